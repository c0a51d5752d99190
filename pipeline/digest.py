"""Per-chunk SHA-256 digests of a RAM region: how the destination checks every byte it got.

The source sends, after the final round, a device section ``rdp-ram-digest`` (only when the
RAM_DIGEST capability was granted with ``Digest.SHA256``) holding the SHA-256 of every chunk of
every block at switchover; the destination hashes its own RAM the same way and compares before
it resumes. Chunk digests rather than one digest name the chunks that differ. Hashing runs in a
few threads (hashlib releases the GIL on large buffers).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

DIGEST_SECTION = "rdp-ram-digest"
SIZE = 32


def _ranges(region) -> list[tuple[int, int, int, int]]:
    out = []
    for blk in region.blocks:
        for c in range(blk.nb_chunks):
            start, end = blk.chunk_range(c)
            out.append((blk.index, c, start, end))
    return out


_ZERO: dict[int, bytes] = {}


def _zero_digest(n: int) -> bytes:
    if n not in _ZERO:
        _ZERO[n] = hashlib.sha256(bytes(n)).digest()
    return _ZERO[n]


def chunk_digests(region, threads: int = 2) -> bytes:
    """SHA-256 of each chunk, blocks in order, chunks in order, concatenated. A chunk with no
    page in memory (never written) is zero: its digest is known without reading (and so
    without allocating) its pages."""
    import numpy as np

    from stages.scanner import resident

    ranges = _ranges(region)
    views = {blk.index: memoryview(blk.view) for blk in region.blocks}
    absent = {}
    for blk in region.blocks:
        res = resident(blk.view.view(np.uint64).reshape(-1, 512))
        if res is not None:
            pad = (-len(res)) % blk.chunk_pages
            per_chunk = np.concatenate([res, np.zeros(pad, bool)]).reshape(-1, blk.chunk_pages)
            absent[blk.index] = ~per_chunk.any(axis=1)

    def one(r):
        b, c, start, end = r
        if b in absent and absent[b][c]:
            return _zero_digest(end - start)
        return hashlib.sha256(views[b][start:end]).digest()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(one, ranges))
    for v in views.values():
        v.release()
    return b"".join(digests)


def mismatches(region, expected: bytes, threads: int = 2) -> list[tuple[str, int]]:
    """(block idstr, chunk) of every chunk whose digest differs from ``expected``."""
    ranges = _ranges(region)
    if len(expected) != SIZE * len(ranges):
        return [("<geometry>", -1)]
    mine = chunk_digests(region, threads)
    names = {blk.index: blk.idstr for blk in region.blocks}
    return [(names[b], c) for i, (b, c, _s, _e) in enumerate(ranges)
            if mine[i * SIZE:(i + 1) * SIZE] != expected[i * SIZE:(i + 1) * SIZE]]
