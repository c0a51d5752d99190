"""``file:``: a snapshot in QEMU's stream format, read by an independent reader, restored,
and refused when cut short or damaged."""

import json
import subprocess
import sys

import pytest
from qemu_stream_reader import END, FULL, PART, START, read_stream

from pipeline.api import restore_from_file, save_to_file
from pipeline.guest.synthetic import GuestState, SyntheticGuest
from shm.errors import MigrationError
from shm.naming import new_run_id

pytestmark = pytest.mark.slow
MIB = 1 << 20
BLOCKS = [("pc.ram", 8 * MIB), ("vga.vram", 256 * 1024)]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A saved guest: the file, the guest's RAM at the save, and its state."""
    path = tmp_path_factory.mktemp("snap") / "guest.qemu"
    state = GuestState(seed=5, zero_share=0.25, dirty_rate=2 * MIB)
    with SyntheticGuest(8 * MIB, run_id=new_run_id(), state=state, fill=0.6,
                        blocks=BLOCKS) as guest:
        guest.start()
        summary = save_to_file(str(path), guest)
        ram = {blk.idstr: blk.view.tobytes() for blk in guest.region.blocks}  # still paused
        saved = guest.query()
    return path, ram, saved, summary


def test_independent_reader_rebuilds_both_blocks_and_prints_the_device(snapshot):
    path, ram, saved, summary = snapshot
    assert summary["status"] == "completed"
    data = path.read_bytes()
    dump = read_stream(data)
    assert dump.machine == "rdma-pipeline"
    assert set(dump.blocks) == {"pc.ram", "vga.vram"}
    for name, mem in dump.blocks.items():
        assert bytes(mem) == ram[name], f"block {name} differs"
    shape = [(s.kind, s.name) for s in dump.sections]
    assert shape == [(START, "ram"), (PART, "ram"), (END, "ram"),
                     (FULL, "rdp-synthetic-guest"), (FULL, "rdp-ram-digest"),
                     (FULL, "rdp-device-digest")]
    start, part, end = dump.sections[:3]
    assert start.records[0][0] == "mem_size" and start.records[-1] == ("eos",)
    kinds = {r[0] for r in part.records[:-1]}
    assert kinds == {"page", "zero"} and part.records[-1] == ("eos",)
    assert end.records == [("eos",)]                 # a snapshot: nothing dirty at the end
    pages = sum(len(m) for m in ram.values()) // 4096
    assert len(part.records) - 1 == pages           # every page once, as PAGE or ZERO
    guest = dump.sections[3]
    print("device", guest.name, "through VMDESCRIPTION:", guest.fields)
    assert set(guest.fields) == {"size", "state"}
    assert guest.fields["size"] == len(guest.fields["state"])
    assert json.loads(guest.fields["state"]) == json.loads(saved.to_bytes())
    assert len(dump.sections[4].fields["sha256"]) == 32 * (8 + 1)   # one per 1 MiB chunk
    assert len(dump.sections[5].fields["sha256"]) == 32             # the device sections
    assert summary["ram"]["transferred"] == len(data)


def test_round_trip_verifies_and_resumes(snapshot):
    path, _, saved, _ = snapshot
    summary = restore_from_file(str(path))
    assert summary["status"] == "completed" and summary["verified"] is True
    assert summary["guest"]["resumed"]["pages_written"] == saved.pages_written
    assert summary["ram"]["total"] == 8 * MIB + 256 * 1024


def cut_points(data):
    """Every section boundary of the stream, plus a cut inside a page and inside the JSON."""
    dump = read_stream(data)
    points = {8, 8 + 1 + 4 + len(dump.machine)}
    for s in dump.sections:
        points |= {s.start, s.end}
    points |= {dump.eof_at, dump.eof_at + 1, dump.sections[1].start + 5000, len(data) - 3}
    return sorted(p for p in points if 0 < p < len(data))


def test_a_file_cut_at_any_section_boundary_is_refused(snapshot, tmp_path):
    data = snapshot[0].read_bytes()
    for n in cut_points(data):
        cut = tmp_path / f"cut{n}"
        cut.write_bytes(data[:n])
        with pytest.raises(MigrationError) as info:
            restore_from_file(str(cut))
        msg = str(info.value)
        assert "\n" not in msg and str(cut) in msg
        assert "offset" in msg and ("truncated" in msg or "cut short" in msg), msg
        assert "section" in msg or "file header" in msg or "EOF" in msg, msg


def test_a_flipped_byte_in_a_page_is_refused_saying_where(snapshot, tmp_path):
    data = bytearray(snapshot[0].read_bytes())
    dump = read_stream(bytes(data))
    pages = [r for r in dump.sections[1].records if r[0] == "page"]
    flip = pages[len(pages) // 2][3] + 100        # inside the data of a page in the middle
    data[flip] ^= 0x40
    bad = tmp_path / "flipped.qemu"
    bad.write_bytes(bytes(data))
    with pytest.raises(MigrationError) as info:
        restore_from_file(str(bad))
    msg = str(info.value)
    assert "RAM verification failed" in msg and "not resumed" in msg and "\n" not in msg
    lo, hi = msg.split("stream bytes ")[1].split(" ")[0].split("..")
    assert int(lo) <= flip < int(hi), msg


def test_a_guest_state_edited_to_the_same_length_is_refused(snapshot, tmp_path):
    data = bytearray(snapshot[0].read_bytes())
    at = data.find(b'"seed": 5')
    assert at > 0 and data.find(b'"seed": 5', at + 1) < 0
    data[at + len(b'"seed": ')] = ord("6")         # a valid state, of another guest
    bad = tmp_path / "edited.qemu"
    bad.write_bytes(bytes(data))
    with pytest.raises(MigrationError, match="device state verification failed") as info:
        restore_from_file(str(bad))
    assert "not resumed" in str(info.value) and "\n" not in str(info.value)


def test_cli_save_restore_and_refusal(tmp_path):
    path = tmp_path / "cli.qemu"
    cli = [sys.executable, "-m", "pipeline"]
    save = subprocess.run([*cli, "migrate", f"file:{path}", "--ram", "4M", "--dirty-rate", "1",
                           "--json"], capture_output=True, text=True, timeout=60)
    assert save.returncode == 0, save.stderr
    assert json.loads(save.stdout)["status"] == "completed"
    restore = subprocess.run([*cli, "incoming", f"file:{path}", "--json"], capture_output=True,
                             text=True, timeout=60)
    assert restore.returncode == 0, restore.stderr
    assert json.loads(restore.stdout)["verified"] is True
    path.write_bytes(path.read_bytes()[:-100])
    refused = subprocess.run([*cli, "incoming", f"file:{path}"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated" in lines[0] and "offset" in lines[0], refused.stderr
