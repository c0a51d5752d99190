"""What a new user tripped over: each mistake refused before anything starts, with the reason
in words, never a traceback."""

import io
import json

import pytest

from pipeline.cli import main


@pytest.mark.parametrize("argv, words", [
    (["run", "--uri", "rdma:10.0.0.1:4444"], "run picks the host and port itself"),
    (["run", "--uri", "tcp:", "--transport", "verbs"], "tcp: moves pages in the stream"),
    (["migrate", "tcp:127.0.0.1:4444", "--transport", "verbs"], "use rdma: for verbs"),
    (["run", "--parameter", "downtime-limit=abc"], "'abc' is not a whole number of millisec"),
    (["run", "--trace-control", "/nonexistent-dir/t.jsonl"], "does not exist"),
    (["migrate", "rdma:no-such-host.invalid:4444"], "does not resolve"),
    (["incoming", "defer"], "add --qmp"),
    (["incoming", "defer", "--qmp", "unix:/tmp/x", "--timeout", "5"], "do not apply with --qmp"),
    (["vm", "--qmp", "bogus:x"], "use unix:PATH or tcp:HOST:PORT"),
    (["bench", "--case", "nosuch"], "bench --list shows the cases"),
])
def test_refused_before_anything_starts(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_guest_watch_below_zero_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--guest-watch", "-1"])
    assert info.value.code == 2
    assert "must be 0 or more seconds" in capsys.readouterr().err


def test_debug_works_after_the_subcommand_too():
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["cleanup", "--debug"]).debug is True
    assert build_parser().parse_args(["--debug", "cleanup"]).debug is True
    assert build_parser().parse_args(["cleanup"]).debug is False


def test_bench_list_names_the_cases(capsys):
    assert main(["bench", "--list", "--stage", "ring"]) == 0
    assert capsys.readouterr().out.startswith("ring: ")


def test_decode_reads_a_trace_control_file_as_it_is(monkeypatch, capsys):
    ready = "00000000" "00000002" "00000001" "00000000"     # READY: len 0, repeat 1
    lines = [json.dumps({"t": 0.1, "dir": "send", "hex": ready}), ready]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["decode", "-"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 2 and out[0] == out[1]
