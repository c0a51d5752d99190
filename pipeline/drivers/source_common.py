"""What both source drivers do the same way: run a ``SourceSession`` to its end.

``SourceDriver.run()`` runs the loop of ``pipeline.drivers.loop``: anything that raises
becomes the session's ``Cancel`` (Ctrl-C, ``cancel``) or ``Failed`` (one line). The session
answers a failure with AbortPeer / ResumeGuest / the final state, which the driver carries out
best-effort. After the commit point a failure while tearing down is a ``warning`` in the
summary: the destination runs the guest, so the source never resumes it.

A carrier subclass opens its resources as its Connect action runs, on ``self.stack`` (an
``ExitStack``, closed by ``close()`` whatever happened) and maps each of its actions to a
method in ``HANDLERS``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from pipeline.drivers.loop import one_line, run_session
from pipeline.session import actions as act
from pipeline.session import events as ev
from pipeline.session.source import SourceSession
from pipeline.stats import MigrationStats
from shm.errors import MigrationCancelled, MigrationError

# A COMMIT that may not have arrived: the destination then does not run the guest either.
COMMIT_LOST = ("the commit may not have reached the destination ({}): if it did not, the "
               "guest runs on neither host")

class SourceDriver:
    """Runs one outgoing migration of ``guest`` (started) to ``uri``; ``run()`` blocks."""

    inline = False            # pages travel in the stream (tcp:, file:)

    def __init__(self, uri, config, guest, *, run_id: str,
                 stats: MigrationStats | None = None,
                 on_state: Callable[[str, str], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.uri = uri
        self.config = config
        self.guest = guest
        self.run_id = run_id
        self.stats = stats or MigrationStats()
        self.on_state = on_state or (lambda state, reason: None)
        self.cancel = cancel or threading.Event()
        self.stack = ExitStack()
        self.interrupted: BaseException | None = None
        self.session = SourceSession(
            config, [(b.idstr, b.length) for b in guest.region.blocks], inline=self.inline,
            snapshot=uri.scheme == "file", stats=self.stats)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        self.stats.update(guest=getattr(self.guest, "kind", ""),
                          dirty_tracking=getattr(self.guest, "tracking", ""))
        with self:
            run_session(self.session, self.carry_out, self.failure)
            if self.session.state == "completed":
                self.finish()
        if self.interrupted is not None:
            raise self.interrupted
        return self.stats.snapshot(time.monotonic())

    @property
    def confirming(self) -> bool:
        """The whole stream is out: the destination's verdict alone decides now."""
        return self.session.confirming

    @property
    def paused(self) -> bool:
        """The source guest is paused by this migration (between pause and commit)."""
        return self.session.paused

    def carry_out(self, action) -> object | None:
        return self.HANDLERS[type(action)](self, action)

    def failure(self, exc: BaseException) -> ev.Cancel | ev.Failed:
        if not isinstance(exc, Exception):
            self.interrupted = exc          # Ctrl-C: re-raised once everything is released
        if isinstance(exc, MigrationCancelled | KeyboardInterrupt):
            return ev.Cancel()
        return ev.Failed(self.reason(exc))

    def reason(self, exc: BaseException) -> str:
        return one_line(exc)

    def check(self) -> None:
        """Raise if cancelled, or if the guest died (subclasses add their stages); nothing
        of that matters once the whole stream is out and the destination decides."""
        if self.confirming:
            return
        if self.cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        self.guest.check()

    def finish(self) -> None:
        """After the commit point: stop what still runs; a failure is only a warning."""

    # -- resources -----------------------------------------------------------------------
    def __enter__(self) -> SourceDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release everything opened, children first (idempotent)."""
        self.stack.close()

    # -- actions both carriers share ------------------------------------------------------
    def _state(self, action: act.StateChanged) -> None:
        self.on_state(action.state, action.reason)

    def _pause(self, action: act.PauseGuest) -> ev.GuestPaused:
        state = self.guest.pause()
        return ev.GuestPaused(self.guest.device_section, state.to_bytes())

    def send_commit(self) -> None:
        """Tell the destination the source committed (the carrier's COMMIT)."""
        raise NotImplementedError

    def _send_commit(self, action: act.SendCommit) -> None:
        try:
            self.send_commit()
        except Exception as exc:  # noqa: BLE001 - after the commit point: a warning
            self.stats.update(warning=COMMIT_LOST.format(self.reason(exc)),
                              runs_on="the destination, if the commit reached it; else neither")

    def _resume(self, action: act.ResumeGuest) -> None:
        try:
            self.guest.resume()
        except MigrationError:
            pass              # a guest that died: nothing left to resume

    def _throttle(self, action: act.ThrottleGuest) -> None:
        try:
            self.guest.throttle(action.percentage)
        except MigrationError:
            if action.percentage:
                raise
            # unthrottling a guest that died: nothing left to slow down

    HANDLERS: dict[type, Callable] = {
        act.StateChanged: _state, act.PauseGuest: _pause, act.ResumeGuest: _resume,
        act.SendCommit: _send_commit,
        act.ThrottleGuest: _throttle,
    }
