"""Fixed-size records that travel on the source's shared-memory rings.

    coordinator --COMMAND--> scanner --RUN_RING--> registrar --WRITE_RING--> poster
    coordinator <--REQUEST_RING-- registrar <--COMPLETION_RING-- poster
    coordinator --ANSWER--> registrar
    coordinator <--SYNC_REPLY-- scanner

A ring carries one record size, never a pickle. A ring that carries several kinds of record
(data and, in the same stream, the markers that close a round) is created with a ring dtype
that names only what every kind has (``op``, and ``round`` where every kind has one); the op
code says the kind, and each kind is a dtype of its own over the same bytes, with fields named
for what they hold. A reader filters by op and views (free: no copy), as
``select(recs, WRITE_END)`` does (``recs[recs["op"] == WriteOp.END].view(WRITE_END)``); a
producer builds a kind with ``records`` and puts kinds on a ring with ``concat`` (or
``.view(ring)``). A stage forwards a round's END marker only after every data record of that
round, so order on a ring is the round barrier.

Invariants (checked by tests/stages/test_stage_records.py): every kind of a ring has the ring's
itemsize and its fields at the ring dtype's offsets; no dtype leaves a byte without a field
(bytes no field names are ``_<offset>``): numpy copies only named fields' bytes, so a boolean
index or a concatenation of a dtype with gaps would drop the other kinds' fields. The byte
layout is the one the rings had when each ring had a single overloaded dtype.

Addresses are virtual addresses of the process named in the field's comment.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


def _layout(itemsize: int, fields: list[tuple[str, str, int]],
            op: IntEnum | None = None) -> np.dtype:
    """A dtype of ``itemsize`` bytes with ``fields`` (name, format, offset) and every other
    byte in an opaque field ``_<offset>``; ``op``: the op code of this kind (see ``records``)."""
    filled, at = [], 0
    for name, fmt, offset in sorted(fields, key=lambda f: f[2]):
        if offset < at:
            raise ValueError(f"field {name} overlaps the one before it")
        if offset > at:
            filled.append((f"_{at}", f"V{offset - at}", at))
        filled.append((name, fmt, offset))
        at = offset + np.dtype(fmt).itemsize
    if at < itemsize:
        filled.append((f"_{at}", f"V{itemsize - at}", at))
    names, formats, offsets = zip(*filled, strict=True)
    spec = {"names": list(names), "formats": list(formats), "offsets": list(offsets),
            "itemsize": itemsize}
    return np.dtype(spec, metadata={"op": op}) if op is not None else np.dtype(spec)


# -- coordinator -> scanner ------------------------------------------------------------------
class Command(IntEnum):
    """What the coordinator asks of the scanner."""

    ROUND = 1      # send the pages dirty now (a round of the live phase)
    FINAL = 2      # the same with the guest paused: the last round
    SYNC = 3       # count the pages dirty now (answered with a SYNC_REPLY)
    STOP = 4       # close the runs ring and exit


COMMAND = _layout(8, [("op", "<u4", 0), ("round", "<u4", 4)])

# -- scanner -> coordinator: the answer to Command.SYNC ----------------------------------------
SYNC_REPLY = _layout(16, [
    ("round", "<u4", 0),
    ("dirty_pages", "<u8", 8),   # pages dirty now, not yet sent
])


# -- scanner -> registrar --------------------------------------------------------------------
class RunOp(IntEnum):
    """What a record on the runs ring is."""

    RUN = 0        # a run of dirty pages (RUN)
    END = 1        # the round's last record (SCAN_END): its pages are hashed and tagged


RUN_RING = _layout(32, [("op", "<u1", 0), ("round", "<u4", 4)])
RUN = _layout(32, [
    ("op", "<u1", 0),
    ("zero", "<u1", 1),          # every page of the run is zero
    ("round", "<u4", 4),
    ("block", "<u4", 8),
    ("n_pages", "<u4", 12),
    ("first_page", "<u8", 16),
], RunOp.RUN)
SCAN_END = _layout(32, [
    ("op", "<u1", 0),
    ("round", "<u4", 4),
    ("dirty_pages", "<u4", 12),  # pages the round sends
    ("zero_pages", "<u8", 16),   # of which all-zero
    ("scan_ns", "<u8", 24),      # the scanner's busy time so far
], RunOp.END)


# -- registrar -> poster ---------------------------------------------------------------------
class WriteOp(IntEnum):
    """What a record on the writes ring is."""

    WRITE = 0      # one RDMA WRITE (WRITE)
    END = 1        # the round's last record (WRITE_END)
    # an MR the poster imports (share mode) or registers itself (proxy mode, with a virtual
    # lkey it rewrites in the writes) before a write uses it (MR_IMPORT)
    IMPORT = 2
    # an MR the poster un-imports before the registrar deregisters it (MR_RELEASE): the soft
    # provider refuses to deregister an MR another process holds
    RELEASE = 3


WRITE_RING = _layout(56, [("op", "<u1", 0)])
WRITE = _layout(56, [
    ("op", "<u1", 0),
    ("round", "<u4", 4),
    ("block", "<u4", 8),
    ("chunk", "<u4", 12),
    ("local_addr", "<u8", 16),   # VA in the registrar (the MR's owner)
    ("length", "<u8", 24),       # bytes
    ("remote_addr", "<u8", 32),  # destination VA
    ("lkey", "<u4", 40),
    ("rkey", "<u4", 44),
    ("pages", "<u4", 48),        # pages in this write
    ("zero_pages", "<u4", 52),   # zero pages inside this write
], WriteOp.WRITE)
WRITE_END = _layout(56, [
    ("op", "<u1", 0),
    ("round", "<u4", 4),
    ("dirty_pages", "<u8", 16),  # pages the round sends
    ("zero_pages", "<u8", 24),   # of which all-zero
    ("compressed_pages", "<u4", 48),   # of which sent as COMPRESS
], WriteOp.END)
MR_IMPORT = _layout(56, [
    ("op", "<u1", 0),
    ("mr_handle", "<u4", 4),     # verbs: the MR's kernel handle (ibv_import_mr needs it)
    ("addr", "<u8", 16),         # the MR's VA in the registrar
    ("length", "<u8", 24),       # bytes
    ("file_offset", "<u8", 32),  # the MR's offset in the region's backing file
    ("lkey", "<u4", 40),
    ("rkey", "<u4", 44),
    ("access", "<u4", 48),       # stages.verbs.base.Access flags
    ("pd_slot", "<i4", 52),      # soft: the MR's slot in the shared PD's table (verbs: -1)
], WriteOp.IMPORT)
MR_RELEASE = _layout(56, [("op", "<u1", 0), ("lkey", "<u4", 40)], WriteOp.RELEASE)


# -- poster -> registrar ---------------------------------------------------------------------
class CompletionOp(IntEnum):
    """What a record on the completions ring is."""

    CHUNK = 0      # writes of one chunk completed (CHUNK_DONE)
    DRAINED = 1    # no write of the round (or before) is outstanding (ROUND_DRAINED)
    RELEASED = 4   # an MR un-imported, as MR_RELEASE asked (MR_RELEASED)


COMPLETION_RING = _layout(40, [("op", "<u1", 0)])
CHUNK_DONE = _layout(40, [
    ("op", "<u1", 0),
    ("round", "<u4", 4),
    ("block", "<u4", 8),
    ("chunk", "<u4", 12),
    ("writes", "<u4", 16),       # writes of this chunk completed now
    ("bytes", "<u8", 24),        # their bytes
], CompletionOp.CHUNK)
ROUND_DRAINED = _layout(40, [
    ("op", "<u1", 0),
    ("round", "<u4", 4),
    ("writes", "<u4", 16),       # writes of the round
    ("bytes", "<u8", 24),        # bytes of the round
    ("post_ns", "<u8", 32),      # the poster's busy time so far
], CompletionOp.DRAINED)
MR_RELEASED = _layout(40, [("op", "<u1", 0), ("lkey", "<u4", 20)], CompletionOp.RELEASED)


# -- registrar -> coordinator ----------------------------------------------------------------
class Request(IntEnum):
    """What the registrar asks of the coordinator (the op of a record on the requests ring)."""

    REGISTER = 1     # register chunks at the destination (REGISTER_REQUEST)
    COMPRESS = 2     # have the destination zero-fill a range (COMPRESS_REQUEST)
    UNREGISTER = 3   # unregister chunks at the destination (UNREGISTER_REQUEST)
    DRAINED = 4      # the round's writes all landed, with its figures (DRAINED_REQUEST)


REQUEST_RING = _layout(88, [("op", "<u4", 0), ("round", "<u4", 4)])
_CHUNKS = [
    ("op", "<u4", 0),
    ("round", "<u4", 4),
    ("block", "<u4", 8),
    ("chunk", "<u4", 12),        # first chunk
    ("n_chunks", "<u4", 16),     # chunks (>= 1)
]
REGISTER_REQUEST = _layout(88, _CHUNKS, Request.REGISTER)
UNREGISTER_REQUEST = _layout(88, _CHUNKS, Request.UNREGISTER)
COMPRESS_REQUEST = _layout(88, [
    ("op", "<u4", 0),
    ("round", "<u4", 4),
    ("block", "<u4", 8),
    ("chunk", "<u4", 12),        # the chunk of the first page
    ("offset", "<u8", 24),       # byte offset in the block
    ("length", "<u8", 32),       # bytes
    ("pages", "<u8", 40),
], Request.COMPRESS)
DRAINED_REQUEST = _layout(88, [
    ("op", "<u4", 0),
    ("round", "<u4", 4),
    ("bytes_written", "<u8", 24),
    ("writes_posted", "<u8", 32),
    ("dirty_pages", "<u8", 40),
    ("zero_pages", "<u8", 48),
    ("compressed_pages", "<u8", 56),   # pages sent as COMPRESS
    ("scan_ns", "<u8", 64),      # busy times so far: scanner, poster, registrar
    ("post_ns", "<u8", 72),
    ("reg_ns", "<u8", 80),
], Request.DRAINED)


# -- coordinator -> registrar: the answer to Request.REGISTER ------------------------------------
class AnswerStatus(IntEnum):
    """How the destination answered a REGISTER."""

    OK = 0
    REFUSED = 1    # the registrar fails the migration on it


ALL_CHUNKS = 0xFFFFFFFF      # an ANSWER's chunk for a whole block (pin-all)
ANSWER = _layout(24, [
    ("block", "<u4", 0),
    ("chunk", "<u4", 4),         # ALL_CHUNKS: the whole block (pin-all)
    ("rkey", "<u4", 8),
    ("status", "<u4", 12),       # AnswerStatus
    ("remote_base", "<u8", 16),  # destination VA of the block start
])

# every ring's dtype and the kinds it carries
RING_KINDS: dict[np.dtype, tuple[np.dtype, ...]] = {
    COMMAND: (COMMAND,),
    SYNC_REPLY: (SYNC_REPLY,),
    RUN_RING: (RUN, SCAN_END),
    WRITE_RING: (WRITE, WRITE_END, MR_IMPORT, MR_RELEASE),
    COMPLETION_RING: (CHUNK_DONE, ROUND_DRAINED, MR_RELEASED),
    REQUEST_RING: (REGISTER_REQUEST, UNREGISTER_REQUEST, COMPRESS_REQUEST, DRAINED_REQUEST),
    ANSWER: (ANSWER,),
}


def records(kind: np.dtype, n: int = 1, **fields) -> np.ndarray:
    """``n`` zeroed records of ``kind`` with its op code and ``fields`` set (scalars or
    arrays)."""
    out = np.zeros(n, dtype=kind)
    op = (kind.metadata or {}).get("op")
    if op is not None:
        if fields.get("op", op) != op:
            raise ValueError(f"{op!r} records cannot have op {fields['op']!r}")
        out["op"] = op
    for name, value in fields.items():
        out[name] = value
    return out


def select(recs: np.ndarray, kind: np.dtype) -> np.ndarray:
    """The records of ``kind`` (a kind with one op code) among ``recs``, in order, viewed as
    ``kind``."""
    return recs[recs["op"] == kind.metadata["op"]].view(kind)


def concat(ring: np.dtype, parts: list[np.ndarray]) -> np.ndarray:
    """``parts`` (arrays of ``ring`` or of its kinds), in order, as one array of ``ring``."""
    kinds = (ring, *RING_KINDS[ring])
    for p in parts:
        if p.dtype not in kinds:
            raise TypeError(f"records of {p.dtype} do not travel on a ring of {ring}")
    parts = [p.view(ring) for p in parts if len(p)]
    if not parts:
        return np.zeros(0, dtype=ring)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]

