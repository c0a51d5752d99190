"""QEMU's RDMA migration protocol (version 1), sans-IO: bytes in, messages and events out.

Modules, one concept each (imports point down the list):
- ``buffer``: the cursor over wire bytes (``Buffer``, ``BufferReadError``);
- ``messages``: ``MessageType`` and the frozen message / record dataclasses;
- ``codec``: ``encode(msg)`` / ``decode(data)`` with every per-message receiver check;
- ``capabilities``: connection private data, our extensions, ``negotiate`` / ``accept_reply``;
- ``channel``: ``ControlChannel``, the credit / slot / registration-window state machine;
- ``records``, ``parser``, ``stream``: the migration stream inside QEMU FILE messages.

Nothing here touches a socket, a QP, the clock or shared memory; the coordinators do.
Wire facts: ``docs/protocol.md``.
"""

from pipeline.protocol.capabilities import Capabilities, Capability, accept_reply, negotiate
from pipeline.protocol.channel import ControlChannel, Role, Slot, State
from pipeline.protocol.codec import decode, encode
from pipeline.protocol.messages import MessageType
from pipeline.protocol.stream import StreamReader, StreamWriter

__all__ = [
    "Capabilities", "Capability", "accept_reply", "negotiate", "ControlChannel", "Role", "Slot",
    "State", "decode", "encode", "MessageType", "StreamReader", "StreamWriter",
]
