"""The destination's monitor (``rdma-pipeline incoming URI|defer --qmp``), like
``qemu -incoming``: it listens at once for a URI, or waits for ``migrate-incoming`` after
``defer``. Its run state is ``inmigrate`` until the migration completes; then the guest runs
(``running``, RESUME), or stays ``paused`` when ``stop`` came before, and it keeps running
until ``quit``. As QEMU's, a destination whose migration failed or was cancelled ends (exit
code 1) once MIGRATION has said so: there is no guest to run.
"""

from __future__ import annotations

from pipeline.qmp import info
from pipeline.qmp.machine import MIGRATE_ARGS, Machine, command_table, guard
from pipeline.qmp.protocol import QmpError


class DestinationMachine(Machine):
    runstate = "inmigrate"

    def __init__(self, server, settings, *, blocks=None, say=lambda line: None) -> None:
        super().__init__(server, settings)
        self.blocks = blocks
        self.say = say
        self.autostart = True
        self.address = ""           # where it listens, once it does
        self.summary: dict | None = None

    def start(self, uri: str) -> None:
        """Listen at ``uri`` and receive one migration (QmpError if it cannot start)."""
        from pipeline.api import start_incoming
        from pipeline.uri import parse_uri

        target = guard(lambda: parse_uri(uri), "Parameter 'uri'")
        if target.scheme == "file":
            raise QmpError("rdma-pipeline restores file: snapshots with 'incoming file:PATH', "
                           "not through a monitor")
        config = self.settings.config()
        self.migration_event("setup")

        def listening(port: int) -> None:
            self.server.call_soon(self._listening, target, port)

        self.launch(lambda: start_incoming(target, config, blocks=self.blocks, keep_guest=True,
                                           on_listening=listening))

    def _listening(self, target, port: int) -> None:
        host = f"[{target.host}]" if ":" in target.host else target.host
        self.address = f"{target.scheme}:{host}:{port}"
        self.say(f"listening on {self.address}")

    def listening(self) -> str:
        return self.address if self.status == "setup" else ""

    def state_changed(self, mig, state: str) -> None:
        if mig is self.mig and state not in ("setup", "completed", "failed", "cancelled") \
                and state != self.status:
            self.migration_event(state)

    def finished(self, mig, summary: dict) -> None:
        self.summary = summary
        status = summary["status"]
        if status == "completed":
            if self.autostart:
                self.runstate = "running"
                self.event("RESUME")
            else:
                self._pause_guest()
                self.runstate = "paused"
        else:
            self.error = summary.get("error-desc") or (str(mig.error) if mig.error else "")
            status = status if status in ("failed", "cancelled") else "failed"
            self.exit_code = 1
        self.migration_event(status)
        if self.on_finished is not None:
            self.on_finished(summary)
        if status != "completed":
            self.say(f"rdma-pipeline incoming: migration {status}: {self.error or status}")
            self.runstate = "shutdown"
            self.server.stop()

    # -- the kept guest -------------------------------------------------------------------
    def _guest_request(self, op: str) -> None:
        guest = getattr(self.mig.incoming, "guest", None) if self.mig else None
        if guest is None:
            raise QmpError("there is no guest running here")
        guard(lambda: (guest.process.send(op), guest.process.recv(10.0, what=op)), op)

    def _pause_guest(self) -> None:
        try:
            self._guest_request("pause")
        except QmpError as exc:
            self.say(f"rdma-pipeline incoming: {exc.desc}")

    # -- commands -------------------------------------------------------------------------
    def _stop(self, args) -> dict:
        if self.runstate == "inmigrate":
            self.autostart = False          # QEMU's rule: the guest will not start after
        elif self.runstate == "running":
            self._guest_request("pause")
            self.runstate = "paused"
            self.event("STOP")
        return {}

    def _cont(self, args) -> dict:
        if self.runstate == "inmigrate":
            self.autostart = True
        elif self.runstate == "paused":
            self._guest_request("resume")
            self.runstate = "running"
            self.event("RESUME")
        return {}

    def _migrate_incoming(self, args) -> dict:
        if self.runstate != "inmigrate":
            raise QmpError("'-incoming' was not specified on the command line")
        if self.mig is not None or self.status != "none":
            raise QmpError("The incoming migration has already been started")
        self.start(args["uri"])
        return {}

    def _migrate(self, args) -> dict:
        if self.runstate == "inmigrate":
            raise QmpError("Guest is waiting for an incoming migration")
        raise QmpError("rdma-pipeline's destination does not migrate on: start a source with "
                       "'rdma-pipeline vm'")

    def _set_capabilities(self, args) -> dict:
        """Any time, as on QEMU's destination (its migration state is the source's business);
        what the stream uses (rdma-pin-all) is the source's choice, sent in its handshake."""
        self.settings.set_capabilities(args["capabilities"])
        return {}

    def query_migrate(self) -> dict:
        return info.destination_query_migrate(self.status, self.listening())

    def close(self) -> None:
        super().close()
        inc = getattr(self.mig, "incoming", None) if self.mig else None
        if inc is not None:
            inc.stop_guest()

    COMMANDS = command_table(**{
        "migrate-set-capabilities": ({"capabilities": ("array", True)}, _set_capabilities),
        "stop": ({}, _stop), "cont": ({}, _cont),
        "migrate-incoming": ({"uri": ("str", True)}, _migrate_incoming),
        "migrate": (MIGRATE_ARGS, _migrate),
    })
