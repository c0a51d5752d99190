"""``rdma-pipeline cleanup``: remove the shared memory and semaphores of dead runs.

Every object's name carries its owner's pid (``/rdp-<run_id>-<pid>-<kind>``); an object whose
owner no longer lives was left by a process that was killed before it could unlink. Objects of
live owners are never touched, so this is safe to run while migrations are in progress.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be removed, remove nothing")
    parser.add_argument("--run-id", metavar="ID", help="only objects of this run")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also list the objects kept because their owner is alive")


def main(args: argparse.Namespace) -> int:
    from shm import naming

    entries = naming.list_entries(args.run_id)
    removed = kept = failed = 0
    for entry in entries:
        what = "semaphore" if entry.semaphore else "segment"
        if entry.owner_alive:
            kept += 1
            if args.verbose:
                print(f"kept {entry.path} ({what} of live pid {entry.name.pid})")
            continue
        if args.dry_run:
            print(f"would remove {entry.path} ({what} of dead pid {entry.name.pid})")
            removed += 1
            continue
        try:
            if naming.remove_entry(entry):
                print(f"removed {entry.path} ({what} of dead pid {entry.name.pid})")
                removed += 1
        except OSError as exc:
            print(f"cannot remove {entry.path}: {exc.strerror}")
            failed += 1
    verb = "would remove" if args.dry_run else "removed"
    summary = f"{verb} {removed}, kept {kept} of live owners"
    if failed:
        summary += f", {failed} could not be removed (try as their owner or root)"
    print(summary)
    return 1 if failed else 0
