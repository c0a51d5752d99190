import numpy as np
import pytest

from pipeline.guest.synthetic import GuestState, Workload


def views(pages=(256, 16)):
    return [np.zeros((n, 512), np.uint64) for n in pages]


@pytest.mark.parametrize("pattern", ["uniform", "hotspot", "sequential"])
def test_deterministic_and_resumable(pattern):
    a, b = views(), views()
    wa = Workload(GuestState(seed=5, pattern=pattern, zero_share=0.2), [256, 16])
    for _ in range(6):
        wa.write_batch(a, 40)
    # b: 3 batches, then a "migrated" guest resumes from the saved state
    wb = Workload(GuestState(seed=5, pattern=pattern, zero_share=0.2), [256, 16])
    for _ in range(3):
        wb.write_batch(b, 40)
    state = GuestState.from_bytes(wb.state.to_bytes())
    wc = Workload(state, [256, 16])
    for _ in range(3):
        wc.write_batch(b, 40)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert wc.state.pages_written == 240


def test_marks_every_written_page_and_writes_zero_share():
    v = views()
    marked = {0: set(), 1: set()}
    w = Workload(GuestState(seed=1, zero_share=0.5), [256, 16])
    w.write_batch(v, 200, mark=lambda b, p: marked[b].update(p.tolist()))
    for b in (0, 1):
        written = set(np.flatnonzero(v[b].any(axis=1)).tolist())
        assert written <= marked[b]
    assert 0 < sum(len(m) for m in marked.values()) <= 200
    nz = sum(int(x.any(axis=1).sum()) for x in v)
    assert nz < sum(len(m) for m in marked.values())   # some written pages are zero


def test_sequential_wraps_and_boot_fills():
    v = views((8, 8))
    w = Workload(GuestState(seed=1, pattern="sequential", zero_share=0.0), [8, 8])
    w.write_batch(v, 20)
    assert w.state.position == 4
    v2 = views((8, 8))
    w.boot(v2, 0.5)
    assert v2[0][:4].all() and not v2[0][4:].any()


def test_bad_pattern():
    with pytest.raises(ValueError):
        Workload(GuestState(pattern="random-walk"), [4])


def test_a_guest_that_fails_to_start_leaves_nothing():
    from pipeline.guest.synthetic import SyntheticGuest
    from shm.errors import StageFailed
    from shm.naming import new_run_id

    guest = SyntheticGuest(4 << 20, run_id=new_run_id())
    guest.process.config["region"] = "/rdp-0-1-missing"   # the child cannot attach: exit 2
    with pytest.raises(StageFailed, match="guest exited with code 2"):
        guest.start(timeout=30)
    # The region and dirty log the guest created are gone: the suite's leak guard checks.
