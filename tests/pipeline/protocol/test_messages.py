import dataclasses

import pytest

from pipeline.protocol.messages import (
    MAX_COMMANDS,
    MESSAGE_CLASSES,
    QEMU_FILE_MAX,
    Compress,
    ControlHeader,
    DestBlock,
    MessageType,
    QemuFileMessage,
    RamBlocksResultMessage,
    Register,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
)


def test_message_types_have_qemus_names_and_values():
    assert [(t.name, int(t)) for t in MessageType] == [
        ("NONE", 0), ("ERROR", 1), ("READY", 2), ("QEMU_FILE", 3), ("RAM_BLOCKS_REQUEST", 4),
        ("RAM_BLOCKS_RESULT", 5), ("COMPRESS", 6), ("REGISTER_REQUEST", 7),
        ("REGISTER_RESULT", 8), ("REGISTER_FINISHED", 9), ("UNREGISTER_REQUEST", 10),
        ("UNREGISTER_FINISHED", 11), ("COMMIT", 0x100)]     # the last is ours
    assert MessageType.QEMU_FILE.qemu_name == "QEMU FILE"
    # One class per type that travels; NONE never does.
    assert set(MESSAGE_CLASSES) == set(MessageType) - {MessageType.NONE}


def test_messages_are_frozen_and_slotted():
    msg = RegisterRequestMessage((Register(1, 2),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.records = ()
    assert not hasattr(msg, "__dict__")


@pytest.mark.parametrize("make", [
    lambda: ControlHeader(512 * 1024 - 15, MessageType.READY, 1),
    lambda: ControlHeader(0, 2, 1),
    lambda: ControlHeader(0, MessageType.READY, 2**32),
    lambda: DestBlock(-1, 0, 0),
    lambda: DestBlock(0, 0, 0, 2**32),
    lambda: Register(2**64, 0),
    lambda: Register(0, 0, True),
    lambda: RegisterResult(2**32, 0),
    lambda: Compress(0, 0, 0, value=1),
    lambda: QemuFileMessage(bytes(QEMU_FILE_MAX + 1)),
    lambda: QemuFileMessage(bytearray(1)),
    lambda: RamBlocksResultMessage([DestBlock(0, 0, 0)]),
    lambda: RegisterRequestMessage(()),
    lambda: RegisterRequestMessage((Register(0, 0),) * (MAX_COMMANDS + 1)),
    lambda: RegisterRequestMessage((RegisterResult(0, 0),)),
    lambda: RegisterResultMessage((RegisterResult(0, 0),) * 2, 3),
    lambda: RegisterResultMessage((RegisterResult(0, 0),), 0),
    lambda: UnregisterFinishedMessage(0),
])
def test_construction_validates(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_register_aliases_and_result_repeat_default():
    r = Register(0x12345000, 2, 0)
    assert r.current_addr == r.chunk == 0x12345000
    assert RegisterResultMessage((RegisterResult(1, 2),) * 3).repeat == 3
    # QEMU's shape: a single result, repeat echoing a multi-record request.
    assert RegisterResultMessage((RegisterResult(1, 2),), 7).repeat == 7
