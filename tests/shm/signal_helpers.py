"""A signal that arrives while the test's main thread waits, its handler raising or not."""

from __future__ import annotations

import contextlib
import signal
import threading

from shm.semaphores import raise_from_handler


class Stop(Exception):
    """What the test's handler raises."""


@contextlib.contextmanager
def signal_soon(raises: bool, delay: float = 0.2):
    """SIGUSR1 to this (main) thread after ``delay`` s; its handler raises ``Stop`` (through
    ``raise_from_handler``, as a stage's SIGTERM handler does) or returns. Yields the signals
    handled."""
    def handler(signum, frame):
        calls.append(signum)
        if raises:
            raise_from_handler(Stop("stop"))

    calls: list[int] = []
    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(delay, signal.pthread_kill,
                            (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        yield calls
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)
