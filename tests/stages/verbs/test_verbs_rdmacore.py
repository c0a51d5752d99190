"""The pyverbs provider's import hygiene and its one-line answer on machines without RDMA."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.errors import TransportError, TransportUnsupported
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

    from stages.verbs.rdmacore import new_fd

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
    from stages.verbs.rdmacore import errors

    with pytest.raises(TransportError) as info:
        with errors("cannot post send"):
            raise pyverbs_error.PyverbsRDMAError("Failed to post send", 12)
    assert info.value.errno == 12 and str(info.value).startswith("cannot post send")
