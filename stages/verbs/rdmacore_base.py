"""What the pyverbs provider (``rdmacore``) and its connection manager (``rdmacore_cm``) share.

``load()`` imports pyverbs on first use (so ``import stages.verbs`` works without it),
``errors()`` turns a pyverbs error into a TransportError with errno, and ``new_fd()`` finds the
descriptor of a channel pyverbs opened but does not expose (a completion channel, an event
channel): the one that appeared in /proc/self/fd while the object was created, under a lock.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from types import SimpleNamespace

from shm.errors import TransportError, TransportUnsupported

HINT = "use --transport soft (userspace verbs over TCP) on machines without RDMA"
_fd_lock = threading.Lock()


def load():
    """The pyverbs modules, or TransportUnsupported saying how to get them."""
    try:
        import pyverbs.cm_enums as cm_enums
        import pyverbs.enums as enums
        from pyverbs import cmid, cq, device, mr, pd, qp, wr
        from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
    except ImportError as exc:
        raise TransportUnsupported(f"the verbs transport needs pyverbs, which cannot be "
                                   f"imported ({exc})",
                                   hint="install python3-pyverbs, or " + HINT) from None
    return SimpleNamespace(cm=cmid, cq=cq, device=device, mr=mr, pd=pd, qp=qp, wr=wr, e=enums,
                           ce=cm_enums, Error=PyverbsError, RDMAError=PyverbsRDMAError)


@contextmanager
def errors(what: str):
    v = load()
    try:
        yield
    except v.Error as exc:
        raise TransportError(f"{what}: {exc}", errno=errno_of(exc)) from None


def errno_of(exc) -> int | None:
    """The errno a pyverbs error carries: its ``error_code`` (some calls report ``-errno``);
    None for pyverbs' "no code" default of -1, which is not EPERM."""
    code = getattr(exc, "error_code", None)
    if not code or code == -1:
        return None
    return abs(code)


def _fd_links() -> dict[int, str]:
    links = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            links[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue  # the directory listing's own descriptor, already closed
    return links


def new_fd(create, marker: str):
    """Create an object with ``create()`` and find the fd it opened, whose link has ``marker``.

    Descriptors are compared by number *and* target: the new one may reuse the number that the
    listing itself held a moment before.
    """
    with _fd_lock:
        before = _fd_links()
        obj = create()
        found = [fd for fd, link in _fd_links().items()
                 if marker in link and before.get(fd) != link]
    if len(found) != 1:
        obj.close()
        raise TransportError(f"cannot find the descriptor of a new {marker} channel",
                             errno=errno.ENOTSUP)
    return obj, found[0]
