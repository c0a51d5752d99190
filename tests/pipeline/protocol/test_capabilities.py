import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.protocol.capabilities import (
    EXTENDED_SIZE,
    KNOWN_FLAGS,
    Agreement,
    Capabilities,
    Capability,
    DataConnect,
    Digest,
    accept_reply,
    decode_connect,
    negotiate,
)
from shm.errors import ProtocolError, RemoteProtocolError

PIN_ALL, MULTI, QPS = Capability.PIN_ALL, Capability.MULTI_REGISTER, Capability.DATA_QPS
EVERYTHING = Capabilities(flags=KNOWN_FLAGS, data_qps=4, session_token=0xC0FFEE,
                          digest=Digest.BLAKE2B_256)


@pytest.mark.parametrize("hexed, caps", [
    ("00000001 00000001", Capabilities(flags=PIN_ALL)),      # §12 A: request with pin-all
    ("00000001 00000000", Capabilities()),                   # without pin-all / declined
])
def test_vector_a(hexed, caps):
    data = bytes.fromhex(hexed)
    assert Capabilities.decode(data) == caps
    assert caps.encode() == data


def test_extension_block_layout_and_round_trip():
    caps = Capabilities(flags=PIN_ALL | MULTI | QPS | Capability.CHUNK_SIZE, chunk_shift=21,
                        data_qps=3, session_token=0x0102030405060708)
    data = caps.encode()
    assert data == bytes.fromhex("00000001 00000701 52445058 01 15 03 00 0102030405060708")
    assert len(data) == EXTENDED_SIZE <= 56           # fits librdmacm's connect limit
    assert Capabilities.decode(data) == caps
    assert caps.chunk_size == 2 << 20 and caps.multi_register and caps.pin_all


def test_a_qemu_peer_sees_only_its_eight_bytes():
    # What a QEMU destination does: read 8 bytes, mask flags &= 0x01, echo.
    data = Capabilities(flags=PIN_ALL | MULTI | QPS, data_qps=2).encode()
    version, flags = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
    qemu_reply = Capabilities(version, flags & 0x01).encode()
    assert qemu_reply == bytes.fromhex("00000001 00000001")
    agreement = accept_reply(Capabilities.decode(data), Capabilities.decode(qemu_reply))
    assert agreement.capabilities == Capabilities(flags=PIN_ALL)


def test_decode_ignores_bytes_it_does_not_understand():
    # The CM may pad private data; bytes after 8 without our magic are ignored, as QEMU does.
    assert Capabilities.decode(bytes.fromhex("00000001 00000001") + bytes(48)) == \
        Capabilities(flags=PIN_ALL)
    data = EVERYTHING.encode()
    assert Capabilities.decode(data + b"junk") == EVERYTHING


def test_truncated_at_every_length():
    data = EVERYTHING.encode()
    for n in range(8):
        with pytest.raises(RemoteProtocolError, match="needs 8"):
            Capabilities.decode(data[:n])
    for n in range(8, len(data)):   # a cut extension block is not recognised: QEMU's view
        cut = Capabilities.decode(data[:n])
        assert cut == Capabilities(flags=EVERYTHING.flags)
        # Without its fields, negotiation grants none of the bits that need them.
        assert negotiate(cut, EVERYTHING).flags == PIN_ALL | MULTI | Capability.CHUNK_SIZE


def test_extension_fields_need_their_flags():
    with pytest.raises(ValueError, match="needs flag DATA_QPS"):
        Capabilities(data_qps=1)
    bad = bytearray(Capabilities(flags=MULTI).encode())
    bad[14] = 2                                         # data_qps without DATA_QPS
    with pytest.raises(RemoteProtocolError, match="data_qps"):
        Capabilities.decode(bytes(bad))
    bad[14], bad[12] = 0, 0                             # ext_version 0
    with pytest.raises(RemoteProtocolError, match="extension version 0"):
        Capabilities.decode(bytes(bad))


def test_negotiate_grants_only_what_was_asked_and_known():
    request = Capabilities(flags=PIN_ALL | MULTI | (1 << 20) | (1 << 3))   # unknown bits
    reply = negotiate(request, EVERYTHING)
    assert reply.flags == PIN_ALL | MULTI and reply.version == 1
    assert negotiate(Capabilities(), EVERYTHING) == Capabilities()
    # Supported limits what is granted.
    assert negotiate(Capabilities(flags=PIN_ALL | MULTI), Capabilities(flags=MULTI)).flags == MULTI


def test_negotiate_extension_fields():
    request = Capabilities(flags=QPS | Capability.CHUNK_SIZE | Capability.RAM_DIGEST,
                           data_qps=8, chunk_shift=22, digest=Digest.BLAKE2B_256)
    reply = negotiate(request, EVERYTHING)
    assert (reply.data_qps, reply.session_token, reply.chunk_shift, reply.digest) == (
        4, 0xC0FFEE, 22, Digest.BLAKE2B_256)
    other_digest = Capabilities(flags=KNOWN_FLAGS, data_qps=4, session_token=1,
                                digest=Digest.SHA256)
    assert not negotiate(request, other_digest).has(Capability.RAM_DIGEST)
    no_qps = Capabilities(flags=KNOWN_FLAGS)
    assert not negotiate(request, no_qps).has(QPS)
    with pytest.raises(ValueError, match="session_token"):
        negotiate(request, Capabilities(flags=KNOWN_FLAGS, data_qps=2))
    agreement = accept_reply(request, reply)
    assert agreement.capabilities == reply and agreement.warnings == ()


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_negotiate_refuses_other_versions(version):
    with pytest.raises(RemoteProtocolError, match=f"version {version}"):
        negotiate(Capabilities(version=version), EVERYTHING)


def test_accept_reply_falls_back_when_pin_all_is_declined():
    agreement = accept_reply(Capabilities(flags=PIN_ALL), Capabilities())
    assert agreement == Agreement(Capabilities(), pin_all_declined=True)
    assert "falling back to dynamic registration" in agreement.warnings[0]


@pytest.mark.parametrize("requested, reply, words", [
    (Capabilities(), Capabilities(flags=PIN_ALL), ["grant 0x1", "did not ask"]),
    (Capabilities(flags=PIN_ALL), Capabilities(version=2, flags=PIN_ALL), ["version 2"]),
    (Capabilities(flags=QPS, data_qps=2),
     Capabilities(flags=QPS, data_qps=3, session_token=1), ["data_qps 3"]),
    (Capabilities(flags=QPS, data_qps=2), Capabilities(flags=QPS, data_qps=1), ["token 0"]),
    (Capabilities(flags=Capability.CHUNK_SIZE, chunk_shift=21),
     Capabilities(flags=Capability.CHUNK_SIZE, chunk_shift=22), ["chunk_shift 22"]),
    (Capabilities(flags=Capability.RAM_DIGEST, digest=1),
     Capabilities(flags=Capability.RAM_DIGEST, digest=2), ["digest 2"]),
])
def test_accept_reply_refuses_a_bad_reply(requested, reply, words):
    with pytest.raises(RemoteProtocolError) as info:
        accept_reply(requested, reply)
    for word in words:
        assert word in str(info.value)


def test_data_connect():
    hello = DataConnect(session_token=0xC0FFEE, index=2)
    data = hello.encode()
    assert data == bytes.fromhex("52445044 01 02 0000 0000000000c0ffee")
    assert DataConnect.decode(data) == hello == decode_connect(data)
    assert DataConnect.decode(data + bytes(40)) == hello          # the CM may pad
    # A QEMU destination would read the magic as protocol version 0x52445044 and refuse it.
    assert Capabilities.decode(data).version == 0x52445044
    assert decode_connect(EVERYTHING.encode()) == EVERYTHING
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            DataConnect.decode(data[:n])
    with pytest.raises(RemoteProtocolError, match="token 0"):
        DataConnect.decode(data[:8] + bytes(8))


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_random_private_data_raises_only_protocol_errors(data):
    for decoder in (Capabilities.decode, DataConnect.decode, decode_connect):
        try:
            decoder(data)
        except ProtocolError:
            pass


@settings(max_examples=300)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
       st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(0, 255))
def test_random_capabilities_round_trip_and_negotiation_is_safe(flags, supported_flags, qps,
                                                                 token, digest, shift):
    shift = 12 + shift % 19
    ext = dict(chunk_shift=shift if flags & Capability.CHUNK_SIZE else 20,
               data_qps=qps if flags & QPS else 0,
               session_token=token if flags & QPS else 0,
               digest=digest if flags & Capability.RAM_DIGEST else 0)
    request = Capabilities(1, flags, **ext)
    assert Capabilities.decode(request.encode()) == request
    supported = Capabilities(flags=KNOWN_FLAGS, data_qps=4, session_token=7, digest=digest)
    if not supported_flags & QPS:
        supported = Capabilities(flags=supported_flags & KNOWN_FLAGS & ~QPS)
    reply = negotiate(request, supported)
    assert reply.flags & ~request.flags == 0 and reply.flags & ~KNOWN_FLAGS == 0
    assert accept_reply(request, Capabilities.decode(reply.encode())).capabilities == reply
