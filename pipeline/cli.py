"""The ``rdma-pipeline`` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``main(args) -> int``;
``COMMANDS`` maps names to those modules. Command modules keep heavy imports inside ``main`` so
that ``--help`` stays fast. Errors of the ``MigrationError`` tree print as one line and exit 2,
unless ``--debug`` asks for the traceback. SIGINT (and, for ``run``, ``migrate`` and
``incoming``, SIGTERM and SIGHUP: ``cmd_common.StopSignals``) cancels: one line, ``cancelled:
SIGTERM``, and the exit code a shell expects of a signal, 128 + its number.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from pipeline import __version__
from pipeline.cmd_common import say, signal_exit_code, signal_name
from shm.errors import MigrationError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "decode": ("pipeline.decode_cmd", "decode control messages or private data from hex"),
    "run": ("pipeline.run_cmd", "a whole live migration on this machine (soft provider)"),
    "migrate": ("pipeline.migrate_cmd", "migrate a synthetic guest to rdma:HOST:PORT"),
    "incoming": ("pipeline.incoming_cmd", "receive a migration on rdma:HOST:PORT"),
    "vm": ("pipeline.vm_cmd", "a guest that runs until told otherwise, with a QMP monitor"),
    "cleanup": ("pipeline.cleanup_cmd", "remove shared memory left by killed runs"),
    "bench": ("pipeline.bench_cmd", "per-stage and end-to-end benchmarks against baselines"),
    "selftest": ("pipeline.selftest_cmd", "check the verbs transport on this RDMA device"),
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdma-pipeline",
        description="Live-migrate VM RAM with QEMU's RDMA migration protocol.",
    )
    parser.add_argument("--version", action="version", version=f"rdma-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args._main(args) or 0)
    except MigrationError as exc:
        if args.debug:
            raise
        print(f"rdma-pipeline {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        # Ctrl-C, or (run, migrate, incoming) SIGTERM or SIGHUP while the command was starting:
        # what it started is released already (its ``with`` blocks), as after a cancel.
        signum = getattr(exc, "signum", signal.SIGINT)
        say(f"rdma-pipeline {args.command}: cancelled: {signal_name(signum)}")
        return signal_exit_code(signum)
