"""The live progress line of ``run``, ``migrate``, ``incoming`` and ``vm``: one line on a
terminal, redrawn in place, cut to the terminal's width (the least useful figures go first, so
it never wraps and stacks); nothing at all when the stream is not a terminal or ``--json``
asked for machine output.

  active  round 3  sent 412.0 MiB  left 37.5 MiB  2630 Mbit/s  dirty 48 MB/s  downtime ~120 ms  3 s
"""

from __future__ import annotations

import shutil
import sys

from shm.memory import PAGE_SIZE


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def destination_fields(st: dict) -> list[str]:
    """A destination's line: its status, what it received when it can count it (``tcp:``
    and ``file:`` streams; an ``rdma:`` destination does not see the source's WRITEs land,
    so it shows no byte count rather than a 0), and the time."""
    fields = [f"receiving: {st.get('status', '?')}"]
    received = st.get("ram", {}).get("transferred", 0)
    if received:
        fields.append(f"received {mib(received)}")
    fields.append(f"{st.get('total-time', 0) / 1000:.1f} s")
    return fields


def progress_fields(st: dict) -> list[str]:
    """The figures of one ``stats()`` snapshot, most useful first."""
    ram = st.get("ram", {})
    fields = [str(st.get('status', '?'))]
    if st.get("round"):
        fields.append(f"round {st['round']}")
    fields.append(f"sent {mib(ram.get('transferred', 0))}")
    if ram.get("total"):
        fields.append(f"left {mib(ram.get('remaining', 0))}")
    rate = ram.get("average-mbps") if not st.get("round") else ram.get("mbps")
    if rate:
        fields.append(f"{rate:.0f} Mbit/s")
    if ram.get("dirty-pages-rate"):
        fields.append(f"dirty {ram['dirty-pages-rate'] * PAGE_SIZE / 1e6:.0f} MB/s")
    if st.get("expected-downtime"):
        fields.append(f"downtime ~{st['expected-downtime']:.0f} ms")
    fields.append(f"{st.get('total-time', 0) / 1000:.1f} s")
    return fields


def fit(fields: list[str], width: int) -> str:
    """The fields joined, the last dropped until the line fits ``width`` - 1 columns (the
    last column stays free: a line filling it wraps on many terminals)."""
    fields = list(fields)
    line = "  ".join(fields)
    while len(fields) > 1 and len(line) > width - 1:
        fields.pop(-2 if len(fields) > 2 else -1)   # keep the elapsed time while possible
        line = "  ".join(fields)
    return line[:max(1, width - 1)]


def progress_line(st: dict, width: int = 1000, *, destination: bool = False) -> str:
    return fit((destination_fields if destination else progress_fields)(st), width)


class Progress:
    """One live line on ``stream`` (stderr) while ``enabled`` and it is a terminal."""

    def __init__(self, enabled: bool, stream=None, *, destination: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.destination = destination
        self.enabled = enabled and self.stream.isatty()
        self.drawn = False

    def __call__(self, st: dict) -> None:
        if not self.enabled or st.get("status") in ("none", "setup"):
            return                        # nothing moves yet (a destination still listens)
        width = shutil.get_terminal_size((80, 24)).columns
        try:
            self.stream.write("\r\x1b[K" + progress_line(st, width,
                                                          destination=self.destination))
            self.stream.flush()
        except OSError:
            self.enabled = False          # the terminal went away (SIGHUP)
            return
        self.drawn = True

    def done(self) -> None:
        """End the line (once something was drawn), so what follows starts on its own."""
        if self.drawn:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except OSError:
                pass
            self.drawn = False
