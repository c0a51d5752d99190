import socket

import pytest

from pipeline.uri import URI, InvalidURI, parse_uri
from shm.errors import MigrationError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rdma:127.0.0.1:4444", URI("rdma", "127.0.0.1", 4444, socket.AF_INET)),
        ("rdma:0.0.0.0:1", URI("rdma", "0.0.0.0", 1, socket.AF_INET)),
        ("rdma:[::1]:4444", URI("rdma", "::1", 4444, socket.AF_INET6)),
        ("rdma:[::]:65535", URI("rdma", "::", 65535, socket.AF_INET6)),
        ("rdma:[fe80::1%eth0]:4444", URI("rdma", "fe80::1%eth0", 4444, socket.AF_INET6)),
        ("rdma:dest-host.example:4444", URI("rdma", "dest-host.example", 4444)),
        ("rdma:localhost:4444", URI("rdma", "localhost", 4444)),
        ("tcp:10.0.0.2:5555", URI("tcp", "10.0.0.2", 5555, socket.AF_INET)),
        ("file:/tmp/state.bin", URI("file", path="/tmp/state.bin")),
        ("file:relative:with:colons", URI("file", path="relative:with:colons")),
    ],
)
def test_parses(text, expected):
    uri = parse_uri(text)
    assert uri == expected
    assert str(uri) == text
    assert parse_uri(str(uri)) == uri


def test_address_pair():
    assert parse_uri("rdma:[::1]:7").address == ("::1", 7)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("rdma:127.0.0.1", "port"),
        ("rdma:127.0.0.1:", "port is missing"),
        ("rdma::4444", "host is empty"),
        ("rdma:host:0", "out of range"),
        ("rdma:host:65536", "out of range"),
        ("rdma:host:44x", "not a number"),
        ("rdma:host:-1", "not a number"),
        ("rdma:host:٤٤", "not a number"),
        ("rdma:::1:4444", "brackets"),
        ("rdma:[::1:4444", "brackets"),
        ("rdma:[nothex]:4444", "not an IPv6 address"),
        ("rdma:[fe80::1%]:4444", "empty interface"),
        ("rdma:bad host:4444", "neither"),
        ("rdma:1.2.3.4.5:4444", "neither"),
        ("x-rdma:host:4444", "renamed"),
        ("udp:host:4444", "unknown scheme"),
        ("host:4444", "unknown scheme"),
        ("rdma", "no scheme"),
        ("file:", "path is empty"),
        ("", "no scheme"),
    ],
)
def test_rejects_with_hint(text, why):
    with pytest.raises(InvalidURI) as info:
        parse_uri(text)
    err = info.value
    assert why in err.message
    assert isinstance(err, MigrationError) and isinstance(err, ValueError)
    assert "rdma:HOST:PORT" in str(err)  # the hint shows the right form
    assert "\n" not in str(err)


def test_not_a_string():
    with pytest.raises(TypeError):
        parse_uri(b"rdma:h:1")
