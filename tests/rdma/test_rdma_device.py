"""The pyverbs provider on a real device (or Soft-RoCE): what the soft provider cannot show."""

from __future__ import annotations

import os
import select

import numpy as np

from stages.verbs import Access, QPState, open_provider
from stages.verbs.rdmacore import active_ports, load


def test_device_opens_with_an_active_port():
    provider = open_provider("verbs")
    names = provider.list_devices()
    with provider.open_device() as ctx:
        assert ctx.name in names
        assert active_ports(load(), ctx.ctx)


def test_cq_channel_fd_is_found_and_quiet():
    with open_provider("verbs").open_device() as ctx:
        cq = ctx.create_cq(16)
        fd = cq.fileno()
        assert "infinibandevent" in os.readlink(f"/proc/self/fd/{fd}")
        assert select.select([fd], [], [], 0)[0] == []
        assert cq.poll() == [] and not cq.wait(0.05)


def test_registration_and_an_unconnected_qp_accept_receives():
    memory = np.zeros(1 << 20, np.uint8)
    with open_provider("verbs").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(memory.ctypes.data, 1 << 20, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        assert mr.addr == memory.ctypes.data and mr.lkey and mr.rkey
        cq = ctx.create_cq(16)
        qp = pd.create_qp(cq, cq, max_send_wr=4, max_recv_wr=4)
        assert qp.state == QPState.INIT
        qp.post_recv(1, mr.addr, 4096, mr.lkey)  # as QEMU does before rdma_connect
        handle = pd.export()
        assert handle.cmd_fd >= 0 and handle.owner_pid == os.getpid()
