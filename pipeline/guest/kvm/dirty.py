"""KVM's dirty log as a dirty source: fetch-and-clear per memslot, as packed bitmaps.

No bit is lost. In manual-protect mode (MANUAL_DIRTY_LOG_PROTECT2) GET_DIRTY_LOG copies the
bitmap without touching it and CLEAR_DIRTY_LOG clears, and write-protects again, exactly the
bits we pass: a page written between the two either had its bit in our copy (its data will be
read after the clear, so the write is carried) or gets a bit that we do not clear (next fetch).
In classic mode GET_DIRTY_LOG swaps the bitmap and re-protects in one call.

KVM's bitmap is little-endian u64 words, bit i = page i of the slot: read as bytes it is exactly
a ``np.packbits(..., bitorder="little")`` bitmap, which is what we return.
"""

from __future__ import annotations

import numpy as np

from pipeline.guest.kvm import ioctls as k
from pipeline.guest.kvm.vm import Memslot, Vm


class KvmDirtySource:
    """Dirty pages of a VM's dirty-logged memslots, one packed bitmap per memslot (= block)."""

    name = "kvm"

    def __init__(self, vm: Vm, slots: list[Memslot] | None = None) -> None:
        self.vm = vm
        self.slots = list(slots or vm.memslots)
        # One u64 word buffer per slot, reused across fetches (KVM writes into it).
        self._words = [np.zeros(-(-s.nb_pages // 64), np.uint64) for s in self.slots]

    def fetch(self) -> list[np.ndarray]:
        """Pages written since the previous fetch, per slot, as packed little-endian bitmaps."""
        return [self._fetch_slot(slot, words) for slot, words in zip(self.slots, self._words,
                                                                      strict=True)]

    def _fetch_slot(self, slot: Memslot, words: np.ndarray) -> np.ndarray:
        log = k.DirtyLog(slot=slot.slot, bitmap=words.ctypes.data)
        k.ioctl(self.vm.fd, k.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        nbytes = -(-slot.nb_pages // 8)
        bitmap = words.view(np.uint8)[:nbytes].copy()
        if self.vm.manual_protect and words.any():
            clear = k.ClearDirtyLog(slot=slot.slot, num_pages=slot.nb_pages, first_page=0,
                                    bitmap=words.ctypes.data)
            k.ioctl(self.vm.fd, k.KVM_CLEAR_DIRTY_LOG, clear, "KVM_CLEAR_DIRTY_LOG")
        return bitmap

    def close(self) -> None:
        """Nothing to release: the VM owns the log. Present so sources share one surface."""
