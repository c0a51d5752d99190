"""Capabilities in the connection's private data, and our extensions that QEMU ignores.

Wire layout (all big-endian):

    off  size  field
    0    4     version        1; QEMU rejects anything else
    4    4     flags          bit 0 PIN_ALL (QEMU's only bit); ours from bit 8 up
    ---- extension block: written only when a flag bit >= 8 is set; QEMU reads 8 bytes ----
    8    4     magic          0x52445058 "RDPX"
    12   1     ext_version    1
    13   1     chunk_shift    log2 of the chunk size (QEMU: 20, 1 MiB), with CHUNK_SIZE
    14   1     data_qps       number of data QPs, with DATA_QPS
    15   1     digest         end-of-migration RAM digest algorithm (``Digest``), with RAM_DIGEST
    16   8     session_token  what data connections present (chosen by the destination)

Invariants:
- a QEMU peer sees only the first 8 bytes and masks ``flags &= 0x01``, so it never grants one of
  our bits and we never use an extension it did not grant;
- an extension field is at its default unless its flag is set (checked on construction), so
  ``decode(encode(c)) == c``;
- the destination (``negotiate``) never grants a bit the source did not ask for and masks bits
  it does not know; the source (``accept_reply``) refuses a reply that does either.

Data QP connections (DATA_QPS) carry their own 16-byte private data, ``DataConnect``: a magic
that QEMU would read as protocol version 0x52445044 and refuse, the QP index and the token.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from shm.errors import RemoteProtocolError

__all__ = [
    "Capability", "Digest", "Capabilities", "Agreement", "DataConnect", "negotiate",
    "accept_reply", "decode_connect", "VERSION", "KNOWN_FLAGS", "QEMU_SIZE", "EXTENDED_SIZE",
]

VERSION = 1
DEFAULT_CHUNK_SHIFT = 20            # RDMA_REG_CHUNK_SHIFT: 1 MiB
MIN_CHUNK_SHIFT, MAX_CHUNK_SHIFT = 12, 30
EXT_MAGIC = 0x52445058              # "RDPX"
DATA_MAGIC = 0x52445044             # "RDPD"
EXT_VERSION = 1

_QEMU = struct.Struct(">II")                  # version, flags
_EXT = struct.Struct(">IBBBBQ")              # magic, ext_version, chunk_shift, qps, digest, token
_DATA = struct.Struct(">IBBHQ")              # magic, version, index, padding, token
_MAGIC = struct.Struct(">I")
QEMU_SIZE = _QEMU.size                        # 8
EXTENDED_SIZE = _QEMU.size + _EXT.size        # 24


class Capability(IntFlag):
    """Flag bits of ``RDMACapabilities.flags``."""

    PIN_ALL = 0x01              # RDMA_CAPABILITY_PIN_ALL: register all RAM up front
    MULTI_REGISTER = 1 << 8     # several RDMARegister per REGISTER REQUEST, one result each
    DATA_QPS = 1 << 9           # RDMA WRITEs on separate data QPs
    CHUNK_SIZE = 1 << 10        # a chunk size other than 1 MiB (chunk_shift)
    RAM_DIGEST = 1 << 11        # a digest of all RAM checked at the end (digest)


KNOWN_FLAGS = (Capability.PIN_ALL | Capability.MULTI_REGISTER | Capability.DATA_QPS
               | Capability.CHUNK_SIZE | Capability.RAM_DIGEST)
_EXTENSION_MASK = 0xFFFF_FF00


class Digest(IntEnum):
    """Algorithms for the end-of-migration RAM digest."""

    NONE = 0
    BLAKE2B_256 = 1
    SHA256 = 2
    PAGE_HASH = 3       # SHA-256 per chunk over its 64-bit page hashes (stages.pagehash)


def _check(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Capabilities.{name} must be an int")
    if not low <= value <= high:
        raise ValueError(f"Capabilities.{name} = {value} is outside {low}..{high}")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """``RDMACapabilities`` plus our extension fields (defaults mean "not used")."""

    version: int = VERSION
    flags: int = 0
    chunk_shift: int = DEFAULT_CHUNK_SHIFT
    data_qps: int = 0
    session_token: int = 0
    digest: int = Digest.NONE

    def __post_init__(self) -> None:
        _check("version", self.version, 0, 0xFFFF_FFFF)
        _check("flags", self.flags, 0, 0xFFFF_FFFF)
        _check("chunk_shift", self.chunk_shift, MIN_CHUNK_SHIFT, MAX_CHUNK_SHIFT)
        _check("data_qps", self.data_qps, 0, 255)
        _check("session_token", self.session_token, 0, 0xFFFF_FFFF_FFFF_FFFF)
        _check("digest", self.digest, 0, 255)
        for flag, name, default in (
                (Capability.CHUNK_SIZE, "chunk_shift", DEFAULT_CHUNK_SHIFT),
                (Capability.DATA_QPS, "data_qps", 0),
                (Capability.DATA_QPS, "session_token", 0),
                (Capability.RAM_DIGEST, "digest", Digest.NONE)):
            if not self.flags & flag and getattr(self, name) != default:
                raise ValueError(f"Capabilities.{name} = {getattr(self, name)} needs flag "
                                 f"{flag.name} (bit {flag.bit_length() - 1})")

    # -- views ---------------------------------------------------------------------------------
    def has(self, flag: Capability) -> bool:
        return bool(self.flags & flag)

    @property
    def pin_all(self) -> bool:
        return self.has(Capability.PIN_ALL)

    @property
    def multi_register(self) -> bool:
        return self.has(Capability.MULTI_REGISTER)

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_shift

    # -- wire ----------------------------------------------------------------------------------
    def encode(self) -> bytes:
        """QEMU's 8 bytes, then the extension block if any bit >= 8 is set."""
        out = _QEMU.pack(self.version, self.flags)
        if self.flags & _EXTENSION_MASK:
            out += _EXT.pack(EXT_MAGIC, EXT_VERSION, self.chunk_shift, self.data_qps,
                             self.digest, self.session_token)
        return out

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Capabilities:
        """Parse private data: 8 bytes, then our block if its magic is there (else ignored).

        Bytes after what we understand are ignored, as QEMU ignores bytes after 8 (the CM may
        pad). Raises ``RemoteProtocolError`` for fewer than 8 bytes or a malformed block.
        """
        if len(data) < QEMU_SIZE:
            raise RemoteProtocolError(
                f"private data of {len(data)} bytes: RDMACapabilities needs {QEMU_SIZE}")
        version, flags = _QEMU.unpack_from(data, 0)
        fields: dict = {}
        if len(data) >= EXTENDED_SIZE and _EXT.unpack_from(data, QEMU_SIZE)[0] == EXT_MAGIC:
            _magic, ext_version, shift, qps, digest, token = _EXT.unpack_from(data, QEMU_SIZE)
            if ext_version < 1:
                raise RemoteProtocolError(
                    f"capabilities extension version {ext_version}: must be >= 1")
            fields = dict(chunk_shift=shift, data_qps=qps, digest=digest, session_token=token)
        try:
            return cls(version, flags, **fields)
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"capabilities: {exc}") from None


@dataclass(frozen=True, slots=True)
class Agreement:
    """What the source may use after the destination's reply."""

    capabilities: Capabilities
    pin_all_declined: bool = False

    @property
    def warnings(self) -> tuple[str, ...]:
        if self.pin_all_declined:
            return ("destination declined rdma-pin-all; falling back to dynamic registration",)
        return ()


def negotiate(request: Capabilities, supported: Capabilities) -> Capabilities:
    """The destination's reply to ``request``, given what it ``supported``s.

    ``supported.flags`` are the bits we are willing to grant, ``supported.data_qps`` the most
    data QPs we accept, ``supported.session_token`` the token we hand out (non-zero if
    DATA_QPS may be granted), ``supported.digest`` the one digest we compute. A chunk size the
    source asks for is accepted whenever CHUNK_SIZE is supported (any valid shift).
    """
    if request.version != VERSION:
        raise RemoteProtocolError(
            f"capabilities version {request.version}: only version {VERSION} exists "
            "(QEMU rejects version < 1 or > 1)")
    granted = request.flags & supported.flags & KNOWN_FLAGS
    qps = min(request.data_qps, supported.data_qps) if granted & Capability.DATA_QPS else 0
    if not qps:
        granted &= ~Capability.DATA_QPS
    elif not supported.session_token:
        raise ValueError("supported.session_token must be non-zero to grant DATA_QPS")
    if not (request.digest and request.digest == supported.digest):
        granted &= ~Capability.RAM_DIGEST
    return Capabilities(
        version=request.version, flags=int(granted),
        chunk_shift=(request.chunk_shift if granted & Capability.CHUNK_SIZE
                     else DEFAULT_CHUNK_SHIFT),
        data_qps=qps, session_token=supported.session_token if qps else 0,
        digest=request.digest if granted & Capability.RAM_DIGEST else Digest.NONE)


def accept_reply(requested: Capabilities, reply: Capabilities) -> Agreement:
    """Check the destination's ``reply`` to what we ``requested`` and say what we may use."""
    if reply.version != VERSION:
        raise RemoteProtocolError(
            f"reply capabilities version {reply.version}: must be {VERSION}")
    extra = reply.flags & ~requested.flags
    if extra:
        raise RemoteProtocolError(
            f"reply capabilities flags {reply.flags:#x} grant {extra:#x}, which the source did "
            f"not ask for (asked {requested.flags:#x})")
    flags = reply.flags & KNOWN_FLAGS
    if flags & Capability.DATA_QPS:
        if not 1 <= reply.data_qps <= requested.data_qps:
            raise RemoteProtocolError(
                f"reply data_qps {reply.data_qps}: must be 1..{requested.data_qps} (asked)")
        if not reply.session_token:
            raise RemoteProtocolError("reply grants DATA_QPS with session_token 0")
    if flags & Capability.CHUNK_SIZE and reply.chunk_shift != requested.chunk_shift:
        raise RemoteProtocolError(
            f"reply chunk_shift {reply.chunk_shift}: must echo {requested.chunk_shift}")
    if flags & Capability.RAM_DIGEST and reply.digest != requested.digest:
        raise RemoteProtocolError(f"reply digest {reply.digest}: must echo {requested.digest}")
    effective = Capabilities(reply.version, int(flags), reply.chunk_shift, reply.data_qps,
                             reply.session_token, reply.digest)
    declined = requested.pin_all and not effective.pin_all
    return Agreement(effective, pin_all_declined=declined)


@dataclass(frozen=True, slots=True)
class DataConnect:
    """Private data of a data-QP connection: which QP, and the session's token."""

    session_token: int
    index: int

    def __post_init__(self) -> None:
        if not isinstance(self.session_token, int) or not 1 <= self.session_token < 1 << 64:
            raise ValueError(f"DataConnect.session_token = {self.session_token}: 1..2^64-1")
        if not isinstance(self.index, int) or not 0 <= self.index <= 255:
            raise ValueError(f"DataConnect.index = {self.index}: 0..255")

    def encode(self) -> bytes:
        return _DATA.pack(DATA_MAGIC, EXT_VERSION, self.index, 0, self.session_token)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> DataConnect:
        if len(data) < _DATA.size:
            raise RemoteProtocolError(
                f"data connection private data of {len(data)} bytes: needs {_DATA.size}")
        magic, version, index, _pad, token = _DATA.unpack_from(data, 0)
        if magic != DATA_MAGIC:
            raise RemoteProtocolError(f"data connection magic {magic:#x}: must be "
                                      f"{DATA_MAGIC:#x}")
        if version < 1:
            raise RemoteProtocolError(f"data connection version {version}: must be >= 1")
        if token == 0:
            raise RemoteProtocolError("data connection session_token 0: must be non-zero")
        return cls(token, index)


def decode_connect(data: bytes | bytearray | memoryview) -> Capabilities | DataConnect:
    """Tell a control connection (``Capabilities``) from a data connection (``DataConnect``)."""
    if len(data) >= _MAGIC.size and _MAGIC.unpack_from(data, 0)[0] == DATA_MAGIC:
        return DataConnect.decode(data)
    return Capabilities.decode(data)
