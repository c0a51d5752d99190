"""Registration by proxy: one process decides what is registered, the process that owns the
QP's PD registers it.

Sharing a PD between processes (``ibv_import_pd``) works on mlx5 only; rxe, siw, irdma,
bnxt_re and efa cannot. There the registrar keeps deciding (what to register, when to
unregister, the pin budget and the LRU) on a ``ProxyPD``, whose MRs are only names: a
*virtual* lkey, an address and a length in the registrar's address space. The poster owns the
real PD: ``Registrations`` maps the same shared-memory file, registers each announced MR at its
own address of that file, and rewrites the virtual lkeys and addresses of the writes that use
it before posting them (numpy over a batch; a few distinct MRs per batch).

Nothing here pins in the registrar: the poster's registration is the one that pins, and meets
RLIMIT_MEMLOCK there.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os

import numpy as np

from stages.verbs import base
from stages.verbs.base import Access, MRHandle


class ProxyMR(base.MR):
    """An MR the poster registers: its key is virtual until then, and forever to us."""

    imported = False

    def __init__(self, pd: ProxyPD, lkey: int, addr: int, length: int, access: Access) -> None:
        self.pd, self.lkey, self.rkey = pd, lkey, 0
        self.addr, self.length, self.access = addr, length, Access(access)

    def export(self) -> MRHandle:
        raise TypeError("a proxy MR is registered by the poster, not exported")

    def close(self) -> None:
        self._closed = True        # the poster deregisters on MR_RELEASE


class ProxyPD:
    """The registrar's PD in proxy mode: hands out ``ProxyMR``s with virtual lkeys."""

    imported = False
    shareable = False

    def __init__(self) -> None:
        self._keys = itertools.count(1)

    def reg_mr(self, address: int, length: int, access: Access) -> ProxyMR:
        return ProxyMR(self, next(self._keys), address, length, access)

    def reg_mrs(self, ranges: list[tuple[int, int]], access: Access) -> list[ProxyMR]:
        return [self.reg_mr(a, n, access) for a, n in ranges]


class Registrations:
    """The poster's side: real MRs of ``pd`` over the file ``path``, by virtual lkey."""

    def __init__(self, pd, path: str) -> None:
        self.pd = pd
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.mrs: dict[int, object] = {}
        self._delta: dict[int, int] = {}   # virtual lkey -> our address minus theirs

    def register(self, vkey: int, addr: int, file_offset: int, length: int,
                 access: int) -> None:
        local = self.base + file_offset
        self.mrs[vkey] = self.pd.reg_mr(local, length, Access(access))
        self._delta[vkey] = local - addr

    def translate(self, lkeys: np.ndarray, addrs: np.ndarray) -> None:
        """Rewrite virtual ``lkeys`` and registrar ``addrs`` in place into ours."""
        for vkey in np.unique(lkeys).tolist():
            sel = lkeys == vkey
            mr = self.mrs[vkey]
            addrs[sel] += np.uint64(self._delta[vkey] % (1 << 64))    # wraps: a signed delta
            lkeys[sel] = mr.lkey

    def release(self, vkey: int) -> None:
        self._delta.pop(vkey, None)
        self.mrs.pop(vkey).close()

    def close(self) -> None:
        for mr in self.mrs.values():
            mr.close()
        self.mrs.clear()
        self._map.close()
