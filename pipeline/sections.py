"""The sections of our migration stream, whatever carries it (``rdma:``, ``tcp:``, ``file:``).

    header      QEVM, version 3; CONFIGURATION with the machine name ``MACHINE``
    ram         id RAM_SID, instance 0, version 4: START (MEM_SIZE), PART per round, END
    guest       id GUEST_SID: the guest's device state (FULL), framed (be32 length, bytes)
    digest      id DIGEST_SID: ``rdp-ram-digest``, SHA-256 per chunk (FULL), framed
    rounds      ``rdma:`` with page hashes: after round r, ``rdp-round-pages`` instance r
                (id ROUND_SID + r - 1, FULL, framed): which pages the round sent
    devices     id DEVICES_SID: ``rdp-device-digest``, SHA-256 over every device section
                before it (name and framed body, in stream order), so that an edited device
                state is refused as an edited page is
    EOF, then VMDESCRIPTION describing every device section written, field by field

The names and ids of our device sections are defined here and nowhere else (the guests, the
digest and ``stages.pagehash``'s round bitmap only make the bodies); QEMU's own ``ram``
section is the protocol's (``pipeline.protocol.records.RAM_IDSTR``). Every device section body
is framed: be32 length, then the bytes (``frame``, ``device_codec``).

``device_codecs()`` is what a destination's parser needs to find where each of our device
sections ends; ``pipeline.section_writer`` writes them. This module imports nothing, so a guest
process that only names its section loads no protocol code.
"""

from __future__ import annotations

MACHINE = "rdma-pipeline"
DEVICE_VERSION = 1
DEVICES_SID, RAM_SID, GUEST_SID, DIGEST_SID, ROUND_SID = 1, 2, 3, 4, 5   # ROUND_SID + r - 1
SYNTHETIC_SECTION = "rdp-synthetic-guest"     # the synthetic guest's state
KVM_SECTION = "rdp-kvm-guest"                 # the KVM guest's device state
GUEST_SECTIONS = {SYNTHETIC_SECTION: "synthetic", KVM_SECTION: "kvm"}   # section -> guest kind
DIGEST_SECTION = "rdp-ram-digest"             # SHA-256 per chunk (pipeline.digest)
ROUND_SECTION = "rdp-round-pages"             # a round's pages (stages.pagehash.pack_round)
DEVICES_SECTION = "rdp-device-digest"         # SHA-256 of the device sections before it


def frame(data: bytes) -> bytes:
    """``data`` as a length-prefixed device section body."""
    return len(data).to_bytes(4, "big") + data


def device_codec(data: bytes, version: int) -> int | None:
    """Length of a length-prefixed device section (be32 length, then that many bytes)."""
    if len(data) < 4:
        return None
    return 4 + int.from_bytes(data[:4], "big")


def device_codecs() -> dict:
    """Section idstr -> parser codec for every device section we write (all framed)."""
    return dict.fromkeys([*GUEST_SECTIONS, DIGEST_SECTION, DEVICES_SECTION], device_codec)
