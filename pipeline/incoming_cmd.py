"""``rdma-pipeline incoming rdma:HOST:PORT``: receive one migration, verify, resume.

It waits for a source as long as QEMU's ``-incoming`` does, forever, unless ``--timeout`` says
otherwise, and says "listening on" only once it listens (the port is the one bound, so
``rdma:HOST:0`` reports the port the kernel chose).
"""

from __future__ import annotations

import math
import sys

from pipeline.cmd_common import (
    Progress,
    StopSignals,
    add_dump_option,
    add_migration_options,
    add_watch_option,
    build_config,
    conclude,
    say,
)


def add_arguments(p) -> None:
    p.add_argument("uri", help="where to listen, rdma:HOST:PORT or tcp:HOST:PORT; or file:PATH, "
                               "a snapshot to restore; with --qmp, defer: wait for "
                               "migrate-incoming")
    p.add_argument("--ram", default=None,
                   help="this side's pc.ram size; the source's must match (default: take the "
                        "block list from the source)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="fail if no source connects within SECONDS (default: wait forever, as "
                        "QEMU does)")
    add_watch_option(p, 0.0)
    add_migration_options(p, source=False)
    add_dump_option(p, "the RAM received, and DIR/devices.json (each device section, decoded "
                       "as the stream's VMDESCRIPTION describes it),")
    p.add_argument("--qmp", metavar="unix:PATH|tcp:HOST:PORT",
                   help="serve a QMP monitor there, as qemu -incoming does: the guest runs on "
                        "after the migration until 'quit'")


def main(args) -> int:
    if args.qmp:
        from pipeline.vm_cmd import incoming_main

        return incoming_main(args)
    if args.uri == "defer":
        print("rdma-pipeline incoming: defer waits for a monitor's migrate-incoming: add "
              "--qmp unix:PATH", file=sys.stderr)
        return 2
    from pipeline.api import start_incoming
    from pipeline.config import parse_size
    from pipeline.guest.synthetic import SyntheticGuest
    from pipeline.uri import parse_uri

    try:
        uri = parse_uri(args.uri)
        config = build_config(args)
        blocks = None
        if args.ram and args.machine == "none":
            blocks = [("ram", parse_size(args.ram))]          # QEMU's -M none -m RAM
        elif args.ram:
            blocks = [("pc.ram", parse_size(args.ram)), SyntheticGuest.SECOND_BLOCK]
        if args.timeout is not None and not args.timeout > 0:
            raise ValueError(f"--timeout {args.timeout:g}: must be a number of seconds > 0")
    except ValueError as exc:
        print(f"rdma-pipeline incoming: {exc}", file=sys.stderr)
        return 2

    def listening(port: int) -> None:
        say(f"listening on {uri.scheme}:{uri.host}:{port}")

    with StopSignals("incoming") as signals:
        with signals.starting():
            mig = start_incoming(uri, config, blocks=blocks,
                                 guest_watch=max(0.0, args.guest_watch),
                                 accept_timeout=math.inf if args.timeout is None
                                 else args.timeout, on_listening=listening,
                                 dump_dir=args.dump)
        progress = Progress(not args.json, destination=True)
        try:
            while not mig.done:
                progress(mig.stats())
                mig.finished(0.2)
        finally:
            progress.done()
        summary = mig.wait()
        if uri.scheme == "file" and mig.error is not None and signals.signum is None:
            raise mig.error    # a file refused: one line saying where and what, exit 2
        code = signals.report(summary)
    return conclude("incoming", summary, args.json, code)

