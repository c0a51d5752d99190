"""A real QEMU at either end (Debian's qemu-system-x86_64 -M none): its RAM migrates into
``rdma-pipeline incoming --machine none --dump DIR`` over ``tcp:`` and from a file QEMU wrote,
and ``rdma-pipeline migrate --machine none --dump DIR`` (a busy guest) migrates into QEMU over
``tcp:`` and through a file (``exec:cat FILE``). RAM is compared byte for byte: QEMU's
``pmemsave`` and the pattern it was loaded with against our dump. Each migration is 32 MiB.
Our side runs as the CLI a user runs, in a child process."""

import json
import os
import subprocess
import sys

import pytest
from qemu_vm import QemuVm, requires_qemu

from pipeline.api import free_port

pytestmark = [pytest.mark.slow, requires_qemu]
pytest.importorskip("qemu.qmp", reason="qemu.qmp (QEMU's QMP client) is in the test extra")

MIB = 1 << 20
RAM = 32 * MIB
CLI = [sys.executable, "-m", "pipeline"]


@pytest.fixture
def pattern(tmp_path):
    """8 MiB of seeded noise, then QEMU's RAM stays zero: data and zero pages both travel."""
    import numpy as np

    path = os.path.join(tmp_path, "pattern.bin")
    data = np.random.default_rng(14).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return path, data + bytes(RAM - len(data))


def dumped(directory) -> dict[str, bytes]:
    with open(os.path.join(directory, "blocks.json")) as f:
        listing = json.load(f)
    out = {}
    for entry in listing:
        with open(os.path.join(directory, entry["file"]), "rb") as f:
            out[entry["idstr"]] = f.read()
        assert len(out[entry["idstr"]]) == entry["length"]
    return out


def incoming(uri: str, dump, *extra, machine: str | None = "none") -> subprocess.Popen:
    """``rdma-pipeline incoming URI --dump DUMP``, held to ``machine`` (None: any type)."""
    held = ("--machine", machine) if machine else ()
    return subprocess.Popen([*CLI, "incoming", uri, *held, "--dump", str(dump),
                             "--timeout", "60", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def qemu_into_incoming(vm, dump, *, return_path: bool = True,
                       machine: str | None = "none") -> tuple[int, str, str]:
    """QEMU ``vm`` migrates over tcp: into a fresh ``incoming``: its (exit code, stdout,
    stderr)."""
    port = free_port()
    dest = incoming(f"tcp:127.0.0.1:{port}", dump, machine=machine)
    try:
        assert dest.stderr.readline().startswith("listening on")
        vm.set_capability("return-path", return_path)
        vm.migrate(f"tcp:127.0.0.1:{port}")
        assert vm.wait_migration() == "completed", vm.log()
    finally:
        code, out, err = finish(dest)
    return code, out, err


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def migrate(uri: str, dump, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "migrate", uri, "--machine", "none", "--ram", "32M",
                           "--dump", str(dump), *extra],
                          capture_output=True, text=True, timeout=120)


# -- QEMU -> rdma-pipeline ---------------------------------------------------------------------

@pytest.mark.parametrize("return_path", [True, False], ids=["return-path", "no-return-path"])
def test_qemu_into_incoming_over_tcp(tmp_path, pattern, return_path):
    path, expected = pattern
    dump = tmp_path / "dump"
    with QemuVm(tmp_path, RAM, pattern=path) as vm:
        code, out, err = qemu_into_incoming(vm, dump, return_path=return_path)
        assert code == 0, err
        assert "verification: RAM not verified" in out and "machine type 'none'" in out
        qemu_ram = vm.pmemsave(str(tmp_path / "qemu.mem"), RAM)
    ram = dumped(dump)
    assert list(ram) == ["ram"]
    assert ram["ram"] == qemu_ram == expected
    devices = json.loads((dump / "devices.json").read_text())
    assert [d["idstr"] for d in devices] == ["timer", "globalstate"]
    assert bytes.fromhex(devices[1]["fields"]["runstate"]).rstrip(b"\0") in (
        b"running", b"prelaunch")


def test_a_pc_machine_into_incoming_without_machine(tmp_path, pattern):
    """Any machine type is taken when incoming is given none: QEMU's pc (six RAM blocks, some
    named with '/'; 30 device sections with structs and subsections, all decoded by the
    VMDESCRIPTION that arrives last over tcp:)."""
    path, expected = pattern
    dump = tmp_path / "dump"
    with QemuVm(tmp_path, RAM, pattern=path, at=MIB, machine="pc", paused=True) as vm:
        code, out, err = qemu_into_incoming(vm, dump, machine=None)
        assert code == 0, err
        assert "machine type 'pc-i440fx" in out
        above_1m = vm.pmemsave(str(tmp_path / "qemu.mem"), RAM - MIB, at=MIB)
    ram = dumped(dump)
    assert "pc.ram" in ram and "/rom@etc/acpi/tables" in ram
    assert ram["pc.ram"][MIB:] == above_1m == expected[:RAM - MIB]
    devices = json.loads((dump / "devices.json").read_text())
    assert len(devices) > 20 and not [d["idstr"] for d in devices if "raw" in d]


def test_qemu_file_into_incoming(tmp_path, pattern):
    path, expected = pattern
    stream = tmp_path / "qemu.stream"
    with QemuVm(tmp_path, RAM, pattern=path) as vm:
        vm.migrate(f"exec:cat > {stream}")
        assert vm.wait_migration() == "completed", vm.log()
        qemu_ram = vm.pmemsave(str(tmp_path / "qemu.mem"), RAM)
    code, out, err = finish(incoming(f"file:{stream}", tmp_path / "dump", "--json"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["verified"] is None
    assert "no RAM digest" in summary["verification"]
    assert dumped(tmp_path / "dump")["ram"] == qemu_ram == expected
    # given another machine type, incoming refuses in one line, as QEMU does
    res = subprocess.run([*CLI, "incoming", f"file:{stream}", "--machine", "rdma-pipeline"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert "Machine type received is 'none' and local is 'rdma-pipeline'" in res.stderr


# -- rdma-pipeline -> QEMU ---------------------------------------------------------------------

def test_busy_guest_into_qemu_over_tcp(tmp_path):
    port = free_port()
    with QemuVm(tmp_path, RAM, incoming=True) as vm:
        vm.incoming(f"tcp:127.0.0.1:{port}")
        res = migrate(f"tcp:127.0.0.1:{port}", tmp_path / "dump", "--dirty-rate", "20",
                      "--json")
        assert res.returncode == 0, (res.stderr, vm.log())
        summary = json.loads(res.stdout)
        assert summary["status"] == "completed" and summary["verified"] is None
        assert summary["ram"]["dirty-sync-count"] >= 1        # the guest wrote while it moved
        assert vm.wait_migration() == "completed", vm.log()
        qemu_ram = vm.pmemsave(str(tmp_path / "qemu.mem"), RAM)
    ram = dumped(tmp_path / "dump")
    assert list(ram) == ["ram"] and ram["ram"] == qemu_ram
    assert qemu_ram.count(0) < RAM                          # the guest's data, not zeros


def test_busy_guest_into_qemu_through_a_file(tmp_path):
    stream = tmp_path / "ours.stream"
    res = migrate(f"file:{stream}", tmp_path / "dump", "--dirty-rate", "20")
    assert res.returncode == 0, res.stderr
    with QemuVm(tmp_path, RAM, incoming=True) as vm:
        vm.incoming(f"exec:cat {stream}")
        assert vm.wait_migration() == "completed", vm.log()
        qemu_ram = vm.pmemsave(str(tmp_path / "qemu.mem"), RAM)
    assert dumped(tmp_path / "dump")["ram"] == qemu_ram


def test_qemu_refusal_is_one_line(tmp_path):
    """Our own machine type into QEMU -M none: QEMU refuses it (and says why in its log);
    migrate fails in one line and exits 1."""
    port = free_port()
    with QemuVm(tmp_path, RAM, incoming=True) as vm:
        vm.incoming(f"tcp:127.0.0.1:{port}")
        res = subprocess.run([*CLI, "migrate", f"tcp:127.0.0.1:{port}", "--ram", "32M",
                              "--dirty-rate", "0"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.count("\n") == 1, res.stderr
        assert "closed the connection" in res.stderr and "its log says why" in res.stderr
        vm.exit_code()          # QEMU 7.2 exits when an incoming migration fails
        assert "Machine type received is 'rdma-pipeline' and local is 'none'" in vm.log()
