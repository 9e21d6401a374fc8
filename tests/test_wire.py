"""cluster.wire: round trips, the pinned header format, malformed input and a real socket;
every message kind of cluster/messages.py round-trips, and a bad field is a WireError
naming it."""

import random

import msgpack
import pytest
import torch
import zmq

from llm_shard.cluster import wire
from llm_shard.cluster.messages import (
    MAX_CHUNK_BYTES,
    ChunkRequest,
    Error,
    FileData,
    Free,
    ManifestRequest,
    Refusal,
    Result,
    Step,
)
from llm_shard.cluster.types import SamplingParams
from llm_shard.cluster.wire import (
    DEFAULT_ACTIVATION_DTYPE,
    DTYPES,
    WIRE_VERSION,
    Envelope,
    WireError,
    pack,
    unpack,
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
    frames = pack("step", {"positions": [0, 1]}, {"x": t})
    for received in (frames, as_bytes(frames), [bytearray(f) for f in frames]):
        m = unpack(received)
        out = m.tensors["x"]
        assert out.dtype == dtype and out.shape == t.shape
        assert torch.equal(bits(out), bits(t))
        assert m.kind == "step" and m.fields == {"positions": [0, 1]} and m.version == WIRE_VERSION


def test_bfloat16_is_bit_exact_including_specials():
    raw = torch.tensor([0, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xC2F7],
                       dtype=torch.int32).to(torch.int16)
    t = raw.view(torch.bfloat16)  # ±0, ±inf, a NaN payload, a subnormal, 1.0, -123.5
    out = unpack(as_bytes(pack("step", {}, {"h": t}))).tensors["h"]
    assert out.dtype == torch.bfloat16 and torch.equal(out.view(torch.int16), raw)


def test_non_contiguous_and_offset_views():
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    views = {"t": base.t(), "strided": base[::2, 1::3], "offset": base[3:, 2:5], "row": base[4]}
    m = unpack(as_bytes(pack("step", {}, views)))
    for name, v in views.items():
        assert torch.equal(m.tensors[name], v) and m.tensors[name].is_contiguous()


def test_encode_is_zero_copy_and_decode_shares_the_frame():
    t = torch.arange(1024, dtype=torch.float32)
    frames = pack("step", {}, {"x": t})
    assert isinstance(frames[1], memoryview)
    t[0] = 42.0  # the frame is a view over t's memory
    assert torch.frombuffer(bytearray(frames[1]), dtype=torch.float32)[0] == 42.0
    received = [frames[0], bytearray(frames[1])]
    out = unpack(received).tensors["x"]
    received[1][:4] = torch.tensor([7.0]).numpy().tobytes()
    assert out[0] == 7.0  # the tensor is a view over the received frame


@pytest.mark.parametrize("readonly", [False, True])
def test_unaligned_frames_are_copied_to_aligned_tensors(readonly):
    # small zmq frames live inline in the message and may start at any address
    tensors = {"ids": torch.tensor([5, -6, 7]), "x": torch.randn(2, 3).bfloat16(),
               "f": torch.randn(5), "mask": torch.tensor([True, False, True])}
    frames = pack("step", {}, tensors)
    received = [frames[0]]
    for f in frames[1:]:
        buf = memoryview(bytearray(len(f) + 1))[1:]  # one byte past malloc's alignment
        buf[:] = f
        received.append(buf.toreadonly() if readonly else buf)
    out = unpack(received).tensors
    for name, t in tensors.items():
        assert torch.equal(out[name], t) and out[name].data_ptr() % t.itemsize == 0


def test_several_tensors_keep_order_and_fields_nest():
    params = SamplingParams(max_tokens=4, temperature=0, stop=["\n"])
    tensors = {"hidden": torch.randn(2, 3).bfloat16(), "ids": torch.tensor([5, 6]),
               "mask": torch.tensor([True, False])}
    fields = {"seq_ids": [3, 9], "sampling": [params.to_dict()], "kind": "not the header's",
              "nested": {"a": None, "b": b"\x00raw", "c": 1.5}, 7: "int keys survive"}
    m = unpack(as_bytes(pack("result", fields, tensors)))
    assert list(m.tensors) == ["hidden", "ids", "mask"]
    assert m.kind == "result" and m.fields == fields
    assert SamplingParams.from_dict(m.fields["sampling"][0]) == params
    assert unpack(pack("ping")) == Envelope(kind="ping")


def test_pinned_header_format():
    """A change to this format must bump WIRE_VERSION and update this test."""
    frames = pack("step", {"seq_ids": [1, 2], "positions": [5, 0]},
                    {"hidden": torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16),
                     "ids": torch.tensor([3], dtype=torch.int32)})
    assert msgpack.unpackb(frames[0]) == {
        "v": 4,
        "kind": "step",
        "fields": {"seq_ids": [1, 2], "positions": [5, 0]},
        "tensors": [
            {"name": "hidden", "dtype": "bfloat16", "shape": [1, 2]},
            {"name": "ids", "dtype": "int32", "shape": [1]},
        ],
    }
    assert frames[0] == bytes.fromhex(
        "84a17604a46b696e64a473746570a66669656c647382a77365715f696473"
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
        ([header(v=3), X], "wire version 3, expected 4: coordinator and worker run different "
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
        unpack(frames)


def test_size_limits_are_configurable():
    frames = as_bytes(pack("step", {"pad": "x" * 100}, {"x": torch.zeros(64)}))
    unpack(frames)
    with pytest.raises(WireError, match="header is .* bytes, over the 50-byte limit"):
        unpack(frames, max_header_bytes=50)
    with pytest.raises(WireError, match="over the 100-byte frame limit"):
        unpack(frames, max_frame_bytes=100)
    with pytest.raises(WireError, match="over the 100-byte frame limit"):
        pack("step", {}, {"x": torch.zeros(64)}, max_frame_bytes=100)
    with pytest.raises(WireError, match="over the 50-byte limit"):
        pack("step", {"pad": "x" * 100}, max_header_bytes=50)


def test_encode_errors():
    with pytest.raises(WireError, match="kind must be"):
        pack("", {})
    with pytest.raises(WireError, match="not msgpack-able"):
        pack("step", {"t": torch.zeros(1)})
    with pytest.raises(WireError, match="not msgpack-able"):
        pack("step", {"p": SamplingParams()})
    with pytest.raises(WireError, match="dtype torch.complex64"):
        pack("step", {}, {"x": torch.zeros(1, dtype=torch.complex64)})
    with pytest.raises(WireError, match="map str to torch.Tensor"):
        pack("step", {}, {"x": [1.0]})
    with pytest.raises(WireError, match="list of frames"):
        unpack(b"\x84")


def test_fuzz_decode_raises_only_wire_error():
    rng = random.Random(1234)
    good = as_bytes(pack("step", {"seq_ids": [1, 2], "s": SamplingParams().to_dict()},
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
            unpack(frames)
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
    back = wire.from_wire(unpack(as_bytes(pack("step", {}, {"h": sent}))).tensors["h"],
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
        hidden = torch.randn(4 * 512, 1024).bfloat16()  # 4 MiB: 4 prompts of 512 rows
        ids = torch.arange(4 * 512, dtype=torch.int64)
        wire.send(push, Step(3, 1, [0, 1, 2, 3], [512] * 4, [7] * 4, ids, hidden=hidden))
        m = wire.recv(pull)
        assert isinstance(m, Step) and (m.epoch, m.mb, m.seqs) == (3, 1, (0, 1, 2, 3))
        assert hidden.numel() * 2 == 4 * 1024**2
        assert torch.equal(m.hidden.view(torch.int16), hidden.view(torch.int16))
        assert torch.equal(m.tokens, ids)
        push.send_multipart([b"\x93\x01\x02\x03"])
        with pytest.raises(WireError, match="expected a map"):
            wire.recv(pull)
    finally:
        push.close()
        pull.close()
        ctx.term()


# ---------------------------------------------------------------------- typed messages
GREEDY = SamplingParams(max_tokens=4, temperature=0, stop=["\n"])


def full_step(**changes):
    """A later stage's step with every field set: 2 sequences of 2 and 1 rows."""
    kw = dict(epoch=3, mb=1, seqs=[7, 9], lens=[2, 1], steps=[0, 5],
              tokens=torch.tensor([11, 12, 13]), hidden=torch.randn(3, 8).bfloat16(),
              reset=[7], params={7: GREEDY}, free=[4], reuse={7: [3, 16]},
              threads={0: 2, 15: 1},
              rejected={8: "cache full"}, prefixes={7: [2, 1]}, stage_ms=[1.5],
              busy_ms=[1.75])
    kw.update(changes)
    return Step(**kw)


RESULT = Result(3, 1, [7, 9], [42, 43], [-0.5, None], [[(42, -0.5), (3, -1.25)], None],
                rejected={8: "cache full"}, stage_ms=[1.5, 2.0], busy_ms=[1.75, 2.5])
FREE = Free(3, [7, 9])
ERROR = Error(3, 1, "StageError: no cache", (15, 30))


def fields_of(msg):
    return {k: v for k, v in vars(msg).items() if k not in ("tokens", "hidden")}


def test_every_message_kind_round_trips():
    step = full_step()
    got = wire.decode(as_bytes(wire.encode(step)))
    assert isinstance(got, Step) and fields_of(got) == fields_of(step)
    assert got.params == {7: GREEDY} and got.prefixes == {7: (2, 1)}
    assert got.reuse == {7: (3, 16)}
    assert torch.equal(got.tokens, step.tokens) and torch.equal(bits(got.hidden), bits(step.hidden))
    first = full_step(hidden=None)
    assert wire.decode(wire.encode(first)).hidden is None
    for msg in (RESULT, FREE, ERROR):
        assert wire.decode(as_bytes(wire.encode(msg))) == msg


def test_pinned_step_header():
    """A typed step's header: every field by name, in its dataclass's order; a change must
    bump WIRE_VERSION and update this test."""
    step = Step(0, 1, [5], [2], [0], torch.tensor([3, 4]), reset=[5], reuse={5: (2, 16)},
                threads={0: 2})
    frames = wire.encode(step)
    assert msgpack.unpackb(frames[0], strict_map_key=False) == {
        "v": 4, "kind": "step",
        "fields": {"epoch": 0, "mb": 1, "seqs": [5], "lens": [2], "steps": [0], "reset": [5],
                   "params": {}, "free": [], "reuse": {5: [2, 16]}, "threads": {0: 2},
                   "rejected": {},
                   "prefixes": {}, "stage_ms": [], "busy_ms": []},
        "tensors": [{"name": "tokens", "dtype": "int64", "shape": [2]}],
    }
    assert frames[0] == bytes.fromhex(
        "84a17604a46b696e64a473746570a66669656c64738ea565706f636800a26d6201a47365"
        "71739105a46c656e739102a573746570739100a572657365749105a6706172616d7380a4"
        "6672656590a572657573658105920210a774687265616473810002a872656a6563746564"
        "80a8707265666978657380a873746167655f6d7390a7627573795f6d7390a774656e736f"
        "72739183a46e616d65a6746f6b656e73a56474797065a5696e743634a573686170659102"
    )
    assert bytes(frames[1]) == bytes.fromhex("0300000000000000" "0400000000000000")


def reheader(msg, **changes):
    """msg's frames with its header's fields changed (a value of ... deletes the field)."""
    frames = as_bytes(wire.encode(msg))
    header = msgpack.unpackb(frames[0], strict_map_key=False)
    for k, v in changes.items():
        if v is ...:
            del header["fields"][k]
        else:
            header["fields"][k] = v
    return [msgpack.packb(header), *frames[1:]]


@pytest.mark.parametrize("msg, changes, match", [
    (full_step(), {"threads": ...}, r"fields wrong: missing \['threads'\]"),
    (full_step(), {"extra": 1}, r"unknown \['extra'\]"),
    (full_step(), {"epoch": -1}, "epoch must be an integer >= 0, got -1"),
    (full_step(), {"mb": "1"}, "mb must be an integer >= 0, got '1'"),
    (full_step(), {"seqs": [7, 7]}, "seqs names a sequence twice"),
    (full_step(), {"seqs": 7}, "seqs must be a list, got int"),
    (full_step(), {"lens": [2, 0], "steps": [0, 5]}, r"lens\[1\] must be an integer >= 1"),
    (full_step(), {"lens": [3]}, "seqs, lens, steps must be as long as each other"),
    (full_step(), {"steps": [0, True]}, r"steps\[1\] must be an integer >= 0, got True"),
    (full_step(), {"reset": [-7]}, r"reset\[0\] must be an integer"),
    (full_step(), {"free": None}, "free must be a list"),
    (full_step(), {"params": {7: {"temperature": -1}}},
     r"params\[7\]: temperature must be >= 0"),
    (full_step(), {"params": {7: {"nope": 1}}}, r"params\[7\]: SamplingParams: unknown keys"),
    (full_step(), {"threads": {0: 0}}, r"threads\[0\] must be an integer >= 1, got 0"),
    (full_step(), {"threads": {"0": 2}}, "threads key must be an integer >= 0, got '0'"),
    (full_step(), {"threads": [2]}, "threads must be a map, got list"),
    (full_step(), {"rejected": {8: ""}}, r"rejected\[8\] must be a non-empty string"),
    (full_step(), {"prefixes": {7: [2]}}, r"prefixes\[7\] must be 2 integers"),
    (full_step(), {"reuse": {7: [3]}}, r"reuse\[7\] must be 2 integers"),
    (full_step(), {"reuse": {9: [3, 16]}}, r"reuse\[9\] must start a sequence of `reset`"),
    (full_step(), {"reuse": {7: [9, 16]}}, r"reuse\[7\] must start .* neither in the step"),
    (full_step(), {"reuse": {7: [4, 16]}}, r"reuse\[7\] must start .* nor freed by it"),
    (full_step(), {"reuse": {7: [3, 0]}}, r"reuse\[7\] must start .* at least 1 row"),
    (full_step(), {"stage_ms": [-1.0]}, r"stage_ms\[0\] must be a finite number >= 0"),
    (full_step(), {"busy_ms": [float("inf")]}, r"busy_ms\[0\] must be a finite number"),
    (full_step(), {"lens": [2, 2]}, r"tokens must be int64 of shape \(4,\)"),
    (RESULT, {"sampled": [42]}, "seqs, sampled, logprobs, top must be as long"),
    (RESULT, {"sampled": [42, -1]}, r"sampled\[1\] must be an integer >= 0"),
    (RESULT, {"logprobs": ["x", None]}, r"logprobs\[0\] must be a number"),
    (RESULT, {"top": [[[42]], None]}, r"top\[0\]\[0\] must be a \[token, logprob\] pair"),
    (RESULT, {"top": [[[42, "x"]], None]}, r"top\[0\]\[0\] logprob must be a number"),
    (RESULT, {"mb": ...}, r"fields wrong: missing \['mb'\]"),
    (FREE, {"seqs": ["7"]}, r"seqs\[0\] must be an integer"),
    (FREE, {"epoch": None}, "epoch must be an integer"),
    (FREE, {"everything": 1}, "everything must be true or false"),
    (ERROR, {"blocks": [30, 15]}, r"blocks must be a range \[start, end\), got \[30, 15\]"),
    (ERROR, {"blocks": [1, 2, 3]}, "blocks must be 2 integers"),
    (ERROR, {"error": ""}, "error must be a non-empty string"),
], ids=lambda v: v.KIND if hasattr(v, "KIND") else None)
def test_a_bad_field_is_a_wire_error_naming_it(msg, changes, match):
    with pytest.raises(WireError, match=f"^{msg.KIND} message.*{match}"):
        wire.decode(reheader(msg, **changes))


@pytest.mark.parametrize("tensors, match", [
    ({"hidden": torch.zeros(3, 8)}, r"tensors wrong: missing \['tokens'\]"),
    ({"tokens": torch.tensor([1, 2, 3]), "x": torch.zeros(1)}, r"unknown \['x'\]"),
    ({"tokens": torch.tensor([1.0, 2.0, 3.0])}, "tokens must be int64 of shape"),
    ({"tokens": torch.tensor([[1, 2, 3]])}, r"got torch.int64 of shape \(1, 3\)"),
    ({"tokens": torch.tensor([1, 2, 3]), "hidden": torch.zeros(2, 8)},
     r"hidden must be floating, of shape \(3, hidden size\), got torch.float32 of shape"),
    ({"tokens": torch.tensor([1, 2, 3]), "hidden": torch.zeros(3, 8, dtype=torch.int32)},
     "hidden must be floating"),
])
def test_a_step_with_bad_tensors_is_a_wire_error(tensors, match):
    header = msgpack.unpackb(as_bytes(wire.encode(full_step()))[0], strict_map_key=False)
    with pytest.raises(WireError, match=f"^step message.*{match}"):
        wire.decode(pack("step", header["fields"], tensors))


def test_unknown_kinds_and_non_messages_are_refused():
    with pytest.raises(WireError, match="unknown message kind 'ping'; expected one of"):
        wire.decode(pack("ping"))
    with pytest.raises(WireError, match="Envelope is not a pipeline message"):
        wire.encode(Envelope("step"))
    with pytest.raises(ValueError, match="lens"):  # built wrong in-process: no message at all
        Step(0, 0, [1], [0], [0], torch.tensor([], dtype=torch.long))


def test_fuzz_typed_decode_raises_only_wire_error():
    rng = random.Random(99)
    good = as_bytes(wire.encode(full_step()))
    junk = [None, -1, 0, 2**63, "x", [], {}, [1, -2], 1.5, b"\xff", [[]], {0: 0}, {"a": [1]}]
    names = list(msgpack.unpackb(good[0], strict_map_key=False)["fields"])
    n_ok = 0
    for _ in range(500):
        header = msgpack.unpackb(good[0], strict_map_key=False)
        for _ in range(rng.randrange(1, 3)):
            header["fields"][rng.choice(names)] = rng.choice(junk)
        try:
            wire.decode([msgpack.packb(header), *good[1:]])
            n_ok += 1
        except WireError:
            pass
    assert n_ok < 500


# ---------------------------------------------------------------------- store transfer
def test_transfer_requests_and_replies_round_trip_in_their_format():
    assert msgpack.unpackb(wire.encode_request(ManifestRequest())) == {"v": 1, "op": "manifest"}
    chunk = ChunkRequest("blocks/000.safetensors", 4096, 512)
    raw = wire.encode_request(chunk)
    assert msgpack.unpackb(raw) == {"v": 1, "op": "chunk", "file": "blocks/000.safetensors",
                                    "offset": 4096, "size": 512}
    assert wire.decode_request([raw]) == chunk
    assert wire.decode_request([wire.encode_request(ManifestRequest())]) == ManifestRequest()
    data = FileData("chunk", "embed.safetensors", 8, b"\x00\x01")
    frames = wire.encode_reply(data)
    assert msgpack.unpackb(frames[0]) == {"v": 1, "ok": True, "op": "chunk",
                                          "file": "embed.safetensors", "offset": 8}
    got = wire.decode_reply(frames)
    assert (got.op, got.file, got.offset, bytes(got.data)) == ("chunk", "embed.safetensors", 8,
                                                                b"\x00\x01")
    refusal = wire.encode_reply(Refusal("not a file of this store"))
    assert msgpack.unpackb(refusal[0]) == {"v": 1, "ok": False,
                                           "error": "not a file of this store"}
    assert refusal[1] == b"" and wire.decode_reply(refusal) == Refusal("not a file of this store")


def req(**fields):
    return [msgpack.packb({"v": 1, "op": "chunk", "file": "a", "offset": 0, "size": 1,
                           **fields})]


@pytest.mark.parametrize("frames, match", [
    (req(v=99), "not a version 1 map: the two nodes run different llm-shard versions"),
    ([msgpack.packb([1])], "not a version 1 map"),
    ([b"\xc1"], "request is not msgpack"),
    (req(op="list"), "unknown request op 'list'"),
    (req(offset=-1), "chunk request: offset must be an integer >= 0, got -1"),
    (req(size=0), r"size must be an integer in \[1, "),
    (req(size=MAX_CHUNK_BYTES + 1), r"size must be an integer in \[1, 8388608\]"),
    (req(file=""), "file must be a non-empty string"),
    (req(file=7), "file must be a non-empty string, got 7"),
    (req(extra=1), r"chunk request fields wrong: missing \[\], unknown \['extra'\]"),
    ([msgpack.packb({"v": 1, "op": "chunk"})], r"missing \['file', 'offset', 'size'\]"),
    ([msgpack.packb({"v": 1, "op": "manifest", "file": "x"})], r"unknown \['file'\]"),
    (req() * 2, "a request is one header frame, got 2 frames"),
])
def test_bad_transfer_requests_are_wire_errors(frames, match):
    with pytest.raises(WireError, match=match):
        wire.decode_request(frames)


def reply(data=b"", **fields):
    return [msgpack.packb({"v": 1, "ok": True, "op": "chunk", "file": "a", "offset": 0,
                           **fields}), data]


@pytest.mark.parametrize("frames, match", [
    (reply()[:1], "a reply is a header and a data frame, got 1 frames"),
    (reply(ok="yes"), "reply 'ok' must be true or false, got 'yes'"),
    (reply(op="list"), "reply: op must be 'manifest' or 'chunk', got 'list'"),
    (reply(offset=None), "reply: offset must be an integer"),
    ([msgpack.packb({"v": 1, "ok": False}), b""], r"refusal fields wrong: missing \['error'\]"),
    ([msgpack.packb({"v": 1, "ok": False, "error": 5}), b""], "error must be a non-empty"),
    (reply(data="text"), "reply data is a str, expected bytes"),
])
def test_bad_transfer_replies_are_wire_errors(frames, match):
    with pytest.raises(WireError, match=match):
        wire.decode_reply(frames)
