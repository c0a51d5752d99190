"""A real guest: a small KVM VMM running a CPL3 page-writing program, with KVM's dirty log.

``KvmGuest`` (guest.py) is the object the migration drives; ``KvmDirtySource`` (dirty.py) the
dirty log; ``kvm_unavailable_reason()`` says in one line why KVM cannot run here (or None).
"""

from pipeline.guest.kvm.vm import kvm_unavailable_reason

__all__ = ["kvm_unavailable_reason"]
