"""Transport providers behind one verbs interface (see ``base``).

``open_provider("soft")`` gives userspace verbs over TCP (the default, no hardware needed);
``open_provider("verbs")`` gives rdma-core's pyverbs on real RDMA or Soft-RoCE. Neither this
package nor the soft provider imports pyverbs; the verbs provider imports it when it opens a
device.
"""

from __future__ import annotations

from stages.verbs.base import (
    CQ,
    MR,
    PD,
    QP,
    Access,
    ConnectRequest,
    Context,
    Listener,
    MRHandle,
    PDHandle,
    Provider,
    QPState,
    SendOpcode,
    WCOpcode,
    WCStatus,
    WorkCompletion,
)

PROVIDERS = ("soft", "verbs")
DEFAULT_PROVIDER = "soft"


def open_provider(name: str = DEFAULT_PROVIDER) -> Provider:
    """The provider called ``name`` ("soft" or "verbs")."""
    if name == "soft":
        from stages.verbs.soft import SoftProvider

        return SoftProvider()
    if name == "verbs":
        from stages.verbs.rdmacore import VerbsProvider

        return VerbsProvider()
    raise ValueError(f"unknown transport provider {name!r}; choose one of {', '.join(PROVIDERS)}")


__all__ = [
    "CQ", "MR", "PD", "QP", "Access", "ConnectRequest", "Context", "Listener", "MRHandle",
    "PDHandle", "Provider", "QPState", "SendOpcode", "WCOpcode", "WCStatus", "WorkCompletion",
    "DEFAULT_PROVIDER", "PROVIDERS", "open_provider",
]
