"""The one loop every driver runs a session with (see ``pipeline.session.actions``).

Carry out each action in order and hand the session the event an asking action produced. When
carrying out an action raises, the actions still queued are void: the session is told
(``failure(exc)`` makes the event, ``Failed`` or ``Cancel``) and answers with what ending takes.
An order that fails after the session has ended (best-effort cleanup) changes nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from shm.errors import MigrationError


def run_session(session, carry_out: Callable, failure: Callable) -> None:
    """Drive ``session`` until it asks for nothing more."""
    actions = deque(session.start(time.monotonic()))
    while actions:
        action = actions.popleft()
        try:
            event = carry_out(action)
        except BaseException as exc:  # noqa: BLE001 - the session decides what follows
            if session.final:
                continue
            actions.clear()
            event = failure(exc)
        if event is not None:
            actions.extend(session.handle(event, time.monotonic()))


def one_line(exc: BaseException) -> str:
    """A person's line for ``exc``: our errors say it themselves, others name their type."""
    text = str(exc) if isinstance(exc, MigrationError) else f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0] if text else type(exc).__name__
