"""The guest program without KVM: its bytes match an assembler, and the invariant checker
accepts the state at *every* instruction boundary of a model run (and rejects broken ones)."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.guest.kvm import program
from shm.errors import GuestError
from shm.memory import PAGE_SIZE

SOURCE = """
top: xor %r13d,%r13d
 mov %rbx,%rsi
 inc %r12
 mov %r12,(%r15)
page: mov %r12,(%rsi)
 inc %r13
 add %rbp,%rsi
 mov 24(%r15),%rcx
 test %rcx,%rcx
 jz check
delay: dec %rcx
 jnz delay
check: cmp %r14,%r13
 jb page
 jmp top
"""


@pytest.mark.skipif(not shutil.which("as") or not shutil.which("objcopy"),
                    reason="binutils (as, objcopy) not installed")
def test_code_matches_the_assembler(tmp_path):
    (tmp_path / "p.s").write_text(SOURCE)
    subprocess.run(["as", "-o", tmp_path / "p.o", tmp_path / "p.s"], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", tmp_path / "p.o",
                    tmp_path / "p.bin"], check=True)
    assert (tmp_path / "p.bin").read_bytes() == program.CODE


def make_memory(n_pages: int, stride: int = 1) -> program.GuestMemory:
    length = program.DATA_GPA + n_pages * stride * PAGE_SIZE
    block = SimpleNamespace(offset=0, length=length, view=np.zeros(length, np.uint8))
    mem = program.GuestMemory([block])
    program.install(mem, program.Layout(n_pages, stride), delay=1)
    return mem


def model_run(mem: program.GuestMemory, layout: program.Layout, steps: int):
    """Execute the loop one instruction at a time, yielding the registers at each boundary."""
    L = program.LABELS
    r = SimpleNamespace(**program.initial_regs(layout), rcx=0)
    r.rip -= program.CODE_GPA  # work in code offsets
    ctrl = mem.u64s(program.CTRL_GPA, 8)
    for _ in range(steps):
        yield SimpleNamespace(r12=r.r12, r13=r.r13, rip=r.rip + program.CODE_GPA)
        at = r.rip
        if at == L["top"]:
            r.r13, r.rip = 0, L["set_rsi"]
        elif at == L["set_rsi"]:
            r.rsi, r.rip = r.rbx, L["inc_pass"]
        elif at == L["inc_pass"]:
            r.r12, r.rip = r.r12 + 1, L["publish"]
        elif at == L["publish"]:
            ctrl[program.CTRL_PASS], r.rip = r.r12, L["page"]
        elif at == L["page"]:
            mem.scatter_u64(np.array([r.rsi], np.uint64), r.r12)
            r.rip = L["inc_index"]
        elif at == L["inc_index"]:
            r.r13, r.rip = r.r13 + 1, at + 3
        elif at == L["inc_index"] + 3:          # add rsi, rbp
            r.rsi, r.rip = r.rsi + r.rbp, at + 3
        elif at == L["inc_index"] + 6:          # mov rcx, [r15+24]
            r.rcx, r.rip = int(ctrl[program.CTRL_DELAY]), at + 4
        elif at == L["inc_index"] + 10:         # test rcx, rcx
            r.rip = at + 3
        elif at == L["inc_index"] + 13:         # jz check
            r.rip = L["check"] if r.rcx == 0 else L["delay"]
        elif at == L["delay"]:
            r.rcx, r.rip = r.rcx - 1, at + 3
        elif at == L["delay"] + 3:              # jnz delay
            r.rip = L["delay"] if r.rcx else L["check"]
        elif at == L["check"]:
            r.rip = at + 3
        elif at == L["check"] + 3:              # jb page
            r.rip = L["page"] if r.r13 < r.r14 else at + 2
        elif at == L["check"] + 5:              # jmp top
            r.rip = L["top"]
        else:
            raise AssertionError(f"model left the program at offset {at}")


@pytest.mark.parametrize("stride", [1, 3])
def test_invariant_holds_at_every_instruction_boundary(stride):
    layout = program.Layout(5, stride)
    mem = make_memory(layout.n_pages, stride)
    progress = []
    for regs in model_run(mem, layout, 400):
        progress.append(program.check_invariant(mem, regs).pages_written)
    assert progress == sorted(progress) and progress[-1] >= 3 * layout.n_pages


def test_invariant_rejects_registers_one_step_off():
    layout = program.Layout(4)
    mem = make_memory(4)
    rejected = 0
    for regs in model_run(mem, layout, 150):
        for bad in (SimpleNamespace(r12=regs.r12 + 1, r13=regs.r13, rip=regs.rip),
                    SimpleNamespace(r12=regs.r12, r13=regs.r13 + 1, rip=regs.rip)):
            with pytest.raises(GuestError):
                program.check_invariant(mem, bad)
            rejected += 1
    assert rejected == 300
