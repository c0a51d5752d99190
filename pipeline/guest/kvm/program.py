"""The guest program: a 64-bit CPL3 loop that writes pages, its page tables, and its invariant.

Guest-physical memory is the RAM region itself: block i sits at GPA ``block.offset`` (the
ram_addr_t), so GPA == RAM offset, and the guest maps it 1:1 (virtual == physical) with 2 MiB
user pages. The first ``SYSTEM_BYTES`` of block 0 hold the page tables, the code page and the
control page; the data pages the program writes start at ``SYSTEM_BYTES`` (spanning blocks if
they are large enough).

The loop (registers: r12 pass, r13 next page index, r14 pages per pass, r15 control page,
rbx first data page, rbp stride in bytes, rsi address of page r13)::

    top:   xor r13d,r13d ; mov rsi,rbx ; inc r12 ; mov [r15],r12      # new pass, published
    page:  mov [rsi],r12                                              # page r13 carries pass
           inc r13 ; add rsi,rbp
           mov rcx,[r15+24] ; delay loop of rcx iterations            # the host's rate knob
           cmp r13,r14 ; jb page ; jmp top

Invariant, checkable from outside at any instruction boundary: with P = control.pass and k the
number of leading data pages that carry P, the data pages read [P]*k + [P-1]*(n-k) (all zero
before the first pass), and (r12, r13) == (P, k) except at three instruction boundaries, which
``check_invariant`` recognises by rip (between ``xor r13d`` and the publish, and between the
page write and ``inc r13``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from shm.errors import GuestError
from shm.memory import PAGE_SIZE, WORDS_PER_PAGE, resident

HUGE = 2 << 20
GIB = 1 << 30
SYSTEM_BYTES = 1 << 20          # page tables, code and control pages live here, in block 0
PML4_GPA = 0x0000
PDPT_GPA = 0x1000
PD_GPA = 0x2000                 # one PD page per GiB mapped
MAX_PDS = 248                   # PD pages fit below CODE_GPA
CODE_GPA = SYSTEM_BYTES - 2 * PAGE_SIZE
CTRL_GPA = SYSTEM_BYTES - PAGE_SIZE
DATA_GPA = SYSTEM_BYTES

# Control page: u64 words.
CTRL_PASS, CTRL_NPAGES, CTRL_STRIDE, CTRL_DELAY, CTRL_DATA, CTRL_MAGIC = range(6)
CTRL_MAGIC_VALUE = 0x4B564D4755455354  # "KVMGUEST"

PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7

# Segments and MSRs for 64-bit user mode (kvm-notes: what KVM-PVM runs natively).
USER_CS, USER_DS = 0x33, 0x2B
MSR_STAR = 0xC0000081
STAR_VALUE = 0x0023001000000000
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_SCE, EFER_LME, EFER_LMA = 1, 0x100, 0x400
RFLAGS_RESERVED, RFLAGS_IF = 0x2, 0x200


def _assemble() -> tuple[bytes, dict[str, int]]:
    """Hand-assembled loop; each line is (label, bytes, source). Branches are resolved here."""
    lines = [
        ("top", "45 31 ed", "xor r13d, r13d"),
        ("set_rsi", "48 89 de", "mov rsi, rbx"),
        ("inc_pass", "49 ff c4", "inc r12"),
        ("publish", "4d 89 27", "mov [r15], r12"),
        ("page", "4c 89 26", "mov [rsi], r12"),
        ("inc_index", "49 ff c5", "inc r13"),
        (None, "48 01 ee", "add rsi, rbp"),
        (None, "49 8b 4f 18", "mov rcx, [r15+24]   ; delay"),
        (None, "48 85 c9", "test rcx, rcx"),
        (None, "74 @check", "jz check"),
        ("delay", "48 ff c9", "dec rcx"),
        (None, "75 @delay", "jnz delay"),
        ("check", "4d 39 f5", "cmp r13, r14"),
        (None, "72 @page", "jb page"),
        (None, "eb @top", "jmp top"),
    ]
    labels: dict[str, int] = {}
    offset = 0
    for label, hexes, _ in lines:
        if label:
            labels[label] = offset
        offset += len(hexes.split())
    code = bytearray()
    for _, hexes, _ in lines:
        for token in hexes.split():
            if token.startswith("@"):
                rel = labels[token[1:]] - (len(code) + 1)  # rel8 counts from the next instr
                code += struct.pack("<b", rel)
            else:
                code.append(int(token, 16))
    return bytes(code), labels


CODE, LABELS = _assemble()


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the program writes: n data pages, ``stride`` pages apart, from DATA_GPA."""

    n_pages: int
    stride: int = 1

    def page_gpas(self) -> np.ndarray:
        return DATA_GPA + np.arange(self.n_pages, dtype=np.uint64) * np.uint64(
            self.stride * PAGE_SIZE)


def max_data_pages(total_bytes: int, stride: int = 1) -> int:
    """How many data pages fit in guest RAM of ``total_bytes`` at ``stride``."""
    return max(0, (total_bytes - DATA_GPA - PAGE_SIZE) // (stride * PAGE_SIZE) + 1)


class GuestMemory:
    """Read/write guest-physical memory through the RAM blocks (GPA == block.offset + i)."""

    def __init__(self, blocks) -> None:
        self.blocks = list(blocks)
        self.total = max(b.offset + b.length for b in self.blocks)

    def _locate(self, gpa: int, size: int):
        for b in self.blocks:
            if b.offset <= gpa and gpa + size <= b.offset + b.length:
                return b.view, gpa - b.offset
        raise GuestError(f"GPA range {gpa:#x}+{size:#x} is not inside one RAM block")

    def write(self, gpa: int, data: bytes) -> None:
        view, off = self._locate(gpa, len(data))
        view[off:off + len(data)] = np.frombuffer(data, np.uint8)

    def u64s(self, gpa: int, count: int) -> np.ndarray:
        view, off = self._locate(gpa, 8 * count)
        return view[off:off + 8 * count].view(np.uint64)

    def _split(self, gpas: np.ndarray):
        """(block, mask, word indices) for each block holding some of ``gpas``."""
        found = np.zeros(len(gpas), bool)
        for b in self.blocks:
            inside = (gpas >= b.offset) & (gpas + 8 <= b.offset + b.length)
            if inside.any():
                found |= inside
                words = (gpas[inside] - np.uint64(b.offset)) // np.uint64(8)
                yield b.view[: b.length // 8 * 8].view(np.uint64), inside, words
        if not found.all():
            raise GuestError("data pages fall outside the RAM blocks")

    def scatter_u64(self, gpas: np.ndarray, value: int) -> None:
        """Store ``value`` at each GPA (8-aligned), vectorised per block."""
        for words, _, idx in self._split(gpas):
            words[idx] = value

    def gather_u64(self, gpas: np.ndarray) -> np.ndarray:
        """The u64 at each GPA (8-aligned), vectorised per block. A page not in memory reads
        as zero without being read: reading it would allocate it (a shared-memory page is
        allocated on first touch, even a read), and a check that reads every data page would
        make all of guest RAM resident, so later scans and digests would read it all too."""
        out = np.zeros(len(gpas), np.uint64)
        for words, inside, idx in self._split(gpas):
            present = self._resident_words(words, idx)
            out[np.flatnonzero(inside)[present]] = words[idx[present]]
        return out

    @staticmethod
    def _resident_words(words: np.ndarray, idx: np.ndarray) -> np.ndarray:
        n_pages = len(words) * 8 // PAGE_SIZE
        res = resident(words[:n_pages * WORDS_PER_PAGE].reshape(n_pages, WORDS_PER_PAGE))
        if res is None:
            return np.ones(len(idx), bool)
        return res[(idx * 8 // PAGE_SIZE).astype(np.int64)]


def page_tables(total_bytes: int) -> dict[int, bytes]:
    """Identity map of [0, total_bytes) with 2 MiB user pages: {gpa: page bytes}."""
    n_pd = -(-total_bytes // GIB)
    if n_pd > MAX_PDS:
        raise GuestError(f"guest RAM of {total_bytes} bytes exceeds the {MAX_PDS} GiB mapped")
    user = PTE_P | PTE_RW | PTE_US
    pml4 = np.zeros(512, np.uint64)
    pml4[0] = PDPT_GPA | user
    pdpt = np.zeros(512, np.uint64)
    pdpt[:n_pd] = PD_GPA + PAGE_SIZE * np.arange(n_pd, dtype=np.uint64) | np.uint64(user)
    pds = np.arange(n_pd * 512, dtype=np.uint64) * np.uint64(HUGE) | np.uint64(user | PTE_PS)
    pages = {PML4_GPA: pml4.tobytes(), PDPT_GPA: pdpt.tobytes()}
    for i in range(n_pd):
        pages[PD_GPA + i * PAGE_SIZE] = pds[i * 512:(i + 1) * 512].tobytes()
    return pages


def install(mem: GuestMemory, layout: Layout, delay: int = 0) -> None:
    """Write page tables, code and control page into guest RAM (the source's first boot)."""
    if layout.n_pages < 1 or layout.stride < 1:
        raise ValueError("the program needs at least one data page and a stride >= 1")
    last = DATA_GPA + (layout.n_pages - 1) * layout.stride * PAGE_SIZE
    if last + PAGE_SIZE > mem.total:
        raise ValueError(f"{layout.n_pages} pages at stride {layout.stride} do not fit in RAM")
    for gpa, data in page_tables(mem.total).items():
        mem.write(gpa, data)
    mem.write(CODE_GPA, CODE)
    gpas = layout.page_gpas()
    dirty = gpas[mem.gather_u64(gpas) != 0]   # RAM reused from an earlier guest starts clean;
    if len(dirty):                            # fresh RAM is left alone (not allocated)
        mem.scatter_u64(dirty, 0)
    ctrl = np.zeros(WORDS_PER_PAGE, np.uint64)
    ctrl[[CTRL_NPAGES, CTRL_STRIDE, CTRL_DELAY, CTRL_DATA, CTRL_MAGIC]] = [
        layout.n_pages, layout.stride * PAGE_SIZE, delay, DATA_GPA, CTRL_MAGIC_VALUE]
    mem.write(CTRL_GPA, ctrl.tobytes())


def read_layout(mem: GuestMemory) -> Layout:
    """The layout recorded in the control page (on a destination, from the migrated RAM)."""
    ctrl = mem.u64s(CTRL_GPA, 8)
    if int(ctrl[CTRL_MAGIC]) != CTRL_MAGIC_VALUE:
        raise GuestError("guest RAM holds no KVM guest program (control page magic missing)")
    return Layout(int(ctrl[CTRL_NPAGES]), int(ctrl[CTRL_STRIDE]) // PAGE_SIZE)


def set_delay(mem: GuestMemory, loops: int) -> None:
    """The rate knob: delay-loop iterations after each page write (read by the guest per page)."""
    mem.u64s(CTRL_GPA, 8)[CTRL_DELAY] = loops


def initial_regs(layout: Layout) -> dict[str, int]:
    """Registers at first boot: pass 0, 'page n of pass 0 done' so the state is canonical."""
    return {"rip": CODE_GPA + LABELS["top"], "rflags": RFLAGS_RESERVED | RFLAGS_IF,
            "r12": 0, "r13": layout.n_pages, "r14": layout.n_pages, "r15": CTRL_GPA,
            "rbx": DATA_GPA, "rbp": layout.stride * PAGE_SIZE, "rsi": DATA_GPA, "rsp": 0}


def configure_sregs(sregs) -> None:
    """Turn a fresh vCPU's sregs into 64-bit user mode with paging on PML4_GPA."""
    def seg(s, selector, type_, code):
        s.base, s.limit, s.selector, s.type = 0, 0xFFFFFFFF, selector, type_
        s.present, s.dpl, s.s, s.g, s.avl, s.unusable = 1, 3, 1, 1, 0, 0
        s.l, s.db = (1, 0) if code else (0, 1)

    seg(sregs.cs, USER_CS, 11, True)
    for s in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg(s, USER_DS, 3, False)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA


@dataclass(frozen=True, slots=True)
class Progress:
    """Where the guest is: pass number, pages of that pass written, page writes since boot."""

    passes: int
    page: int
    pages_written: int


def check_invariant(mem: GuestMemory, regs) -> Progress:
    """Check memory against itself and against r12/r13 at ``regs.rip``; GuestError if broken."""
    layout = read_layout(mem)
    n = layout.n_pages
    ctrl = mem.u64s(CTRL_GPA, 8)
    p = int(ctrl[CTRL_PASS])
    counters = mem.gather_u64(layout.page_gpas())
    k = int(np.argmin(counters == p)) if not (counters == p).all() else n
    if p == 0:
        good = k == n
    else:
        good = bool((counters[k:] == p - 1).all())
    if not good:
        bad = k + int(np.argmax(counters[k:] != max(p - 1, 0)))
        raise GuestError(f"guest memory breaks the invariant: pass {p}, pages [0,{k}) carry "
                         f"{p} but page {bad} carries {int(counters[bad])}")
    want_r12, want_r13 = p, k
    where = regs.rip - CODE_GPA
    if where in (LABELS["set_rsi"], LABELS["inc_pass"], LABELS["publish"]):
        # r13 was reset for the next pass before the pass is published: memory still shows
        # the last pass complete, and between inc and publish r12 is one ahead.
        if k != n:
            raise GuestError(f"vCPU at pass start but only {k} of {n} pages carry pass {p}")
        want_r13 = 0
        if where == LABELS["publish"]:
            want_r12 = p + 1
    elif where == LABELS["inc_index"]:
        want_r13 = k - 1  # page r13 is written, r13 not yet incremented
    if (regs.r12, regs.r13) != (want_r12, want_r13):
        raise GuestError(f"vCPU registers disagree with memory: r12={regs.r12} r13={regs.r13} "
                         f"at rip {regs.rip:#x}, memory says pass {want_r12} page {want_r13}")
    return Progress(p, k, (p - 1) * n + k if p else 0)


def check_resume_point(mem: GuestMemory, regs) -> Progress:
    """The invariant where the vCPU stands only: registers against the control page and the two
    data pages either side of the vCPU's position. O(1) reads, so a destination can check the
    point it resumes from without touching (and faulting in) every page of RAM: the RAM itself
    was verified against the source's, whose full invariant was checked at the pause."""
    layout = read_layout(mem)
    n = layout.n_pages
    p = int(mem.u64s(CTRL_GPA, 8)[CTRL_PASS])
    where = regs.rip - CODE_GPA
    want_r12 = p
    if where in (LABELS["set_rsi"], LABELS["inc_pass"], LABELS["publish"]):
        k, want_r13 = n, 0            # between passes: the last one is complete
        if where == LABELS["publish"]:
            want_r12 = p + 1
    elif where == LABELS["inc_index"]:
        k = regs.r13 + 1              # page r13 is written, r13 not yet incremented
        want_r13 = regs.r13
    else:
        k = want_r13 = regs.r13
    if regs.r12 != want_r12 or regs.r13 != want_r13 or not 0 <= k <= n or (p == 0 and k != n):
        raise GuestError(f"vCPU registers disagree with memory: r12={regs.r12} r13={regs.r13} "
                         f"at rip {regs.rip:#x}, control page says pass {p}")
    gpas = layout.page_gpas()
    for index, want in ((k - 1, p), (k, max(p - 1, 0))):
        if 0 <= index < n and p and int(mem.u64s(int(gpas[index]), 1)[0]) != want:
            raise GuestError(f"guest memory breaks the invariant at the vCPU's position: pass "
                             f"{p}, page {index} carries {int(mem.u64s(int(gpas[index]), 1)[0])}"
                             f", expected {want}")
    return Progress(p, k, (p - 1) * n + k if p else 0)
