"""DestinationSession walked through whole dialogues with crafted events: no process, socket
or region. Every failure or cancel ends with AbortPeer and a final state, never a resume."""

from __future__ import annotations

import numpy as np
import pytest
from destination_world import (
    BLOCKS,
    DIGEST,
    GUEST_STATE,
    MIB,
    DestinationWorld,
    Rounds,
    addresses,
    ours,
)

from pipeline.config import MigrationConfig
from pipeline.protocol.capabilities import Digest
from pipeline.protocol.messages import (
    Compress,
    CompressMessage,
    DestBlock,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from pipeline.protocol.records import Hook
from pipeline.sections import DIGEST_SECTION
from pipeline.sections import SYNTHETIC_SECTION as DEVICE_SECTION
from pipeline.session import destination_events as de
from pipeline.session.destination import COMMIT_TIMEOUT_S, DestinationSession
from pipeline.session.states import (
    DESTINATION_TRANSITIONS,
    DestinationState,
    StateMachine,
)
from shm.errors import LocalProtocolError
from stages.pagehash import pack_round

D = DestinationState
REGION = addresses(BLOCKS)
PC, VGA = REGION
FINISHED = RegisterFinishedMessage()
ROUND = pack_round([np.zeros(1024 // 8, np.uint8), np.zeros(64 // 8, np.uint8)])


def reg(block: int, offset: int, chunks: int = 0) -> Register:
    """A REGISTER record for ``offset`` bytes into block ``block`` (of REGION)."""
    return Register(REGION[block].offset + offset, block, chunks)


def opened(**kw) -> tuple[DestinationWorld, Rounds]:
    """An rdma: session through setup: MEM_SIZE, the first window (RAM BLOCKS) closed."""
    world = DestinationWorld(**kw).start()
    src = Rounds()
    world.feed(*src.setup(), RamBlocksRequestMessage(), FINISHED)
    return world, src


def finish(world: DestinationWorld, src: Rounds, **end) -> DestinationWorld:
    """The final round (nothing to register) and the end of the stream."""
    return world.feed(*src.round(final=True), FINISHED, *src.end(**end))


def assert_refused(world: DestinationWorld, *words: str, state: D = D.FAILED) -> None:
    s = world.session
    assert s.state is state, s.reason
    assert all(w in s.reason for w in words), s.reason
    assert "\n" not in s.reason and str(s.error).startswith(s.reason)
    assert not world.of(de.LoadGuest) and not world.of(de.Confirm), "resumed after failing"
    failing = world.actions[-2:]
    assert isinstance(failing[0], de.AbortPeer) and failing[1] == de.StateChanged(
        state.value, s.reason)
    assert world.session.handle(de.Cancel(), 9.0) == []       # final: nothing more


# -- the table --------------------------------------------------------------------------
def test_transition_table():
    table = DESTINATION_TRANSITIONS
    assert set(table) == set(D)
    for state in (D.COMPLETED, D.FAILED, D.CANCELLED):
        assert table[state] == frozenset()
    for state in (D.NONE, D.SETUP, D.ACTIVE):
        assert {D.FAILED, D.CANCELLED} <= table[state]
    assert D.COMPLETED in table[D.ACTIVE] and D.COMPLETED not in table[D.SETUP]
    sm = StateMachine("destination", table)
    with pytest.raises(LocalProtocolError, match="destination migration state none cannot go "
                                                 "to active"):
        sm.to(D.ACTIVE, 1.0)
    assert sm.state is D.NONE
    for state in (D.SETUP, D.ACTIVE, D.COMPLETED):
        sm.to(state, 1.0)
    assert sm.final


# -- whole dialogues --------------------------------------------------------------------
def test_dynamic_registration_over_several_rounds():
    world, src = opened()
    s = world.session
    assert world.states == ["setup", "active"]
    assert world.of(de.CreateRegion) == [de.CreateRegion(BLOCKS, MIB)]
    assert len(world.of(de.StartGuest)) == 1 and len(world.of(de.OpenWindow)) == 1
    assert world.replies == [RamBlocksResultMessage(tuple(
        DestBlock(b.address, b.offset, b.length, 0) for b in REGION))]
    assert s.policy.multi_register and s.policy.round_sections

    # round 1: a REGISTER of three records (one chunk twice), COMPRESS, then its pages
    world.feed(*src.round(), RegisterRequestMessage((reg(0, 0), reg(0, MIB + 4096),
                                                     reg(0, 100))))
    assert world.of(de.RegisterChunks)[-1] == de.RegisterChunks((
        ((0, 0), PC.address, MIB), ((0, 1), PC.address + MIB, MIB)))
    assert world.replies[-1] == RegisterResultMessage(
        (RegisterResult(0x101, PC.address), RegisterResult(0x102, PC.address),
         RegisterResult(0x101, PC.address)), repeat=3)
    world.feed(CompressMessage(Compress(1, VGA.offset + 8192, 8192)), FINISHED)
    assert world.of(de.ZeroRange) == [de.ZeroRange("vga.vram", 8192, 8192)]
    src.round_pages(ROUND)

    # round 2: chunks registered before keep their rkeys; a new one registers alone
    world.feed(*src.round(), RegisterRequestMessage((reg(0, MIB), reg(1, 0, chunks=0))))
    assert world.of(de.RegisterChunks)[-1] == de.RegisterChunks((
        ((1, 0), VGA.address, 256 * 1024),))
    assert world.replies[-1].results == (RegisterResult(0x102, PC.address),
                                         RegisterResult(0x103, VGA.address))
    world.feed(FINISHED)
    assert world.of(de.HashRound) == [de.HashRound(ROUND, ("pc.ram", "vga.vram"))]
    assert not world.of(de.SettleHashes)       # its pages went out with round 2's HOOK

    # switchover: the last round's pages alone in a message, whose READY waits for hashing
    src.round_pages(ROUND)
    world.feed(*src.flush())
    assert isinstance(world.actions[-2], de.SettleHashes)
    assert isinstance(world.actions[-1], de.AwaitMessage)
    finish(world, src)
    assert world.of(de.HashRam) == [de.HashRam(("pc.ram", "vga.vram"), MIB, Digest.PAGE_HASH)]
    assert world.of(de.LoadGuest) == [de.LoadGuest(DEVICE_SECTION, GUEST_STATE)]
    # two-phase: confirmed, then the guest runs on the source's COMMIT
    assert world.actions[-4:] == [de.Confirm(), de.AwaitCommit(COMMIT_TIMEOUT_S),
                                  de.LoadGuest(DEVICE_SECTION, GUEST_STATE),
                                  de.StateChanged("completed")]
    assert s.state is D.COMPLETED and s.verified is True
    assert s.stats.resume_time > s.stats.pause_time > 0
    assert s.stats.total_bytes == sum(n for _, n in BLOCKS)
    assert not world.of(de.AbortPeer)
    assert world.session.handle(de.Failed("late"), 9.0) == []   # after the commit point


def test_pin_all_registers_each_block_once_on_demand():
    world = DestinationWorld(capabilities=ours(pin_all=True)).start()
    src = Rounds()
    world.feed(*src.setup(), RamBlocksRequestMessage())
    assert world.of(de.PinBlocks) == [de.PinBlocks(tuple((b.address, b.length)
                                                         for b in REGION))]
    assert world.replies == [RamBlocksResultMessage((
        DestBlock(PC.address, PC.offset, PC.length, 0x101),
        DestBlock(VGA.address, VGA.offset, VGA.length, 0x102)))]
    world.feed(FINISHED)
    for _ in range(3):
        world.feed(*src.round(), FINISHED)
        src.round_pages(ROUND)
    world.feed(*src.flush())
    finish(world, src)
    assert world.session.state is D.COMPLETED
    assert not world.of(de.RegisterChunks) and len(world.of(de.HashRound)) == 3


def test_unregister_finds_the_chunk_register_stored_whatever_the_block_order():
    # The region was made from given blocks in another order than the stream's: the source
    # names blocks by their index in the stream, and so must both REGISTER and UNREGISTER.
    world = DestinationWorld(blocks=list(reversed(BLOCKS))).start()
    src = Rounds()
    world.feed(*src.setup(), RamBlocksRequestMessage(), FINISHED)
    vga = next(b for b in world.session.region if b.idstr == "vga.vram")
    world.feed(*src.round(), RegisterRequestMessage((Register(vga.offset, 1),)))
    assert world.of(de.RegisterChunks) == [de.RegisterChunks((((1, 0), vga.address,
                                                                256 * 1024),))]
    world.feed(UnregisterRequestMessage((Register(0, 1), Register(3, 0))))
    assert world.of(de.DeregisterChunks) == [de.DeregisterChunks(((1, 0),))]
    assert world.replies[-1] == UnregisterFinishedMessage(2)
    world.feed(RegisterRequestMessage((Register(vga.offset, 1),)))    # registered anew
    assert len(world.of(de.RegisterChunks)) == 2
    world.feed(FINISHED)
    assert world.session.state is D.ACTIVE


def test_a_peer_without_multi_register_gets_one_result():
    world, src = opened(capabilities=ours(extensions=False))
    world.feed(*src.round(), RegisterRequestMessage((reg(0, 0), reg(0, MIB))))
    assert world.replies[-1] == RegisterResultMessage((RegisterResult(0x101, PC.address),),
                                                      repeat=2)


@pytest.mark.parametrize("carrier", ["tcp", "file"])
def test_stream_carriers(carrier):
    label = "file:/x.qemu" if carrier == "file" else ""
    world = DestinationWorld(carrier, label=label).start()
    src = Rounds(records=True)
    world.feed(*src.setup(), *src.round())
    src.end_section()
    world.feed(*src.flush(), *src.round(final=True), *src.end())
    assert world.of(de.Accept) == [de.Accept(None)]
    assert world.of(de.HashLanded) == [de.HashLanded(("pc.ram", "vga.vram"))] * 3
    assert bool(world.of(de.StartGuest)) == (carrier == "tcp")    # a restore: only at the end
    if carrier == "file":
        assert world.session.state is D.ACTIVE                   # the file must end there
        world.feed(de.StreamEnded(5000))
    if carrier == "file":       # nobody to confirm to: QEMU's order
        assert world.actions[-3:] == [de.LoadGuest(DEVICE_SECTION, GUEST_STATE), de.Confirm(),
                                      de.StateChanged("completed")]
    else:
        assert world.actions[-4:] == [de.Confirm(), de.AwaitCommit(COMMIT_TIMEOUT_S),
                                      de.LoadGuest(DEVICE_SECTION, GUEST_STATE),
                                      de.StateChanged("completed")]
    assert world.of(de.HashRam) == [de.HashRam(("pc.ram", "vga.vram"), MIB, Digest.PAGE_HASH)]


def test_stream_digest_of_another_chunk_size_is_followed():
    world = DestinationWorld("tcp").start()
    src = Rounds(records=True)
    world.feed(*src.setup(), *src.round(final=True), *src.end(digest=DIGEST[:64]))
    assert world.of(de.HashRam) == [de.HashRam(("pc.ram", "vga.vram"), 4 * MIB,
                                               Digest.PAGE_HASH)]
    assert world.session.state is D.COMPLETED


# -- refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("record, words", [
    (Register(0, 2), ["block index 2 out of range (2 blocks)"]),
    (Register(4 * MIB, 0), ["REGISTER address 0x400000 is outside block pc.ram"]),
    (Register(4 * MIB + 256 * 1024, 1), ["outside block vga.vram"]),
])
def test_a_bad_register_record_fails_before_anything_is_registered(record, words):
    world, src = opened()
    world.feed(*src.round(), RegisterRequestMessage((reg(0, 0), record)))
    assert_refused(world, *words)
    assert not world.of(de.RegisterChunks) and len(world.replies) == 1


@pytest.mark.parametrize("offset, length", [
    (VGA.offset - 4096, 8192), (VGA.offset + 256 * 1024 - 4096, 8192),
    (VGA.offset + 100, 4096), (VGA.offset, 100)])
def test_a_bad_compress_range_fails(offset, length):
    world, src = opened()
    world.feed(*src.round(), CompressMessage(Compress(1, offset, length)))
    assert_refused(world, f"COMPRESS range {offset:#x}+{length:#x} is outside block "
                          "vga.vram or not page-aligned")
    assert not world.of(de.ZeroRange)


def test_a_message_a_window_does_not_take_fails():
    world, src = opened()
    world.feed(*src.round(), ReadyMessage())
    assert_refused(world, "unexpected ReadyMessage in a registration window")


def test_missing_digest_refuses_to_resume():
    world, src = opened()
    finish(world, src, digest=None)
    assert_refused(world, "the source sent no RAM digest: cannot verify the RAM",
                   "never resumes on unchecked memory")


def test_missing_guest_state_refuses_to_resume():
    world, src = opened()
    finish(world, src, guest=False)
    assert_refused(world, "the stream carried no guest device state")
    assert world.session.verified is True


def test_an_edited_guest_state_is_refused_by_the_device_digest():
    world, src = opened()
    finish(world, src, devices=bytes(32))      # what the source hashed differs from this
    assert_refused(world, "device state verification failed: the device sections differ")
    assert world.session.verified is False


def test_a_stream_without_the_device_digest_is_refused():
    world, src = opened()
    finish(world, src, devices=None)
    assert_refused(world, "no device-state digest: cannot verify the guest's state")


def test_mismatch_names_the_chunks_and_never_resumes():
    world, src = opened()
    world.mine = DIGEST[:32] + bytes(32) + DIGEST[64:128] + bytes(32)
    finish(world, src)
    assert_refused(world, "RAM verification failed: 2 chunk(s) differ (pc.ram chunk 1, "
                          "vga.vram chunk 0); the guest was not resumed")
    assert world.session.verified is False and world.session.stats.verified is False


def test_stream_mismatch_says_where_the_first_chunk_came_from():
    world = DestinationWorld("file", label="file:/x.qemu").start()
    world.mine = bytes(32) + DIGEST[32:]
    src = Rounds(records=True)
    world.feed(*src.setup(), *src.round(final=True), *src.end(), de.StreamEnded(9))
    assert world.of(de.LocateChunk) == [de.LocateChunk("pc.ram", 0, MIB)]
    assert_refused(world, "file:/x.qemu: RAM verification failed: 1 chunk(s) differ "
                          "(pc.ram chunk 0: its pages came from stream bytes 100..4204 of "
                          "section 'ram'); the guest was not resumed")


def test_stream_digest_that_fits_no_chunk_size():
    world = DestinationWorld("tcp").start()
    src = Rounds(records=True)
    world.feed(*src.setup(), *src.round(final=True), *src.end(digest=bytes(33)))
    assert_refused(world, "the RAM digest (33 bytes) does not fit RAM blocks of "
                          f"[{4 * MIB}, {256 * 1024}] bytes")


@pytest.mark.parametrize("carrier", ["rdma", "tcp"])
def test_layout_mismatch_at_mem_size_names_both(carrier):
    world = DestinationWorld(carrier, blocks=[("pc.ram", 8 * MIB), ("vga.vram", 256 * 1024)])
    world.start()
    src = Rounds(records=carrier != "rdma")
    world.feed(*src.setup())
    assert world.of(de.CreateRegion) == [de.CreateRegion((("pc.ram", 8 * MIB),
                                                          ("vga.vram", 256 * 1024)), MIB)]
    assert_refused(world, "ram blocks mismatch: the stream has [('pc.ram', 4194304), "
                          "('vga.vram', 262144)], this destination [('pc.ram', 8388608), "
                          "('vga.vram', 262144)]", "start both sides with the same RAM size")
    assert not world.of(de.StartGuest)


def test_a_block_the_destination_lacks_is_named():
    world = DestinationWorld(blocks=[("pc.ram", 4 * MIB), ("vga", 256 * 1024)]).start()
    world.feed(*Rounds().setup())
    assert_refused(world, "RAMBlock 'vga.vram' not found on the destination")


def test_chunk_size_differing_from_the_region_fails_at_accept():
    world = DestinationWorld(blocks=list(BLOCKS), capabilities=ours(chunk_size=2 * MIB))
    world.start()
    assert_refused(world, "source chunk size 2097152 differs from this destination's 1048576")


def test_round_pages_without_page_hash_or_of_the_wrong_size():
    world, src = opened(capabilities=ours(extensions=False))
    world.feed(*src.round(), FINISHED)
    src.round_pages(ROUND)
    world.feed(*src.flush())
    assert_refused(world, "round page bitmaps without page-hash verification")
    for body, words in [(b"junk", "bad round page bitmap"),
                        (pack_round([np.zeros(3, np.uint8)]), "round page bitmap of 3 bytes "
                                                              "does not fit the RAM blocks")]:
        world, src = opened()
        world.feed(*src.round(), FINISHED)
        src.round_pages(body)
        world.feed(*src.flush())
        assert_refused(world, words)


def test_a_hook_in_a_stream_carrier_fails():
    world = DestinationWorld("tcp").start()
    world.feed(*Rounds(records=True).setup(), de.StreamRecord(Hook(), 77))
    assert_refused(world, "migration stream offset 77: a HOOK record in a tcp: stream")


def test_a_stream_cut_after_eof_fails():
    world = DestinationWorld("file", label="file:/x.qemu").start()
    src = Rounds(records=True)
    records = [*src.setup(), *src.round(final=True), *src.end()][:-1]   # no VMDESCRIPTION
    world.feed(*records, de.StreamEnded(1234))
    assert_refused(world, "file:/x.qemu: migration stream ends after QEMU_VM_EOF at offset "
                          "1234 without its VMDESCRIPTION")


def test_an_event_not_asked_for_fails_the_session():
    world, _ = opened()
    world.tell(de.RamHashed(DIGEST))
    assert_refused(world, "destination session in state active got RamHashed, waiting for "
                          "ControlReceived")


def test_an_unknown_carrier_is_refused():
    with pytest.raises(ValueError, match="carrier"):
        DestinationSession(MigrationConfig(), carrier="udp")


# -- cancel and failure at every step ----------------------------------------------------
def dialogue(world: DestinationWorld) -> None:
    """A whole rdma: migration fed to ``world`` (stops early if the session ends)."""
    src = Rounds()
    world.feed(*src.setup(), RamBlocksRequestMessage(), FINISHED)
    world.feed(*src.round(), RegisterRequestMessage((reg(0, 0),)),
               CompressMessage(Compress(1, VGA.offset, 4096)),
               UnregisterRequestMessage((Register(0, 0),)), FINISHED)
    src.round_pages(ROUND)
    world.feed(*src.flush())
    finish(world, src)


def asking_steps() -> list[type]:
    world = DestinationWorld(blocks=list(BLOCKS)).start()
    dialogue(world)
    assert world.session.state is D.COMPLETED
    return [type(a) for a in world.actions if isinstance(a, de.ASKING)]


STEPS = asking_steps()


@pytest.mark.parametrize("step", range(len(STEPS)))
@pytest.mark.parametrize("how", ["failed", "cancelled"])
def test_a_failure_or_cancel_at_every_step(step, how):
    world = DestinationWorld(blocks=list(BLOCKS))
    original = world._answer

    def answer(action):
        asked = [a for a in world.actions if isinstance(a, de.ASKING)]
        if len(asked) - 1 == step:
            assert type(action) is STEPS[step]
            return de.Failed("boom: the driver broke") if how == "failed" else de.Cancel()
        return original(action)

    world._answer = answer
    world.start()
    dialogue(world)
    s = world.session
    if how == "cancelled" and STEPS[step] in (de.AwaitCommit, de.LoadGuest):
        # confirmed: the source may have committed, so a cancel is too late and ignored
        assert s.state is D.ACTIVE and s.committing and not world.of(de.AbortPeer)
        return
    assert s.state is D(how), (STEPS[step], s.state)
    assert world.of(de.AbortPeer) == [de.AbortPeer()]
    assert world.states[-1] == how
    assert "completed" not in world.states
    # a resume is asked for only before the failure, and only if the step came after it
    assert bool(world.of(de.LoadGuest)) == (STEPS.index(de.LoadGuest) <= step)
    abort = world.actions.index(de.AbortPeer())
    assert not [a for a in world.actions[abort:] if isinstance(a, de.ASKING)]
    assert s.reason == ("boom: the driver broke" if how == "failed"
                        else "incoming migration cancelled")


@pytest.mark.parametrize("when", ["none", "setup", "active", "window", "verifying",
                                  "completed"])
def test_cancel_in_every_state(when):
    world = DestinationWorld()
    if when != "none":
        world.answers[de.Accept] = lambda a: None if when == "setup" else de.Accepted(
            ours()(a.capabilities))
        world.start()
    src = Rounds()
    if when in ("active", "window", "verifying", "completed"):
        world.feed(*src.setup(), RamBlocksRequestMessage(), FINISHED)
    if when == "window":
        world.feed(*src.round())
    if when == "verifying":
        world.answers[de.HashRam] = lambda a: None
        finish(world, src)
        assert isinstance(world.actions[-1], de.HashRam)
    if when == "completed":
        finish(world, src)
    before = world.session.state
    out = world.tell(de.Cancel())
    if when == "completed":
        assert out == [] and world.session.state is D.COMPLETED
        return
    assert out == [de.AbortPeer(), de.StateChanged("cancelled", "incoming migration cancelled")]
    assert world.session.state is D.CANCELLED and before is not D.CANCELLED
    assert not world.of(de.LoadGuest)


def test_a_file_names_itself_in_a_cancel():
    world = DestinationWorld("file", label="file:/x.qemu").start()
    world.tell(de.Cancel())
    assert world.session.reason == "file:/x.qemu: incoming migration cancelled"
    assert world.session.stats.error == world.session.reason


def test_stats_of_a_session():
    world, src = opened()
    finish(world, src)
    st = world.session.stats
    assert st.status == "completed" and st.verified is True and st.end_time > st.start_time
    assert DIGEST_SECTION and world.session.digests == DIGEST
