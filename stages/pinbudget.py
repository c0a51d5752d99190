"""How much guest RAM one side may keep pinned at once: its pin budget.

When registrations pin (``x-odp=off``, or a device without on-demand paging) every registered
byte is charged to RLIMIT_MEMLOCK, per process. The default budget is what that limit leaves
over what this process has locked already (VmLck), unless CAP_IPC_LOCK (or an unlimited limit)
lifts it; ``x-pin-budget`` sets it instead. ``memlock_room`` reads the figures, ``pin_budget``
picks the budget, ``check_fits`` refuses, in one line naming the side, the limit and how to
raise it, what cannot fit before anything moves. 0 means no budget.
"""

from __future__ import annotations

import errno
import resource

from shm.errors import TransportError

CAP_IPC_LOCK = 14
RAISE_HINT = ("raise it with `ulimit -l unlimited` (LimitMEMLOCK=infinity in a systemd unit) or "
              "grant CAP_IPC_LOCK, or leave x-odp on where the device has on-demand paging")


def human(n: int) -> str:
    """Bytes for people: 8.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _status() -> dict[str, str]:
    try:
        with open("/proc/self/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def memlock_room() -> tuple[int, int] | None:
    """(RLIMIT_MEMLOCK, bytes this process has locked already), or None when nothing limits
    what it may pin (an unlimited limit, or CAP_IPC_LOCK)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    status = _status()
    cap_eff = int(status.get("CapEff", "0").strip() or "0", 16)
    if soft == resource.RLIM_INFINITY or cap_eff & (1 << CAP_IPC_LOCK):
        return None
    locked = int(status.get("VmLck", "0 kB").split()[0]) * 1024
    return soft, locked


def pin_budget(explicit: int, *, pins: bool, reserve: int = 0) -> tuple[int, str]:
    """The budget in bytes (0: none) and why it is that (for messages): ``x-pin-budget``
    when set, capped by what RLIMIT_MEMLOCK leaves when registrations pin (``pins``: x-odp
    off). ``reserve``: bytes kept out of the limit's room (what the peer, with the same
    limit, pins beside its chunks)."""
    room = memlock_room() if pins else None
    if room is None:
        return (explicit, f"x-pin-budget is {human(explicit)}") if explicit else (0, "")
    limit, locked = room
    left = max(0, limit - locked - reserve)
    if explicit and explicit <= left:
        return explicit, f"x-pin-budget is {human(explicit)}"
    why = f"RLIMIT_MEMLOCK allows {human(limit)} per process"
    if locked:
        why += f" and {human(locked)} is locked already"
    if reserve:
        why += f", {human(reserve)} kept for the peer's control buffers"
    return left, why


def check_fits(side: str, budget: int, why: str, need: int, what: str, used: int = 0) -> None:
    """TransportError (one line) when ``need`` more bytes (``what``: "one 1.0 MiB chunk") do
    not fit ``budget`` with ``used`` bytes pinned already; nothing when there is no budget."""
    if not budget or used + need <= budget:
        return
    held = f", {human(used)} of it pinned already" if used else ""
    raise TransportError(
        f"{side}: cannot pin {what} ({human(need)}): {why}, which leaves a pin budget of "
        f"{human(budget)}{held}", errno=errno.ENOMEM,
        hint=RAISE_HINT if why.startswith("RLIMIT") else
        "raise x-pin-budget (and RLIMIT_MEMLOCK with it)")
