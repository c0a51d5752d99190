"""The carriers of a migration: one driver per URI scheme, decided here and only here.

A driver is a context manager that owns what it opens (an ``ExitStack``: connections, stage
processes, rings, threads, the guest's region) and feeds a sans-IO session
(``pipeline.session``) the events it sees, carrying out the actions the session answers with.

    rdma:   RdmaSource (control link + scanner, registrar, poster) / RdmaDestination
    tcp:    StreamSource (pages inline, one process) / StreamDestination
    file:   the same stream carriers, into or out of a file
"""

from __future__ import annotations


def source_driver(uri):
    """The source driver class for ``uri``'s scheme."""
    if uri.scheme == "rdma":
        from pipeline.drivers.rdma_source import RdmaSource

        return RdmaSource
    from pipeline.drivers.stream_source import StreamSource

    return StreamSource


def destination_driver(uri):
    """The destination driver class for ``uri``'s scheme."""
    if uri.scheme == "rdma":
        from pipeline.drivers.rdma_destination import RdmaDestination

        return RdmaDestination
    from pipeline.drivers.stream_destination import StreamDestination

    return StreamDestination
