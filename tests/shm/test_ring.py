"""Rings: round trips between real processes, wraparound, close, dead peers, header checks."""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from signal_helpers import Stop, signal_soon

from shm import naming
from shm.errors import ShmError
from shm.ring import _PRODUCER_PID, CONSUMER, Ring, RingTimeout
from shm.runs import RUN_DTYPE
from shm.segment import PeerGone, Segment

ctx = mp.get_context("spawn")

DTYPES = {
    "u8": np.dtype("<u8"),
    "run": RUN_DTYPE,
    "packed": np.dtype([("a", "u1"), ("b", "<f8"), ("c", "S7"), ("d", "<i2", (3,))]),
    "aligned": np.dtype([("x", "<u4"), ("y", "<u8"), ("z", "u1")], align=True),
}
try:  # the stages' record types, when that layer is there
    from stages import records as _records
except ImportError:  # pragma: no cover
    _records = None
if _records is not None:
    DTYPES.update({f"stages{i}": ring for i, ring in enumerate(_records.RING_KINDS)})

# batch sizes from 1 to 10,000; the ring holds 1000 so big batches wrap and split
BATCHES = [1, 2, 3, 10, 64, 999, 1000, 1001, 4096, 10000, 1, 7, 333]
POP_SIZES = [1, 5, 64, 1000, 10000, 3, 777]
CAPACITY = 1000


def stream(dtype: np.dtype, seed: int, n: int) -> np.ndarray:
    """``n`` records of random bytes: both ends regenerate the same stream from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def produce(rings: list[tuple[str, np.dtype, int]], delay: float) -> None:
    """Child: push each ring's stream in BATCHES, sleeping ``delay`` between batches."""
    for name, dtype, seed in rings:
        with Ring.attach(name, dtype, role="producer") as ring:
            data, pos = stream(dtype, seed, sum(BATCHES)), 0
            for batch in BATCHES:
                ring.push(data[pos:pos + batch], timeout=30)
                pos += batch
                time.sleep(delay)
            ring.close_write()


def consume(rings: list[tuple[str, np.dtype, int]], delay: float) -> None:
    """Child: pop each ring to its end, sleeping ``delay`` between pops; exit 1 on mismatch."""
    for name, dtype, seed in rings:
        with Ring.attach(name, dtype, role="consumer") as ring:
            got = drain(ring, delay)
            if not same(got, stream(dtype, seed, sum(BATCHES))):
                raise SystemExit(f"ring {name}: records differ")


def drain(ring: Ring, delay: float) -> np.ndarray:
    got, i = [], 0
    while True:
        out = ring.pop(POP_SIZES[i % len(POP_SIZES)], timeout=30)
        i += 1
        if out.size == 0:  # concatenate raw bytes: a structured copy would drop padding
            return np.concatenate([g.view(np.uint8) for g in got]).view(ring.dtype)
        assert out.size <= POP_SIZES[(i - 1) % len(POP_SIZES)]
        got.append(out)
        time.sleep(delay)


def join(proc, timeout: float = 30.0) -> int:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return proc.exitcode


@pytest.fixture
def run_id():
    return naming.new_run_id()


@pytest.fixture
def ring_set(run_id):
    """One ring per dtype of DTYPES, with its (name, dtype, seed) for a child; unlinked after."""
    rings = [Ring.create(naming.segment_name(run_id, f"ring.{k}"), dt, CAPACITY)
             for k, dt in DTYPES.items()]
    try:
        yield rings, [(r.name, r.dtype, seed) for seed, r in enumerate(rings)]
    finally:
        for r in rings:
            r.__exit__(None, None, None)


def test_round_trip_slow_consumer(ring_set):
    """Child produces as fast as it can; the test consumes slowly (the producer blocks)."""
    rings, spec = ring_set
    proc = ctx.Process(target=produce, args=(spec, 0.0))
    proc.start()
    try:
        for ring, (_, dtype, seed) in zip(rings, spec, strict=True):
            assert same(drain(ring, 0.0005), stream(dtype, seed, sum(BATCHES)))
            assert ring.at_end
    finally:
        assert join(proc) == 0


def test_round_trip_slow_producer(ring_set):
    """The test produces slowly from here; a child consumes (and blocks on an empty ring)."""
    rings, spec = ring_set
    proc = ctx.Process(target=consume, args=(spec, 0.0))
    proc.start()
    try:
        for ring, (_, dtype, seed) in zip(rings, spec, strict=True):
            data, pos = stream(dtype, seed, sum(BATCHES)), 0
            for batch in BATCHES:
                ring.push(data[pos:pos + batch], timeout=30)
                pos += batch
                time.sleep(0.002)
            ring.close_write()
    finally:
        assert join(proc) == 0


def hang_after_push(name: str, dtype: np.dtype, role: str) -> None:
    """Child: attach as ``role``, move a few records, then sleep until killed."""
    ring = Ring.attach(name, dtype, role=role)
    if role == "producer":
        ring.push(np.zeros(3, dtype))
    else:
        ring.pop(3)
    time.sleep(60)


def kill_later(pid: int, delay: float, when: list[float]) -> threading.Timer:
    def kill():
        when.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
    timer = threading.Timer(delay, kill)
    timer.start()
    return timer


def test_killed_producer_wakes_blocked_consumer(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.k"), RUN_DTYPE, 16,
                     role="consumer") as ring:
        proc = ctx.Process(target=hang_after_push, args=(ring.name, RUN_DTYPE, "producer"))
        proc.start()
        try:
            assert len(ring.pop(10, timeout=30)) == 3
            killed: list[float] = []
            timer = kill_later(proc.pid, 0.3, killed)
            with pytest.raises(PeerGone, match="died"):
                ring.pop(10, timeout=10)
            assert time.monotonic() - killed[0] < 1.5  # a correctness deadline, not a benchmark
            timer.join()
        finally:
            join(proc)


def test_killed_consumer_wakes_blocked_producer(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.k"), RUN_DTYPE, 8,
                     role="producer") as ring:
        proc = ctx.Process(target=hang_after_push, args=(ring.name, RUN_DTYPE, "consumer"))
        proc.start()
        try:
            ring.push(np.zeros(3, RUN_DTYPE), timeout=30)
            deadline = time.monotonic() + 30
            while ring.readable and time.monotonic() < deadline:
                time.sleep(0.01)  # the test waits for the child to take its three records
            ring.push(np.zeros(8, RUN_DTYPE), timeout=10)  # ring now full
            killed: list[float] = []
            timer = kill_later(proc.pid, 0.3, killed)
            with pytest.raises(PeerGone, match="died"):
                ring.push(np.zeros(1, RUN_DTYPE), timeout=10)
            assert time.monotonic() - killed[0] < 1.5
            timer.join()
        finally:
            join(proc)


def own_ring_and_hang(run_id: str, ready) -> None:
    Ring.create(naming.segment_name(run_id, "ring.o"), RUN_DTYPE, 4)
    ready.send(True)
    time.sleep(60)


def test_dead_owner_wakes_consumer_and_sweep_removes_its_ring(run_id):
    ready, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=own_ring_and_hang, args=(run_id, child_end))
    proc.start()
    try:
        assert ready.poll(30) and ready.recv()
        name = naming.segment_name(run_id, "ring.o", pid=proc.pid)
        ring = Ring.attach(name, RUN_DTYPE, role="consumer")
        try:
            proc.kill()
            start = time.monotonic()
            with pytest.raises(PeerGone, match="owner"):
                ring.pop(1, timeout=10)
            assert time.monotonic() - start < 1.5
        finally:
            ring.close()
    finally:
        join(proc)
        removed = naming.sweep(run_id=run_id)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [name[1:], f"sem.{name[1:]}.items", f"sem.{name[1:]}.spaces"])


def test_close_write_ends_stream_after_drain(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.c"), RUN_DTYPE, 4) as prod:
        with Ring.attach(prod.name, RUN_DTYPE, role="consumer") as cons:
            prod.push(np.zeros(3, RUN_DTYPE))
            prod.close_write()
            assert not cons.at_end
            assert len(cons.pop(10, timeout=1)) == 3
            assert cons.pop(10, timeout=1).size == 0
            assert cons.pop(10).size == 0 and cons.at_end
            with pytest.raises(ValueError, match="close_write"):
                prod.push(np.zeros(1, RUN_DTYPE))


def test_producer_leaving_without_close_write_is_peer_gone(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.a"), RUN_DTYPE, 4) as owner:
        prod = Ring.attach(owner.name, RUN_DTYPE, role="producer")
        cons = Ring.attach(owner.name, RUN_DTYPE, role="consumer")
        prod.push(np.zeros(2, RUN_DTYPE))
        prod.close()
        prod.close()  # idempotent
        assert len(cons.pop(10, timeout=1)) == 2  # what was pushed still arrives
        with pytest.raises(PeerGone, match="left"):
            cons.pop(10, timeout=1)
        cons.close()


def test_consumer_leaving_is_peer_gone_for_producer(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.a"), RUN_DTYPE, 4,
                     role="producer") as prod:
        Ring.attach(prod.name, RUN_DTYPE, role="consumer").close()
        with pytest.raises(PeerGone, match="consumer"):
            prod.push(np.zeros(1, RUN_DTYPE))


def test_timeouts(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.t"), RUN_DTYPE, 4,
                     role="producer") as prod:
        cons = Ring.attach(prod.name, RUN_DTYPE, role="consumer")
        with pytest.raises(RingTimeout):
            cons.pop(1, timeout=0)
        start = time.monotonic()
        with pytest.raises(RingTimeout):
            cons.pop(1, timeout=0.25)
        assert time.monotonic() - start >= 0.25
        with pytest.raises(RingTimeout) as info:
            prod.push(np.zeros(6, RUN_DTYPE), timeout=0.2)
        assert info.value.done == 4 and prod.writable == 0
        assert isinstance(info.value, ShmError)
        cons.close()


def test_wrong_dtype_and_roles(run_id):
    with Ring.create(naming.segment_name(run_id, "ring.d"), RUN_DTYPE, 4) as ring:
        with pytest.raises(ShmError, match="carries records"):
            Ring.attach(ring.name, np.dtype([("block", "<u4"), ("first_page", "<u8")]))
        with pytest.raises(ShmError, match="carries records"):  # same size, other fields
            Ring.attach(ring.name, np.dtype([("a", "<u8"), ("b", "<u8")]))
        with pytest.raises(TypeError):
            ring.push(np.zeros(1, "<u8"))
        with pytest.raises(TypeError):
            Ring.create(naming.segment_name(run_id, "ring.o"), object, 4)
        with pytest.raises(ValueError):
            Ring.create(naming.segment_name(run_id, "ring.z"), RUN_DTYPE, 0)
        ring.push(np.zeros(1, RUN_DTYPE))
        with pytest.raises(ValueError, match="producer"):
            ring.pop(1)
        other = Ring.attach(ring.name, RUN_DTYPE)
        ring._hdr[_PRODUCER_PID] = os.getppid()  # pretend a live other process produces
        with pytest.raises(ShmError, match="already has a producer"):
            other.push(np.zeros(1, RUN_DTYPE))
        with pytest.raises(ValueError, match="owner"):
            other.unlink()
        other.close()
        with pytest.raises(ValueError, match="closed"):
            other.pop(1)
    with Segment.create(naming.segment_name(run_id, "notring"), 64, kind=b"ram") as seg:
        with pytest.raises(ShmError, match="holds 'ram'"):
            Ring.attach(seg.name, RUN_DTYPE)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 17),
       ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=40))
def test_wraparound_matches_a_queue(capacity, ops):
    """Any sequence of pushes and pops (in one process) returns records in order."""
    name = naming.segment_name(naming.new_run_id(), "ring.h")
    with Ring.create(name, RUN_DTYPE, capacity, role="producer") as prod:
        cons = Ring.attach(name, RUN_DTYPE, role="consumer")
        model: collections.deque[int] = collections.deque()
        counter = 0
        for is_push, n in ops:
            if is_push:
                n = min(n, prod.writable)
                recs = np.zeros(n, RUN_DTYPE)
                recs["first_page"] = np.arange(counter, counter + n)
                prod.push(recs, timeout=0)
                model.extend(range(counter, counter + n))
                counter += n
            elif model:
                out = cons.pop(n, timeout=0)
                assert out["first_page"].tolist() == [model.popleft() for _ in range(len(out))]
                assert len(out) == min(n, len(out) + len(model))
        assert cons.readable == len(model)
        cons.close()


def test_a_signal_handlers_exception_ends_a_wait(run_id):
    """A stage told to stop (its SIGTERM handler raises) must not sleep on in pop or push."""
    with Ring.create(naming.segment_name(run_id, "sig"), np.uint64, 2, role=CONSUMER) as ring:
        t0 = time.monotonic()
        with signal_soon(raises=True), pytest.raises(Stop):
            ring.pop(1, timeout=10)
        with signal_soon(raises=False):     # a handler that returns: the wait goes on
            with pytest.raises(RingTimeout):
                ring.pop(1, timeout=0.5)
        assert time.monotonic() - t0 < 5


def test_the_producers_note_is_read_by_anyone(ring_set):
    rings, _ = ring_set
    ring = rings[0]
    assert ring.peek_note() == 0
    ring.note(123 << 20)
    onlooker = Ring.attach(ring.name, ring.dtype)
    try:
        assert onlooker.peek_note() == 123 << 20
    finally:
        onlooker.close()
