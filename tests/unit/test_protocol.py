"""The frame and payload decoders: whatever bytes arrive, only ProtocolViolation comes out."""
import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from sandbox.errors import ProtocolViolation
from sandbox.protocol import (CALL, CHILD_TYPES, EVENT, HOST_TYPES, READY, RESULT, FrameDecoder, Limits,
                              NotPlainData, dumps, encode_frame, loads)
from sandbox.protocol.framing import HEADER

pytestmark = pytest.mark.unpriv

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@given(plain)
def test_plain_data_round_trips(value):
    assert loads(dumps(value)) == value


@given(st.binary(max_size=4096))
@settings(max_examples=500)
def test_arbitrary_bytes_only_raise_protocol_violation(data):
    d = FrameDecoder(max_frame=1 << 16)
    try:
        for frame in d.feed(data):
            loads(frame.payload, Limits(max_bytes=1 << 16))
    except ProtocolViolation:
        pass


@given(st.binary(max_size=2048))
@settings(max_examples=500)
def test_arbitrary_payload_only_raises_protocol_violation(data):
    try:
        loads(data)
    except ProtocolViolation:
        pass


@given(st.lists(plain, max_size=5), st.integers(1, 64))
def test_frames_survive_any_split(values, chunk):
    stream = b"".join(encode_frame(EVENT, i, dumps(v)) for i, v in enumerate(values))
    d = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += d.feed(stream[i:i + chunk])
    assert [loads(f.payload) for f in got] == values
    assert d.at_boundary()


def test_header_announcing_4_gib_is_refused_before_allocating():
    d = FrameDecoder(max_frame=16 << 20)
    with pytest.raises(ProtocolViolation, match="exceeds"):
        d.feed(HEADER.pack(b"SB", 1, RESULT, 0xFFFFFFFF, 1))
    assert d.pending == 0  # nothing buffered towards the lie


def test_decoder_is_poisoned_after_an_error():
    d = FrameDecoder()
    with pytest.raises(ProtocolViolation):
        d.feed(b"XX" + b"\0" * 14)
    with pytest.raises(ProtocolViolation):
        d.feed(encode_frame(RESULT, 1, dumps(1)))


def test_bad_magic_version_and_direction():
    with pytest.raises(ProtocolViolation, match="magic"):
        FrameDecoder().feed(HEADER.pack(b"ZZ", 1, RESULT, 0, 0))
    with pytest.raises(ProtocolViolation, match="version"):
        FrameDecoder().feed(HEADER.pack(b"SB", 9, RESULT, 0, 0))
    with pytest.raises(ProtocolViolation, match="not allowed"):
        FrameDecoder(allowed_types=CHILD_TYPES).feed(encode_frame(CALL, 1, dumps(1)))
    with pytest.raises(ProtocolViolation, match="not allowed"):
        FrameDecoder(allowed_types=HOST_TYPES).feed(encode_frame(READY, 1, dumps(1)))


def test_five_byte_array_header_announcing_a_billion_elements():
    with pytest.raises(ProtocolViolation):
        loads(b"\xdd" + struct.pack(">I", 1_000_000_000))


def test_map_with_millions_of_keys_is_capped():
    with pytest.raises(ProtocolViolation):
        loads(b"\xdf" + struct.pack(">I", 5_000_000), Limits(max_items=1000))


def test_deep_nesting_is_refused():
    with pytest.raises(ProtocolViolation):
        loads(b"\x91" * 100_000 + b"\xc0")
    with pytest.raises(ProtocolViolation, match="deeper"):
        loads(msgpack.packb(_nest(100)), Limits(max_depth=64))
    assert loads(dumps(_nest(10))) == _nest(10)


def _nest(n):
    v = None
    for _ in range(n):
        v = [v]
    return v


def test_extension_types_and_pickles_are_not_objects():
    with pytest.raises(ProtocolViolation):
        loads(msgpack.packb(msgpack.ExtType(5, b"xyz")))
    import pickle
    blob = pickle.dumps(object())
    assert loads(dumps(blob)) == blob  # bytes stay bytes: nothing is ever unpickled


def test_non_plain_values_are_refused_on_encode():
    for bad in (object(), {1: "int key"}, {1.5}, lambda: 0):
        with pytest.raises(NotPlainData):
            dumps(bad)


def test_truncated_frame_is_not_at_boundary():
    frame = encode_frame(RESULT, 1, dumps("hello"))
    d = FrameDecoder()
    assert d.feed(frame[:-2]) == []
    assert not d.at_boundary()


# big payloads built from small draws (hypothesis refuses to draw 100 KB of entropy)
big = st.tuples(st.binary(min_size=1, max_size=8), st.integers(0, 40_000)).map(lambda t: t[0] * t[1])


@given(st.lists(plain | big, min_size=1, max_size=6))
@settings(max_examples=40, deadline=None)
def test_encoder_reuses_its_buffer_without_mixing_messages(values):
    """Large payloads come back as views of one kept buffer; each must still decode to its own value."""
    from sandbox.protocol import Encoder
    enc = Encoder()
    for v in values:
        out = enc.encode(v)
        assert loads(bytes(out)) == v
        if isinstance(out, memoryview):
            enc.release()
    out1 = bytes(enc.encode([1, "a"]))
    assert loads(out1) == [1, "a"]


def test_encoder_refusal_leaves_no_partial_bytes_behind():
    from sandbox.protocol import Encoder
    enc = Encoder()
    with pytest.raises(NotPlainData):
        enc.encode([b"x" * 100_000, object()])
    assert loads(bytes(enc.encode("next"))) == "next"


@given(st.lists(big, min_size=1, max_size=5), st.integers(1, 70_000))
@settings(max_examples=40, deadline=None)
def test_reusing_decoder_gives_each_frame_its_own_payload(payloads, chunk):
    """reuse=True collects large payloads in one kept buffer: decoded in turn, none is mixed up."""
    stream = b"".join(encode_frame(RESULT, i, dumps(p)) for i, p in enumerate(payloads))
    d = FrameDecoder(max_frame=1 << 20, reuse=True)
    got = []
    for i in range(0, len(stream), chunk):
        for frame in d.feed(stream[i:i + chunk]):
            got.append(loads(frame.payload, Limits(max_bytes=1 << 20)))  # decoded before the next feed
    assert got == payloads


def test_encoder_survives_a_view_still_held_elsewhere():
    """A slice of a large payload kept alive (say, by a traceback) must not break the next encode."""
    from sandbox.protocol import Encoder
    enc = Encoder()
    held = memoryview(enc.encode(b"x" * 100_000))[10:]
    enc.release()
    assert loads(bytes(enc.encode(b"y" * 100_000))) == b"y" * 100_000
    enc.release()
    assert bytes(held[:3]) == b"xxx"  # the old buffer stayed valid for whoever held it


def _calling_core():
    from sandbox._host.lifecycle import Lifecycle
    core = Lifecycle("p", "/x/worker.py", max_frame=1 << 16)
    core.handoff(True, None)
    core.receive(encode_frame(READY, 0, dumps({})))
    core.begin_call("f", (), {})
    return core


def _outcome(core, outs):
    def shown(o):
        d = {k: getattr(o, k) for k in getattr(o, "__slots__", ())}
        # an error arrives as an exception object: compare what it says, not its identity
        return type(o).__name__, {k: (type(v).__name__, str(v)) if isinstance(v, BaseException) else v
                                  for k, v in d.items()}
    reason = core.reason
    return [shown(o) for o in outs], (type(reason).__name__, str(reason)) if reason else None


@given(st.sampled_from([b"SB", b"SX"]), st.sampled_from([1, 2]), st.sampled_from([RESULT, EVENT, CALL, 4, 99]),
       st.sampled_from([0, 1, 2]), plain | st.binary(max_size=64), st.booleans())
@settings(max_examples=300, deadline=None)
def test_lifecycle_fast_read_matches_the_general_decoder(magic, version, ftype, call_id, value, garbage):
    """Lifecycle.receive takes a shortcut for the usual read (one whole reply); whatever the bytes,
    it must say exactly what the general frame decoder says (reached here by a split read)."""
    payload = value if garbage and isinstance(value, bytes) else dumps(value)
    frame = HEADER.pack(magic, version, ftype, len(payload), call_id) + payload
    fast, slow = _calling_core(), _calling_core()
    got = _outcome(fast, fast.receive(frame))
    outs = slow.receive(frame[:1]) + slow.receive(frame[1:])
    assert got == _outcome(slow, outs)
    assert fast.session.pending_id == slow.session.pending_id


# ---- what the encoder refuses is exactly what the other side's decoder would ------------------
def _counted(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@pytest.mark.parametrize("value", [
    _nest(65), {"a": _nest(64)}, [0] * 1_000_001, [[0] * 10] * 200_000, [{} for _ in range(2_000_001)],
])
def test_the_encoder_refuses_what_the_decoder_refuses(value):
    from sandbox.protocol import Encoder
    with pytest.raises(NotPlainData):
        dumps(value)
    with pytest.raises(NotPlainData):
        Encoder().encode(value)
    with pytest.raises(ProtocolViolation):
        loads(_counted(value))


@pytest.mark.parametrize("value", [_nest(64), {"a": _nest(63)}, [0] * 1_000_000, [[0] * 10] * 150_000])
def test_the_encoder_passes_what_the_decoder_takes(value):
    assert loads(dumps(value)) == value


def test_a_call_argument_may_nest_as_deep_as_a_reply():
    from sandbox.protocol import Encoder
    e = Encoder()
    # the worker decodes calls without the depth walk (the host is the trusted side)
    assert loads(e.encode_call("f", (_nest(64),), {}), Limits(max_depth=None)) == ["f", [_nest(64)], {}]
    for args, kwargs in (((_nest(65),), {}), ((), {"k": _nest(65)}), (tuple(range(1_000_001)), {}), ((), {1: 2})):
        with pytest.raises(NotPlainData):
            e.encode_call("f", args, kwargs)


def test_a_cycle_is_refused_not_followed():
    a: list = []
    a.append(a)
    with pytest.raises(NotPlainData, match="deeper"):
        dumps(a)


def test_not_plain_data_is_a_sandbox_error_and_still_a_type_error():
    from sandbox.errors import SandboxError, UsageError
    with pytest.raises(NotPlainData) as ei:
        dumps({1, 2})
    assert isinstance(ei.value, SandboxError) and isinstance(ei.value, UsageError)
    assert isinstance(ei.value, TypeError) and ei.value.kind == "usage-error"


@given(st.text(min_size=1, max_size=20), st.lists(plain | big, max_size=4),
       st.dictionaries(st.text(min_size=1, max_size=8), plain | big, max_size=3))
@settings(max_examples=200, deadline=None)
def test_a_call_frame_encodes_like_the_general_encoder(name, args, kwargs):
    """Encoder.encode_call skips walking what Python guarantees; it must give what encode() gives."""
    from sandbox.protocol import Encoder
    fast, general = Encoder(), Encoder()
    got = bytes(fast.encode_call(name, tuple(args), kwargs))
    fast.release()
    assert got == bytes(general.encode([name, args, kwargs]))
    assert loads(got) == [name, args, kwargs]


@pytest.mark.parametrize("bad", [object(), {1: "x"}, [[{"k": {2.5: "x"}}]], (b"x" * 70_000, object())])
def test_a_call_with_a_value_that_is_not_plain_data_is_refused(bad):
    from sandbox.protocol import Encoder
    enc = Encoder()
    with pytest.raises(NotPlainData):
        enc.encode_call("f", (bad,), {})
    with pytest.raises(NotPlainData):
        enc.encode_call("f", (), {"k": bad})
    assert loads(bytes(enc.encode_call("f", (1,), {}))) == ["f", [1], {}]
