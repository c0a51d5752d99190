"""A QMP monitor, as QEMU 7.2 speaks it, for ``rdma-pipeline vm`` and ``incoming --qmp``.

protocol.py  framing, greeting, negotiation, replies, errors, events (sans-IO)
server.py    the sockets: one thread, one selector, ``call_soon`` from other threads
settings.py  migration capabilities and parameters, and the config they make
machine.py   what both sides share: dispatch, argument checks, common commands
source.py    the source's commands (migrate, stop, cont ...); destination.py the destination's
info.py      query-migrate / query-status / info migrate / info status in QEMU's shapes
run.py       a process serving a monitor until quit or a signal
"""
