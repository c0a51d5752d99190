"""What a session may use with its peer, fixed once at connect time.

An rdma-pipeline peer announces our extensions with capability bits QEMU masks away; a QEMU
peer grants at most ``rdma-pin-all``. ``PeerPolicy`` turns what was asked for and what was
granted into plain facts the sessions read (``policy.data_qps``, ``policy.round_sections``...),
so no session method branches on capability bits. The source asks with ``request()`` and
decides with ``from_agreement()``; the destination grants with ``supported()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.protocol.capabilities import Capabilities, Capability, Digest
from pipeline.sections import MACHINE

DEFAULT_CHUNK_SIZE = 1 << 20
DESTINATION_DATA_QPS = 4


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """The facts of one peer, as both sides agreed them."""

    pin_all: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    data_qps: bool = False           # RDMA WRITEs on separate data QPs (the poster's)
    multi_register: bool = False     # several registrations per REGISTER REQUEST
    digest: Digest = Digest.NONE     # how the destination verifies RAM at the end
    session_token: int = 0           # data QPs present it when they connect
    inline: bool = False             # pages travel inline in the stream (tcp:, file:)
    machine: str = MACHINE           # the machine type the stream's configuration names
    return_path: bool = False        # tcp:: the source opens QEMU's return path, and the
                                     # destination confirms (SHUT) only on one it opened

    @property
    def own_sections(self) -> bool:
        """The stream carries our device sections (the guest's state, the digests): only as
        machine rdma-pipeline; a QEMU machine type (``none``) refuses sections it lacks."""
        return self.machine == MACHINE

    @property
    def verified(self) -> bool:
        """The destination checks every chunk against the source's digest before it resumes."""
        return self.digest != Digest.NONE

    @property
    def unverified(self) -> str:
        """Why the RAM cannot be verified with this peer ("" when it can)."""
        if self.verified:
            return ""
        return ("the RAM was not verified: the peer speaks QEMU's rdma: protocol version 1 "
                "(it granted none of our extensions), so no RAM digest travels")

    @property
    def round_sections(self) -> bool:
        """Each round's pages are named to the destination (``rdp-round-pages``), which
        hashes them while the next round runs: only with page-hash verification, and only in
        a stream of ours (a QEMU machine type refuses sections it does not know)."""
        return self.digest == Digest.PAGE_HASH and not self.inline and self.own_sections

    @property
    def ready_after_eof(self) -> bool:
        """The rdma: destination confirms with one more READY after EOF once it verified the
        RAM (our extension; QEMU's destination sends nothing)."""
        return self.verified and not self.inline

    @property
    def two_phase(self) -> bool:
        """The destination runs the guest only once the source has committed (our extension).
        It confirms a verified migration and waits for the source's COMMIT before it resumes:
        a confirmation lost on the way then ends with the guest on the source alone, where
        QEMU's order (resume, then confirm) would leave it running on both hosts. Only in a
        stream of ours: QEMU's machine types carry no digest and no guest of ours."""
        return self.verified and self.own_sections

    @property
    def register_batch(self) -> int:
        """Most registrations one REGISTER or UNREGISTER REQUEST may carry."""
        return 512 if self.multi_register else 1

    # -- the source ----------------------------------------------------------------------
    @staticmethod
    def request(*, pin_all: bool, chunk_size: int, extensions: bool = True) -> Capabilities:
        """What a source asks for: QEMU's pin-all, and our extensions unless told not to."""
        flags = Capability.PIN_ALL if pin_all else Capability(0)
        shift = chunk_size.bit_length() - 1
        if not extensions:
            return Capabilities(flags=int(flags))
        flags |= Capability.DATA_QPS | Capability.MULTI_REGISTER | Capability.RAM_DIGEST
        if shift != 20:
            flags |= Capability.CHUNK_SIZE
        return Capabilities(flags=int(flags), chunk_shift=shift, data_qps=1,
                            digest=Digest.PAGE_HASH)

    @classmethod
    def from_agreement(cls, caps: Capabilities) -> PeerPolicy:
        """The policy a negotiation's effective capabilities give."""
        return cls(pin_all=caps.pin_all, chunk_size=caps.chunk_size,
                   data_qps=caps.has(Capability.DATA_QPS), multi_register=caps.multi_register,
                   digest=Digest(caps.digest) if caps.has(Capability.RAM_DIGEST)
                   else Digest.NONE,
                   session_token=caps.session_token)

    # -- the destination -----------------------------------------------------------------
    @staticmethod
    def supported(*, chunk_size: int, session_token: int,
                  extensions: bool = True) -> Capabilities:
        """What a destination grants: QEMU's pin-all, and our extensions unless told not to."""
        if not extensions:
            return Capabilities(flags=int(Capability.PIN_ALL))
        flags = (Capability.PIN_ALL | Capability.MULTI_REGISTER | Capability.DATA_QPS
                 | Capability.RAM_DIGEST | Capability.CHUNK_SIZE)
        return Capabilities(flags=int(flags), chunk_shift=chunk_size.bit_length() - 1,
                            data_qps=DESTINATION_DATA_QPS, session_token=session_token,
                            digest=Digest.PAGE_HASH)


# The stream carriers (tcp:, file:) carry pages inline and always end with our digest.
STREAM_POLICY = PeerPolicy(digest=Digest.PAGE_HASH, inline=True)


def stream_policy(carrier: str, machine: str = MACHINE) -> PeerPolicy:
    """A stream source's policy: our digest only as machine rdma-pipeline (QEMU reads none),
    and over ``tcp:`` QEMU's return path, on which the destination confirms."""
    return PeerPolicy(digest=Digest.PAGE_HASH if machine == MACHINE else Digest.NONE,
                      inline=True, machine=machine, return_path=carrier == "tcp")
