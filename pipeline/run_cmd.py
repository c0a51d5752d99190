"""``rdma-pipeline run``: a whole live migration on this machine (guest, source, destination)."""

from __future__ import annotations

import sys

from pipeline.cmd_common import (
    Interrupted,
    Progress,
    StopSignals,
    add_guest_options,
    add_migration_options,
    add_watch_option,
    build_config,
    check_transport,
    conclude,
    guest_spec,
)


def add_arguments(p) -> None:
    add_guest_options(p)
    add_watch_option(p, 0.5)
    add_migration_options(p, source=True)
    p.add_argument("--uri", default="rdma:", metavar="SCHEME:",
                   help="rdma: (default: RDMA WRITEs, soft provider) or tcp: (pages inline in "
                        "the stream over a plain socket); host and port are chosen here")


def main(args) -> int:
    from pipeline.api import LocalRun
    from pipeline.config import parse_size
    from shm.memory import PAGE_SIZE

    try:
        scheme, _, rest = args.uri.partition(":")
        if scheme not in ("rdma", "tcp"):
            raise ValueError(f"--uri {args.uri}: use rdma: or tcp:")
        if rest:
            raise ValueError(f"--uri {args.uri}: run picks the host and port itself (127.0.0.1 "
                             f"and a free port); give only the scheme, {scheme}: (to use a "
                             "host and port, run 'incoming' there and 'migrate' here)")
        check_transport(args.transport, scheme)
        config = build_config(args)
        spec = guest_spec(args)
        ram = parse_size(args.ram)
        if ram <= 0 or ram % PAGE_SIZE:
            raise ValueError(f"--ram {args.ram}: must be a positive multiple of 4K")
    except ValueError as exc:
        print(f"rdma-pipeline run: {exc}", file=sys.stderr)
        return 2
    progress = Progress(not args.json)
    with StopSignals("run") as signals:
        try:
            with LocalRun(ram, config, state=spec.state, fill=spec.fill, guest=spec,
                          guest_watch=max(0.0, args.guest_watch), scheme=scheme) as lr:
                try:
                    with signals.starting():
                        mig = lr.start()
                except Interrupted:
                    _cancel_destination(lr)     # it would wait for a source forever
                    raise
                while not mig.done:
                    progress(mig.stats())
                    mig.finished(0.2)
                summary = lr.finish()
        finally:
            progress.done()
        code = signals.report(summary)
    return conclude("run", summary, args.json, code)


def _cancel_destination(lr) -> None:
    from shm.errors import StageFailed

    if lr.dest is not None and lr.dest.pid is not None:
        try:
            lr.dest.send("cancel")
        except StageFailed:
            pass
