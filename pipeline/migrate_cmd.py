"""``rdma-pipeline migrate rdma:HOST:PORT``: start a guest here (synthetic or KVM), migrate it."""

from __future__ import annotations

import sys

from pipeline.cmd_common import (
    Progress,
    StopSignals,
    add_dump_option,
    add_guest_options,
    add_migration_options,
    build_config,
    check_transport,
    conclude,
    guest_blocks,
    guest_spec,
    resolve_host,
    say,
)


def add_arguments(p) -> None:
    p.add_argument("uri", help="the destination: rdma:HOST:PORT, tcp:HOST:PORT (pages inline "
                               "over a socket) or file:PATH (a snapshot of the paused guest)")
    add_guest_options(p)
    add_migration_options(p, source=True)
    add_dump_option(p, "the guest's RAM as paused")


def main(args) -> int:
    from pipeline.api import start_outgoing
    from pipeline.config import parse_size
    from pipeline.source_pipeline import prestart
    from pipeline.uri import parse_uri
    from shm.naming import new_run_id
    from stages.harness import discard_spares

    try:
        uri = parse_uri(args.uri)
        check_transport(args.transport, uri.scheme)
        resolve_host(uri)
        config = build_config(args)
        spec = guest_spec(args)
        ram = parse_size(args.ram)
    except ValueError as exc:
        print(f"rdma-pipeline migrate: {exc}", file=sys.stderr)
        return 2
    run_id = new_run_id()
    progress = Progress(not args.json)
    with StopSignals("migrate") as signals:
        try:
            with signals.starting():
                if uri.scheme == "rdma":     # stage interpreters start while the guest boots
                    prestart()
                guest = spec.create(ram, run_id=run_id, chunk_size=config.chunk_size,
                                    blocks=guest_blocks(args.machine, ram))
            with guest:
                with signals.starting():
                    guest.start()
                    mig = start_outgoing(uri, guest, config, run_id=run_id)
                while not mig.done:
                    progress(mig.stats())
                    mig.finished(0.2)
                summary = mig.wait()
                if args.dump and summary["status"] == "completed":
                    _dump(args.dump, guest, summary)
        finally:
            discard_spares()
            progress.done()
        code = signals.report(summary)
    return conclude("migrate", summary, args.json, code)


def _dump(directory: str, guest, summary: dict) -> None:
    """The RAM as the migration left it: paused, never resumed after the commit point."""
    from pipeline.dump import write_dump

    try:
        write_dump(directory, [(b.idstr, b.view) for b in guest.region.blocks])
    except OSError as exc:
        summary["warning"] = f"--dump {directory}: {exc.strerror or exc}"
        say(f"rdma-pipeline migrate: {summary['warning']}")
