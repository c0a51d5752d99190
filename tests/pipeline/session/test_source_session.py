"""SourceSession, with no process: whole migrations, and a failure or cancel at every step."""

from __future__ import annotations

import pytest
from source_world import BLOCKS, SourceWorld, granted

from pipeline.config import MigrationConfig
from pipeline.protocol.capabilities import Capabilities
from pipeline.protocol.messages import (
    CompressMessage,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterRequestMessage,
)
from pipeline.session import actions as act
from pipeline.session import events as ev
from pipeline.session.source import SourceSession
from pipeline.session.states import SOURCE_TRANSITIONS, SourceState
from shm.errors import LocalProtocolError

FINAL = ("completed", "failed", "cancelled")


def test_a_dynamic_migration_walks_setup_rounds_switchover_and_commits():
    w = SourceWorld()
    w.run()
    assert w.states() == ["setup", "active", "device", "completed"]
    assert w.session.committed and w.session.stats.verified is True
    # every dirty chunk registered once (chunk (1, 1) is zero: COMPRESS instead)
    regs = [r for m in w.sent if isinstance(m, RegisterRequestMessage) for r in m.records]
    rounds = len(w.of(act.SyncDirtyLog)) + 1          # then the final one
    assert rounds >= 3
    assert len(regs) == 9
    zero_rounds = [r for r in range(1, rounds + 1) if min(r, 3) == 3]
    assert len([m for m in w.sent if isinstance(m, CompressMessage)]) == len(zero_rounds)
    # one REGISTER FINISHED for setup and one per round
    assert len([m for m in w.sent if isinstance(m, RegisterFinishedMessage)]) == rounds + 1
    assert [a.round for a in w.of(act.CommandScanner)] == list(range(1, rounds + 1))
    assert [a.final for a in w.of(act.CommandScanner)] == [False] * (rounds - 1) + [True]
    assert len(w.of(act.PauseGuest)) == 1 and not w.of(act.ResumeGuest)
    # the final round's pages went out with the guest paused, then the digest, then EOF
    kinds = [type(a) for a in w.log]
    assert kinds.index(act.PauseGuest) < kinds.index(act.ComputeDigest)
    assert w.session.stats.dirty_sync_count == rounds - 1


def test_registrations_start_small_and_double_up_to_the_batch():
    w = SourceWorld(rounds=[[(0, c) for c in range(60)]],
                    blocks=(("pc.ram", 64 << 20), ("vga.vram", 2 << 20)), dirty=[0],
                    zero_chunks=frozenset())
    w.run()
    sizes = [len(m.records) for m in w.sent if isinstance(m, RegisterRequestMessage)]
    assert sizes == [16, 32, 12]


def test_qemu_shaped_registration_is_one_record_a_message():
    w = SourceWorld(capabilities=granted(flags=int(granted().flags) & ~(1 << 8)))
    w.run()
    assert w.states()[-1] == "completed"
    sizes = {len(m.records) for m in w.sent if isinstance(m, RegisterRequestMessage)}
    assert sizes == {1}


def test_pin_all_answers_every_block_at_setup_and_registers_nothing():
    w = SourceWorld(config=MigrationConfig(pin_all=True), capabilities=granted(pin_all=True))
    w.run()
    assert w.states()[-1] == "completed"
    assert not [m for m in w.sent if isinstance(m, RegisterRequestMessage)]
    first = w.pushed[0]
    assert list(first["block"]) == [0, 1] and set(first["rkey"]) == {99}


def test_unregister_waits_for_its_finished_and_counts():
    w = SourceWorld(unregister_after=2)
    w.run()
    assert w.states()[-1] == "completed"
    assert len([m for m in w.sent if isinstance(m, UnregisterRequestMessage)]) == 1
    assert w.session.stats.stages.chunks_unregistered == 1


def test_a_guest_that_never_converges_gives_up_and_resumes_nothing():
    w = SourceWorld(config=MigrationConfig(max_rounds=3), dirty=[5000] * 10,
                    rounds=[[(0, 0)]] * 10)
    w.run()
    assert w.states()[-1] == "failed"
    assert "did not converge after 3 rounds" in w.session.stats.error
    assert not w.of(act.PauseGuest) and w.guest_running


def test_the_first_round_alone_never_switches_over_while_pages_are_dirty():
    w = SourceWorld(dirty=[1, 0], rounds=[[(0, 0)], [(0, 1)]])
    w.run()
    assert [a.round for a in w.of(act.CommandScanner)] == [1, 2, 3]


@pytest.mark.parametrize("config", [MigrationConfig(), MigrationConfig(extensions=False)],
                         ids=["asked", "x-rdma-extensions=off"])
def test_a_destination_that_grants_no_extension_gets_qemus_version_1(config):
    # QEMU's destination masks every flag but pin-all: one QP (ConnectDataPath(0)), one
    # registration per message, no digest, no round sections, no READY awaited after EOF.
    w = SourceWorld(config=config, capabilities=Capabilities())
    w.run()
    assert w.states() == ["setup", "active", "device", "completed"]
    assert w.of(act.ConnectDataPath) == [act.ConnectDataPath(0)]
    assert {len(m.records) for m in w.sent if isinstance(m, RegisterRequestMessage)} == {1}
    for kind in (act.ComputeDigest, act.ReadRoundPages, act.AwaitCredit,
                 act.AwaitConfirmation):
        assert not w.of(kind), kind
    st = w.session.stats
    assert st.verified is None and "version 1" in st.verification and "not verified" in \
        st.verification


def test_extensions_off_asks_for_pin_all_alone():
    cfg = MigrationConfig(pin_all=True, extensions=False)
    w = SourceWorld(config=cfg, capabilities=Capabilities(flags=1))
    w.run()
    assert w.of(act.Connect)[0].capabilities == Capabilities(flags=1)
    assert w.states()[-1] == "completed"


@pytest.mark.parametrize("refusal, words", [
    (dict(chunk_shift=21, flags=int(granted().flags) | (1 << 10)), "refused chunk size"),
])
def test_a_destination_that_grants_too_little_is_refused_at_connect(refusal, words):
    w = SourceWorld(capabilities=granted(**refusal))
    w.run()
    assert w.states() == ["setup", "failed"]
    assert words in w.session.stats.error
    assert w.of(act.AbortPeer)


def test_pin_all_declined_fails():
    w = SourceWorld(config=MigrationConfig(pin_all=True), capabilities=granted())
    w.run()
    assert "declined rdma-pin-all" in w.session.stats.error


def test_a_register_result_of_the_wrong_size_fails_the_migration():
    w = SourceWorld()

    def one_result(msg):
        if isinstance(msg, RegisterRequestMessage) and len(msg.records) > 1:
            return RegisterResultMessage((RegisterResult(1, 2),), repeat=len(msg.records))
        return w.destination(msg)

    w.peer = one_result
    w.run()
    assert w.states()[-1] == "failed"
    assert "1 results for a 9-record request" in w.session.stats.error


def test_a_snapshot_pauses_before_setup_and_confirms_unverified():
    w = SourceWorld(inline=True, snapshot=True)
    w.run()
    kinds = [type(a) for a in w.log]
    assert kinds.index(act.PauseGuest) < kinds.index(act.SendStream)
    assert w.states() == ["setup", "active", "device", "completed"]
    assert len(w.of(act.PauseGuest)) == 1
    assert w.session.stats.verified is None


def test_a_tcp_stream_sends_pages_inline_and_confirms_verified():
    w = SourceWorld(inline=True)
    w.run()
    assert w.states()[-1] == "completed" and w.session.stats.verified is True
    assert not w.of(act.SendControl) and not w.of(act.CommandScanner)
    syncs = len(w.of(act.SyncDirtyLog))
    assert [a.round for a in w.of(act.SendPages)] == list(range(1, syncs + 2))


def full_run_length(**kw) -> int:
    return len(SourceWorld(**kw).run())


SCENARIOS = {
    "dynamic": {},
    "pin-all": dict(config=MigrationConfig(pin_all=True), capabilities=granted(pin_all=True)),
    "tcp": dict(inline=True),
    "file": dict(inline=True, snapshot=True),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("interrupt", [ev.Failed("the peer sent ERROR"), ev.Cancel()],
                         ids=["failure", "cancel"])
def test_a_failure_or_cancel_at_every_step_ends_once_and_never_runs_two_guests(scenario,
                                                                            interrupt):
    n = full_run_length(**SCENARIOS[scenario])
    for at in range(n):
        w = SourceWorld(**SCENARIOS[scenario])
        w.run(interrupt, at)
        states = w.states()
        final = [s for s in states if s in FINAL]
        assert len(final) == 1, (at, states)
        if final[0] == "completed":
            # the commit point was passed: the destination runs the guest, ours stays paused
            assert not w.guest_running and not w.of(act.ResumeGuest), (at, states)
            continue
        want = "cancelled" if isinstance(interrupt, ev.Cancel) else "failed"
        assert final[0] == want, (at, states)
        if want == "cancelled":
            assert states[-2:] == ["cancelling", "cancelled"] or states == ["cancelled"]
        assert w.guest_running, (at, states)     # resumed if it was paused
        assert w.of(act.AbortPeer) or states == ["cancelled"], (at, states)


def test_after_the_commit_point_a_failure_changes_nothing():
    w = SourceWorld()
    w.run()
    assert w.session.handle(ev.Failed("the poster died"), w.now) == []
    assert w.session.state is SourceState.COMPLETED


def test_an_event_the_session_did_not_ask_for_fails_it_naming_both():
    s = SourceSession(MigrationConfig(), BLOCKS)
    s.start(0.0)
    out = s.handle(ev.Synced(3), 1.0)
    assert s.state is SourceState.FAILED
    assert "got Synced, waiting for Connected" in s.stats.error
    assert any(isinstance(a, act.AbortPeer) for a in out)


def test_cancel_before_start_is_cancelled_at_once():
    s = SourceSession(MigrationConfig(), BLOCKS)
    assert s.handle(ev.Cancel(), 0.0) == [act.StateChanged("cancelled", "cancelled")]


def test_parameters_change_while_migrating_and_unknown_ones_are_refused():
    w = SourceWorld(dirty=[5000, 5000, 5000, 5000, 0], rounds=[[(0, 0)]] * 5)
    w.session.handle(ev.SetParameter("x-max-rounds", 2), 0.0)
    w.run()
    assert "after 2 rounds" in w.session.stats.error
    s = SourceSession(MigrationConfig(), BLOCKS)
    with pytest.raises(ValueError, match="cannot change"):
        s.handle(ev.SetParameter("max-bandwidth", 1), 0.0)


def test_the_transition_table_names_qemus_states_and_refuses_the_rest():
    from pipeline.session.states import StateMachine

    assert {s.value for s in SOURCE_TRANSITIONS} == {
        "none", "setup", "active", "device", "completed", "failed", "cancelling", "cancelled"}
    sm = StateMachine("source", SOURCE_TRANSITIONS)
    sm.to(SourceState.SETUP, 0.0)
    with pytest.raises(LocalProtocolError, match="source migration state setup cannot go to "
                                                 "completed"):
        sm.to(SourceState.COMPLETED, 1.0)
    assert sm.state is SourceState.SETUP
    for final in (SourceState.COMPLETED, SourceState.FAILED, SourceState.CANCELLED):
        assert SOURCE_TRANSITIONS[final] == frozenset()
