"""QMP framing without sockets: whole, byte by byte, split and joined messages, junk,
negotiation, and QEMU's error texts."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from pipeline.qmp.protocol import QmpConnection, QmpError, Request


def negotiated() -> QmpConnection:
    conn = QmpConnection("test")
    conn.receive_data(b'{"execute": "qmp_capabilities"}\n')
    assert isinstance(conn.next_request(), Request)
    return conn


def drain(conn: QmpConnection) -> list:
    out = []
    while (item := conn.next_request()) is not None:
        out.append(item)
    return out


def test_greeting_is_qemus_shape():
    msg = json.loads(QmpConnection("rdma-pipeline 1").greeting())
    assert msg == {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                       "package": "rdma-pipeline 1"}, "capabilities": []}}


def test_commands_before_negotiation_are_refused_with_the_id():
    conn = QmpConnection()
    conn.receive_data(b'{"execute": "query-status", "id": "x"}\n')
    err = conn.next_request()
    assert isinstance(err, QmpError) and err.cls == "CommandNotFound" and err.id == "x"
    assert json.loads(conn.error(err)) == {"error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": "x"}


def test_negotiating_twice_or_asking_for_oob_is_refused():
    conn = negotiated()
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    assert conn.next_request().cls == "CommandNotFound"
    fresh = QmpConnection()
    fresh.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert fresh.next_request().desc == "Capability 'oob' not available"
    assert not fresh.negotiated


def test_a_message_byte_by_byte_then_two_in_one_chunk():
    conn = negotiated()
    data = b'{"execute": "query-migrate", "id": 1}\r\n'
    for i in range(len(data) - 3):
        conn.receive_data(data[i:i + 1])
        assert conn.next_request() is None
    conn.receive_data(data[len(data) - 3:])
    assert drain(conn) == [Request("query-migrate", {}, 1, True)]
    conn.receive_data(b'{"execute": "a"}{"execute": "b", "arguments": {"x": [1, 2]}}\n')
    assert [r.execute for r in drain(conn)] == ["a", "b"]


def test_a_character_split_between_two_reads_survives():
    conn = negotiated()
    data = '{"execute": "x", "id": "é"}\n'.encode()
    cut = data.index("é".encode()) + 1
    conn.receive_data(data[:cut])
    conn.receive_data(data[cut:])
    assert conn.next_request().id == "é"


def test_malformed_input_gets_qemus_words_and_the_stream_goes_on():
    conn = negotiated()
    conn.receive_data(b'garbage\n[1]\n{"bad": 1, "id": 3}\n{"execute": 5}\n'
                      b'{"execute": "x", "arguments": []}\n{}\n{"execute": "ok"}\n')
    items = drain(conn)
    descs = [i.desc for i in items[:-1]]
    assert descs[0].startswith("JSON parse error")
    assert descs[1:] == ["QMP input must be a JSON object", "QMP input member 'bad' is unexpected",
                         "QMP input member 'execute' must be a string",
                         "QMP input member 'arguments' must be an object",
                         "QMP input lacks member 'execute'"]
    assert items[2].id == 3
    assert items[-1] == Request("ok", {}, None, False)


def test_replies_echo_the_id_and_events_carry_a_timestamp():
    conn = negotiated()
    assert json.loads(conn.reply({}, Request("x", {}, None, True))) == {"return": {},
                                                                       "id": None}
    assert json.loads(conn.reply(3, Request("x", {}))) == {"return": 3}
    ev = json.loads(conn.event("MIGRATION", {"status": "setup"}, 1796498858.680810))
    assert ev == {"timestamp": {"seconds": 1796498858, "microseconds": 680810},
                  "event": "MIGRATION", "data": {"status": "setup"}}
    assert "data" not in json.loads(conn.event("STOP", None, 1.5))


@given(st.binary(max_size=300))
def test_no_input_crashes_the_reader(data):
    conn = negotiated()
    conn.receive_data(data + b"\n")
    for item in drain(conn):
        assert isinstance(item, Request | QmpError)
