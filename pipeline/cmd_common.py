"""What ``run``, ``migrate`` and ``incoming`` share: options, config building, printing, and
what SIGINT, SIGTERM and SIGHUP do to them (``StopSignals``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from pipeline.config import MigrationConfig, parse_size
from pipeline.progress import Progress, mib, progress_line  # noqa: F401 - the commands' API
from pipeline.sections import MACHINE

MACHINES = (MACHINE, "none")


def add_migration_options(p, *, source: bool) -> None:
    p.add_argument("--capability", action="append", default=[], metavar="NAME=on|off",
                   help="a migration capability, QEMU spelling (rdma-pin-all=on)")
    p.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                   help="a migration parameter, QEMU spelling (downtime-limit=300, "
                        "max-bandwidth=1G; ours: x-max-rounds, x-keep-going, x-pin-budget)")
    p.add_argument("--transport", choices=("soft", "verbs"), default="soft",
                   help="verbs provider (default soft: userspace verbs over TCP)")
    p.add_argument("--device", metavar="NAME",
                   help="RDMA device for --transport verbs (default: the device of the route "
                        "to the peer, else the first with an ACTIVE port)")
    p.add_argument("--chunk-size", default="1M", help="registration chunk size (default 1M)")
    p.add_argument("--json", action="store_true",
                   help="print only the summary, as one JSON object, on stdout")
    if source:
        p.add_argument("--machine", choices=MACHINES, default=None,
                       help="the machine type the stream names: rdma-pipeline (default: our "
                            "guest, device sections and digest) or none (QEMU's -M none -m "
                            "RAM: one block 'ram', nothing of ours, so a real QEMU can be "
                            "the destination)")
    else:
        p.add_argument("--machine", default=None, metavar="NAME",
                       help="refuse a stream of another machine type, as QEMU does "
                            "(default: take any: rdma-pipeline, none, pc, q35...)")
    if source:
        p.add_argument("--trace-control", metavar="PATH",
                       help="write every control message sent or received as a JSON line")


def add_dump_option(p, what: str) -> None:
    p.add_argument("--dump", metavar="DIR",
                   help=f"once completed, write {what} to DIR: one file per RAM block and "
                        "DIR/blocks.json listing them (idstr, length, file)")


def guest_blocks(machine: str | None, ram: int) -> list[tuple[str, int]] | None:
    """The RAM blocks of a guest of ``machine``: QEMU's -M none has one, named ``ram``;
    ours (None) pc.ram and a small vga.vram, as a real VM."""
    return [("ram", ram)] if machine == "none" else None


def add_guest_options(p) -> None:
    p.add_argument("--guest", choices=("synthetic", "kvm"), default="synthetic",
                   help="the guest to migrate: a synthetic workload process (default) or a KVM "
                        "VM running a page-writing program (needs /dev/kvm)")
    p.add_argument("--dirty-tracking", choices=("soft", "uffd", "kvm"), default=None,
                   help="how dirty pages are found: soft (the guest's own dirty log; synthetic),"
                        " uffd (kernel write-protect + PAGEMAP_SCAN; either guest), kvm (KVM's "
                        "dirty log; kvm). Default: soft for synthetic, kvm for kvm")
    p.add_argument("--ram", default="512M", help="guest RAM (pc.ram) size (default 512M)")
    p.add_argument("--dirty-rate", type=float, default=50.0,
                   help="MB/s the guest writes (0 = idle; default 50)")
    p.add_argument("--pattern", choices=("uniform", "hotspot", "sequential"),
                   default="uniform", help="which pages the synthetic guest writes (default "
                                           "uniform; the KVM guest writes its pages in order)")
    p.add_argument("--zero-share", type=float, default=0.1,
                   help="share of written pages that are zero pages (synthetic; default 0.1)")
    p.add_argument("--fill", type=float, default=0.5,
                   help="share of RAM filled with data at boot (synthetic; default 0.5)")
    p.add_argument("--seed", type=int, default=1, help="synthetic guest seed (default 1)")


def build_config(args) -> MigrationConfig:
    """The config from the options; ValueError (one line) for anything wrong, and
    TransportUnsupported, before anything starts, when ``--transport verbs`` cannot run here."""
    trace = getattr(args, "trace_control", None)
    if trace:
        check_writable(trace, "--trace-control")
    cfg = MigrationConfig(transport=args.transport, chunk_size=parse_size(args.chunk_size),
                          trace_control=trace, machine=getattr(args, "machine", None) or "")
    cfg = cfg.with_options(args.capability, args.parameter)
    if cfg.transport == "verbs":
        from shm.errors import TransportUnsupported
        from stages.verbs.rdmacore import DEVICE_ENV, probe

        if getattr(args, "device", None):       # read by every process that opens a device
            os.environ[DEVICE_ENV] = args.device

        reason = probe()
        if reason:
            raise TransportUnsupported(reason, hint="use --transport soft (userspace verbs over "
                                                    "TCP) on machines without RDMA")
    return cfg


def check_writable(path: str, option: str) -> None:
    """ValueError, before anything starts, when ``path`` cannot be written."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise ValueError(f"{option} {path}: not writable here")


def check_transport(transport: str, scheme: str) -> None:
    """ValueError when ``--transport verbs`` meets a URI without verbs (tcp:, file:)."""
    if transport == "verbs" and scheme in ("tcp", "file"):
        raise ValueError(f"--transport verbs: {scheme}: moves pages in the stream, without "
                         "verbs; use rdma: for verbs, or drop --transport")


def resolve_host(uri) -> None:
    """Resolve a URI's host name now, before anything starts (MigrationError when it does not
    resolve: ``dest`` in the README's examples stands for your destination's address)."""
    import socket

    from pipeline.uri import InvalidURI

    if uri.scheme not in ("rdma", "tcp") or uri.family != socket.AF_UNSPEC:
        return
    try:
        socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidURI(f"host {uri.host!r} does not resolve ({exc.strerror})",
                         hint="use the destination's address or a name this machine resolves; "
                              "'dest' in the README's examples stands for it") from None


def guest_state(args):
    from pipeline.guest.synthetic import PATTERNS, GuestState

    if args.dirty_rate < 0:
        raise ValueError("--dirty-rate must be >= 0")
    if not 0 <= args.zero_share <= 1 or not 0 <= args.fill <= 1:
        raise ValueError("--zero-share and --fill are shares between 0 and 1")
    assert args.pattern in PATTERNS
    return GuestState(seed=args.seed, pattern=args.pattern, zero_share=args.zero_share,
                      dirty_rate=int(args.dirty_rate * 1e6))


def guest_spec(args):
    """The guest to create from ``--guest``, ``--dirty-tracking`` and the workload options
    (ValueError, one line, for a pair that does not fit)."""
    from pipeline.guest.factory import GuestSpec

    return GuestSpec(args.guest, args.dirty_tracking, guest_state(args), args.fill)


def seconds(text: str) -> float:
    """An argparse type: a number of seconds >= 0 (argparse prints the reason)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more seconds")
    return value


def add_watch_option(p, default: float) -> None:
    p.add_argument("--guest-watch", type=seconds, default=default, metavar="SECONDS",
                   help="seconds the resumed guest runs on the destination before it is stopped "
                        f"and its progress reported (default {default:g})")


def conclude(command: str, summary: dict, as_json: bool, signalled: int | None = None) -> int:
    """How a command ends: a completed migration's summary on stdout; a failed or cancelled
    one as one line on stderr and nothing on stdout (``--json``: the whole summary, whatever
    the status, the reason in it, and nothing on stderr). ``signalled``: the exit code after
    a stop signal, whose line ``StopSignals.report`` said. The exit code."""
    status = summary["status"]
    if as_json or status == "completed":
        print_summary(summary, as_json)
    if signalled is not None:
        return signalled
    if status != "completed" and not as_json:
        say(f"rdma-pipeline {command}: migration {status}: "
            f"{summary.get('error-desc') or status}")
    return exit_code(summary)


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    ram = summary["ram"]
    lines = [
        f"status: {summary['status']}",
        f"total-time: {summary['total-time']} ms",
        f"setup-time: {summary['setup-time']} ms",
        f"downtime: {downtime_words(summary)}",
        f"expected-downtime: {summary['expected-downtime']} ms",
        f"verified: {verified_words(summary.get('verified'))}",
    ]
    if summary.get("verification"):
        lines.append(f"verification: {summary['verification']}")
    guest = summary.get("guest")        # the source's: which guest; the destination's: a report
    if isinstance(guest, str):
        lines.append(f"guest: {guest} (dirty tracking: {summary.get('dirty-tracking')})")
    report = guest if isinstance(guest, dict) else summary.get("destination", {}).get("guest")
    if report:
        lines.append("destination guest: " + guest_report_line(report))
    for key in ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                "mbps", "dirty-pages-rate", "dirty-sync-count"):
        lines.append(f"ram.{key}: {ram[key]}")
    for stage, figs in summary.get("stages", {}).items():
        lines.append(f"{stage}: " + ", ".join(f"{k} {v}" for k, v in figs.items()))
    if summary.get("warning"):
        lines.append(f"warning: {summary['warning']}")
    if summary.get("guest-runs-on"):
        lines.append(f"guest runs on: {summary['guest-runs-on']}")
    print("\n".join(lines))


def verified_words(verified: bool | None) -> str:
    """What ``verified`` means, in words."""
    if verified is True:
        return "yes (every page on the destination hashes as on the source)"
    if verified is False:
        return "NO (the destination's pages differ from the source's)"
    return "not checked (the destination's verdict did not come back)"


def downtime_words(summary: dict) -> str:
    if summary.get("downtime") is not None:
        return f"{summary['downtime']} ms"
    if summary.get("status") != "completed":
        return "none (the guest ran on)"
    return "not measured on this side (the source measures it)"


def guest_report_line(report: dict) -> str:
    """Where the destination's guest resumed and where it was when stopped."""
    def at(p: dict) -> str:
        where = f"{p['pages_written']} pages written"
        return where + (f" (pass {p['passes']})" if "passes" in p else "")

    resumed, stopped = report.get("resumed"), report.get("stopped")
    text = f"{resumed.get('kind', '')} guest resumed at {at(resumed)}" if resumed else "-"
    if resumed and stopped:
        text += f", stopped at {at(stopped)}"
        if resumed.get("kind") == "kvm":
            text += "; invariant held (at the resume point on restore, every page at stop)"
    return text


def exit_code(summary: dict) -> int:
    return 0 if summary["status"] == "completed" else 1


class Interrupted(KeyboardInterrupt):
    """A stop signal that came while the command was starting (nothing to cancel yet)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def signal_exit_code(signum: int) -> int:
    """128 + the signal's number, as a shell reports a command a signal ended: 130 for SIGINT,
    143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(signum)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP all do what Ctrl-C does, for as long as this is entered.

    While the command starts (``starting()``) and no migration runs yet, the first signal raises
    ``Interrupted``, which unwinds what was started (the command's ``with`` blocks). Once a
    migration runs, a signal cancels it through its normal path (``Migration.cancel``: the
    drivers see the cancel event) and raises nothing: the command's wait sees the migration end
    ``cancelled``, and ``report()`` turns that into one line and 128 + the signal's number. A
    signal while the command is finishing (the migration is over) only counts for ``report()``,
    and so do later signals: nothing may cut a release short.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, command: str) -> None:
        self.command = command
        self.signum: int | None = None
        self._starting = False
        self._raised = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    @contextlib.contextmanager
    def starting(self):
        """The command starts its guest, processes and migration here: a signal unwinds it."""
        self._starting = True
        try:
            if self.signum is not None:      # one came before: stop now
                self._raise(self.signum)
            yield
        finally:
            self._starting = False

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        # Every migration of this process (the one the command waits for, and a destination's)
        # ends through its cancel event; api keeps the set of those still running.
        from pipeline.api import cancel_all

        if not cancel_all() and self._starting:
            self._raise(signum)

    def _raise(self, signum: int) -> None:
        if not self._raised:
            self._raised = True
            from shm.semaphores import raise_from_handler

            raise_from_handler(Interrupted(signum))

    def report(self, summary: dict | None) -> int | None:
        """After a signal: one line on stderr and the exit code (None when no signal came).
        A migration that completed anyway (the signal came after the commit point) exits 0."""
        if self.signum is None:
            return None
        name = signal_name(self.signum)
        if summary is not None and summary.get("status") == "completed":
            say(f"rdma-pipeline {self.command}: {name} came after the commit point: "
                "the migration completed")
            return 0
        say(f"rdma-pipeline {self.command}: cancelled: {name}")
        return signal_exit_code(self.signum)


def say(line: str) -> None:
    """One line on stderr; nothing when stderr is gone (SIGHUP: the terminal closed)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass
