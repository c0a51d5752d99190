"""Migration URIs, parsed in one place.

``rdma:HOST:PORT`` (QEMU's form, ``inet_parse`` rules: IPv6 in brackets, an optional
``%iface`` scope on link-local addresses, the port required), plus ``tcp:HOST:PORT`` and
``file:PATH`` for later transports. A malformed URI raises :class:`InvalidURI`, which is both a
:class:`~shm.errors.MigrationError` (the CLI prints it on one line with a hint showing the
right form) and a ``ValueError`` (for library callers who treat it as bad input).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from shm.errors import MigrationError

SCHEMES = ("rdma", "tcp", "file")
_FORMS = "rdma:HOST:PORT, rdma:[IPV6]:PORT, tcp:HOST:PORT or file:PATH"
# A DNS name or an IPv4 literal: labels of letters, digits, '-' and '_' separated by dots.
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_\-]{0,62})(\.[A-Za-z0-9_\-]{1,63})*\.?")


class InvalidURI(MigrationError, ValueError):
    """A migration URI that does not parse; the hint shows the accepted forms."""


@dataclass(frozen=True, slots=True)
class URI:
    """A parsed migration URI.

    ``family`` is ``socket.AF_INET`` or ``AF_INET6`` for address literals, ``AF_UNSPEC`` for
    host names (resolved later, every address tried in turn) and for ``file:``.
    """

    scheme: str
    host: str = ""
    port: int = 0
    family: int = socket.AF_UNSPEC
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file:{self.path}"
        host = f"[{self.host}]" if self.family == socket.AF_INET6 else self.host
        return f"{self.scheme}:{host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for socket and connection-manager calls."""
        return self.host, self.port


def _fail(uri: str, why: str) -> InvalidURI:
    return InvalidURI(f"invalid migration URI {uri!r}: {why}", hint=f"use {_FORMS}")


def _parse_port(uri: str, text: str) -> int:
    if not text:
        raise _fail(uri, "the port is missing (there is no default port)")
    if not text.isascii() or not text.isdigit():
        raise _fail(uri, f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _fail(uri, f"port {port} is out of range 1..65535")
    return port


def _parse_host(uri: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        if not text.endswith("]"):
            raise _fail(uri, "unbalanced '[' around the IPv6 address")
        inner = text[1:-1]
        address, _, scope = inner.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise _fail(uri, f"{inner!r} is not an IPv6 address") from None
        if "%" in inner and not scope:
            raise _fail(uri, "empty interface after '%'")
        return inner, socket.AF_INET6
    if not text:
        raise _fail(uri, "the host is empty (listen on all addresses with 0.0.0.0 or [::])")
    if ":" in text:
        raise _fail(uri, "an IPv6 address must be written in brackets, e.g. rdma:[::1]:4444")
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        if not _HOSTNAME.fullmatch(text) or text.replace(".", "").isdigit():
            raise _fail(uri, f"{text!r} is neither an address nor a host name") from None
        return text, socket.AF_UNSPEC
    return text, socket.AF_INET


def parse_uri(uri: str) -> URI:
    """Parse ``rdma:HOST:PORT``, ``tcp:HOST:PORT`` or ``file:PATH``."""
    if not isinstance(uri, str):
        raise TypeError(f"a URI is a str, not {type(uri).__name__}")
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise _fail(uri, "no scheme")
    if scheme == "x-rdma":
        raise _fail(uri, "the x-rdma: prefix was renamed rdma: in 2014")
    if scheme not in SCHEMES:
        raise _fail(uri, f"unknown scheme {scheme!r}")
    if scheme == "file":
        if not rest:
            raise _fail(uri, "the path is empty")
        return URI("file", path=rest)
    host_text, sep, port_text = rest.rpartition(":")
    if not sep:
        raise _fail(uri, "expected HOST:PORT after the scheme, the port is missing")
    if host_text.startswith("[") != host_text.endswith("]"):
        raise _fail(uri, "unbalanced brackets around the IPv6 address")
    host, family = _parse_host(uri, host_text)
    return URI(scheme, host, _parse_port(uri, port_text), family)
