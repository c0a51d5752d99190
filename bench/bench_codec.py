"""Control messages per second through the codec and the channel, against bare struct.

    .venv/bin/python -m bench.bench_codec            # table
    .venv/bin/python -m bench.bench_codec --json     # one JSON line per case

Each case runs in a fresh interpreter (``--case NAME``) and prints one JSON line: records
(messages), wall and CPU seconds, ``records_per_s``, bytes per message and peak RSS. The
baselines run in the same invocation: ``struct.pack`` / ``struct.unpack`` of the same 16-byte
header with a precompiled ``>IIII`` Struct, the floor any Python codec of this format pays.
Encode cases compare with the pack baseline, decode and channel cases with the unpack one.
"""

from __future__ import annotations

import resource
import struct
import sys
import time

DURATION = 0.5      # seconds of measured work per case


def messages() -> dict:
    from pipeline.protocol.messages import (
        Compress,
        CompressMessage,
        DestBlock,
        QemuFileMessage,
        RamBlocksResultMessage,
        ReadyMessage,
        Register,
        RegisterRequestMessage,
        RegisterResult,
        RegisterResultMessage,
    )
    return {
        "READY": ReadyMessage(),
        "REGISTER_REQUEST": RegisterRequestMessage((Register(0x12345000, 0, 0),)),
        "REGISTER_REQUEST_x64": RegisterRequestMessage(
            tuple(Register(i << 20, 0, 0) for i in range(64))),
        "REGISTER_RESULT": RegisterResultMessage((RegisterResult(0x1234, 0x7F1234500000),)),
        "COMPRESS": CompressMessage(Compress(0, 0x12345000, 0xBB000)),
        "RAM_BLOCKS_RESULT": RamBlocksResultMessage((
            DestBlock(0x7F1234500000, 0, 128 << 20, 0xABCDEF),
            DestBlock(0x7F1200000000, 0x8000000, 256 << 10, 0xABCE01))),
        "QEMU_FILE_32K": QemuFileMessage(bytes(range(256)) * 128),
    }


CASES = (["baseline-pack", "baseline-unpack"]
         + [f"{op}-{name}" for name in messages() for op in ("encode", "decode")]
         + ["channel-QEMU_FILE", "channel-REGISTER"])


def baseline_for(case: str) -> str | None:
    if case.startswith("baseline"):
        return None
    return "baseline-pack" if case.startswith("encode") else "baseline-unpack"


def timed(step, batch: int = 1000) -> tuple[int, float, float]:
    """Run ``step`` (which does ``batch`` records) until DURATION has passed."""
    step()                                           # warm up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while (wall := time.perf_counter() - t0) < DURATION:
        step()
        n += batch
    return n, wall, time.process_time() - c0


def thousand(fn, *args):
    """A step that calls ``fn(*args)`` 1000 times and keeps no result alive (so that big
    results are not page-faulted in anew on every batch)."""
    def step():
        for _ in range(1000):
            fn(*args)
    return step


def case_step(case: str):
    """A callable doing 1000 records of ``case``, and the bytes of one record."""
    header = struct.Struct(">IIII")
    if case == "baseline-pack":
        return thousand(header.pack, 0, 2, 1, 0), 16
    if case == "baseline-unpack":
        return thousand(header.unpack, header.pack(0, 2, 1, 0)), 16
    from pipeline.protocol.codec import decode, encode
    op, name = case.split("-", 1)
    if op == "channel":
        return channel_step(name)
    msg = messages()[name]
    data = encode(msg)
    if op == "encode":
        return thousand(encode, msg), len(data)
    return thousand(decode, data), len(data)


def channel_step(name: str):
    """One message through a source and a destination ControlChannel, with its READY (and
    its reply): what the coordinators pay per message on top of the verbs."""
    from pipeline.protocol.capabilities import Capabilities
    from pipeline.protocol.channel import ControlChannel, Role
    from pipeline.protocol.codec import encode
    from pipeline.protocol.messages import (
        QemuFileMessage,
        RamBlocksRequestMessage,
        RamBlocksResultMessage,
        Register,
        RegisterRequestMessage,
        RegisterResult,
        RegisterResultMessage,
    )
    src = ControlChannel(Role.SOURCE, capabilities=Capabilities())
    dst = ControlChannel(Role.DESTINATION, capabilities=Capabilities())
    src.take_recv_posts()
    dst.take_recv_posts()

    def one(msg, reply=None):
        src.receive(dst.grant())
        data = src.send(msg)
        src.take_recv_posts()
        dst.receive(data)
        dst.take_recv_posts()
        if reply is not None:
            src.receive(dst.send(reply))

    if name == "QEMU_FILE":
        msg = QemuFileMessage(bytes(4096))
        return thousand(one, msg), len(encode(msg))
    one(QemuFileMessage(bytes(7) + b"\x80"))        # open the SETUP window
    dst.begin_registration()
    one(RamBlocksRequestMessage(), RamBlocksResultMessage(()))
    request = RegisterRequestMessage((Register(0, 0),))
    result = RegisterResultMessage((RegisterResult(1, 0x1000),))
    return thousand(one, request, result), len(encode(request))


def run_case(case: str) -> dict:
    step, size = case_step(case)
    n, wall, cpu = timed(step)
    return {"case": case, "records": n, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "records_per_s": round(n / wall), "bytes_per_record": size,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    from bench.stages import module_main

    return module_main("codec", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
