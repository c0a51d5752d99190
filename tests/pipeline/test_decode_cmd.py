import json
import subprocess
import sys

import pytest

from pipeline.cli import main

REGISTER_RESULT = "00000010 00000008 00000001 00000000 00001234 00000000 00007f1234500000"


def run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["decode", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_one_message_with_spaces(capsys):
    code, out, err = run(REGISTER_RESULT.split(), capsys)
    assert code == 0 and err == ""
    assert out == [{"type": "REGISTER_RESULT", "len": 16, "repeat": 1,
                    "results": [{"rkey": 0x1234, "host_addr": 0x7F1234500000}]}]


def test_one_argument_and_qemu_file(capsys):
    code, out, _ = run(["0000000d000000030000000000000000020000000300000000000000 80"], capsys)
    assert code == 0
    assert out[0] == {"type": "QEMU_FILE", "len": 13, "repeat": 0,
                      "data": "02000000030000000000000080"}


def test_stdin_lines_and_a_bad_one(capsys, monkeypatch):
    lines = "\n".join([
        "00000000 00000002 00000001 00000000",
        "",
        "00000000 00000002 00000001 000000",            # 15 bytes
        "00000018 00000006 00000001 00000000 00000000 00000000 0000000012345000 "
        "00000000000bb000",
        "00000000 0000000c 00000001 00000000",          # unknown type
        "zz",
    ]) + "\n"
    code, out, err = run(["-"], capsys, stdin=lines, monkeypatch=monkeypatch)
    assert code == 2
    assert [o["type"] for o in out] == ["READY", "COMPRESS"]
    assert out[1]["offset"] == 0x12345000 and out[1]["length"] == 0xBB000
    errors = err.splitlines()
    assert len(errors) == 3
    assert errors[0].startswith("rdma-pipeline decode: line 3: control message of 15 bytes")
    assert "line 5: header type 12 (unknown)" in errors[1]
    assert "line 6: not hex: 'z'" in errors[2]


def test_a_trace_file_reads_as_it_is(capsys, monkeypatch):
    """A --trace-control file: the connection's private data first, then the messages."""
    from pipeline.session.policy import PeerPolicy

    private = PeerPolicy.request(pin_all=False, chunk_size=1 << 20).encode().hex()
    trace = "\n".join(json.dumps(x) for x in [
        {"t": 0.0, "dir": "connect", "hex": private},
        {"t": 0.01, "dir": "accepted", "hex": private},
        {"t": 0.02, "dir": "recv", "hex": "00000000000000020000000100000000"},
    ]) + "\n"
    code, out, err = run(["-"], capsys, stdin=trace, monkeypatch=monkeypatch)
    assert code == 0 and err == ""
    assert [o.get("kind") or o["type"] for o in out] == ["capabilities", "capabilities", "READY"]
    assert "RAM_DIGEST" in out[0]["flag_names"]


@pytest.mark.parametrize("argv, words", [
    (["00000001 00000002 00000001 00000000"], ["header len 1 but the message is 16 bytes"]),
    (["000"], ["odd number of hex digits"]),
    ([], ["give HEX"]),
])
def test_bad_input_prints_one_line_and_exits_2(argv, words, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == [] and len(err.splitlines()) == 1
    for word in words:
        assert word in err


def test_capabilities(capsys):
    code, out, _ = run(["--capabilities", "00 00 00 01 00 00 00 01"], capsys)
    assert code == 0 and out == [{"kind": "capabilities", "version": 1, "flags": 1,
                                  "flag_names": ["PIN_ALL"], "chunk_shift": 20, "data_qps": 0,
                                  "session_token": 0, "digest": 0, "bytes": 8}]
    code, out, _ = run(["--capabilities", "52445044 01 02 0000 0000000000c0ffee"], capsys)
    assert out == [{"kind": "data_connect", "session_token": 0xC0FFEE, "index": 2}]
    code, out, err = run(["--capabilities", "000000010000"], capsys)
    assert code == 2 and "RDMACapabilities needs 8" in err


def test_as_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "decode", "-"], input=(
        "00000000 00000009 00000001 00000000\n00000000 00000009 00000002 00000000\n"),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"type": "REGISTER_FINISHED", "len": 0, "repeat": 1}
    assert proc.stderr.strip() == ("rdma-pipeline decode: line 2: REGISTER FINISHED: header "
                                   "repeat 2, must be 1")
