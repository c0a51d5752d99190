"""A PD and its MRs shared between processes: the registrar registers, the poster posts."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
from verbs_helpers import address, port, shm_ram, wait_wcs
from verbs_peer import SPAWN, Peer, import_and_die

from shm.errors import TransportError
from shm.naming import SHM_DIR, parse_segment_name
from stages.verbs import Access, SendOpcode, WCStatus, open_provider

MiB = 1 << 20


@pytest.fixture
def guest_ram():
    """2 MiB of POSIX shared memory, as guest RAM is; unlinked afterwards."""
    with shm_ram(2 * MiB) as (_name, ram):
        ram[:] = np.random.default_rng(7).integers(0, 256, 2 * MiB, np.uint8)
        yield ram


def test_mr_imported_into_another_process_posts_a_write(provider, guest_ram):
    with open_provider(provider).open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(guest_ram.ctypes.data, 2 * MiB, Access.LOCAL_WRITE)
        pd_handle, mr_handle = pd.export(), mr.export()
        assert pickle.loads(pickle.dumps(mr_handle)) == mr_handle  # plain data
        with Peer(provider, size=2 * MiB) as target, \
                Peer(provider, pd_handle=pd_handle, mr_handle=mr_handle) as poster:
            assert poster.info["addr"] == mr.addr  # SGEs stay in the exporter's address space
            listen_port = target.call("listen", address(provider), port(provider))
            target.send("accept", b"")
            poster.call("connect", address(provider), listen_port, b"")
            target.answer()
            with pytest.raises(TransportError) as info:
                mr.close()  # the poster holds an import
            assert info.value.errno == errno.EBUSY
            remote = target.info["addr"]
            poster.call("write", 1, MiB, MiB, remote + MiB, target.info["rkey"])
            poster.call("write", 2, 123, 4096, remote + 5, target.info["rkey"])
            wcs = poster.call("poll", 2, 10)
            assert [(w[0], w[1]) for w in wcs] == [(1, WCStatus.SUCCESS), (2, WCStatus.SUCCESS)]
            assert target.call("read", 0, MiB) == (
                bytes(5) + guest_ram[123:123 + 4096].tobytes() + bytes(MiB - 4101))
            assert target.call("read", MiB, MiB) == guest_ram[MiB:].tobytes()
        mr.close()  # the poster is gone: its import went with it


def _soft_pd_with_shared_mr(ctx, ram):
    pd = ctx.alloc_pd()
    mr = pd.reg_mr(ram.ctypes.data, MiB, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
    return pd, mr, pd.export(), mr.export()


def test_soft_pd_table_is_owned_named_and_unlinked(guest_ram):
    ctx = open_provider("soft").open_device()
    with ctx:
        _pd, _mr, pd_handle, mr_handle = _soft_pd_with_shared_mr(ctx, guest_ram)
        name = parse_segment_name(pd_handle.name)
        assert name is not None and name.pid == os.getpid() and name.kind == "verbs.pd"
        assert os.path.exists(SHM_DIR + pd_handle.name)
        assert mr_handle.path.startswith(SHM_DIR) and mr_handle.file_offset == 0
    assert not os.path.exists(SHM_DIR + pd_handle.name)


def test_soft_import_in_the_same_process_blocks_dereg_until_unimported(guest_ram):
    with open_provider("soft").open_device() as ctx, \
            open_provider("soft").open_device() as other:
        _pd, mr, pd_handle, mr_handle = _soft_pd_with_shared_mr(ctx, guest_ram)
        imported_pd = other.import_pd(pd_handle)
        imported = imported_pd.import_mr(mr_handle)
        assert imported.imported and imported.lkey == mr.lkey and imported.addr == mr.addr
        # The import maps the same pages at another address.
        assert imported.local_address != mr.local_address
        guest_ram[10] = 99
        assert imported.slice(mr.addr + 10, 1)[0] == 99
        with pytest.raises(TransportError) as info:
            mr.close()
        assert info.value.errno == errno.EBUSY and not mr.closed
        imported.close()
        imported.close()  # idempotent
        mr.close()
        with pytest.raises(TransportError) as info:
            imported_pd.import_mr(mr_handle)  # gone now
        assert info.value.errno == errno.ENOENT


def test_soft_import_hold_dies_with_the_importer(guest_ram):
    with open_provider("soft").open_device() as ctx:
        _pd, mr, pd_handle, mr_handle = _soft_pd_with_shared_mr(ctx, guest_ram)
        conn, child_conn = SPAWN.Pipe()
        child = SPAWN.Process(target=import_and_die, args=(child_conn, pd_handle, mr_handle))
        child.start()
        try:
            assert conn.poll(30) and conn.recv() == "imported"
            with pytest.raises(TransportError):
                mr.close()
            child.kill()
            child.join(10)
            mr.close()  # the kernel dropped the dead importer's lock
        finally:
            if child.is_alive():
                child.kill()
                child.join()
            conn.close()


def test_soft_exporting_private_memory_is_refused():
    memory = np.zeros(MiB, np.uint8)  # anonymous: no file another process could map
    with open_provider("soft").open_device() as ctx:
        mr = ctx.alloc_pd().reg_mr(memory.ctypes.data, MiB, Access.LOCAL_WRITE)
        with pytest.raises(TransportError, match="not a shared file mapping") as info:
            mr.export()
        assert "/dev/shm" in str(info.value)


def test_soft_handles_of_the_other_provider_are_refused(guest_ram):
    with open_provider("soft").open_device() as ctx:
        _pd, _mr, pd_handle, _ = _soft_pd_with_shared_mr(ctx, guest_ram)
        foreign = type(pd_handle)("verbs", pd_handle.owner_pid, pd_handle.name)
        with pytest.raises(ValueError):
            ctx.import_pd(foreign)


def test_soft_write_through_imported_mr_in_same_process(guest_ram):
    """The poster's SGE addresses are the exporter's; the soft provider maps them locally."""
    with open_provider("soft").open_device() as registrar, \
            open_provider("soft").open_device() as poster, \
            open_provider("soft").open_device() as target:
        _pd, mr, pd_handle, mr_handle = _soft_pd_with_shared_mr(registrar, guest_ram)
        pd = poster.import_pd(pd_handle)
        imported = pd.import_mr(mr_handle)
        dest = np.zeros(MiB, np.uint8)
        tpd = target.alloc_pd()
        tmr = tpd.reg_mr(dest.ctypes.data, MiB, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        cq, tcq = poster.create_cq(8), target.create_cq(8)
        qp = pd.create_qp(cq, cq, max_send_wr=4, max_recv_wr=1)
        tqp = tpd.create_qp(tcq, tcq, max_send_wr=4, max_recv_wr=1)
        listener = target.listen("127.0.0.1", 0)
        import threading

        thread = threading.Thread(target=lambda: listener.get_request(5).accept(tqp))
        thread.start()
        poster.connect(qp, "127.0.0.1", listener.port)
        thread.join()
        qp.post_send(1, SendOpcode.RDMA_WRITE, mr.addr + 4096, 8192, imported.lkey,
                     remote_addr=tmr.addr, rkey=tmr.rkey)
        assert wait_wcs(cq, 1)[0].status == WCStatus.SUCCESS
        assert (dest[:8192] == guest_ram[4096:4096 + 8192]).all()
        with pytest.raises(TransportError):
            mr.close()
