"""Writing our sections into a migration stream (the table they follow is ``pipeline.sections``).

``write_header`` writes the file magic, version and CONFIGURATION; ``DeviceSections`` writes
the device sections and remembers how to describe them, and its ``end()`` writes EOF and the
VMDESCRIPTION of every section written.
"""

from __future__ import annotations

from pipeline.digest import DeviceDigest
from pipeline.protocol.records import (
    OPEN_RETURN_PATH,
    Command,
    Configuration,
    DeviceState,
    Eof,
    FileHeader,
    SectionFooter,
    SectionHeader,
    SectionType,
)
from pipeline.protocol.vmdesc import DeviceDescription, framed_fields, vm_description
from pipeline.sections import (
    DEVICE_VERSION,
    DEVICES_SECTION,
    DEVICES_SID,
    DIGEST_SECTION,
    DIGEST_SID,
    GUEST_SID,
    MACHINE,
    frame,
)


def write_header(writer, machine: str = MACHINE, *, return_path: bool = False) -> None:
    """File magic, version and the configuration section naming ``machine``; then, for a
    source that waits on the destination's return path, MIG_CMD_OPEN_RETURN_PATH (QEMU's
    destination answers on it only once told to open it)."""
    writer.write_event(FileHeader())
    writer.write_event(Configuration(machine))
    if return_path:
        writer.write_event(Command(OPEN_RETURN_PATH))


class DeviceSections:
    """Device sections written to one stream, and their VMDESCRIPTION."""

    def __init__(self) -> None:
        self.described: list[DeviceDescription] = []
        self.devices = DeviceDigest()          # every device section written so far

    def write(self, writer, sid: int, idstr: str, payload: str, body: bytes,
              instance_id: int = 0) -> None:
        """One FULL section holding ``body`` framed; ``payload`` names the body's field. A
        section written more than once (a per-round one) takes a new ``instance_id`` and
        ``sid`` each time: VMDESCRIPTION describes one (name, instance) by one layout."""
        writer.write_event(SectionHeader(SectionType.SECTION_FULL, sid, idstr, instance_id,
                                         DEVICE_VERSION))
        framed = frame(body)
        writer.write_event(DeviceState(sid, idstr, framed))
        self.devices.add(idstr, framed)
        writer.write_event(SectionFooter(sid))
        self.described.append(DeviceDescription(idstr, instance_id, DEVICE_VERSION,
                                                framed_fields(payload, len(body))))

    def guest(self, writer, idstr: str, state: bytes) -> None:
        """The guest's device state (``idstr``: the synthetic or the KVM guest's section)."""
        self.write(writer, GUEST_SID, idstr, "state", state)

    def digest(self, writer, digests: bytes) -> None:
        """The RAM digest section: SHA-256 of every chunk."""
        self.write(writer, DIGEST_SID, DIGEST_SECTION, "sha256", digests)

    def device_digest(self, writer) -> None:
        """The digest of every device section written so far (the guest's state included)."""
        self.write(writer, DEVICES_SID, DEVICES_SECTION, "sha256", self.devices.digest())

    def end(self, writer, machine: str = MACHINE) -> None:
        """QEMU_VM_EOF, then the VMDESCRIPTION of the sections written."""
        writer.write_event(Eof())
        writer.write_event(vm_description(self.described, machine=machine))
