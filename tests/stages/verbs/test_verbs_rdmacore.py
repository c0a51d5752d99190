"""The pyverbs provider's import hygiene and its one-line answer on machines without RDMA."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shm.errors import TransportError, TransportUnsupported
from stages.verbs import open_provider
from stages.verbs.rdmacore import load, probe


def test_pipeline_and_the_soft_provider_never_import_pyverbs():
    code = (
        "import sys, pipeline, pipeline.uri, pipeline.errors, stages.verbs, stages.verbs.soft\n"
        "from stages.verbs import open_provider\n"
        "open_provider('verbs')\n"  # choosing the provider does not import it either
        "open_provider('soft').open_device().close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyverbs')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_pyverbs_is_importable_for_the_error_path():
    pytest.importorskip("pyverbs.device", reason="python3-pyverbs is not installed here")
    load()  # pyverbs present: discovery and the no-device path below really run


def test_verbs_without_a_device_says_so_in_one_line():
    reason = probe()
    if reason is None:
        pytest.skip("this machine has an RDMA device")
    provider = open_provider("verbs")
    with pytest.raises(TransportUnsupported) as info:
        provider.open_device()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("no RDMA device") or "pyverbs" in message
    assert "--transport soft" in message
    assert isinstance(info.value, TransportError)
    with pytest.raises(TransportUnsupported):
        provider.list_devices()


def test_missing_pyverbs_is_transport_unsupported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs", None)  # makes "import pyverbs..." fail
    for name in [m for m in sys.modules if m.startswith("pyverbs.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(TransportUnsupported, match="python3-pyverbs"):
        open_provider("verbs").open_device()
    assert probe() is not None


def test_unknown_provider_is_api_misuse():
    with pytest.raises(ValueError, match="soft, verbs"):
        open_provider("ucx")


def test_new_fd_finds_the_descriptor_a_constructor_opened():
    import os

    from stages.verbs.rdmacore_base import new_fd

    class Channel:  # stands in for a CompChannel, whose fd pyverbs does not expose
        def __init__(self):
            self.fd = os.eventfd(0)

        def close(self):
            os.close(self.fd)

    channel, fd = new_fd(Channel, "eventfd")
    try:
        assert fd == channel.fd
    finally:
        channel.close()
    with pytest.raises(TransportError):
        new_fd(Channel, "infinibandevent")  # closed again when not found


def test_pyverbs_errors_become_transport_errors_with_errno():
    pyverbs_error = pytest.importorskip("pyverbs.pyverbs_error")
    from stages.verbs.rdmacore_base import errors

    with pytest.raises(TransportError) as info:
        with errors("cannot post send"):
            raise pyverbs_error.PyverbsRDMAError("Failed to post send", 12)
    assert info.value.errno == 12 and str(info.value).startswith("cannot post send")


class _FakeChannel:
    """pyverbs.cq.CompChannel stand-in: an eventfd that one armed completion makes readable."""

    def __init__(self, _ctx):
        import os

        self.fd = os.eventfd(0, os.EFD_NONBLOCK)

    def get_cq_event(self, _cq):
        import os

        os.eventfd_read(self.fd)

    def close(self):
        import os

        os.close(self.fd)


class _FakeCQ:
    """pyverbs.cq.CQ stand-in with ibv_req_notify_cq's one-shot arming."""

    def __init__(self, _ctx, _depth, _cq_context, channel, _vector):
        self.channel, self.items, self.armed = channel, [], False

    def req_notify(self):
        self.armed = True

    def poll(self, n):
        out, self.items = self.items[:n], self.items[n:]
        return len(out), out

    def ack_events(self, _n):
        pass

    def close(self):
        pass

    def complete(self, wr_id):
        import os
        from types import SimpleNamespace

        self.items.append(SimpleNamespace(wr_id=wr_id, status=0, opcode=1, byte_len=8,
                                          qp_num=3))
        if self.armed:
            self.armed = False
            os.eventfd_write(self.channel.fd, 1)


def test_verbs_cq_wait_poll_and_fd_follow_the_channel(monkeypatch):
    import select
    from types import SimpleNamespace

    pytest.importorskip("pyverbs.device", reason="python3-pyverbs is not installed here")
    from stages.verbs import rdmacore

    monkeypatch.setattr(rdmacore, "new_fd", lambda create, _marker: (c := create(), c.fd))
    v = SimpleNamespace(cq=SimpleNamespace(CompChannel=_FakeChannel, CQ=_FakeCQ))
    cq = rdmacore.VerbsCQ(SimpleNamespace(v=v, ctx=None), 16)
    try:
        assert not cq.wait(0.05) and cq.poll() == [] and len(cq) == 0
        cq.cq.complete(1)
        assert select.select([cq.fileno()], [], [], 0)[0]
        assert cq.wait(1) and len(cq) == 1  # held for poll()
        assert [wc.wr_id for wc in cq.poll()] == [1]  # emptied: the event is consumed too
        assert select.select([cq.fileno()], [], [], 0)[0] == []
        cq.cq.complete(2)  # re-armed: the fd wakes a select() again
        cq.cq.complete(3)
        assert select.select([cq.fileno()], [], [], 1)[0]
        assert [wc.wr_id for wc in cq.poll(1)] + [wc.wr_id for wc in cq.poll()] == [2, 3]
    finally:
        cq.close()
