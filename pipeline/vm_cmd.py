"""``rdma-pipeline vm --qmp unix:PATH|tcp:HOST:PORT``: a guest that runs until told otherwise,
driven through a QMP monitor as QEMU is (``migrate``, ``query-migrate``, ``stop``, ``cont``,
``quit`` ...; see ``pipeline.qmp``). It says where the monitor listens on stderr once it does,
prints each migration's summary on stdout when it ends, and leaves nothing behind on ``quit``.

``incoming_main`` is ``rdma-pipeline incoming URI|defer --qmp ...``: the destination with a
monitor, like ``qemu -incoming``.
"""

from __future__ import annotations

import sys

from pipeline.cmd_common import (
    Progress,
    add_guest_options,
    add_migration_options,
    build_config,
    conclude,
    guest_spec,
    say,
)


def add_arguments(p) -> None:
    p.add_argument("--qmp", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                   help="where the QMP monitor listens (QEMU's -qmp forms; ',server=on,"
                        "wait=off' is accepted: the monitor never waits for a client)")
    add_guest_options(p)
    add_migration_options(p, source=True)


def main(args) -> int:
    from pipeline.config import parse_size
    from pipeline.qmp.run import serve
    from pipeline.qmp.server import MonitorServer, parse_monitor_address
    from pipeline.qmp.settings import MigrationSettings
    from pipeline.qmp.source import SourceMachine
    from shm.naming import new_run_id

    try:
        config = build_config(args)
        spec = guest_spec(args)
        ram = parse_size(args.ram)
        parse_monitor_address(args.qmp)
    except ValueError as exc:
        print(f"rdma-pipeline vm: {exc}", file=sys.stderr)
        return 2
    run_id = new_run_id()
    guest = spec.create(ram, run_id=run_id, chunk_size=config.chunk_size)
    try:
        guest.start()
        machine = None
        server = MonitorServer(args.qmp, lambda req: machine.dispatch(req))
    except BaseException:
        guest.close()
        raise
    machine = SourceMachine(server, MigrationSettings(config), guest, run_id=run_id)
    machine.on_finished = lambda summary: conclude("vm", summary, args.json)
    say(f"rdma-pipeline vm: QMP monitor on {server.address}")
    return serve(machine, server, Progress(not args.json))


def incoming_main(args) -> int:
    """``incoming --qmp``: listen at ``args.uri`` now, or at ``migrate-incoming``'s after
    ``defer``; serve the monitor until ``quit`` (exit 0) or a failed migration (exit 1)."""
    from pipeline.config import parse_size
    from pipeline.guest.synthetic import SyntheticGuest
    from pipeline.qmp.destination import DestinationMachine
    from pipeline.qmp.protocol import QmpError
    from pipeline.qmp.run import serve
    from pipeline.qmp.server import MonitorServer, parse_monitor_address
    from pipeline.qmp.settings import MigrationSettings
    from pipeline.uri import parse_uri

    try:
        config = build_config(args)
        blocks = None
        if args.ram:
            blocks = [("pc.ram", parse_size(args.ram)), SyntheticGuest.SECOND_BLOCK]
        if args.uri != "defer":
            parse_uri(args.uri)
        parse_monitor_address(args.qmp)
        if args.timeout is not None or args.guest_watch:
            raise ValueError("--timeout and --guest-watch do not apply with --qmp: the monitor "
                             "waits for a source as QEMU does, and the guest runs until quit")
    except ValueError as exc:
        print(f"rdma-pipeline incoming: {exc}", file=sys.stderr)
        return 2
    machine = None
    server = MonitorServer(args.qmp, lambda req: machine.dispatch(req))
    machine = DestinationMachine(server, MigrationSettings(config), blocks=blocks, say=say)
    machine.on_finished = lambda summary: (
        conclude("incoming", summary, args.json) if summary["status"] == "completed" else None)
    say(f"rdma-pipeline incoming: QMP monitor on {server.address}")
    if args.uri != "defer":
        try:
            machine.start(args.uri)
        except QmpError as exc:
            server.close()
            print(f"rdma-pipeline incoming: {exc.desc}", file=sys.stderr)
            return 2
    return serve(machine, server, Progress(not args.json, destination=True))
