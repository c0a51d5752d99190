"""Fixed-size records that travel on the source's shared-memory rings.

Every ring carries one numpy structured dtype from this module, never a pickle. A ring carries
data records and, in the same stream, markers (an ``op`` field) that close a round; a stage
forwards a round's marker only after every data record of that round, so order on a ring is
the round barrier.

    coordinator --COMMAND--> scanner --RUN--> registrar --WRITE--> poster
    coordinator <--REQUEST-- registrar <--COMPLETION-- poster
    coordinator --ANSWER--> registrar
    coordinator <--SYNC-- scanner

Field names say what a number is; addresses are virtual addresses of the process named in the
field's comment.
"""

from __future__ import annotations

import numpy as np

# coordinator -> scanner
CMD_ROUND, CMD_FINAL, CMD_SYNC, CMD_STOP = 1, 2, 3, 4
COMMAND_DTYPE = np.dtype([("op", "<u4"), ("round", "<u4")])

# scanner -> coordinator: the answer to CMD_SYNC (pages dirty now, not yet sent)
SYNC_DTYPE = np.dtype([("round", "<u4"), ("pad", "<u4"), ("dirty_pages", "<u8")])

# scanner -> registrar, registrar -> poster, poster -> registrar: op says what the record is.
# OP_IMPORT / OP_RELEASE (registrar -> poster) carry an MR the poster must import before a
# write uses it, or un-import before the registrar deregisters it (the soft provider refuses to
# deregister an MR another process holds); OP_RELEASED (poster -> registrar) confirms.
OP_RUN, OP_END, OP_IMPORT, OP_RELEASE, OP_RELEASED = 0, 1, 2, 3, 4
RUN_DTYPE = np.dtype([
    ("op", "<u1"),
    ("zero", "<u1"),          # every page of the run is zero
    ("pad", "<u2"),
    ("round", "<u4"),
    ("block", "<u4"),
    ("n_pages", "<u4"),       # OP_END: dirty pages of the round
    ("first_page", "<u8"),    # OP_END: zero pages of the round
    ("scan_ns", "<u8"),       # OP_END: time the scanner spent on the round
])

# registrar -> poster: one RDMA WRITE each (OP_RUN), or a round marker (OP_END)
WRITE_DTYPE = np.dtype([
    ("op", "<u1"),
    ("pad", "<u1", (3,)),
    ("round", "<u4"),
    ("block", "<u4"),
    ("chunk", "<u4"),
    ("local_addr", "<u8"),    # VA in the registrar (the MR's owner); OP_END: dirty pages
    ("length", "<u8"),        # bytes; OP_END: zero pages
    ("remote_addr", "<u8"),   # destination VA; OP_IMPORT: the MR's offset in its backing file
    ("lkey", "<u4"),
    ("rkey", "<u4"),
    ("pages", "<u4"),         # pages in this write; OP_END: COMPRESSed pages; OP_IMPORT: access
    ("zero_pages", "<u4"),    # zero pages inside this write; OP_IMPORT: PD-table slot
])

# poster -> registrar: completions (OP_RUN, per chunk) and "round drained" (OP_END)
COMPLETION_DTYPE = np.dtype([
    ("op", "<u1"),
    ("pad", "<u1", (3,)),
    ("round", "<u4"),
    ("block", "<u4"),
    ("chunk", "<u4"),
    ("writes", "<u4"),        # writes of this chunk completed now; OP_END: writes of the round
    ("lkey", "<u4"),          # OP_RELEASED: the MR un-imported
    ("bytes", "<u8"),         # bytes completed; OP_END: bytes of the round
    ("post_ns", "<u8"),       # OP_END: time the poster was busy on the round
])

# registrar -> coordinator
REQ_REGISTER, REQ_COMPRESS, REQ_UNREGISTER, REQ_DRAINED = 1, 2, 3, 4
REQUEST_DTYPE = np.dtype([
    ("op", "<u4"),
    ("round", "<u4"),
    ("block", "<u4"),
    ("chunk", "<u4"),         # REGISTER/UNREGISTER: first chunk
    ("n_chunks", "<u4"),      # REGISTER: chunks in this registration (>= 1)
    ("pad", "<u4"),
    ("offset", "<u8"),        # COMPRESS: byte offset in the block; DRAINED: bytes written
    ("length", "<u8"),        # COMPRESS: bytes; DRAINED: writes posted
    ("pages", "<u8"),         # DRAINED: dirty pages; COMPRESS: pages
    ("zero_pages", "<u8"),    # DRAINED: zero pages of the round
    ("compressed", "<u8"),    # DRAINED: pages sent as COMPRESS in the round
    ("busy_ns", "<u8"),       # DRAINED: scanner busy ns (high 32 bits unused)
    ("post_ns", "<u8"),       # DRAINED: poster busy ns
    ("reg_ns", "<u8"),        # DRAINED: registrar busy ns
])

# coordinator -> registrar: the answer to REQ_REGISTER
ANSWER_DTYPE = np.dtype([
    ("block", "<u4"),
    ("chunk", "<u4"),
    ("rkey", "<u4"),
    ("status", "<u4"),        # 0 ok
    ("remote_base", "<u8"),   # destination VA of the block start
])


def records(dtype: np.dtype, n: int = 1, **fields) -> np.ndarray:
    """``n`` zeroed records of ``dtype`` with ``fields`` set (scalars or arrays)."""
    out = np.zeros(n, dtype=dtype)
    for name, value in fields.items():
        out[name] = value
    return out
