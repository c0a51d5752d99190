import numpy as np
import pytest

from stages.records import (
    RING_KINDS,
    RUN,
    RUN_RING,
    SCAN_END,
    UNREGISTER_REQUEST,
    WRITE,
    WRITE_END,
    WRITE_RING,
    Request,
    RunOp,
    WriteOp,
    concat,
    records,
)

RINGS = list(RING_KINDS.items())


@pytest.mark.parametrize("ring, kinds", RINGS, ids=[str(r.names) for r, _ in RINGS])
def test_every_kind_of_a_ring_has_its_size_and_its_shared_fields_in_place(ring, kinds):
    for kind in kinds:
        assert kind.itemsize == ring.itemsize
        for name in ring.names:
            if not name.startswith("_"):
                assert kind.fields[name] == ring.fields[name], (kind, name)


@pytest.mark.parametrize("dtype", [d for r, ks in RINGS for d in (r, *ks)])
def test_no_byte_is_left_without_a_field(dtype):
    # numpy copies only the bytes of named fields: a gap would lose the other kinds' fields
    assert sum(dtype.fields[n][0].itemsize for n in dtype.names) == dtype.itemsize


def test_a_copy_through_the_ring_dtype_keeps_every_kind_whole():
    stream = concat(WRITE_RING, [records(WRITE, 2, length=[1, 2], lkey=3),
                                 records(WRITE_END, round=4, dirty_pages=5, zero_pages=6,
                                         compressed_pages=7)])
    ends = stream[stream["op"] == WriteOp.END].view(WRITE_END)
    assert ends[["round", "dirty_pages", "zero_pages", "compressed_pages"]].tolist() == [
        (4, 5, 6, 7)]
    again = np.concatenate([stream[:1], stream[1:]])
    assert again.dtype == WRITE_RING and again.tobytes() == stream.tobytes()
    assert again[again["op"] == WriteOp.WRITE].view(WRITE)["length"].tolist() == [1, 2]


def test_records_sets_the_kind_s_op_and_refuses_another():
    assert records(SCAN_END, 2)["op"].tolist() == [RunOp.END] * 2
    assert records(UNREGISTER_REQUEST)["op"][0] == Request.UNREGISTER
    with pytest.raises(ValueError):
        records(RUN, op=RunOp.END)


def test_concat_refuses_records_of_another_ring():
    assert concat(RUN_RING, []).dtype == RUN_RING
    with pytest.raises(TypeError):
        concat(RUN_RING, [records(WRITE)])
