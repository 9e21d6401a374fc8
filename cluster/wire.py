"""The wire between coordinator and workers; the only code that packs or unpacks it.

A pipeline message (cluster/messages.py: Step, Result, Free, Error) is a ZeroMQ
multipart message `[header, frame 0, frame 1, ...]`. The header is a msgpack map with
exactly these keys, in this order:

    {"v": WIRE_VERSION,                 # refused when it differs
     "kind": "step",                    # the message's KIND
     "fields": {...},                   # every field but its tensors: all required
     "tensors": [{"name": "hidden", "dtype": "bfloat16", "shape": [4, 576]}, ...]}

and frame i holds the raw little-endian bytes of tensors[i], C order, nothing else.
Tensors go out zero-copy (a buffer over the tensor's own memory) and come back
zero-copy (`torch.frombuffer` over the received frame). `decode` checks the envelope,
the kind, that the fields are exactly the kind's, and builds its dataclass, which
validates every value. Store transfer (cluster/transfer.py) has its own two frames:
a request `{"v": TRANSFER_VERSION, "op": ...}`, a reply `[{"v", "ok", ...}, data]`.
Anything malformed raises `WireError`, naming what is wrong, and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq

from .messages import (
    MAX_STEP_ROWS,
    ChunkRequest,
    Error,
    FileData,
    Free,
    ManifestRequest,
    PipelineMessage,
    Refusal,
    Result,
    Step,
    TransferReply,
    TransferRequest,
)
from .types import SamplingParams

__all__ = [
    "WIRE_VERSION", "TRANSFER_VERSION", "MAX_HEADER_BYTES", "MAX_FRAME_BYTES",
    "DEFAULT_ACTIVATION_DTYPE", "DTYPES", "WireError", "Envelope", "pack", "unpack",
    "encode", "decode", "send", "recv", "encode_request", "decode_request", "encode_reply",
    "decode_reply", "activation_dtype", "to_wire", "from_wire", "MAX_STEP_ROWS",
    "max_step_bytes", "limit_frames",
]

# 2: typed messages, a step's `threads`; 3: Free.everything; 4: a step's `reuse`
WIRE_VERSION = 4
TRANSFER_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024**2  # default limits; decode/encode/recv take others
MAX_FRAME_BYTES = 1024**3
_MAX_DIMS = 32

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_KEYS = ("v", "kind", "fields", "tensors")
_TENSOR_KEYS = {"name", "dtype", "shape"}

DEFAULT_ACTIVATION_DTYPE = torch.bfloat16
_ACTIVATION_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


class WireError(ValueError):
    """A message that is not, or cannot be, in this module's format."""


@dataclass
class Envelope:
    """An unpacked message, before its kind's fields are read. `tensors` share memory with
    the received frames: treat them as read-only (clone before writing in place)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = WIRE_VERSION


def pack(
    kind: str,
    fields: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> list[bytes | memoryview]:
    """Pack a message. Tensor frames are views over the tensors' memory (a CUDA or
    non-contiguous tensor is first copied to a contiguous CPU one), so the tensors must
    not be written in place until ZeroMQ has sent them."""
    if not isinstance(kind, str) or not kind:
        raise WireError(f"kind must be a non-empty string, got {kind!r}")
    fields = {} if fields is None else fields
    if not isinstance(fields, dict):
        raise WireError(f"fields must be a dict, got {type(fields).__name__}")
    descs, frames = [], []
    for name, t in (tensors or {}).items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WireError(
                f"tensors must map str to torch.Tensor, got {name!r}: {type(t).__name__}"
            )
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise WireError(f"tensor {name!r} has dtype {t.dtype}; the wire carries {list(DTYPES)}")
        if t.device.type != "cpu" or t.requires_grad or not t.is_contiguous():
            t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.itemsize
        if nbytes > max_frame_bytes:
            raise WireError(f"tensor {name!r} is {nbytes} bytes, over "
                            f"the {max_frame_bytes}-byte frame limit")
        descs.append({"name": name, "dtype": dtype, "shape": list(t.shape)})
        frames.append(_bytes_of(t))
    header_map = {"v": WIRE_VERSION, "kind": kind, "fields": fields, "tensors": descs}
    try:
        header = msgpack.packb(header_map, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"fields of {kind!r} message are not msgpack-able: {e}; "
                        "send tensors in `tensors=` and dataclasses as .to_dict()") from e
    if len(header) > max_header_bytes:
        raise WireError(f"header of {kind!r} message is {len(header)} bytes, over the "
                        f"{max_header_bytes}-byte limit")
    return [header, *frames]


def unpack(
    frames: list[Any],
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> Envelope:
    """Unpack `[header, frame...]` (bytes, bytearray, memoryview or zmq.Frame).

    Raises WireError, naming what is wrong, for any input that is not a valid message.
    """
    if not isinstance(frames, (list, tuple)):
        raise WireError(f"expected a list of frames, got {type(frames).__name__}")
    if not frames:
        raise WireError("empty message: expected [header, tensor frames...]")
    header_buf = _buffer(frames[0], "header")
    if header_buf.nbytes > max_header_bytes:
        raise WireError(f"header is {header_buf.nbytes} bytes, over the "
                        f"{max_header_bytes}-byte limit")
    header = _unpack_header(header_buf)
    descs = header["tensors"]
    if len(descs) != len(frames) - 1:
        raise WireError(f"header describes {len(descs)} tensor frames but the message "
                        f"has {len(frames) - 1} (truncated or mixed-up message)")
    tensors: dict[str, torch.Tensor] = {}
    for i, desc in enumerate(descs):
        name, dtype, shape = _check_desc(i, desc, tensors)
        tensors[name] = _tensor(name, dtype, shape, _buffer(frames[i + 1], f"frame of {name!r}"),
                                max_frame_bytes)
    return Envelope(kind=header["kind"], fields=header["fields"], tensors=tensors,
                    version=header["v"])


def _buffer(frame: Any, what: str) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its bytes as .buffer
    try:
        if isinstance(buf, str):
            raise TypeError("str")
        mv = memoryview(buf)
    except TypeError:
        raise WireError(f"{what} is a {type(frame).__name__}, expected bytes") from None
    if mv.format == "B" and mv.ndim == 1:
        return mv
    if not mv.c_contiguous:
        raise WireError(f"{what} is not a contiguous buffer")
    try:
        return mv.cast("B")
    except (TypeError, ValueError) as e:
        raise WireError(f"{what} cannot be read as bytes: {e}") from None


def _unpack_header(buf: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # msgpack raises several types on garbage, all mean the same
        raise WireError(f"header is not valid msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise WireError(f"header is a msgpack {type(header).__name__}, expected a map")
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise WireError(f"header has no wire version 'v' (got {version!r})")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version}, expected {WIRE_VERSION}: coordinator and "
                        "worker run different llm-shard versions")
    missing = [k for k in _HEADER_KEYS if k not in header]
    unknown = [k for k in header if k not in _HEADER_KEYS]
    if missing or unknown:
        raise WireError(f"header keys wrong: missing {missing}, unknown {unknown!r}")
    if not isinstance(header["kind"], str) or not header["kind"]:
        raise WireError(f"header 'kind' must be a non-empty string, got {header['kind']!r}")
    if not isinstance(header["fields"], dict):
        raise WireError(f"header 'fields' must be a map, got {type(header['fields']).__name__}")
    if not isinstance(header["tensors"], list):
        raise WireError(f"header 'tensors' must be a list, got "
                        f"{type(header['tensors']).__name__}")
    return header


def _check_desc(i: int, desc: Any, seen: dict) -> tuple[str, torch.dtype, list[int]]:
    if not isinstance(desc, dict) or set(desc) != _TENSOR_KEYS:
        raise WireError(f"tensor {i} must be a map with keys {sorted(_TENSOR_KEYS)}, got {desc!r}")
    name, dtype, shape = desc["name"], desc["dtype"], desc["shape"]
    if not isinstance(name, str) or name in seen:
        raise WireError(f"tensor {i} name {name!r} is not a string or is repeated")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"tensor {name!r} has unknown dtype {dtype!r}; expected one of "
                        f"{list(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise WireError(f"tensor {name!r} has bad shape {shape!r}; expected a list of at "
                        f"most {_MAX_DIMS} sizes >= 0")
    return name, DTYPES[dtype], shape


def _tensor(name: str, dtype: torch.dtype, shape: list[int], buf: memoryview,
            max_frame_bytes: int) -> torch.Tensor:
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    # Zero-size dims aside, the sizes must fit the limit too: [0, 2**62, 2**62] is "empty"
    # but overflows torch's stride arithmetic.
    spread = math.prod(max(d, 1) for d in shape) * itemsize
    if max(spread, buf.nbytes) > max_frame_bytes:
        raise WireError(f"tensor {name!r} is {max(spread, buf.nbytes)} bytes, over the "
                        f"{max_frame_bytes}-byte frame limit")
    if buf.nbytes != expected:
        raise WireError(f"tensor {name!r} frame has {buf.nbytes} bytes, but shape {shape} "
                        f"of {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        if bool((_frombuffer(buf, torch.uint8) > 1).any()):
            raise WireError(f"tensor {name!r} is bool but has bytes other than 0 and 1")
    flat = _frombuffer(buf, dtype)
    if flat.data_ptr() % itemsize:  # tiny zmq frames live inline and may be unaligned
        flat = _frombuffer(memoryview(bytearray(buf)), dtype)  # (malloc'd: aligned)
    return flat.view(shape)


def _frombuffer(buf: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over buf's bytes, no copy (one torch op: a received step's path runs with
    caches cold from the weights streamed before it, where each op costs tens of us)."""
    if buf.readonly:
        # bytes frames (tests, copy=True receives) are read-only; the tensor is
        # documented read-only, so torch's once-per-process warning says nothing new.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(buf, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, no copy. numpy has no bfloat16: every dtype is
    reinterpreted as bytes, 1-D so that 0-d works too."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------- pipeline messages
_KINDS: dict[str, type] = {cls.KIND: cls for cls in (Step, Result, Free, Error)}
# per kind: its fields in order, those sent in the header, and the tensors that must be there
_ORDER = {k: tuple(f.name for f in dataclasses.fields(c)) for k, c in _KINDS.items()}
_FIELDS = {k: frozenset(_ORDER[k]) - set(c.TENSORS) for k, c in _KINDS.items()}
_NEEDED = {k: [f.name for f in dataclasses.fields(c)
               if f.name in c.TENSORS and f.default is dataclasses.MISSING]
           for k, c in _KINDS.items()}


def _plain(v: Any) -> Any:
    """A field's value as msgpack packs it: SamplingParams as their dict."""
    if isinstance(v, SamplingParams):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def encode(msg: PipelineMessage, **limits: int) -> list[bytes | memoryview]:
    """Pack a Step, Result, Free or Error (`limits`: pack's max_header_bytes and
    max_frame_bytes). Its tensors go out zero-copy, as `pack` says."""
    cls = type(msg)
    kind = getattr(cls, "KIND", None)
    if _KINDS.get(kind) is not cls:
        raise WireError(f"{cls.__name__} is not a pipeline message; expected one of "
                        f"{[c.__name__ for c in _KINDS.values()]}")
    fields, tensors = {}, {}
    for name in _ORDER[kind]:
        v = getattr(msg, name)
        if name in cls.TENSORS:
            if v is not None:
                tensors[name] = v
        else:
            fields[name] = _plain(v) if type(v) is dict and v else v
    return pack(kind, fields, tensors, **limits)


def decode(frames: list[Any], **limits: int) -> PipelineMessage:
    """Unpack and validate a pipeline message: WireError names the field that is wrong."""
    env = unpack(frames, **limits)
    cls = _KINDS.get(env.kind)
    if cls is None:
        raise WireError(f"unknown message kind {env.kind!r}; expected one of {list(_KINDS)}")
    want = _FIELDS[env.kind]
    if env.fields.keys() != want:
        missing = sorted(want - env.fields.keys())
        unknown = sorted(map(repr, env.fields.keys() - want))
        raise WireError(f"{env.kind} message fields wrong: missing {missing}, unknown "
                        f"[{', '.join(unknown)}]")
    stray = sorted(env.tensors.keys() - set(cls.TENSORS))
    absent = [t for t in _NEEDED[env.kind] if t not in env.tensors]
    if stray or absent:
        raise WireError(f"{env.kind} message tensors wrong: missing {absent}, unknown {stray}")
    try:
        return cls(**env.fields, **env.tensors)
    except (ValueError, TypeError) as e:
        raise WireError(f"{env.kind} message: {e}") from None


def send(socket: Any, msg: PipelineMessage) -> None:
    """Encode a message and send it on a ZeroMQ socket without copying its tensors' bytes."""
    socket.send_multipart(encode(msg), copy=False)


def recv(socket: Any, **limits: int) -> PipelineMessage:
    """Receive and decode one message; `limits` are unpack's max_header_bytes/max_frame_bytes."""
    return decode(socket.recv_multipart(copy=False), **limits)


# ---------------------------------------------------------------------- store transfer
def encode_request(req: TransferRequest) -> bytes:
    """A store-transfer request's one frame."""
    if not isinstance(req, (ManifestRequest, ChunkRequest)):
        raise WireError(f"{type(req).__name__} is not a store-transfer request")
    return msgpack.packb({"v": TRANSFER_VERSION, "op": req.OP, **dataclasses.asdict(req)})


def decode_request(frames: list[Any]) -> TransferRequest:
    """A store-transfer request from its frames (bytes or zmq.Frame)."""
    if len(frames) != 1:
        raise WireError(f"a request is one header frame, got {len(frames)} frames")
    header = _transfer_header(frames[0], "request")
    op = header.pop("op", None)
    cls = {ManifestRequest.OP: ManifestRequest, ChunkRequest.OP: ChunkRequest}.get(op)
    if cls is None:
        raise WireError(f"unknown request op {op!r}")
    return _build(cls, header, f"{op} request")


def encode_reply(reply: TransferReply) -> list[bytes | memoryview]:
    """A store-transfer reply's two frames: header and data (empty for a refusal)."""
    if isinstance(reply, FileData):
        return [msgpack.packb({"v": TRANSFER_VERSION, "ok": True, "op": reply.op,
                               "file": reply.file, "offset": reply.offset}), reply.data]
    if isinstance(reply, Refusal):
        return [msgpack.packb({"v": TRANSFER_VERSION, "ok": False, "error": reply.error}), b""]
    raise WireError(f"{type(reply).__name__} is not a store-transfer reply")


def decode_reply(frames: list[Any]) -> TransferReply:
    """A store-transfer reply from its frames; FileData.data is a view of the data frame."""
    if len(frames) != 2:
        raise WireError(f"a reply is a header and a data frame, got {len(frames)} frames")
    header = _transfer_header(frames[0], "reply")
    ok = header.pop("ok", None)
    if ok is False:
        return _build(Refusal, header, "refusal")
    if ok is not True:
        raise WireError(f"reply 'ok' must be true or false, got {ok!r}")
    return _build(FileData, {**header, "data": _buffer(frames[1], "reply data")}, "reply")


def _transfer_header(frame: Any, what: str) -> dict:
    try:
        header = msgpack.unpackb(_buffer(frame, what), raw=False)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types on garbage, all mean the same
        raise WireError(f"{what} is not msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.pop("v", None) != TRANSFER_VERSION:
        raise WireError(f"{what} is not a version {TRANSFER_VERSION} map: the two nodes run "
                        "different llm-shard versions")
    return header


def _build(cls: type, fields: dict, what: str) -> Any:
    want = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = sorted(want - fields.keys()), sorted(map(repr, fields.keys() - want))
    if missing or unknown:
        raise WireError(f"{what} fields wrong: missing {missing}, unknown [{', '.join(unknown)}]")
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise WireError(f"{what}: {e}") from None


def max_step_bytes(hidden_size: int) -> int:
    """The largest frame of a legal pipeline message of a model with `hidden_size`: a
    MAX_STEP_ROWS step's fp32 activations, or the largest header."""
    return max(MAX_HEADER_BYTES, MAX_STEP_ROWS * hidden_size * 4)


def limit_frames(sock: Any, max_bytes: int) -> Any:
    """Make `sock` (before bind or connect) drop any peer that sends a frame over
    `max_bytes`, before reading it into memory (and before a CURVE handshake)."""
    sock.setsockopt(zmq.MAXMSGSIZE, int(max_bytes))
    return sock


def activation_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16'/'bfloat16', 'fp16'/'float16'/'half', 'fp32'/'float32'/'float' → torch dtype."""
    if isinstance(name, torch.dtype) and name in _ACTIVATION_DTYPES.values():
        return name
    dtype = _ACTIVATION_DTYPES.get(name.lower()) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"activation dtype {name!r} is not one of {list(_ACTIVATION_DTYPES)}")
    return dtype


def to_wire(hidden: torch.Tensor, dtype: torch.dtype = DEFAULT_ACTIVATION_DTYPE) -> torch.Tensor:
    """Cast floating activations to the wire dtype (bf16 halves the bytes of fp32)."""
    return hidden.to(activation_dtype(dtype)) if hidden.is_floating_point() else hidden


def from_wire(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast received activations to the stage's compute dtype (a copy, so writable)."""
    return hidden.to(dtype, copy=True)
