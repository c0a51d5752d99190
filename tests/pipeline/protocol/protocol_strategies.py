"""Hypothesis strategies for valid control messages (shared by the protocol tests)."""

from hypothesis import strategies as st

from pipeline.protocol.messages import (
    MAX_COMMANDS,
    QEMU_FILE_MAX,
    Compress,
    CompressMessage,
    DestBlock,
    ErrorMessage,
    QemuFileMessage,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
repeats = st.integers(1, MAX_COMMANDS)

registers = st.builds(Register, u64, u32, u64)
results = st.builds(RegisterResult, u32, u64)
dest_blocks = st.builds(DestBlock, u64, u64, u64, u32)


@st.composite
def register_results(draw):
    n = draw(st.integers(1, 64))
    if draw(st.booleans()):        # QEMU's shape: one result whatever repeat is
        return RegisterResultMessage((draw(results),), draw(repeats))
    return RegisterResultMessage(tuple(draw(st.lists(results, min_size=n, max_size=n))))


messages = st.one_of(
    st.just(ErrorMessage()), st.just(ReadyMessage()), st.just(RamBlocksRequestMessage()),
    st.just(RegisterFinishedMessage()),
    st.builds(QemuFileMessage, st.binary(max_size=QEMU_FILE_MAX), u32),
    st.builds(RamBlocksResultMessage, st.lists(dest_blocks, max_size=40).map(tuple)),
    st.builds(CompressMessage, st.builds(Compress, u32, u64, u64)),
    st.builds(RegisterRequestMessage, st.lists(registers, min_size=1, max_size=64).map(tuple)),
    st.builds(UnregisterRequestMessage, st.lists(registers, min_size=1, max_size=64).map(tuple)),
    register_results(),
    st.builds(UnregisterFinishedMessage, repeats),
)
