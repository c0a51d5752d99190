"""Completion queue of the soft provider.

Invariant: the eventfd is readable exactly when the queue holds a completion (written when the
queue becomes non-empty, drained when a poll empties it), so callers can select() on several
CQs at once and a readable fd never means a spin. A send-queue or receive-queue slot is freed
when the completion that retires it is polled, as on hardware; a completion therefore carries the
QP and how many slots it retires (a signaled WR also retires the unsignaled ones before it).
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from shm.errors import TransportError
from stages.verbs.base import CQ, WorkCompletion, closed_error

if TYPE_CHECKING:
    from stages.verbs.soft.qp import SoftQP


class SoftCQ(CQ):
    """A CQ holding up to ``depth`` completions; more is a fatal overrun, as in verbs."""

    def __init__(self, context, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"CQ depth must be at least 1, not {depth}")
        self.context = context
        self.depth = depth
        self._lock = threading.Lock()
        self._items: deque[tuple[WorkCompletion, SoftQP, bool, int]] = deque()
        self._overrun = False
        self._qps: set[SoftQP] = set()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- called by QPs, under the QP's lock ----------------------------------------------
    def _push(self, wc: WorkCompletion, qp: SoftQP, is_send: bool, retire: int) -> None:
        with self._lock:
            if self._closed:
                return
            if len(self._items) >= self.depth:
                self._overrun = True
            self._items.append((wc, qp, is_send, retire))
            if len(self._items) == 1:
                os.eventfd_write(self._efd, 1)

    def _push_many(self, items: list) -> None:
        """``_push`` for several ``(wc, qp, is_send, retire)`` items at once, in order."""
        if not items:
            return
        with self._lock:
            if self._closed:
                return
            was_empty = not self._items
            if len(self._items) + len(items) > self.depth:
                self._overrun = True
            self._items.extend(items)
            if was_empty:
                os.eventfd_write(self._efd, 1)

    def _attach(self, qp: SoftQP) -> None:
        with self._lock:
            if self._closed:
                raise closed_error("CQ")
            self._qps.add(qp)

    def _detach(self, qp: SoftQP) -> None:
        with self._lock:
            self._qps.discard(qp)

    # -- public --------------------------------------------------------------------------
    def poll(self, n: int = 16) -> list[WorkCompletion]:
        with self._lock:
            if self._closed:
                raise closed_error("CQ")
            if self._overrun:
                raise TransportError(f"completion queue overrun (depth {self.depth})",
                                     errno=errno.EOVERFLOW,
                                     hint="create the CQ deeper or poll it more often")
            items = self._items
            if n >= len(items):
                taken = list(items)
                items.clear()
            else:
                taken = [items.popleft() for _ in range(n)]
            if taken and not items:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
        retired: dict = {}  # one QP lock round trip per queue, not per completion
        for _wc, qp, is_send, retire in taken:
            retired[qp, is_send] = retired.get((qp, is_send), 0) + retire
        for (qp, is_send), count in retired.items():
            qp._retire(is_send, count)
        return [item[0] for item in taken]

    def fileno(self) -> int:
        if self._closed:
            raise closed_error("CQ")
        return self._efd

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise closed_error("CQ")
            if self._items:
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._efd], [], [], left)
            if not readable and deadline is not None and time.monotonic() >= deadline:
                return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._qps:
                raise TransportError(f"CQ is still used by {len(self._qps)} QP(s); close them "
                                     "first", errno=errno.EBUSY)
            self._closed = True
            self._items.clear()
        os.close(self._efd)
        self.context._forget(self)
