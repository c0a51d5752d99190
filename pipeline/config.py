"""Migration settings, with QEMU's spellings.

``MigrationConfig`` is a frozen dataclass validated on construction, so a wrong option is
refused before any process or segment exists. ``parse_capability`` / ``parse_parameter`` read
the command-line forms ``rdma-pin-all=on`` and ``downtime-limit=300``; ``parse_size`` reads
``512M``, ``1G``, ``4096``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from shm.memory import PAGE_SIZE  # noqa: F401 - also for users: pipeline.config.PAGE_SIZE

MIB = 1 << 20

CAPABILITIES = ("rdma-pin-all", "x-odp", "x-rdma-extensions", "auto-converge")
PARAMETERS = ("downtime-limit", "max-bandwidth", "x-max-rounds", "x-keep-going", "x-pin-budget",
              "x-memlock-limit", "cpu-throttle-initial", "cpu-throttle-increment",
              "max-cpu-throttle", "throttle-trigger-threshold", "cpu-throttle-tailslow")
# auto-converge's parameters: (field, lowest, highest), QEMU's names and ranges
_THROTTLE = {"cpu-throttle-initial": ("throttle_initial", 1, 99),
             "cpu-throttle-increment": ("throttle_increment", 1, 99),
             "max-cpu-throttle": ("throttle_max", 1, 99),
             "throttle-trigger-threshold": ("throttle_threshold", 1, 100)}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from ``4096``, ``64K``, ``512M``, ``1G`` (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 1G, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("on", "true", "yes", "1"):
        return True
    if low in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{name}: expected on or off, got {text!r}")


def _whole(name: str, text: str, unit: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number of {unit}") from None


def _split(item: str, kind: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"{kind} {item!r}: expected NAME=VALUE")
    name, value = item.split("=", 1)
    return name.strip(), value.strip()


@dataclass(frozen=True)
class MigrationConfig:
    """Everything that shapes one migration; both ends must agree on chunk size and pin-all.
    ``odp`` and ``pin_budget`` are each side's own choice (nothing on the wire): with x-odp off
    a side pins every guest-RAM registration, as QEMU does, and keeps within its budget."""

    pin_all: bool = False                 # capability rdma-pin-all
    odp: bool = True                      # capability x-odp: register guest RAM on demand
    extensions: bool = True               # capability x-rdma-extensions: off speaks QEMU's
                                          # rdma: protocol version 1 alone, as QEMU does
    downtime_limit_ms: int = 300          # parameter downtime-limit (ms)
    max_bandwidth: int = 0                # parameter max-bandwidth (bytes/s), 0 = unlimited
    max_rounds: int = 30                  # rounds without convergence before giving up
    keep_going: bool = False              # keep iterating past max_rounds instead of failing
    pin_budget: int = 0                   # bytes of guest RAM pinned at once by each side;
                                          # 0 = RLIMIT_MEMLOCK's room with x-odp off, else none
    chunk_size: int = MIB
    transport: str = "soft"
    trace_control: str | None = None      # path of a JSON-lines control trace
    stage_timeout: float = 10.0           # seconds a stage may take to start or to stop
    memlock_limit: int = 0                # x-memlock-limit: act as if ulimit -l were this
    machine: str = ""                     # --machine: the source's machine type (default
                                          # rdma-pipeline; "none" is QEMU's -M none); the
                                          # destination's refuses any other ("": any)
    auto_converge: bool = False           # capability auto-converge: throttle a busy guest
    throttle_initial: int = 20            # cpu-throttle-initial (%)
    throttle_increment: int = 10          # cpu-throttle-increment (%)
    throttle_max: int = 99                # max-cpu-throttle (%)
    throttle_threshold: int = 50          # throttle-trigger-threshold (% of bytes sent)
    throttle_tailslow: bool = False       # cpu-throttle-tailslow
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.transport not in ("soft", "verbs"):
            raise ValueError(f"transport {self.transport!r}: use soft or verbs")
        cs = self.chunk_size
        if cs < MIB or cs & (cs - 1) or cs > (1 << 30):
            raise ValueError(f"chunk size {cs}: use a power of two from 1M to 1G, e.g. 4M")
        if self.downtime_limit_ms <= 0:
            raise ValueError("downtime-limit must be a positive number of milliseconds")
        if self.max_bandwidth < 0:
            raise ValueError("max-bandwidth must be >= 0 (0 = unlimited)")
        if self.max_rounds < 1:
            raise ValueError("x-max-rounds must be >= 1")
        if not self.extensions and cs != MIB:
            raise ValueError(f"chunk size {cs}: with x-rdma-extensions off the chunk is QEMU's "
                             "1M")
        if self.pin_budget and self.pin_budget < cs:
            raise ValueError("x-pin-budget must be 0 (unlimited) or at least one chunk")
        for name, (attr, low, high) in _THROTTLE.items():
            if not low <= getattr(self, attr) <= high:
                raise ValueError(f"{name} must be between {low} and {high}")
        if len(self.machine.encode()) > 255 or "\0" in self.machine:
            raise ValueError(f"machine type {self.machine!r}: a name of 1-255 bytes")

    def with_options(self, capabilities: list[str] = (), parameters: list[str] = ()
                     ) -> MigrationConfig:
        """A copy with ``NAME=VALUE`` capabilities and parameters applied (QEMU spellings)."""
        changes: dict = {}
        for item in capabilities:
            name, value = _split(item, "capability")
            if name == "rdma-pin-all":
                changes["pin_all"] = _parse_bool(name, value)
            elif name == "x-odp":
                changes["odp"] = _parse_bool(name, value)
            elif name == "x-rdma-extensions":
                changes["extensions"] = _parse_bool(name, value)
            elif name == "auto-converge":
                changes["auto_converge"] = _parse_bool(name, value)
            else:
                raise ValueError(f"unknown capability {name!r} (known: {', '.join(CAPABILITIES)})")
        for item in parameters:
            name, value = _split(item, "parameter")
            try:
                if name == "downtime-limit":
                    changes["downtime_limit_ms"] = _whole(name, value, "milliseconds")
                elif name == "max-bandwidth":
                    changes["max_bandwidth"] = parse_size(value)
                elif name == "x-max-rounds":
                    changes["max_rounds"] = _whole(name, value, "rounds")
                elif name == "x-keep-going":
                    changes["keep_going"] = _parse_bool(name, value)
                elif name == "x-pin-budget":
                    changes["pin_budget"] = parse_size(value)
                elif name == "x-memlock-limit":
                    changes["memlock_limit"] = parse_size(value)
                elif name in _THROTTLE:
                    changes[_THROTTLE[name][0]] = int(value)
                elif name == "cpu-throttle-tailslow":
                    changes["throttle_tailslow"] = _parse_bool(name, value)
                else:
                    raise ValueError(
                        f"unknown parameter {name!r} (known: {', '.join(PARAMETERS)})")
            except ValueError as exc:
                if "unknown parameter" in str(exc):
                    raise
                raise ValueError(f"parameter {name}: {exc}") from None
        return dataclasses.replace(self, **changes)

    @property
    def chunk_pages(self) -> int:
        return self.chunk_size // PAGE_SIZE
