"""The ``soft`` provider: userspace verbs over TCP, with verbs semantics and no RDMA device.

Modules by concept: ``memory`` (views over addresses, mlock pinning, shared backings),
``pdtable`` (exported PDs and import holds), ``device`` (context, PD, MR), ``cq``, ``qp``
(queues, completions, errors), ``link`` (the connection's reader and writer threads), ``wire``
(frames) and ``cm`` (listen, connect, accept with private data).
"""

from stages.verbs.soft.device import SoftContext, SoftProvider

__all__ = ["SoftContext", "SoftProvider"]
