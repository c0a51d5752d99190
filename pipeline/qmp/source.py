"""The source's monitor (``rdma-pipeline vm --qmp``): a guest that runs until told otherwise,
migrated by ``migrate``, paused by ``stop``, resumed by ``cont``.

``migrate`` returns at once, as QEMU's does: the URI and the settings are checked first (a
GenericError for a malformed URI), the status is ``setup`` (and MIGRATION says so) before the
answer goes out, and the migration runs in ``pipeline.api``'s worker thread. A destination that
cannot be reached is a ``failed`` migration with its ``error-desc``, as in QEMU. The guest must
be running to be migrated (ours cannot migrate a paused guest: ``cont`` first).
"""

from __future__ import annotations

from pipeline.qmp import info
from pipeline.qmp.machine import IN_PROGRESS, MIGRATE_ARGS, Machine, command_table, guard
from pipeline.qmp.protocol import QmpError


class SourceMachine(Machine):
    """A started guest (synthetic or KVM) behind a monitor."""

    def __init__(self, server, settings, guest, *, run_id: str) -> None:
        super().__init__(server, settings)
        self.guest = guest
        self.run_id = run_id
        self.summary: dict | None = None

    # -- run state ------------------------------------------------------------------------
    def _stop(self, args) -> dict:
        if self.status in IN_PROGRESS:
            raise QmpError("rdma-pipeline pauses the guest itself during a migration: "
                           "migrate_cancel first")
        if self.runstate == "running":
            guard(self.guest.pause, "stop")
            self.runstate = "paused"
            self.event("STOP")
        return {}

    def _cont(self, args) -> dict:
        if self.status in IN_PROGRESS:
            raise QmpError("a migration is in progress: wait for it or migrate_cancel")
        if self.runstate in ("paused", "postmigrate"):
            guard(self.guest.resume, "cont")
            self.runstate = "running"
            self.event("RESUME")
        return {}

    # -- migration ------------------------------------------------------------------------
    def _migrate(self, args) -> dict:
        from pipeline.api import start_outgoing
        from pipeline.uri import parse_uri

        if self.status in IN_PROGRESS:
            raise QmpError("There's a migration process in progress")
        if args.get("resume"):
            raise QmpError("rdma-pipeline has no postcopy to resume")
        if args.get("blk") or args.get("inc"):
            raise QmpError("rdma-pipeline migrates RAM and device state, no block devices")
        if self.runstate != "running":
            raise QmpError(f"the guest is {self.runstate}: rdma-pipeline migrates a running "
                           "guest (cont first)")
        uri = guard(lambda: parse_uri(args["uri"]), "Parameter 'uri'")
        config = self.settings.config()
        self.summary = None
        self.error = ""
        self.migration_event("setup")
        self.launch(lambda: start_outgoing(uri, self.guest, config, run_id=self.run_id,
                                           on_pass=self._pass_from_worker))
        return {}

    def _pass_from_worker(self, n: int) -> None:
        self.server.call_soon(self._pass, n)

    def _pass(self, n: int) -> None:
        if self.settings.events and self.status in IN_PROGRESS:
            self.event("MIGRATION_PASS", {"pass": n})

    def state_changed(self, mig, state: str) -> None:
        if mig is not self.mig or state in FINAL_OR_SETUP:
            return
        if state == "device":                       # the guest is paused for the last pass
            self.status = "device"
            self.runstate = "finish-migrate"
            self.event("STOP")
            return
        if state != self.status:
            self.migration_event(state)

    def finished(self, mig, summary: dict) -> None:
        if mig is not self.mig:
            return
        self.summary = summary
        status = summary["status"]
        if status == "completed":
            self.runstate = "postmigrate"
        else:
            self.error = summary.get("error-desc") or (str(mig.error) if mig.error else "")
            if self.runstate == "finish-migrate":   # the session resumed the guest
                self.runstate = "running"
                self.event("RESUME")
            if status not in ("failed", "cancelled"):
                status = "failed"
        self.migration_event(status)
        if self.on_finished is not None:
            self.on_finished(summary)

    def query_migrate(self) -> dict:
        if self.status == "none":
            return {}
        snap = self.summary if self.summary is not None else (
            self.mig.stats() if self.mig is not None else None)
        return info.source_query_migrate(self.status, snap or {}, self.error)

    def close(self) -> None:
        super().close()
        self.guest.close()

    COMMANDS = command_table(**{
        "stop": ({}, _stop), "cont": ({}, _cont), "migrate": (MIGRATE_ARGS, _migrate),
        "migrate-incoming": ({"uri": ("str", True)}, lambda self, args: _no_incoming()),
    })


FINAL_OR_SETUP = ("setup", "completed", "failed", "cancelled")


def _no_incoming():
    raise QmpError("'-incoming' was not specified on the command line")
