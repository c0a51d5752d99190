"""The strict double's ``pyverbs.device``: devices, their attributes, Context."""

from __future__ import annotations

import errno
import os

from pyverbs import enums as e
from pyverbs._kernel import _rdma, devices, has_odp, shares_pd, table_add, table_read
from pyverbs.pyverbs_error import PyverbsUserError


class DeviceAttr:
    def __init__(self, name: str) -> None:
        self.phys_port_cnt = 1
        self.vendor_id = 0x02C9 if shares_pd(name) else 0
        self.max_qp_wr = 32768
        self.max_cqe = 4194303


class ODPCaps:
    def __init__(self, name: str) -> None:
        odp = has_odp(name)
        self.general_caps = e.IBV_ODP_SUPPORT if odp else 0
        self.rc_odp_caps = (e.IBV_ODP_SUPPORT_SEND | e.IBV_ODP_SUPPORT_RECV
                            | e.IBV_ODP_SUPPORT_WRITE | e.IBV_ODP_SUPPORT_READ) if odp else 0
        self.uc_odp_caps = self.ud_odp_caps = 0


class DeviceAttrEx:
    def __init__(self, name: str) -> None:
        self.orig_attr = DeviceAttr(name)
        self.odp_caps = ODPCaps(name)


class PortAttr:
    state = e.IBV_PORT_ACTIVE
    gid_tbl_len = 2


class GID:
    def __init__(self, text: str) -> None:
        self.gid = text

    def __str__(self) -> str:
        return self.gid


class Device:
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.node_type = 1


def get_device_list() -> list[Device]:
    return [Device(name) for name in devices()]


class Context:
    """``Context(name=...)``, ``Context(cmd_fd=...)`` (ibv_import_device) or ``Context(cmid=)``."""

    def __init__(self, **kwargs) -> None:
        from stages.verbs.soft.device import SoftContext

        self._children: list = []
        self._closed = False
        if "cmd_fd" in kwargs:
            self._fd = kwargs["cmd_fd"]
            header = table_read(self._fd)
            if not header or "device" not in header[0]:
                raise _rdma("Failed to import device", errno.EINVAL)
            self.name = header[0]["device"]
            self.imported = True
        else:
            name = kwargs.get("name")
            if name is None and kwargs.get("cmid") is not None:
                name = kwargs["cmid"].dev_name
            if isinstance(name, bytes):
                name = name.decode()
            if name not in devices():
                raise PyverbsUserError(f"Device {name} not found")
            self.name = name
            self._fd = os.memfd_create(f"uverbs-{name}", os.MFD_CLOEXEC)
            table_add(self._fd, {"device": name})
            self.imported = False
        self.soft = SoftContext()

    @property
    def cmd_fd(self) -> int:
        return self._fd

    def query_device(self) -> DeviceAttr:
        return DeviceAttr(self.name)

    def query_device_ex(self, ex_input=None) -> DeviceAttrEx:
        return DeviceAttrEx(self.name)

    def query_port(self, port_num) -> PortAttr:
        if port_num != 1:
            raise _rdma(f"Failed to query port {port_num}", errno.EINVAL)
        return PortAttr()

    def query_gid(self, port_num, index) -> GID:
        """Index 0: the link-local GID; 1: the RoCE v2 GID of the device's IPv4 address."""
        if index == 0:
            return GID("fe80:0000:0000:0000:0000:0000:0000:0001")
        a, b, c, d = (int(x) for x in devices()[self.name].split("."))
        return GID(f"0000:0000:0000:0000:0000:ffff:{a << 8 | b:04x}:{c << 8 | d:04x}")

    def close(self) -> None:
        if self._closed:
            return
        for child in reversed(list(self._children)):
            child.close()
        self.soft.close()
        os.close(self._fd)
        self._closed = True
