"""What a destination session is told and what it asks: the inputs and outputs of
``DestinationSession.handle``.

Events are what the driver saw when it carried out the session's last asking action; ``Cancel``
and ``Failed`` (from ``events``) may come at any time, as may ``ControlReceived`` only when the
session asked for a message. Actions are orders carried out in sequence, or *asking* actions
(``ASKING``): the driver carries one out and hands the session the event it produced
(``ANSWERS``). One answer holds at most one asking action, and it comes last. ``StateChanged``
and ``AbortPeer`` are the source's orders, shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.protocol.capabilities import Capabilities, Digest
from pipeline.protocol.messages import Message
from pipeline.session.actions import AbortPeer, StateChanged
from pipeline.session.events import Cancel, ControlReceived, Failed

__all__ = [
    # events
    "Accepted", "RegionCreated", "StreamRecord", "StreamEnded", "ChunksRegistered",
    "BlocksPinned", "RamHashed", "Located", "GuestResumed", "ConfirmSent",
    "Committed", "ControlReceived", "Cancel", "Failed",
    # orders
    "StateChanged", "AbortPeer", "StartGuest", "StopGuest", "OpenWindow", "Reply",
    "DeregisterChunks", "ZeroRange", "HashRound", "HashLanded", "SettleHashes",
    # asking actions
    "CreateRegion", "Accept", "AwaitMessage", "ReadStream", "RegisterChunks", "PinBlocks",
    "HashRam", "LocateChunk", "LoadGuest", "Confirm", "AwaitCommit",
    "ASKING", "ANSWERS",
    "RegionBlock",
]


@dataclass(frozen=True, slots=True)
class RegionBlock:
    """One block of the destination's RAM region, as the session needs it."""

    idstr: str
    offset: int              # ram_addr_t: where the block starts in the RAM address space
    length: int
    address: int             # where it is mapped in the destination (REGISTER RESULT's base)


# -- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Accepted:
    """A source connected; ``capabilities`` are the effective ones (None: a stream carrier)."""

    capabilities: Capabilities | None = None


@dataclass(frozen=True, slots=True)
class RegionCreated:
    """The RAM region exists; its blocks in the region's order."""

    blocks: tuple[RegionBlock, ...]


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A stream carrier parsed ``record`` at stream ``offset`` (pages never come here: the
    driver lands them in RAM itself)."""

    record: object
    offset: int = 0


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """A stream carrier's bytes ended where a record ends, at ``offset``."""

    offset: int


@dataclass(frozen=True, slots=True)
class ChunksRegistered:
    """One rkey per range of ``RegisterChunks``, in order."""

    rkeys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlocksPinned:
    """One rkey per block of ``PinBlocks``, in order."""

    rkeys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RamHashed:
    """This side's digest of its RAM, 32 bytes per chunk, in ``HashRam``'s order."""

    digests: bytes


@dataclass(frozen=True, slots=True)
class Located:
    """Where a chunk's pages came from in the stream (``": its pages came from ..."``), or
    "" when nothing wrote it."""

    origin: str


@dataclass(frozen=True, slots=True)
class GuestResumed:
    """The guest runs from its device state; ``info`` says where it resumed."""

    info: dict


@dataclass(frozen=True, slots=True)
class ConfirmSent:
    """The source was told the RAM verified (the commit point on the source)."""


@dataclass(frozen=True, slots=True)
class Committed:
    """The source committed (two-phase): the guest may run here now."""


# -- orders ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartGuest:
    """Start the guest process now, idle until ``LoadGuest`` (so that starting a process is
    not part of the downtime)."""


@dataclass(frozen=True, slots=True)
class StopGuest:
    """The migration failed after the guest resumed but before the source was told: stop
    it, for the source resumes its own."""


@dataclass(frozen=True, slots=True)
class OpenWindow:
    """The stream met a HOOK: open the control channel's registration window."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer a request (RAM BLOCKS RESULT, REGISTER RESULT, UNREGISTER FINISHED)."""

    message: Message


@dataclass(frozen=True, slots=True)
class DeregisterChunks:
    """Close the MRs of these chunks, keyed (source block index, chunk)."""

    keys: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ZeroRange:
    """COMPRESS: zero ``length`` bytes at ``start`` of block ``block`` (only the pages that
    hold data: the others are zero and stay unallocated)."""

    block: str
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class HashRound:
    """A round's pages have all landed: hash them (``body``: its packed page bitmap) in the
    background. ``blocks``: block order of the bitmap and of the hash tables."""

    body: bytes
    blocks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HashLanded:
    """A stream carrier: hash the pages landed since the last time, in the background."""

    blocks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SettleHashes:
    """Wait until every page handed to the hasher is hashed (before the next READY)."""


# -- asking actions ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CreateRegion:
    """Create the RAM region (``prealloc``: fault it all in now) -> RegionCreated."""

    blocks: tuple[tuple[str, int], ...]
    chunk_size: int
    prealloc: bool = False


@dataclass(frozen=True, slots=True)
class Accept:
    """Listen and accept one source, granting ``capabilities`` (None: a stream carrier)
    -> Accepted."""

    capabilities: Capabilities | None


@dataclass(frozen=True, slots=True)
class AwaitMessage:
    """Grant READY for one message and wait for it -> ControlReceived."""


@dataclass(frozen=True, slots=True)
class ReadStream:
    """Land pages until the next other record -> StreamRecord, or StreamEnded."""


@dataclass(frozen=True, slots=True)
class RegisterChunks:
    """Register each (key, address, length), one MR each, keyed (source block index, chunk),
    and fault them in ahead of the writes -> ChunksRegistered."""

    ranges: tuple[tuple[tuple[int, int], int, int], ...]


@dataclass(frozen=True, slots=True)
class PinBlocks:
    """pin-all: register each block (address, length) whole -> BlocksPinned."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class HashRam:
    """Digest this side's RAM, blocks ``blocks`` in order, ``chunk_size`` chunks, with
    ``digest``'s method -> RamHashed."""

    blocks: tuple[str, ...]
    chunk_size: int
    digest: Digest


@dataclass(frozen=True, slots=True)
class LocateChunk:
    """Where the pages of ``chunk`` of ``block`` came from -> Located."""

    block: str
    chunk: int
    chunk_size: int


@dataclass(frozen=True, slots=True)
class LoadGuest:
    """Start the guest if it is not, load its device section and run it -> GuestResumed."""

    section: str
    state: bytes


@dataclass(frozen=True, slots=True)
class Confirm:
    """Tell the source the migration completed: on rdma: READY after EOF (``ready_after_eof``:
    our source) and SHUT(0) on a return-path connection if the source opened one (QEMU's,
    which expects no READY); SHUT(0) on tcp:; nothing for a file -> ConfirmSent."""

    ready_after_eof: bool = True


@dataclass(frozen=True, slots=True)
class AwaitCommit:
    """Wait for the source's commit (COMMIT on rdma:, the commit token on tcp:) ->
    Committed; anything else, or nothing within ``timeout``, fails the migration here."""

    timeout: float


ANSWERS = {
    CreateRegion: RegionCreated, Accept: Accepted, AwaitMessage: ControlReceived,
    ReadStream: (StreamRecord, StreamEnded), RegisterChunks: ChunksRegistered,
    PinBlocks: BlocksPinned, HashRam: RamHashed, LocateChunk: Located,
    LoadGuest: GuestResumed, Confirm: ConfirmSent, AwaitCommit: Committed,
}
ASKING = tuple(ANSWERS)
