import signal
import time

import pytest
from signal_helpers import Stop, signal_soon

from shm.errors import ShmError
from shm.naming import new_run_id, segment_name
from shm.semaphores import (
    attach_semaphores,
    close_semaphores,
    create_semaphores,
    unlink_semaphores,
    wait,
)


def test_create_attach_unlink():
    name = segment_name(new_run_id(), "sems")
    sems = create_semaphores(name, ("a", "b"))
    try:
        others = attach_semaphores(name, ("a", "b"), "test object")
        sems[0].release()
        others[0].acquire(0)        # the same semaphore: the token crossed
        close_semaphores(others)
    finally:
        close_semaphores(sems)
        unlink_semaphores(name, ("a", "b"))
    with pytest.raises(ShmError, match="test object .* has no semaphore"):
        attach_semaphores(name, ("a", "b"), "test object")


def test_create_is_exclusive_and_a_failure_leaves_the_others_alone():
    name = segment_name(new_run_id(), "sems")
    first = create_semaphores(name, ("b",))
    try:
        # "a" is created, then "b" exists: "a" is removed again, "b" (someone else's) stays.
        with pytest.raises(ShmError, match="already exists"):
            create_semaphores(name, ("a", "b"))
        with pytest.raises(ShmError, match="has no semaphore"):
            attach_semaphores(name, ("a",), "test object")
        close_semaphores(attach_semaphores(name, ("b",), "test object"))
    finally:
        close_semaphores(first)
        unlink_semaphores(name, ("b",))


@pytest.fixture
def sem():
    name = segment_name(new_run_id(), "sems")
    sems = create_semaphores(name, ("a",))
    yield sems[0]
    close_semaphores(sems)
    unlink_semaphores(name, ("a",))


def test_wait_takes_a_token_or_times_out(sem):
    sem.release()
    assert wait(sem, 0) is True
    assert wait(sem, 0.01) is False


def test_wait_raises_what_a_signal_handler_raised(sem):
    """posix_ipc turns the handler's exception into SignalError: wait() must not lose it."""
    t0 = time.monotonic()
    with signal_soon(raises=True), pytest.raises(Stop):
        wait(sem, 10)
    assert time.monotonic() - t0 < 5


def test_wait_returns_after_a_handler_that_did_not_raise(sem):
    with signal_soon(raises=False) as calls:
        assert wait(sem, 10) is False        # the caller looks again
    assert calls == [signal.SIGUSR1]
