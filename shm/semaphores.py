"""Named POSIX semaphores that belong to a segment: created, attached, unlinked together.

A ring and a dirty log each pair one segment with two semaphores named after it
(``<segment>.<suffix>``, so ``sweep`` finds them as ``/dev/shm/sem.<segment>.<suffix>``). The
segment's owner creates them exclusively and alone unlinks them; attachers open and close. A
creation or attach that fails half-way leaves nothing behind.

Every wait on one goes through ``wait``, which never swallows a signal: posix_ipc runs Python's
signal handlers inside ``acquire`` and then replaces whatever a handler raised with
``SignalError``, so a stage told to stop (its SIGTERM handler raises) would sleep on. A handler
that raises through ``raise_from_handler`` leaves its exception where ``wait`` finds it and
raises it again.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar, NoReturn

import posix_ipc

from shm.errors import ShmError

# (count, thread ident, exception) of the last exception a handler raised via raise_from_handler
_raised: tuple[int, int, BaseException | None] = (0, 0, None)


def raise_from_handler(exc: BaseException) -> NoReturn:
    """Raise ``exc`` from a signal handler, so that a semaphore ``wait`` the signal interrupted
    raises it too instead of posix_ipc's ``SignalError``."""
    global _raised
    _raised = (_raised[0] + 1, threading.get_ident(), exc)
    raise exc


def wait(sem: posix_ipc.Semaphore, timeout: float | None) -> bool:
    """Take a token of ``sem`` within ``timeout`` seconds (None: no limit). True if taken; False
    at the timeout, or after a signal whose handler returned (the caller looks again). What a
    handler raised through ``raise_from_handler`` during the wait is raised here."""
    before = _raised[0]
    try:
        sem.acquire(timeout)
    except posix_ipc.BusyError:
        return False
    except posix_ipc.SignalError:
        count, thread, exc = _raised
        if count != before and thread == threading.get_ident() and exc is not None:
            raise exc from None
        return False
    return True


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
