"""Two hosts for real: ``incoming`` in one network namespace, ``migrate`` in another.

The two namespaces are joined by a veth pair whose addresses (10.231.7.1 and .2/30) exist only
inside them; neither namespace has any other interface than that and its loopback, and no
route, so no packet leaves them. Faults are made on that link:

- 1% random loss in both directions: an nftables rule ``numgen random mod 100 < 1 drop`` on
  input in each namespace (this kernel has no netem). Segmentation offload is turned off on the
  veth so that the rule drops 1% of wire-sized packets, not of 64 KiB super-packets;
- the link down for 3 s while pages move (``ip link set ... down`` then ``up``): the migration
  must ride it out, complete and verify;
- the link down for good while pages move: each side must fail in one line within
  ``GIVE_UP_S`` seconds, exit non-zero, and leave no process and no /dev/shm object behind.

"While pages move" is read from the destination's receive counter (``/proc/PID/net/dev`` of the
incoming process shows its namespace's interfaces), and ``max-bandwidth`` stretches the run so
that the outage falls in its middle.

Everything made here (namespaces, the veth pair, nftables tables, processes) is removed in a
``finally``, whatever happens. The tests skip, saying why, only where namespaces cannot be made
(not root, no ``ip``, or ``ip netns add`` refused).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shm.naming import SHM_DIR, parse_segment_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEST_ADDR, SRC_ADDR, PREFIX_LEN = "10.231.7.1", "10.231.7.2", 30
DEST_IF, SRC_IF = "rdp-dst0", "rdp-src0"
PORT = 4444                 # the namespace is fresh: any port is free in it
RAM = "64M"
SLOW = "max-bandwidth=16M"  # ~3 s at --dirty-rate 5 (8M would not converge), so an
                            # outage lands mid-run
MOVING = 8 << 20            # bytes the destination received before we call the run "active"
OUTAGE_S = 3.0
GIVE_UP_S = 15.0            # each side of a dead link must have failed by then
BOUND_S = 90.0              # no wait in this file is longer (a hang fails, it does not block)
LOSS_TABLE = "rdp_loss"


# -- namespaces -------------------------------------------------------------------------------
def _sh(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}): "
                             f"{res.stderr.strip() or res.stdout.strip()}")
    return res


def _cannot_make_namespaces(probe: str) -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run scripts/test as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` fails here: {res.stderr.strip() or res.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Hosts:
    """Two namespaces ("hosts") joined by a veth pair, and the processes started in them."""

    dest_ns: str
    src_ns: str
    procs: list = field(default_factory=list)
    seen_pids: set = field(default_factory=set)   # every pid ever found in either namespace

    def ns_of(self, side: str) -> tuple[str, str]:
        return (self.dest_ns, DEST_IF) if side == "dest" else (self.src_ns, SRC_IF)

    def set_link(self, side: str, up: bool) -> None:
        ns, dev = self.ns_of(side)
        _sh("ip", "-n", ns, "link", "set", dev, "up" if up else "down")

    def add_loss(self, percent: int) -> None:
        """Drop ``percent``% of the packets arriving in each namespace, at random."""
        if shutil.which("nft") is None:
            pytest.fail("`nft` is not installed (scripts/install installs nftables)")
        for ns in (self.dest_ns, self.src_ns):
            rules = (f"table inet {LOSS_TABLE} {{\n"
                     "  chain input {\n"
                     "    type filter hook input priority 0; policy accept;\n"
                     f"    numgen random mod 100 < {percent} counter drop\n"
                     "  }\n"
                     "}\n")
            res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                                 capture_output=True, text=True, timeout=20)
            assert res.returncode == 0, f"nft in {ns}: {res.stderr.strip()}"

    def dropped(self) -> int:
        """Packets the loss rules dropped, both namespaces together."""
        total = 0
        for ns in (self.dest_ns, self.src_ns):
            out = _sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet",
                      LOSS_TABLE).stdout
            for item in json.loads(out)["nftables"]:
                for expr in item.get("rule", {}).get("expr", []):
                    if "counter" in expr:
                        total += expr["counter"]["packets"]
        return total

    def start(self, side: str, *args: str) -> subprocess.Popen:
        """``rdma-pipeline ARGS`` in the namespace of ``side`` (``ip netns exec`` execs it, so
        the Popen's pid is the command's own)."""
        ns, _ = self.ns_of(side)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pipeline",
                                 *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self) -> set[int]:
        """Processes now in either namespace (all of them ours: the namespaces are)."""
        found = set()
        for ns in (self.dest_ns, self.src_ns):
            res = _sh("ip", "netns", "pids", ns, check=False)
            found |= {int(p) for p in res.stdout.split()}
        self.seen_pids |= found
        return found

    def kill_all(self) -> None:
        """SIGKILL, by pid, whatever still runs in the namespaces or was started here."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass


@pytest.fixture
def hosts():
    tag = f"rdp{os.getpid()}"
    why = _cannot_make_namespaces(f"{tag}-probe")
    if why:
        pytest.skip(why)
    h = Hosts(dest_ns=f"{tag}-dst", src_ns=f"{tag}-src")
    made = []
    try:
        for ns in (h.dest_ns, h.src_ns):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
        _sh("ip", "link", "add", DEST_IF, "netns", h.dest_ns, "type", "veth",
            "peer", "name", SRC_IF, "netns", h.src_ns)
        for ns, dev, addr in ((h.dest_ns, DEST_IF, DEST_ADDR), (h.src_ns, SRC_IF, SRC_ADDR)):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
            # wire-sized packets, so that "1% loss" means 1% of packets on a wire
            _sh("ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        h.kill_all()
        for ns in made:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet",
                            LOSS_TABLE], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- one migration between them -------------------------------------------------------------
def _proc_net(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/net/{name}") as f:
            return f.read()
    except OSError:
        return ""


def _listening(pid: int, port: int) -> bool:
    """The process's namespace has a TCP socket listening on ``port``."""
    for line in _proc_net(pid, "tcp").splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


def _rx_bytes(pid: int, dev: str) -> int:
    for line in _proc_net(pid, "dev").splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            return int(rest.split()[0])
    return 0


def _run_ids(pids: set[int], entries: set[str]) -> set[str]:
    out = set()
    for entry in entries:
        parsed = parse_segment_name(entry.removeprefix("sem."))
        if parsed is not None and parsed.pid in pids:
            out.add(parsed.run_id)
    return out


def _shm() -> set[str]:
    return set(os.listdir(SHM_DIR))


@dataclass
class Ended:
    """How one command ended: exit code, seconds after the fault (or after start), output."""

    code: int
    at: float
    summary: dict
    stderr: str


class Migration:
    """``incoming`` in the destination namespace, then ``migrate`` in the source's."""

    def __init__(self, hosts: Hosts, scheme: str = "rdma", *extra: str) -> None:
        self.hosts = hosts
        self.shm_before = _shm()
        uri = f"{scheme}:{DEST_ADDR}:{PORT}"
        self.dest = hosts.start("dest", "incoming", uri, "--json", *extra)
        deadline = time.monotonic() + 30
        while not (self._dest_in_ns() and _listening(self.dest.pid, PORT)):
            assert self.dest.poll() is None, f"incoming ended: {self.dest.communicate()}"
            assert time.monotonic() < deadline, "incoming never listened"
            time.sleep(0.05)
        self.src = hosts.start("src", "migrate", uri, "--ram", RAM, "--dirty-rate", "5",
                               "--json", *extra)
        self.t0 = time.monotonic()
        self.shm_seen: set[str] = set()
        self.rx = 0             # the most the destination's interface was seen to receive

    def _dest_in_ns(self) -> bool:
        """The incoming process runs in its namespace (``ip netns exec`` has switched)."""
        try:
            return (os.stat(f"/proc/{self.dest.pid}/ns/net").st_ino
                    == os.stat(f"/run/netns/{self.hosts.dest_ns}").st_ino)
        except OSError:
            return False

    def received(self) -> int:
        return _rx_bytes(self.dest.pid, DEST_IF)

    def wait_moving(self) -> None:
        """Until the destination has received ``MOVING`` bytes, with both sides still on."""
        deadline = time.monotonic() + 30
        while self.received() < MOVING:
            self._sample()
            for proc in (self.src, self.dest):
                assert proc.poll() is None, "a side ended before pages moved: " + \
                    proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "pages never started moving"
            time.sleep(0.02)

    def _sample(self) -> None:
        self.rx = max(self.rx, self.received())
        self.hosts.pids()
        self.shm_seen |= _shm() - self.shm_before

    def wait(self, since: float | None = None, bound: float = BOUND_S) -> tuple[Ended, Ended]:
        """Both ends, each with the time it took from ``since`` (default: the source's start);
        fails, after killing them, if either runs past ``bound`` seconds."""
        since = self.t0 if since is None else since
        ended: dict[str, float] = {}
        deadline = time.monotonic() + bound
        while len(ended) < 2:
            self._sample()
            for name, proc in (("source", self.src), ("destination", self.dest)):
                if name not in ended and proc.poll() is not None:
                    ended[name] = time.monotonic() - since
            if time.monotonic() > deadline:
                self.hosts.kill_all()
                pytest.fail(f"still running {bound:g} s on: "
                            f"{sorted({'source', 'destination'} - set(ended))}")
            time.sleep(0.05)
        out = []
        for name, proc in (("source", self.src), ("destination", self.dest)):
            stdout, stderr = proc.communicate(timeout=10)
            try:
                summary = json.loads(stdout)
            except ValueError:
                pytest.fail(f"the {name} printed no JSON summary (exit {proc.returncode}): "
                            f"stdout {stdout[-500:]!r} stderr {stderr[-2000:]!r}")
            out.append(Ended(proc.returncode, ended[name], summary, stderr))
        return out[0], out[1]

    def leftovers(self) -> tuple[set[int], set[str]]:
        """What the run left once both commands ended (waiting up to 2 s for stragglers):
        processes in the namespaces, and /dev/shm objects of the run's processes."""
        deadline = time.monotonic() + 2.0
        while True:
            self._sample()
            left = self.hosts.pids()
            runs = _run_ids(self.hosts.seen_pids, self.shm_seen)
            objects = {e for e in _shm() - self.shm_before
                       if (p := parse_segment_name(e.removeprefix("sem."))) is not None
                       and (p.pid in self.hosts.seen_pids or p.run_id in runs)}
            if not (left or objects) or time.monotonic() > deadline:
                return left, objects
            time.sleep(0.1)


def assert_completed(src: Ended, dest: Ended) -> None:
    for name, end in (("source", src), ("destination", dest)):
        s = end.summary
        assert s["status"] == "completed", f"{name}: {s.get('error-desc')}"
        assert s["verified"] is True, f"{name} did not verify: {s}"
        assert end.code == 0, f"{name} exit {end.code}: {end.stderr[-2000:]}"
    assert dest.summary["ram"]["total"] == src.summary["ram"]["total"]


# -- the cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["rdma", "tcp"])
def test_one_percent_loss_both_ways(hosts, scheme):
    """1% of the packets lost at random in each direction: completes and verifies."""
    hosts.add_loss(1)
    mig = Migration(hosts, scheme)
    src, dest = mig.wait(bound=60)
    assert_completed(src, dest)
    assert hosts.dropped() > 0, "the loss rules dropped nothing: the test tested nothing"
    left, objects = mig.leftovers()
    assert not left and not objects, (left, objects)


@pytest.mark.parametrize("side", ["src", "dest"])
def test_link_down_for_three_seconds(hosts, side):
    """The link goes down for 3 s while pages move, then comes back: completes and verifies."""
    mig = Migration(hosts, "rdma", "--parameter", SLOW)
    mig.wait_moving()
    hosts.set_link(side, False)
    time.sleep(OUTAGE_S)
    assert mig.src.poll() is None and mig.dest.poll() is None, \
        "a side gave up during a 3 s outage"
    before = mig.received()
    hosts.set_link(side, True)
    src, dest = mig.wait(bound=60)
    assert_completed(src, dest)
    assert mig.rx > before, "nothing moved after the link came back"
    assert src.summary["total-time"] > OUTAGE_S * 1000
    print(f"link {side} down for {OUTAGE_S:g} s: completed in {src.summary['total-time']:.0f} ms")


@pytest.mark.parametrize("side", ["src", "dest"])
def test_link_down_for_good(hosts, side):
    """The link goes down for good while pages move: each side fails, in one line, within
    GIVE_UP_S seconds, exits non-zero and leaves nothing behind."""
    mig = Migration(hosts, "rdma", "--parameter", SLOW)
    mig.wait_moving()
    cut = time.monotonic()
    hosts.set_link(side, False)
    src, dest = mig.wait(since=cut)
    print(f"link {side} down: the source failed after {src.at:.1f} s, the destination after "
          f"{dest.at:.1f} s")
    for name, end in (("source", src), ("destination", dest)):
        reason = end.summary.get("error-desc") or ""
        assert end.summary["status"] == "failed", f"{name}: {end.summary}"
        assert end.code != 0, f"the {name} exited 0"
        assert reason and "\n" not in reason, f"{name}: reason {reason!r}"
        lines = [ln for ln in end.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 1 and "Traceback" not in end.stderr, \
            f"{name} said more than one line: {end.stderr[-2000:]}"
        assert end.at <= GIVE_UP_S, \
            f"the {name} took {end.at:.1f} s to fail (limit {GIVE_UP_S:g} s): {reason}"
    left, objects = mig.leftovers()
    assert not left, f"processes left in the namespaces: {sorted(left)}"
    assert not objects, f"/dev/shm objects left: {sorted(objects)}"
