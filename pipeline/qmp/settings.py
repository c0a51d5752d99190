"""Migration capabilities and parameters as QMP sets and queries them, and the
``MigrationConfig`` they make.

The names are QEMU 7.2's plus ours (``x-`` prefixed). What rdma-pipeline carries out:
``rdma-pin-all``, ``x-odp``, ``downtime-limit``, ``max-bandwidth``, ``x-max-rounds``,
``x-keep-going``, ``x-pin-budget``, ``x-memlock-limit``, ``auto-converge`` and the cpu-throttle
parameters (the synthetic guest's write rate, a KVM guest's vCPU time); ``events`` turns
MIGRATION and MIGRATION_PASS events on, as in QEMU. QEMU's other capabilities may be turned
off, not on; its other parameters are refused by name. Argument errors use QEMU's texts.
"""

from __future__ import annotations

import dataclasses

from pipeline.config import MigrationConfig
from pipeline.qmp.protocol import QmpError

# QEMU 7.2's capabilities, in its order, then ours
QEMU_CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
    "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt")
CAPABILITIES = QEMU_CAPABILITIES + ("x-odp",)
SUPPORTED_CAPABILITIES = ("rdma-pin-all", "auto-converge", "events", "x-odp")

UINT64 = (0, (1 << 64) - 1)
# name -> (QAPI type, (low, high) or None, the QEMU range text when out of it)
PARAMETERS: dict[str, tuple[str, tuple[int, int] | None, str]] = {
    "downtime-limit": ("uint64", (0, 2_000_000),
                       "Parameter 'downtime_limit' expects an integer in the range of 0 to "
                       "(2000 * 1000) ms"),
    "max-bandwidth": ("size", UINT64, ""),
    "cpu-throttle-initial": ("uint8", (1, 99),
                             "Parameter 'cpu_throttle_initial' expects an integer in the range "
                             "of 1 to 99"),
    "cpu-throttle-increment": ("uint8", (1, 99),
                               "Parameter 'cpu_throttle_increment' expects an integer in the "
                               "range of 1 to 99"),
    "cpu-throttle-tailslow": ("bool", None, ""),
    "max-cpu-throttle": ("uint8", (1, 99),
                         "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to "
                         "99"),
    "throttle-trigger-threshold": ("uint8", (1, 100),
                                   "Parameter 'throttle_trigger_threshold' expects an integer "
                                   "in the range of 1 to 100"),
    "x-max-rounds": ("uint64", (1, 1 << 31), "Parameter 'x-max-rounds' expects an integer >= 1"),
    "x-keep-going": ("bool", None, ""),
    "x-pin-budget": ("size", UINT64, ""),
    "x-memlock-limit": ("size", UINT64, ""),
}
# QEMU 7.2 parameters rdma-pipeline has no use for: refused by name, not as unknown
QEMU_ONLY_PARAMETERS = (
    "announce-initial", "announce-max", "announce-rounds", "announce-step", "compress-level",
    "compress-threads", "compress-wait-thread", "decompress-threads", "tls-creds",
    "tls-hostname", "tls-authz", "max-postcopy-bandwidth", "x-checkpoint-delay",
    "block-incremental", "multifd-channels", "multifd-compression", "multifd-zlib-level",
    "multifd-zstd-level", "xbzrle-cache-size", "block-bitmap-mapping")

_CONFIG_FIELD = {"downtime-limit": "downtime_limit_ms", "max-bandwidth": "max_bandwidth",
                 "x-max-rounds": "max_rounds", "x-keep-going": "keep_going",
                 "x-pin-budget": "pin_budget", "x-memlock-limit": "memlock_limit",
                 "cpu-throttle-initial": "throttle_initial",
                 "cpu-throttle-increment": "throttle_increment",
                 "max-cpu-throttle": "throttle_max",
                 "throttle-trigger-threshold": "throttle_threshold",
                 "cpu-throttle-tailslow": "throttle_tailslow"}


def check_value(name: str, kind: str, value: object) -> None:
    """QEMU's type check of one argument (``QmpError`` with its words)."""
    if kind == "bool":
        ok = isinstance(value, bool)
        qapi = "boolean"
    elif kind == "str":
        ok, qapi = isinstance(value, str), "string"
    elif kind == "array":
        ok, qapi = isinstance(value, list), "array"
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
        qapi = {"size": "size", "uint8": "uint8"}.get(kind, "uint64")
    if not ok:
        raise QmpError(f"Parameter '{name}' expects {qapi}")
    if kind in ("uint64", "size", "uint8") and value < 0:
        raise QmpError(f"Parameter '{name}' expects {qapi}")


class MigrationSettings:
    """The capabilities and parameters one monitor holds; ``config()`` makes the
    ``MigrationConfig`` a migration starts with."""

    def __init__(self, base: MigrationConfig) -> None:
        self.base = base
        self.caps = {name: False for name in CAPABILITIES}
        self.caps["rdma-pin-all"] = base.pin_all
        self.caps["x-odp"] = base.odp
        self.caps["auto-converge"] = base.auto_converge
        self.params: dict[str, object] = {
            "downtime-limit": base.downtime_limit_ms, "max-bandwidth": base.max_bandwidth,
            "cpu-throttle-initial": base.throttle_initial,
            "cpu-throttle-increment": base.throttle_increment,
            "cpu-throttle-tailslow": base.throttle_tailslow, "max-cpu-throttle": base.throttle_max,
            "throttle-trigger-threshold": base.throttle_threshold, "x-max-rounds": base.max_rounds,
            "x-keep-going": base.keep_going, "x-pin-budget": base.pin_budget,
            "x-memlock-limit": base.memlock_limit}

    # -- capabilities ---------------------------------------------------------------------
    def set_capabilities(self, caps: object) -> None:
        """``migrate-set-capabilities``: all or nothing, as in QEMU."""
        check_value("capabilities", "array", caps)
        changes = {}
        for item in caps:
            if not isinstance(item, dict):
                raise QmpError("Invalid parameter type for 'capabilities[0]', expected: object")
            for key in item:
                if key not in ("capability", "state"):
                    raise QmpError(f"Parameter '{key}' is unexpected")
            for key in ("capability", "state"):
                if key not in item:
                    raise QmpError(f"Parameter '{key}' is missing")
            name, state = item["capability"], item["state"]
            check_value("capability", "str", name)
            check_value("state", "bool", state)
            if name not in CAPABILITIES:
                raise QmpError(f"Parameter 'capability' does not accept value '{name}'")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise QmpError(f"Capability '{name}' is not supported by rdma-pipeline")
            changes[name] = state
        self.caps.update(changes)

    def query_capabilities(self) -> list[dict]:
        return [{"state": state, "capability": name} for name, state in self.caps.items()]

    # -- parameters -----------------------------------------------------------------------
    def set_parameters(self, args: dict) -> None:
        """``migrate-set-parameters``: checked whole, then applied, as in QEMU."""
        checked = {}
        for name, value in args.items():
            if name in QEMU_ONLY_PARAMETERS:
                raise QmpError(f"Parameter '{name}' is not supported by rdma-pipeline")
            if name not in PARAMETERS:
                raise QmpError(f"Parameter '{name}' is unexpected")
            kind, bounds, range_text = PARAMETERS[name]
            check_value(name, kind, value)
            if bounds and not bounds[0] <= value <= bounds[1]:
                raise QmpError(range_text or f"Parameter '{name}' is out of range")
            checked[name] = value
        trial = {**self.params, **checked}
        try:
            self._config(self.caps, trial)
        except ValueError as exc:            # what our config refuses beyond QEMU's ranges
            raise QmpError(str(exc)) from None
        self.params = trial

    def query_parameters(self) -> dict:
        return dict(self.params)

    # -- the config -----------------------------------------------------------------------
    @property
    def events(self) -> bool:
        return self.caps["events"]

    def config(self) -> MigrationConfig:
        return self._config(self.caps, self.params)

    def _config(self, caps: dict, params: dict) -> MigrationConfig:
        changes = {field: params[name] for name, field in _CONFIG_FIELD.items()}
        return dataclasses.replace(self.base, pin_all=caps["rdma-pin-all"], odp=caps["x-odp"],
                                   auto_converge=caps["auto-converge"], **changes)
