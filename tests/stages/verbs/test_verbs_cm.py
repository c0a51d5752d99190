"""Connection manager: private data, IPv4/IPv6, refusals, timeouts, URIs."""

from __future__ import annotations

import errno
import socket
import threading

import numpy as np
import pytest
from verbs_helpers import address, port, wait_wcs

from pipeline.uri import InvalidURI, parse_uri
from shm.errors import TransportError
from stages.verbs import Access, QPState, SendOpcode, WCStatus, open_provider


class Side:
    def __init__(self, ctx) -> None:
        self.memory = np.zeros(65536, np.uint8)
        self.pd = ctx.alloc_pd()
        self.mr = self.pd.reg_mr(self.memory.ctypes.data, 65536, Access.LOCAL_WRITE)
        self.cq = ctx.create_cq(16)
        self.qp = self.pd.create_qp(self.cq, self.cq, max_send_wr=4, max_recv_wr=4)


@pytest.fixture
def ctx(provider):
    with open_provider(provider).open_device() as context:
        yield context


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _accept_in_thread(listener, qp, reply=b"", seen=None):
    def run():
        request = listener.get_request(10)
        if seen is not None:
            seen.append(request.private_data)
        request.accept(qp, reply)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _connect_and_ping(ctx, host_for_listen, connect_host, provider):
    a, b = Side(ctx), Side(ctx)
    b.qp.post_recv(1, b.mr.addr, 4096, b.mr.lkey)
    with ctx.listen(host_for_listen, port(provider)) as listener:
        seen = []
        thread = _accept_in_thread(listener, b.qp, b"\x00\x00\x00\x01\x00\x00\x00\x01ext", seen)
        reply = ctx.connect(a.qp, connect_host, listener.port, b"\x00\x00\x00\x01\x00\x00\x00\x00",
                            10)
        thread.join(10)
    assert reply[:11] == b"\x00\x00\x00\x01\x00\x00\x00\x01ext"  # QEMU's 8 bytes + ours
    assert seen[0][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x00"
    a.memory[:4] = [1, 2, 3, 4]
    a.qp.post_send(7, SendOpcode.SEND, a.mr.addr, 4, a.mr.lkey)
    assert wait_wcs(a.cq, 1)[0].status == WCStatus.SUCCESS
    wc = wait_wcs(b.cq, 1)[0]
    assert (wc.wr_id, wc.byte_len) == (1, 4) and list(b.memory[:4]) == [1, 2, 3, 4]


def test_private_data_both_ways_ipv4(ctx, provider):
    _connect_and_ping(ctx, address(provider), address(provider), provider)


def test_ipv6_loopback_from_a_uri(provider):
    if provider != "soft":
        pytest.skip("IPv6 loopback is not an RDMA address; the soft provider covers it")
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    with open_provider(provider).open_device() as ctx:
        uri = parse_uri("rdma:[::1]:4444")
        assert uri.host == "::1" and uri.family == socket.AF_INET6
        a, b = Side(ctx), Side(ctx)
        with ctx.listen(uri.host, 0) as listener:
            thread = _accept_in_thread(listener, b.qp, b"v6")
            target = parse_uri(f"rdma:[::1]:{listener.port}")
            assert ctx.connect(a.qp, *target.address, b"", 10) == b"v6"
            thread.join(10)
        assert a.qp.state == QPState.RTS


def test_listening_on_all_ipv6_addresses_accepts_ipv4_too():
    if not _ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    with open_provider("soft").open_device() as ctx:
        _connect_and_ping(ctx, "::", "127.0.0.1", "soft")


def test_refused_connection_is_one_clear_line(ctx, provider):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    side = Side(ctx)
    with pytest.raises(TransportError) as info:
        ctx.connect(side.qp, "127.0.0.1", free, b"", 5)
    message = str(info.value)
    assert info.value.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ECONNABORTED)
    assert f"127.0.0.1:{free}" in message or provider != "soft"
    assert "\n" not in message
    assert side.qp.state == QPState.INIT  # still usable


def test_rejected_connection(ctx, provider):
    side = Side(ctx)
    with ctx.listen(address(provider), port(provider)) as listener:
        thread = threading.Thread(target=lambda: listener.get_request(10).reject(b"no"))
        thread.start()
        with pytest.raises(TransportError, match="rejected") as info:
            ctx.connect(side.qp, address(provider), listener.port, b"", 10)
        thread.join(10)
    assert info.value.errno == errno.ECONNREFUSED


def test_get_request_times_out(ctx, provider):
    with ctx.listen(address(provider), port(provider)) as listener:
        with pytest.raises(TransportError) as info:
            listener.get_request(0.1)
    assert info.value.errno == errno.ETIMEDOUT


def test_private_data_limits(ctx, provider):
    side = Side(ctx)
    with pytest.raises(ValueError, match="56"):
        ctx.connect(side.qp, address(provider), 1, bytes(57), 1)


def test_wrong_uri_is_refused_before_any_connection():
    with pytest.raises(InvalidURI) as info:
        parse_uri("rdma:::1:4444")
    assert "rdma:[IPV6]:PORT" in str(info.value)


def test_soft_connect_times_out_when_nobody_answers():
    with open_provider("soft").open_device() as ctx:
        side = Side(ctx)
        with ctx.listen("127.0.0.1", 0) as listener:  # never calls get_request
            with pytest.raises(TransportError) as info:
                ctx.connect(side.qp, "127.0.0.1", listener.port, b"", 0.3)
        assert info.value.errno == errno.ETIMEDOUT


def test_soft_listener_survives_a_stray_client():
    with open_provider("soft").open_device() as ctx:
        a, b = Side(ctx), Side(ctx)
        with ctx.listen("127.0.0.1", 0) as listener:
            with socket.create_connection(("127.0.0.1", listener.port)) as stray:
                stray.sendall(b"GET / HTTP/1.0\r\n\r\n")
                thread = _accept_in_thread(listener, b.qp, b"ok")
                assert ctx.connect(a.qp, "127.0.0.1", listener.port, b"", 10) == b"ok"
                thread.join(10)


def test_soft_a_connected_qp_cannot_connect_again():
    with open_provider("soft").open_device() as ctx:
        a, b, c = Side(ctx), Side(ctx), Side(ctx)
        with ctx.listen("127.0.0.1", 0) as listener:
            thread = _accept_in_thread(listener, b.qp)
            ctx.connect(a.qp, "127.0.0.1", listener.port, b"", 10)
            thread.join(10)
            with pytest.raises(TransportError) as info:
                ctx.connect(a.qp, "127.0.0.1", listener.port, b"", 1)
            assert info.value.errno == errno.EINVAL
        assert c.qp.state == QPState.INIT
