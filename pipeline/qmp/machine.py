"""The machine a QMP monitor drives: run state, migration settings, one migration at a time.

Everything here runs on the monitor's thread (``MonitorServer.call_soon`` brings the
migration's callbacks there), so no state needs a lock. ``COMMANDS`` maps each command to its
arguments (``name -> (type, required)``) and its method; ``dispatch`` checks the arguments
with QEMU's words, then calls it.

Run states and events follow QEMU: a source is ``running``; ``finish-migrate`` (STOP) while
its guest is paused for the last pass; ``postmigrate`` after a completed migration, and back
to ``running`` (RESUME) after a failed or cancelled one. A destination is ``inmigrate`` until
its migration completes, then ``running`` (RESUME); ``stop`` before that keeps it ``paused``.
MIGRATION and MIGRATION_PASS are sent only while the ``events`` capability is on.
A migration's final state is announced once its worker has ended (``Migration.wait``), so
that ``query-migrate`` then has the final figures and the reason of a failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pipeline import __version__
from pipeline.qmp import info
from pipeline.qmp.protocol import NOT_FOUND, QEMU_VERSION, QmpError, Request
from pipeline.qmp.settings import MigrationSettings, check_value
from shm.errors import MigrationError

IN_PROGRESS = ("setup", "active", "device", "cancelling")
FINAL = ("completed", "failed", "cancelled")


def check_arguments(spec: dict[str, tuple[str, bool]], args: dict) -> None:
    for name in args:
        if name not in spec:
            raise QmpError(f"Parameter '{name}' is unexpected")
    for name, (kind, required) in spec.items():
        if name in args:
            check_value(name, kind, args[name])
        elif required:
            raise QmpError(f"Parameter '{name}' is missing")


class Machine:
    """What a source and a destination monitor share."""

    runstate = "running"

    def __init__(self, server, settings: MigrationSettings) -> None:
        self.server = server
        self.settings = settings
        self.mig = None                     # pipeline.api.Migration, the last one started
        self.status = "none"                # its QEMU status, as this monitor announced it
        self.error = ""
        self.exit_code = 0
        self.on_finished: Callable[[dict], None] | None = None   # e.g. the terminal's summary

    # -- dispatch -------------------------------------------------------------------------
    def dispatch(self, req: Request) -> object:
        entry = self.COMMANDS.get(req.execute)
        if entry is None:
            raise QmpError(f"The command {req.execute} has not been found", NOT_FOUND)
        spec, method = entry
        if spec is not None:
            check_arguments(spec, req.arguments)
        return method(self, req.arguments)

    def event(self, name: str, data: dict | None = None) -> None:
        self.server.broadcast(name, data)

    def migration_event(self, status: str) -> None:
        self.status = status
        if self.settings.events:
            self.event("MIGRATION", {"status": status})

    def launch(self, start: Callable[[], object]) -> None:
        """Start a migration (``start()`` returns it) and watch it; a refusal is the command's
        error and a failed MIGRATION event, as QEMU answers."""
        try:
            mig = start()
        except (MigrationError, ValueError) as exc:
            self.error = str(exc)
            self.migration_event("failed")
            raise QmpError(str(exc)) from None
        self.mig = mig
        self.watch(mig)

    def watch(self, mig) -> None:
        """Have ``finished`` run on the monitor's thread once ``mig``'s worker has ended."""
        mig.subscribe(lambda state, reason: self.server.call_soon(self.state_changed, mig,
                                                                  state))

        def wait() -> None:
            summary = mig.wait()
            self.server.call_soon(self.finished, mig, summary)

        threading.Thread(target=wait, name="qmp-watch", daemon=True).start()

    def state_changed(self, mig, state: str) -> None:
        raise NotImplementedError

    def finished(self, mig, summary: dict) -> None:
        raise NotImplementedError

    # -- commands both sides have ---------------------------------------------------------
    def _query_status(self, args) -> dict:
        return info.query_status(self.runstate)

    def _quit(self, args) -> dict:
        self.shutdown("host-qmp-quit")
        return {}

    def shutdown(self, reason: str) -> None:
        """SHUTDOWN, then the monitor stops (``quit``, or a signal: ``host-signal``)."""
        self.runstate = "shutdown"
        self.event("SHUTDOWN", {"guest": False, "reason": reason})
        self.server.stop()

    def _set_capabilities(self, args) -> dict:
        if self.status in IN_PROGRESS:
            raise QmpError("There's a migration process in progress")
        self.settings.set_capabilities(args["capabilities"])
        return {}

    def _query_capabilities(self, args) -> list:
        return self.settings.query_capabilities()

    def _set_parameters(self, args) -> dict:
        if self.status in IN_PROGRESS:
            raise QmpError("rdma-pipeline fixes a migration's parameters when it starts: set "
                           "them before migrate")
        self.settings.set_parameters(args)
        return {}

    def _query_parameters(self, args) -> dict:
        return self.settings.query_parameters()

    def _query_version(self, args) -> dict:
        return {"qemu": dict(QEMU_VERSION), "package": f"rdma-pipeline {__version__}"}

    def _query_commands(self, args) -> list:
        return [{"name": name} for name in ("qmp_capabilities", *self.COMMANDS)]

    def query_migrate(self) -> dict:
        raise NotImplementedError

    def _query_migrate(self, args) -> dict:
        return self.query_migrate()

    def listening(self) -> str:
        return ""

    def _hmp(self, args) -> str:
        line = args["command-line"].strip()
        words = line.split()
        if words == ["info", "status"]:
            return info.hmp_info_status(self.runstate)
        if words == ["info", "migrate"]:
            return info.hmp_info_migrate(self.query_migrate(), self.listening())
        return f"unknown command: '{line}'\r\n"

    def _migrate_cancel(self, args) -> dict:
        if self.mig is not None and self.status in IN_PROGRESS:
            self.mig.cancel()
        return {}

    def close(self) -> None:
        """Cancel a migration still running and wait for it to release what it holds."""
        if self.mig is not None and not self.mig.done:
            self.mig.cancel()
            self.mig.finished(30.0)

    COMMANDS: dict[str, tuple[dict | None, Callable]] = {}


COMMON = {
    "query-status": ({}, Machine._query_status),
    "quit": ({}, Machine._quit),
    "migrate-set-capabilities": ({"capabilities": ("array", True)}, Machine._set_capabilities),
    "query-migrate-capabilities": ({}, Machine._query_capabilities),
    "migrate-set-parameters": (None, Machine._set_parameters),
    "query-migrate-parameters": ({}, Machine._query_parameters),
    "query-migrate": ({}, Machine._query_migrate),
    "migrate_cancel": ({}, Machine._migrate_cancel),
    "human-monitor-command": ({"command-line": ("str", True), "cpu-index": ("uint64", False)},
                              Machine._hmp),
    "query-version": ({}, Machine._query_version),
    "query-commands": ({}, Machine._query_commands),
}
MIGRATE_ARGS = {"uri": ("str", True), "blk": ("bool", False), "inc": ("bool", False),
                "detach": ("bool", False), "resume": ("bool", False)}


def command_table(**own: tuple[dict | None, Callable]) -> dict[str, tuple[dict | None,
                                                                         Callable]]:
    """The commands both sides have, plus ``own`` (a spec of None: the method checks its
    arguments itself)."""
    return {**COMMON, **own}


def guard(fn: Callable[[], object], what: str) -> object:
    """Run ``fn``; a ``MigrationError`` or ``ValueError`` becomes a GenericError saying what."""
    try:
        return fn()
    except (MigrationError, ValueError) as exc:
        raise QmpError(f"{what}: {exc}") from None
