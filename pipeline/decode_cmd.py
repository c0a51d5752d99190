"""``rdma-pipeline decode``: dissect control messages (or connection private data) from hex.

One control message per argument list (``decode 00 00 00 00 ...``; spaces are allowed in the
hex) or per stdin line (``decode -``; a ``--trace-control`` file's JSON lines are read as they
are, each message's ``hex``). Each message prints as one JSON object: ``type`` by its
QEMU enum name (``RDMA_CONTROL_<type>``), the header fields and every payload field by name,
integers as numbers, stream bytes as hex. A line that does not decode prints one line on stderr
saying what is wrong; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "hex", nargs="*", metavar="HEX",
        help="one control message in hex (spaces allowed), or - to read one message per line "
             "from stdin")
    parser.add_argument(
        "--capabilities", metavar="HEX",
        help="decode connection private data (RDMACapabilities and our extension) instead")


def _bytes(text: str) -> bytes:
    """Hex with optional spaces, colons or a 0x prefix -> bytes (ValueError names the fault)."""
    digits = "".join(text.split()).replace(":", "")
    if digits[:2].lower() == "0x":
        digits = digits[2:]
    if len(digits) % 2:
        raise ValueError(f"odd number of hex digits ({len(digits)})")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        bad = next((c for c in digits if c not in "0123456789abcdefABCDEF"), "?")
        raise ValueError(f"not hex: {bad!r}") from None


def _describe_capabilities(data: bytes) -> dict:
    from pipeline.protocol.capabilities import (
        KNOWN_FLAGS,
        Capabilities,
        Capability,
        DataConnect,
        decode_connect,
    )

    parsed = decode_connect(data)
    if isinstance(parsed, DataConnect):
        return {"kind": "data_connect", "session_token": parsed.session_token,
                "index": parsed.index}
    caps: Capabilities = parsed
    names = [f.name for f in Capability if caps.flags & f]
    unknown = caps.flags & ~KNOWN_FLAGS
    if unknown:
        names.append(f"unknown {unknown:#x}")
    return {"kind": "capabilities", "version": caps.version, "flags": caps.flags,
            "flag_names": names, "chunk_shift": caps.chunk_shift, "data_qps": caps.data_qps,
            "session_token": caps.session_token, "digest": caps.digest, "bytes": len(data)}


# A trace's first lines hold the connection's private data, not control messages.
PRIVATE_DATA = ("connect", "accepted")


def _trace_hex(line: str) -> tuple[str, bool]:
    """A ``--trace-control`` line (``{"t", "dir", "hex"}``) as its hex, and whether it is the
    connection's private data (``dir`` connect or accepted); other lines as they are."""
    text = line.strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
            return str(entry["hex"]), entry.get("dir") in PRIVATE_DATA
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return text, False


def _decode_one(text: str, capabilities: bool) -> dict:
    from pipeline.protocol.codec import decode, describe

    data = _bytes(text)
    return _describe_capabilities(data) if capabilities else describe(decode(data))


def main(args: argparse.Namespace) -> int:
    from shm.errors import ProtocolError

    if args.capabilities is not None:
        inputs = [("--capabilities", (args.capabilities, True))]
    elif args.hex == ["-"]:
        inputs = [(f"line {n}", _trace_hex(line)) for n, line in enumerate(sys.stdin, 1)
                  if line.strip()]
    elif args.hex:
        inputs = [("input", (" ".join(args.hex), False))]
    else:
        print("rdma-pipeline decode: give HEX, - (hex lines on stdin) or --capabilities HEX",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    status = EXIT_OK
    for where, (text, capabilities) in inputs:
        try:
            print(json.dumps(_decode_one(text, capabilities)), flush=True)
        except (ValueError, ProtocolError) as exc:
            print(f"rdma-pipeline decode: {where}: {exc}", file=sys.stderr, flush=True)
            status = EXIT_BAD_INPUT
    return status
