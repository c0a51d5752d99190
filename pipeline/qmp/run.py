"""Serve a monitor until ``quit`` or a stop signal, then release everything.

SIGINT, SIGTERM and SIGHUP do what QEMU does on them: SHUTDOWN (reason ``host-signal``) and
the process ends, cancelling a migration still running first. The handler only queues work
for the monitor's thread (``call_soon`` takes no lock). While a migration runs and stderr is a
terminal, the progress line is redrawn every ``server.TICK`` seconds.
"""

from __future__ import annotations

import signal

from pipeline.qmp.machine import IN_PROGRESS

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(machine, server, progress=None) -> int:
    """Run ``server`` for ``machine`` until it stops; the process's exit code."""
    def on_signal(signum, frame) -> None:
        server.call_soon(machine.shutdown, "host-signal")

    def tick() -> None:
        if machine.mig is not None and machine.status in IN_PROGRESS:
            progress(machine.mig.stats())

    old = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    if progress is not None and progress.enabled:
        server.tick = tick
        finished = machine.on_finished

        def done(summary: dict) -> None:
            progress.done()
            if finished is not None:
                finished(summary)

        machine.on_finished = done
    try:
        server.serve()
    finally:
        try:
            machine.close()
        finally:
            server.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return machine.exit_code
