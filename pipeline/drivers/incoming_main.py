"""The destination as a stage process, as ``run`` starts it (``LocalRun``): one incoming
migration over the driver its scheme names (``pipeline.drivers.destination_driver``).

The process reports ("ready", port=...) once it listens, ("state", status, reason) on every
change and finally ("result", summary); ("cancel",) on the pipe, or the parent gone, cancels
it. ``config``: ``config`` (a ``MigrationConfig`` as a dict), ``scheme``, ``host``, ``port``,
``run_id``, ``blocks``, ``guest_watch``, ``prealloc``, and ``options`` (a plain dict for an
entry that wraps this one with a driver of its own, e.g. a test's).
"""

from __future__ import annotations

import threading


def incoming_main(config: dict, link, *, driver=None) -> int:
    """Stage-process entry; ``driver``: the driver class (default: the scheme's)."""
    from pipeline.config import MigrationConfig
    from pipeline.drivers import destination_driver
    from pipeline.uri import URI

    uri = URI(config.get("scheme", "rdma"), config["host"], int(config["port"]))
    driver_class = driver or destination_driver(uri)
    cancel = threading.Event()

    def listen_parent() -> None:
        try:
            while True:
                msg = link.recv()
                if msg and msg[0] == "cancel":
                    cancel.set()
                    return
        except (EOFError, OSError):
            cancel.set()

    threading.Thread(target=listen_parent, daemon=True).start()
    dest = driver_class(uri, MigrationConfig(**config["config"]), run_id=config["run_id"],
                        blocks=config.get("blocks"), cancel=cancel,
                        guest_watch=float(config.get("guest_watch", 0)),
                        prealloc=bool(config.get("prealloc")),
                        on_listening=lambda port: link.ready(port=port),
                        on_state=lambda s, r: link.send("state", s, r))
    try:
        summary = dest.run()
    except BaseException:
        link.send("result", dest.summary())
        raise
    link.send("result", summary)
    return 0
