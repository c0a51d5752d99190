"""Per-chunk SHA-256 digests of a RAM region: how the destination checks every byte it got.

The source sends, after the final round, a device section ``rdp-ram-digest`` (only when the
RAM_DIGEST capability was granted with ``Digest.SHA256``) holding the SHA-256 of every chunk of
every block at switchover; the destination hashes its own RAM the same way and compares before
it resumes. Chunk digests rather than one digest name the chunks that differ. Hashing runs in a
few threads (hashlib releases the GIL on large buffers).
"""

from __future__ import annotations

import hashlib

from shm.memory import PAGE_SIZE, WORDS_PER_PAGE, resident

SIZE = 32


class DeviceDigest:
    """SHA-256 over device sections in stream order: each one's name (length-prefixed) and
    its framed body, exactly as the stream carries them."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, idstr: str, framed: bytes) -> None:
        name = idstr.encode()
        self._h.update(len(name).to_bytes(1, "big") + name)
        self._h.update(framed)

    def digest(self) -> bytes:
        return self._h.digest()


def _ranges(region, chunk_size: int | None = None) -> list[tuple[int, int, int, int]]:
    out = []
    for blk in region.blocks:
        cs = chunk_size or blk.chunk_size
        for c in range(-(-blk.length // cs)):
            out.append((blk.index, c, c * cs, min(blk.length, (c + 1) * cs)))
    return out


def chunk_size_for(lengths: list[int], n_digests: int) -> int | None:
    """The chunk size (a power of two, 1 MiB to 1 GiB) that cuts blocks of ``lengths`` into
    ``n_digests`` chunks, or None. Where two sizes give the same count every block fits in one
    chunk of either, so they cut alike and the smaller is as good."""
    cs = 1 << 20
    while cs <= 1 << 30:
        if sum(-(-n // cs) for n in lengths) == n_digests:
            return cs
        cs <<= 1
    return None


_ZERO: dict[int, bytes] = {}


def _zero_digest(n: int) -> bytes:
    if n not in _ZERO:
        _ZERO[n] = hashlib.sha256(bytes(n)).digest()
    return _ZERO[n]


def chunk_digests(region, threads: int = 2, chunk_size: int | None = None) -> bytes:
    """SHA-256 of each chunk (of the region's chunk size unless ``chunk_size``), blocks in
    order, chunks in order, concatenated. A chunk with no page in memory (never written) is
    zero: its digest is known without reading (and so without allocating) its pages."""
    from concurrent.futures import ThreadPoolExecutor  # here: the sessions import this module

    import numpy as np

    ranges = _ranges(region, chunk_size)
    views = {blk.index: memoryview(blk.view) for blk in region.blocks}
    absent = {}
    for blk in region.blocks:
        res = resident(blk.view.view(np.uint64).reshape(-1, WORDS_PER_PAGE))
        if res is not None:
            chunk_pages = (chunk_size or blk.chunk_size) // PAGE_SIZE
            pad = (-len(res)) % chunk_pages
            per_chunk = np.concatenate([res, np.zeros(pad, bool)]).reshape(-1, chunk_pages)
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


def mismatches(region, expected: bytes, threads: int = 2,
               chunk_size: int | None = None) -> list[tuple[str, int]]:
    """(block idstr, chunk) of every chunk whose digest differs from ``expected``."""
    ranges = _ranges(region, chunk_size)
    if len(expected) != SIZE * len(ranges):
        return [("<geometry>", -1)]
    names = {blk.index: blk.idstr for blk in region.blocks}
    return differing(chunk_digests(region, threads, chunk_size), expected,
                     [(names[b], c) for b, c, _s, _e in ranges])


def differing(mine: bytes, expected: bytes, chunks: list) -> list:
    """The entries of ``chunks`` (one per digest, in order) whose digest in ``mine`` differs
    from ``expected``; ``[("<geometry>", -1)]`` when the two do not hold as many digests."""
    if len(mine) != len(expected) or len(mine) != SIZE * len(chunks):
        return [("<geometry>", -1)]
    return [chunk for i, chunk in enumerate(chunks)
            if mine[i * SIZE:(i + 1) * SIZE] != expected[i * SIZE:(i + 1) * SIZE]]
