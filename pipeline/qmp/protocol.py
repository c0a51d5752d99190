"""QMP framing as QEMU 7.2 speaks it, sans-IO: bytes in, requests out; replies and events in,
bytes out.

``QmpConnection`` is one client's side of the wire. ``greeting()`` is the first thing sent;
``receive_data(data)`` buffers what arrived and ``next_request()`` returns a ``Request``, a
``QmpError`` to answer (malformed input: its ``id`` is echoed when the input had one), or
``None`` when a whole message has not arrived yet. Until the client negotiates with
``qmp_capabilities`` every other command is refused as QEMU refuses it, and events are not
sent to it (``negotiated``). Replies: ``reply(value, id)``, ``error(exc, id)``;
``event(name, data, now)`` takes the wall clock as an argument (seconds since the epoch).

Messages are JSON objects; clients (qemu.qmp, libvirt, socat) end each with a newline, but an
object may span lines and several may share one. The texts of the errors are QEMU's.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass

QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}   # the QMP this monitor follows
MAX_MESSAGE = 1 << 20                                  # bytes of one unfinished message

GENERIC = "GenericError"
NOT_FOUND = "CommandNotFound"


class QmpError(Exception):
    """A command's failure as QMP reports it: ``{"error": {"class", "desc"}}``."""

    def __init__(self, desc: str, cls: str = GENERIC, id: object = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls
        self.id = id


@dataclass(frozen=True, slots=True)
class Request:
    """One command from the client; ``has_id`` tells an absent id from ``"id": null``."""

    execute: str
    arguments: dict
    id: object = None
    has_id: bool = False


_MEMBERS = ("execute", "arguments", "id")


def parse_request(obj: object) -> Request:
    """A decoded JSON value checked as QEMU's dispatcher checks it (QmpError otherwise)."""
    if not isinstance(obj, dict):
        raise QmpError("QMP input must be a JSON object")
    rid, has_id = obj.get("id"), "id" in obj
    for key in obj:
        if key not in _MEMBERS:
            raise QmpError(f"QMP input member '{key}' is unexpected", id=rid)
    if "execute" not in obj:
        raise QmpError("QMP input lacks member 'execute'", id=rid)
    if not isinstance(obj["execute"], str):
        raise QmpError("QMP input member 'execute' must be a string", id=rid)
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        raise QmpError("QMP input member 'arguments' must be an object", id=rid)
    return Request(obj["execute"], args, rid, has_id)


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"


def event_message(name: str, data: dict | None, now: float) -> dict:
    """An event as QEMU sends it: its timestamp first, ``data`` only when there is some."""
    secs = int(now)
    micros = min(999_999, round((now - secs) * 1e6))
    msg: dict = {"timestamp": {"seconds": secs, "microseconds": micros},
                 "event": name}
    if data is not None:
        msg["data"] = data
    return msg


class QmpConnection:
    """One client's QMP session (no I/O: the caller owns the socket)."""

    def __init__(self, package: str = "") -> None:
        self.package = package
        self.negotiated = False
        self._buf = ""
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")   # split chars

    def greeting(self) -> bytes:
        return encode({"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": self.package},
                               "capabilities": []}})

    def receive_data(self, data: bytes) -> None:
        self._buf += self._utf8.decode(data)

    def next_request(self) -> Request | QmpError | None:
        """The next whole request, the error to answer for a malformed one, or None."""
        text = self._buf.lstrip()
        if not text:
            self._buf = ""
            return None
        try:
            obj, end = self._decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
                if len(text) <= MAX_MESSAGE:
                    self._buf = text
                    return None                          # the rest has not arrived yet
            line, _, rest = text.partition("\n")
            self._buf = rest                             # skip the bad line, as QEMU resyncs
            return QmpError(f"JSON parse error, {exc.msg[0].lower()}{exc.msg[1:]}")
        self._buf = text[end:]
        try:
            req = parse_request(obj)
        except QmpError as exc:
            return exc
        return self._gate(req)

    def _gate(self, req: Request) -> Request | QmpError:
        """Capabilities negotiation first, once (QEMU's words for both mistakes)."""
        if req.execute == "qmp_capabilities":
            if self.negotiated:
                return QmpError("Capabilities negotiation is already complete, command "
                                "ignored", NOT_FOUND, req.id)
            enable = req.arguments.get("enable", [])
            unexpected = [k for k in req.arguments if k != "enable"]
            if unexpected:
                return QmpError(f"Parameter '{unexpected[0]}' is unexpected", id=req.id)
            if not isinstance(enable, list):
                return QmpError("Parameter 'enable' expects array", id=req.id)
            for cap in enable:
                return QmpError(f"Capability '{cap}' not available", id=req.id)
            self.negotiated = True
            return req
        if not self.negotiated:
            return QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                            NOT_FOUND, req.id)
        return req

    def reply(self, value: object, req: Request) -> bytes:
        msg: dict = {"return": value}
        if req.has_id:
            msg["id"] = req.id
        return encode(msg)

    def error(self, exc: QmpError) -> bytes:
        msg: dict = {"error": {"class": exc.cls, "desc": exc.desc}}
        if exc.id is not None:
            msg["id"] = exc.id
        return encode(msg)

    def event(self, name: str, data: dict | None, now: float) -> bytes:
        return encode(event_message(name, data, now))
