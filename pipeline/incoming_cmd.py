"""``rdma-pipeline incoming rdma:HOST:PORT``: receive one migration, verify, resume."""

from __future__ import annotations

import sys

from pipeline.cmd_common import (
    add_migration_options,
    add_watch_option,
    build_config,
    exit_code,
    print_summary,
)


def add_arguments(p) -> None:
    p.add_argument("uri", help="where to listen, rdma:HOST:PORT or tcp:HOST:PORT; or file:PATH, "
                               "a snapshot to restore")
    p.add_argument("--ram", default=None,
                   help="this side's pc.ram size; the source's must match (default: take the "
                        "block list from the source)")
    add_watch_option(p, 0.0)
    add_migration_options(p, source=False)


def main(args) -> int:
    from pipeline.api import _uri, start_incoming
    from pipeline.config import parse_size
    from pipeline.guest.synthetic import SyntheticGuest

    try:
        uri = _uri(args.uri)
        config = build_config(args)
        blocks = None
        if args.ram:
            blocks = [("pc.ram", parse_size(args.ram)), SyntheticGuest.SECOND_BLOCK]
    except ValueError as exc:
        print(f"rdma-pipeline incoming: {exc}", file=sys.stderr)
        return 2
    if not args.json and uri.scheme != "file":
        print(f"listening on {uri}", file=sys.stderr)
    mig = start_incoming(uri, config, blocks=blocks, guest_watch=max(0.0, args.guest_watch))
    try:
        summary = mig.wait()
    except KeyboardInterrupt:
        mig.cancel()
        summary = mig.wait()
    if uri.scheme == "file" and mig.error is not None:
        raise mig.error        # a file refused: one line saying where and what, exit 2
    print_summary(summary, args.json)
    return exit_code(summary)
