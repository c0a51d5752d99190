"""Which guest, which dirty tracking: defaults, pairs refused in one line, and a machine without
/dev/kvm or userfaultfd said so in one line before anything starts."""

import pytest

import pipeline.guest.kvm.vm as kvm_vm
import shm.uffd
from pipeline.cli import main
from pipeline.guest.factory import GuestSpec, resolve_tracking
from pipeline.guest.kvm.owner import KvmGuestProcess
from pipeline.guest.synthetic import SyntheticGuest
from pipeline.sections import GUEST_SECTIONS
from shm.errors import GuestError


@pytest.mark.parametrize(("kind", "tracking", "want"), [
    ("synthetic", None, "soft"), ("kvm", None, "kvm"),
    ("synthetic", "uffd", "uffd"), ("kvm", "uffd", "uffd"), ("synthetic", "soft", "soft"),
])
def test_tracking_defaults_and_pairs(kind, tracking, want):
    assert resolve_tracking(kind, tracking) == want
    assert GuestSpec(kind, tracking).tracking == want


@pytest.mark.parametrize(("kind", "tracking", "words"), [
    ("kvm", "soft", "vCPU"), ("synthetic", "kvm", "KVM dirty log"),
    ("synthetic", "pml", "use one of"), ("qemu", None, "use one of"),
])
def test_pairs_that_do_not_fit_are_refused(kind, tracking, words):
    with pytest.raises(ValueError, match=words):
        GuestSpec(kind, tracking)


def test_both_guest_sections_are_known_to_the_destination():
    assert GUEST_SECTIONS == {SyntheticGuest.device_section: SyntheticGuest.kind,
                              KvmGuestProcess.device_section: KvmGuestProcess.kind}


def test_no_kvm_is_one_line_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setattr(kvm_vm, "kvm_unavailable_reason",
                        lambda: "/dev/kvm does not exist (no KVM on this machine)")
    with pytest.raises(GuestError, match="--guest kvm: /dev/kvm does not exist"):
        GuestSpec("kvm").check()
    assert main(["run", "--guest", "kvm", "--ram", "8M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/dev/kvm" in err[0] and "--guest synthetic" in err[0]


def test_no_uffd_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(shm.uffd, "uffd_unavailable_reason",
                        lambda: "the kernel's userfaultfd lacks features 0x8000")
    with pytest.raises(GuestError, match="--dirty-tracking uffd"):
        GuestSpec("synthetic", "uffd").check()
    GuestSpec("synthetic").check()   # the software log is the default, and needs nothing
    assert main(["run", "--dirty-tracking", "uffd", "--ram", "8M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dirty-tracking soft" in err[0]


def test_a_pair_that_does_not_fit_is_a_usage_error(capsys):
    assert main(["run", "--guest", "kvm", "--dirty-tracking", "soft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use kvm or uffd" in err[0]
