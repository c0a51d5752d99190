"""Named POSIX semaphores that belong to a segment: created, attached, unlinked together.

A ring and a dirty log each pair one segment with two semaphores named after it
(``<segment>.<suffix>``, so ``sweep`` finds them as ``/dev/shm/sem.<segment>.<suffix>``). The
segment's owner creates them exclusively and alone unlinks them; attachers open and close. A
creation or attach that fails half-way leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import posix_ipc

from shm.errors import ShmError


def semaphore_names(segment: str, suffixes: Sequence[str]) -> list[str]:
    return [f"{segment}.{suffix}" for suffix in suffixes]


def create_semaphores(segment: str, suffixes: Sequence[str]) -> list[posix_ipc.Semaphore]:
    """Create ``<segment>.<suffix>`` for each suffix, at 0, exclusively; ShmError if one exists."""
    sems: list[posix_ipc.Semaphore] = []
    try:
        for name in semaphore_names(segment, suffixes):
            try:
                sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0))
            except posix_ipc.ExistentialError as exc:
                raise ShmError(f"semaphore {name} already exists",
                               hint="`rdma-pipeline cleanup` removes those of dead runs") from exc
    except BaseException:
        for sem in sems:
            sem.unlink()
            sem.close()
        raise
    return sems


def attach_semaphores(segment: str, suffixes: Sequence[str],
                      what: str) -> list[posix_ipc.Semaphore]:
    """Open the semaphores of ``segment``; ShmError naming ``what`` if one is missing."""
    sems: list[posix_ipc.Semaphore] = []
    try:
        for name in semaphore_names(segment, suffixes):
            try:
                sems.append(posix_ipc.Semaphore(name))
            except posix_ipc.ExistentialError as exc:
                raise ShmError(f"{what} {segment} has no semaphore {name}") from exc
    except BaseException:
        close_semaphores(sems)
        raise
    return sems


def close_semaphores(sems: Sequence[posix_ipc.Semaphore]) -> None:
    for sem in sems:
        sem.close()


def unlink_semaphores(segment: str, suffixes: Sequence[str]) -> None:
    """Remove the semaphores of ``segment`` (owner only; those already gone are skipped)."""
    for name in semaphore_names(segment, suffixes):
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass


class SemaphoreSegment:
    """What a segment with semaphores (a ring, a dirty log) does alike: the owner's unlink and
    the context manager. Subclasses set ``SEMAPHORES`` and have ``name``, ``segment`` and
    ``close()``."""

    SEMAPHORES: ClassVar[tuple[str, ...]] = ()
    name: str

    def unlink(self) -> None:
        """Remove the segment and its semaphores (owner only, idempotent)."""
        self.segment.unlink()
        unlink_semaphores(self.name, self.SEMAPHORES)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """Close, and for the owner also unlink."""
        self.close()
        if self.segment.owner:
            self.unlink()
