"""Guest RAM as one shared-memory segment holding every RAM block.

A region mirrors QEMU's RAMBlocks: each block has an ``idstr`` (``pc.ram``), a ram_addr_t
``offset`` (the sum of the lengths before it) and a used ``length``. The payload starts with a
block table (so ``attach`` needs only the name), then the blocks:

    payload 0        table: n_blocks x _TABLE_DTYPE, padded to a page
    payload T + ...  block 0, block 1, ...: each starts at a multiple of ``chunk_size`` from T

Invariants: lengths are multiples of PAGE_SIZE; ``chunk_size`` is a power of two in
[1 MiB, 1 GiB]; every block starts chunk-aligned relative to the first, so a chunk never
straddles two blocks' pages and the padding after a block's last partial chunk is never touched.
The segment is sparse: creating it touches no page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shm.errors import ShmError
from shm.memory import PAGE_SHIFT, PAGE_SIZE
from shm.naming import segment_name
from shm.segment import Segment

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 1 << 30
KIND = b"ram"
_IDSTR_MAX = 256
_TABLE_DTYPE = np.dtype([("idstr", f"S{_IDSTR_MAX}"), ("offset", "<u8"), ("length", "<u8"),
                         ("seg_offset", "<u8")])


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a power of two in [1 MiB, 1 GiB], else ValueError."""
    if (not isinstance(chunk_size, int) or chunk_size & (chunk_size - 1)
            or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):
        raise ValueError(f"chunk size {chunk_size} must be a power of two from 1 MiB to 1 GiB")
    return chunk_size


@dataclass(frozen=True, slots=True)
class RamBlockSpec:
    """What a RAM block is called and how long it is (bytes, a multiple of PAGE_SIZE)."""

    idstr: str
    length: int

    def __post_init__(self) -> None:
        raw = self.idstr.encode() if isinstance(self.idstr, str) else b""
        if not raw or len(raw) >= _IDSTR_MAX or b"\x00" in raw:
            raise ValueError(f"RAM block idstr {self.idstr!r} must be 1-255 bytes without NUL")
        if not isinstance(self.length, int) or self.length <= 0 or self.length % PAGE_SIZE:
            raise ValueError(f"RAM block {self.idstr} length {self.length} must be a positive "
                             f"multiple of the {PAGE_SIZE}-byte page size")


@dataclass(frozen=True, slots=True, eq=False)
class RamBlock:
    """One RAM block of a region, as mapped in this process."""

    idstr: str
    index: int
    offset: int            # ram_addr_t: where the block starts in QEMU's RAM address space
    length: int
    chunk_size: int
    seg_offset: int        # where the block starts in the segment's payload
    address: int           # virtual address of the block in this process
    view: np.ndarray = field(repr=False)  # uint8, ``length`` bytes

    @property
    def nb_pages(self) -> int:
        return self.length >> PAGE_SHIFT

    @property
    def chunk_pages(self) -> int:
        return self.chunk_size >> PAGE_SHIFT

    @property
    def nb_chunks(self) -> int:
        return -(-self.length // self.chunk_size)

    def page_to_chunk(self, page):
        """The chunk holding ``page`` (an int or an integer array)."""
        return page // self.chunk_pages

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Byte offsets ``(start, end)`` of ``chunk`` in the block, clamped at the block end."""
        if not 0 <= chunk < self.nb_chunks:
            raise IndexError(f"chunk {chunk} outside block {self.idstr} "
                             f"({self.nb_chunks} chunks)")
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.length)

    def pages(self, first: int, n: int = 1) -> np.ndarray:
        """A uint8 view of pages ``first`` .. ``first + n - 1``."""
        if first < 0 or n < 0 or first + n > self.nb_pages:
            raise IndexError(f"pages {first}+{n} outside block {self.idstr} "
                             f"({self.nb_pages} pages)")
        return self.view[first << PAGE_SHIFT:(first + n) << PAGE_SHIFT]


class RamRegion:
    """Every RAM block of a guest in one shared-memory segment. Use ``create`` or ``attach``."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        if len(segment.geometry) != 4 or segment.geometry[0] != PAGE_SIZE:
            segment.close()
            raise ShmError(f"region {segment.name} has geometry {segment.geometry}, expected "
                           f"(page size {PAGE_SIZE}, chunk size, blocks, total length)")
        _, self.chunk_size, n_blocks, self.total_length = segment.geometry
        try:
            table = segment.ndarray(_TABLE_DTYPE, 0, n_blocks).copy()
            if any(int(r["seg_offset"]) + int(r["length"]) > segment.size for r in table):
                raise ValueError("a block lies past the end of the segment")
        except ValueError as exc:
            segment.close()
            raise ShmError(f"region {segment.name} has a corrupt block table: {exc}") from exc
        self.blocks: list[RamBlock] = [
            RamBlock(idstr=row["idstr"].decode(), index=i, offset=int(row["offset"]),
                     length=int(row["length"]), chunk_size=self.chunk_size,
                     seg_offset=int(row["seg_offset"]),
                     address=segment.address + int(row["seg_offset"]),
                     view=segment.ndarray(np.uint8, int(row["seg_offset"]), int(row["length"])))
            for i, row in enumerate(table)]

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def chunk_pages(self) -> int:
        return self.chunk_size >> PAGE_SHIFT

    @property
    def owner(self) -> bool:
        return self.segment.owner

    @classmethod
    def create(cls, run_id: str, specs: Sequence[RamBlockSpec],
               chunk_size: int = DEFAULT_CHUNK_SIZE, *, kind: str = "ram") -> RamRegion:
        """Create the region's segment ``/rdp-<run_id>-<pid>-<kind>`` (sparse; zero-filled)."""
        check_chunk_size(chunk_size)
        specs = list(specs)
        if not specs:
            raise ValueError("a RAM region needs at least one block")
        if len({s.idstr for s in specs}) != len(specs):
            raise ValueError("RAM block idstrs must be unique")
        table = np.zeros(len(specs), _TABLE_DTYPE)
        data_start = _round_up(table.nbytes, PAGE_SIZE)
        ram_addr = placed = 0
        for row, spec in zip(table, specs, strict=True):
            row["idstr"] = spec.idstr.encode()
            row["offset"] = ram_addr
            row["length"] = spec.length
            row["seg_offset"] = data_start + placed
            ram_addr += spec.length
            placed += _round_up(spec.length, chunk_size)
        name = segment_name(run_id, kind)
        segment = Segment.create(name, data_start + placed, kind=KIND,
                                 geometry=(PAGE_SIZE, chunk_size, len(specs), ram_addr))
        try:
            segment.ndarray(_TABLE_DTYPE, 0, len(specs))[:] = table
            return cls(segment)
        except BaseException:
            segment.close()
            segment.unlink()
            raise

    @classmethod
    def attach(cls, name: str) -> RamRegion:
        """Map the region ``name`` created by another process."""
        return cls(Segment.attach(name, kind=KIND))

    def block(self, idstr: str) -> RamBlock:
        """The block called ``idstr``."""
        for b in self.blocks:
            if b.idstr == idstr:
                return b
        raise KeyError(f"no RAM block {idstr!r} in region {self.name}")

    def specs(self) -> list[RamBlockSpec]:
        """The specs this region was made from (to create a matching region elsewhere)."""
        return [RamBlockSpec(b.idstr, b.length) for b in self.blocks]

    def close(self) -> None:
        """Unmap (idempotent). Views taken from ``blocks`` keep the mapping until they die."""
        self.blocks = []
        self.segment.close()

    def unlink(self) -> None:
        """Remove the segment's name (owner only, idempotent)."""
        self.segment.unlink()

    def __enter__(self) -> RamRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.blocks = []
        self.segment.__exit__(*exc)

    def __repr__(self) -> str:
        blocks = ", ".join(f"{b.idstr}:{b.length}" for b in self.blocks)
        return f"<RamRegion {self.name} chunk {self.chunk_size} [{blocks}]>"
