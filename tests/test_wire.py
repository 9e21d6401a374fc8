"""cluster.wire: round trips, the pinned header format, malformed input and a real socket."""

import random

import msgpack
import pytest
import torch
import zmq

from llm_shard.cluster import wire
from llm_shard.cluster.types import SamplingParams
from llm_shard.cluster.wire import (
    DEFAULT_ACTIVATION_DTYPE,
    DTYPES,
    WIRE_VERSION,
    Message,
    WireError,
    decode,
    encode,
)


def sample(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=gen,
                         dtype=dtype)


def as_bytes(frames):
    return [bytes(f) for f in frames]


def bits(t):  # compare bit patterns, so bf16/fp16 equality is exact
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (), (2, 1, 7)], ids=str)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    t = sample(dtype, shape, torch.Generator().manual_seed(0))
    frames = encode("step", {"positions": [0, 1]}, {"x": t})
    for received in (frames, as_bytes(frames), [bytearray(f) for f in frames]):
        m = decode(received)
        out = m.tensors["x"]
        assert out.dtype == dtype and out.shape == t.shape
        assert torch.equal(bits(out), bits(t))
        assert m.kind == "step" and m.fields == {"positions": [0, 1]} and m.version == WIRE_VERSION


def test_bfloat16_is_bit_exact_including_specials():
    raw = torch.tensor([0, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xC2F7],
                       dtype=torch.int32).to(torch.int16)
    t = raw.view(torch.bfloat16)  # ±0, ±inf, a NaN payload, a subnormal, 1.0, -123.5
    out = decode(as_bytes(encode("step", {}, {"h": t}))).tensors["h"]
    assert out.dtype == torch.bfloat16 and torch.equal(out.view(torch.int16), raw)


def test_non_contiguous_and_offset_views():
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    views = {"t": base.t(), "strided": base[::2, 1::3], "offset": base[3:, 2:5], "row": base[4]}
    m = decode(as_bytes(encode("step", {}, views)))
    for name, v in views.items():
        assert torch.equal(m.tensors[name], v) and m.tensors[name].is_contiguous()


def test_encode_is_zero_copy_and_decode_shares_the_frame():
    t = torch.arange(1024, dtype=torch.float32)
    frames = encode("step", {}, {"x": t})
    assert isinstance(frames[1], memoryview)
    t[0] = 42.0  # the frame is a view over t's memory
    assert torch.frombuffer(bytearray(frames[1]), dtype=torch.float32)[0] == 42.0
    received = [frames[0], bytearray(frames[1])]
    out = decode(received).tensors["x"]
    received[1][:4] = torch.tensor([7.0]).numpy().tobytes()
    assert out[0] == 7.0  # the tensor is a view over the received frame


@pytest.mark.parametrize("readonly", [False, True])
def test_unaligned_frames_are_copied_to_aligned_tensors(readonly):
    # small zmq frames live inline in the message and may start at any address
    tensors = {"ids": torch.tensor([5, -6, 7]), "x": torch.randn(2, 3).bfloat16(),
               "f": torch.randn(5), "mask": torch.tensor([True, False, True])}
    frames = encode("step", {}, tensors)
    received = [frames[0]]
    for f in frames[1:]:
        buf = memoryview(bytearray(len(f) + 1))[1:]  # one byte past malloc's alignment
        buf[:] = f
        received.append(buf.toreadonly() if readonly else buf)
    out = decode(received).tensors
    for name, t in tensors.items():
        assert torch.equal(out[name], t) and out[name].data_ptr() % t.itemsize == 0


def test_several_tensors_keep_order_and_fields_nest():
    params = SamplingParams(max_tokens=4, temperature=0, stop=["\n"])
    tensors = {"hidden": torch.randn(2, 3).bfloat16(), "ids": torch.tensor([5, 6]),
               "mask": torch.tensor([True, False])}
    fields = {"seq_ids": [3, 9], "sampling": [params.to_dict()], "kind": "not the header's",
              "nested": {"a": None, "b": b"\x00raw", "c": 1.5}, 7: "int keys survive"}
    m = decode(as_bytes(encode("result", fields, tensors)))
    assert list(m.tensors) == ["hidden", "ids", "mask"]
    assert m.kind == "result" and m.fields == fields
    assert SamplingParams.from_dict(m.fields["sampling"][0]) == params
    assert decode(encode("ping")) == Message(kind="ping")


def test_pinned_header_format():
    """A change to this format must bump WIRE_VERSION and update this test."""
    frames = encode("step", {"seq_ids": [1, 2], "positions": [5, 0]},
                    {"hidden": torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16),
                     "ids": torch.tensor([3], dtype=torch.int32)})
    assert msgpack.unpackb(frames[0]) == {
        "v": 1,
        "kind": "step",
        "fields": {"seq_ids": [1, 2], "positions": [5, 0]},
        "tensors": [
            {"name": "hidden", "dtype": "bfloat16", "shape": [1, 2]},
            {"name": "ids", "dtype": "int32", "shape": [1]},
        ],
    }
    assert frames[0] == bytes.fromhex(
        "84a17601a46b696e64a473746570a66669656c647382a77365715f696473"
        "920102a9706f736974696f6e73920500a774656e736f72739283a46e616d"
        "65a668696464656ea56474797065a862666c6f61743136a5736861706592"
        "010283a46e616d65a3696473a56474797065a5696e743332a57368617065"
        "9101"
    )
    assert bytes(frames[1]) == bytes.fromhex("803f00c0")  # bf16 1.0, -2.0, little-endian
    assert bytes(frames[2]) == bytes.fromhex("03000000")


def header(**overrides):
    h = {"v": WIRE_VERSION, "kind": "step", "fields": {},
         "tensors": [{"name": "x", "dtype": "float32", "shape": [2]}]}
    h.update(overrides)
    return msgpack.packb({k: v for k, v in h.items() if v is not ...})


X = bytes(8)  # two float32 zeros


@pytest.mark.parametrize(
    "frames, match",
    [
        ([header(v=2), X], "wire version 2, expected 1: coordinator and worker run different "
                           "llm-shard versions"),
        ([header(v="1"), X], "no wire version"),
        ([header(v=...), X], "no wire version"),
        ([msgpack.packb([1, 2]), X], "header is a msgpack list, expected a map"),
        ([b"\xc1", X], "not valid msgpack"),
        ([header()[:-3], X], "not valid msgpack"),
        ([header() + b"\x00", X], "not valid msgpack"),
        ([header(kind=...), X], r"missing \['kind'\]"),
        ([header(tensors=...), X], r"missing \['tensors'\]"),
        ([header(extra=1), X], "unknown"),
        ([header(kind=""), X], "'kind' must be a non-empty string"),
        ([header(fields=[1]), X], "'fields' must be a map"),
        ([header(tensors={}), X], "'tensors' must be a list"),
        ([header(tensors=[{"name": "x", "dtype": "complex64", "shape": [1]}]), X],
         "unknown dtype 'complex64'"),
        ([header(tensors=[{"name": "x", "dtype": "float32"}]), X], "must be a map with keys"),
        ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [-1]}]), X], "bad shape"),
        ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [True]}]), X], "bad shape"),
        ([header(tensors=[{"name": 1, "dtype": "float32", "shape": [2]}]), X], "name 1"),
        ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}] * 2), X, X],
         "repeated"),
        ([header()], "describes 1 tensor frames but the message has 0"),
        ([header(), X, X], "describes 1 tensor frames but the message has 2"),
        ([header(), X[:7]], "frame has 7 bytes, but shape \\[2\\] of torch.float32 needs 8"),
        ([header(), X + b"\x00"], "frame has 9 bytes"),
        ([header(tensors=[{"name": "m", "dtype": "bool", "shape": [2]}]), b"\x01\x02"],
         "bytes other than 0 and 1"),
        ([header(tensors=[{"name": "x", "dtype": "uint8", "shape": [2**40, 2**40]}]), X],
         "over the"),
        ([header(tensors=[{"name": "x", "dtype": "uint8", "shape": [0, 2**62, 2**62]}]), b""],
         "over the"),
        ([], "empty message"),
        ([None], "header is a NoneType, expected bytes"),
        ([header(), "text"], "is a str, expected bytes"),
        ([header(), 12], "is a int, expected bytes"),
    ],
)
def test_malformed_messages_raise_wire_error(frames, match):
    with pytest.raises(WireError, match=match):
        decode(frames)


def test_size_limits_are_configurable():
    frames = as_bytes(encode("step", {"pad": "x" * 100}, {"x": torch.zeros(64)}))
    decode(frames)
    with pytest.raises(WireError, match="header is .* bytes, over the 50-byte limit"):
        decode(frames, max_header_bytes=50)
    with pytest.raises(WireError, match="over the 100-byte frame limit"):
        decode(frames, max_frame_bytes=100)
    with pytest.raises(WireError, match="over the 100-byte frame limit"):
        encode("step", {}, {"x": torch.zeros(64)}, max_frame_bytes=100)
    with pytest.raises(WireError, match="over the 50-byte limit"):
        encode("step", {"pad": "x" * 100}, max_header_bytes=50)


def test_encode_errors():
    with pytest.raises(WireError, match="kind must be"):
        encode("", {})
    with pytest.raises(WireError, match="not msgpack-able"):
        encode("step", {"t": torch.zeros(1)})
    with pytest.raises(WireError, match="not msgpack-able"):
        encode("step", {"p": SamplingParams()})
    with pytest.raises(WireError, match="dtype torch.complex64"):
        encode("step", {}, {"x": torch.zeros(1, dtype=torch.complex64)})
    with pytest.raises(WireError, match="map str to torch.Tensor"):
        encode("step", {}, {"x": [1.0]})
    with pytest.raises(WireError, match="list of frames"):
        decode(b"\x84")


def test_fuzz_decode_raises_only_wire_error():
    rng = random.Random(1234)
    good = as_bytes(encode("step", {"seq_ids": [1, 2], "s": SamplingParams().to_dict()},
                           {"h": torch.randn(3, 4).bfloat16(), "ids": torch.arange(3),
                            "m": torch.tensor([True, False])}))
    pieces = [b"", b"\x00", b"\xc1", b"\x80", b"\x90", b"\xdf\xff\xff\xff\xff", *good]

    def rand_bytes(n):
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(n)))

    def mutate(frame):
        b = bytearray(frame)
        for _ in range(rng.randrange(1, 4)):
            if b and rng.random() < 0.6:
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            elif b:
                del b[rng.randrange(len(b)):]
            else:
                b += rand_bytes(8)
        return bytes(b)

    def rand_header():
        h = msgpack.unpackb(good[0])
        key = rng.choice(["v", "kind", "fields", "tensors", "shape", "dtype", "name"])
        junk = rng.choice([None, -1, 2**40, "bfloat16", [], {}, [1, -2], 1.5, b"\xff", [[]]])
        if key in h:
            h[key] = junk
        else:
            h["tensors"][rng.randrange(3)][key] = junk
        return msgpack.packb(h)

    n_ok = 0
    for _ in range(2000):
        r = rng.random()
        if r < 0.25:
            frames = [rand_bytes(64) for _ in range(rng.randrange(5))]
        elif r < 0.5:
            frames = [mutate(f) if rng.random() < 0.5 else f for f in good]
        elif r < 0.7:
            frames = [rand_header(), *good[1:]]
        elif r < 0.85:
            frames = [rng.choice(pieces) for _ in range(rng.randrange(6))]
        else:
            frames = list(good)
            del frames[rng.randrange(len(frames)):]
            frames += [rng.choice([None, 0, "x", 1.5, memoryview(b"ab"), bytearray(2)])
                       for _ in range(rng.randrange(3))]
        try:
            decode(frames)
            n_ok += 1
        except WireError:
            pass
    assert n_ok < 2000  # the generator does produce bad messages


def test_activation_helpers():
    assert DEFAULT_ACTIVATION_DTYPE == torch.bfloat16
    assert wire.activation_dtype("bf16") is torch.bfloat16
    assert wire.activation_dtype("FP16") is torch.float16
    assert wire.activation_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="activation dtype 'int8'"):
        wire.activation_dtype("int8")
    h = torch.randn(2, 3, 8)
    sent = wire.to_wire(h)
    assert sent.dtype == torch.bfloat16
    assert wire.to_wire(h, torch.float32) is h  # fp32 on the wire stays as is
    ids = torch.arange(4)
    assert wire.to_wire(ids) is ids  # only floating tensors are cast
    back = wire.from_wire(decode(as_bytes(encode("step", {}, {"h": sent}))).tensors["h"],
                          torch.float32)
    assert back.dtype == torch.float32 and torch.allclose(back, h, rtol=1e-2, atol=1e-2)
    back += 1  # a writable copy, not the received frame


def test_zmq_round_trip_4mb_bf16():
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        for s in (push, pull):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 10_000)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        hidden = torch.randn(4, 512, 1024).bfloat16()  # 4 MiB
        ids = torch.arange(4, dtype=torch.int64)
        wire.send(push, encode("step", {"seq_ids": [0, 1, 2, 3]}, {"hidden": hidden, "ids": ids}))
        m = wire.recv(pull)
        assert m.kind == "step" and m.fields == {"seq_ids": [0, 1, 2, 3]}
        assert hidden.numel() * 2 == 4 * 1024**2
        assert torch.equal(m.tensors["hidden"].view(torch.int16), hidden.view(torch.int16))
        assert torch.equal(m.tensors["ids"], ids)
        wire.send(push, [b"\x93\x01\x02\x03"])
        with pytest.raises(WireError, match="expected a map"):
            wire.recv(pull)
    finally:
        push.close()
        pull.close()
        ctx.term()
