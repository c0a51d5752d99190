"""DestinationSession against a peer that speaks QEMU's protocol version 1 only (it granted
no extension): no digest, decided at connect time, so the end of the stream completes the
migration unverified, says why, and sends no READY after EOF; QEMU's VMDESCRIPTION after EOF
is read when it follows in the stream."""

from __future__ import annotations

from destination_world import DestinationWorld, Rounds, ours

from pipeline.config import MigrationConfig
from pipeline.protocol.capabilities import Capabilities
from pipeline.protocol.messages import (
    QemuFileMessage,
    RamBlocksRequestMessage,
    RegisterFinishedMessage,
)
from pipeline.session import destination_events as de
from pipeline.session.policy import PeerPolicy
from pipeline.session.states import DestinationState

D = DestinationState
FINISHED = RegisterFinishedMessage()


def qemu_source(supported: Capabilities) -> Capabilities:
    """What QEMU's source ends up with: pin-all at most, nothing of ours."""
    return Capabilities()


def qemu_world(**kw) -> tuple[DestinationWorld, Rounds]:
    world = DestinationWorld(capabilities=qemu_source, **kw).start()
    src = Rounds()
    world.feed(*src.setup(), RamBlocksRequestMessage(), FINISHED)
    return world, src


def test_a_source_without_digest_completes_unverified_and_says_why():
    world, src = qemu_world()
    assert not world.session.policy.verified
    world.feed(*src.round(final=True), FINISHED, *src.end(digest=None, devices=None))
    s = world.session
    assert s.state is D.COMPLETED, s.reason
    assert world.of(de.LoadGuest) and not world.of(de.HashRam)
    assert world.of(de.Confirm) == [de.Confirm(ready_after_eof=False)], \
        "QEMU's source expects no READY after EOF"
    assert s.stats.verified is None
    assert "not verified" in s.stats.verification and "version 1" in s.stats.verification


def test_our_source_with_extensions_off_is_treated_as_qemu():
    world = DestinationWorld(capabilities=ours(extensions=False)).start()
    src = Rounds()
    world.feed(*src.setup(), RamBlocksRequestMessage(), FINISHED,
               *src.round(final=True), FINISHED, *src.end(digest=None, devices=None))
    assert world.session.state is D.COMPLETED
    assert world.of(de.Confirm) == [de.Confirm(ready_after_eof=False)]


def test_the_vmdescription_after_eof_is_read_from_the_next_message():
    world, src = qemu_world()
    msgs = src.round(final=True)
    world.feed(*msgs, FINISHED)
    end = b"".join(m.data for m in src.end(digest=None, devices=None))
    cut = end.rindex(b"\x00\x06") + 3        # QEMU_VM_EOF, VMDESCRIPTION, a byte of its length
    world.feed(QemuFileMessage(end[:cut]))
    assert world.session.state is D.ACTIVE and isinstance(world.waiting, de.AwaitMessage)
    world.feed(QemuFileMessage(end[cut:]))
    assert world.session.state is D.COMPLETED, world.session.reason


def test_extensions_off_grants_only_pin_all():
    cfg = MigrationConfig(extensions=False)
    world = DestinationWorld(config=cfg).start()
    accept = world.of(de.Accept)[0]
    assert accept.capabilities == PeerPolicy.supported(chunk_size=cfg.chunk_size,
                                                       session_token=1, extensions=False)
    assert accept.capabilities.flags == 1
