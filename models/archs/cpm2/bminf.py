"""BMInf's own checkpoint format for CPM-2 (`checkpoint.pt` + `vocab.txt` of "cpm2.1-new"),
read as a checkpoint source for `convert` (layout "bminf" in models/archs/cpm2/model.py,
whose ARCH names `open_bminf` as its reader).

The file is no torch file: BMInf's `Layer.dump` writes, per layer, a (n_params,
n_sublayers) header of two uint32, then each parameter (name, shape as a uint8 rank and
uint32 sizes, uint32 byte count, dtype byte 0 = int8 / 1 = fp16, raw bytes), then each
sublayer (name, then the same recursively). The model's sublayers are enc_layers,
dec_layers, ln_enc, ln_dec, input_embedding, output_embedding, position_bias_enc,
position_bias_dec. Nothing is unpickled; tensors are read from a memory map.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from llm_shard.models.checkpoint.sources import Source, SourceError

_BMINF_DTYPES = {0: (torch.int8, 1), 1: (torch.float16, 2)}  # dtype byte -> (dtype, bytes)


def bminf_index(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """name -> (shape, dtype, byte offset) of every parameter of a BMInf checkpoint, with
    sublayer names joined by '.' (enc_layers.0.self_attn.project_q.weight)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
    size = path.stat().st_size

    def read(f, fmt: str):
        n = struct.calcsize(fmt)
        data = f.read(n)
        if len(data) != n:
            raise SourceError(f"{path}: truncated BMInf checkpoint at byte {f.tell()}")
        return struct.unpack(fmt, data)

    def name(f) -> str:
        (n,) = read(f, "<I")
        return f.read(n).decode("utf-8")

    def layer(f, prefix: str, depth: int) -> None:
        if depth > 8:
            raise SourceError(f"{path}: BMInf layers nested too deep: not a checkpoint")
        n_params, n_sub = read(f, "<II")
        for _ in range(n_params):
            key = prefix + name(f)
            (rank,) = read(f, "<B")
            shape = read(f, f"<{rank}I")
            nbytes, code = read(f, "<IB")
            if code not in _BMINF_DTYPES:
                raise SourceError(f"{path}: {key} has unknown dtype byte {code}")
            dtype, width = _BMINF_DTYPES[code]
            if nbytes != math.prod(shape) * width or f.tell() + nbytes > size:
                raise SourceError(f"{path}: {key} of shape {list(shape)} has {nbytes} bytes")
            out[key] = (tuple(shape), dtype, f.tell())
            f.seek(nbytes, 1)
        for _ in range(n_sub):
            layer(f, prefix + name(f) + ".", depth + 1)

    with open(path, "rb") as f:
        layer(f, "", 0)
        if f.tell() != size:
            raise SourceError(f"{path}: {size - f.tell()} bytes after the BMInf checkpoint")
    return out


class BMInfFile(Source):
    """BMInf's CPM-2 `checkpoint.pt` (no torch file) with its `vocab.txt` beside it. Linear
    weights are int8 [out, in] with a per-row fp16 `scale`: they are presented dequantized
    (weight * scale), so an int8 store rounds them back to the same integers and scales
    (rounding "nearest"; GPTQ would re-round integers that are already final)."""

    layout, arch = "bminf", "cpm2"
    int8_source = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index = bminf_index(path)
        scales = {k for k in self._index
                  if k.endswith(".scale") and k[: -len("scale")] + "weight" in self._index}
        self._where = {k: path.name for k in self._index if k not in scales}
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    @staticmethod
    def recognise(path: Path) -> bool:
        """A BMInf checkpoint starts with the model's header: no parameters, 8 sublayers
        (T5Model: enc_layers, dec_layers, ln_enc, ln_dec, two embeddings, two biases)."""
        with open(path, "rb") as f:
            return f.read(8) == struct.pack("<II", 0, 8)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key][0]

    def _raw(self, key: str) -> torch.Tensor:
        shape, dtype, offset = self._index[key]
        n = math.prod(shape) * (1 if dtype == torch.int8 else 2)
        data = np.array(self._map[offset: offset + n])  # a copy: the map is read-only
        return torch.from_numpy(data).view(dtype).reshape(shape)

    def get(self, key: str) -> torch.Tensor:
        t = self._raw(key)
        scale = key[: -len("weight")] + "scale"
        if t.dtype == torch.int8 and scale in self._index:
            return t.float() * self._raw(scale).float()[:, None]
        return t

    def config(self, arch: str) -> dict:
        vocab = self.path.parent / "vocab.txt"
        if not vocab.is_file():
            raise SourceError(f"{self.path}: BMInf's checkpoint records no token ids; put its "
                              f"vocab.txt beside it (the decoder starts from <s>)")
        from llm_shard.models.archs.cpm2.tokenizer import START, read_vocab

        pieces = read_vocab(vocab.read_text(encoding="utf-8"))
        if START not in pieces:
            raise SourceError(f"{vocab} has no {START} (CPM-2's decoder start token)")
        return config_from_bminf({k: self.shape(k) for k in self._index}, pieces.index(START))


def open_bminf(path: Path) -> BMInfFile | None:
    """BMInf's checkpoint at `path`, or None when the file is not one (`Arch.reader`)."""
    return BMInfFile(path) if BMInfFile.recognise(path) else None


def config_from_bminf(shapes: dict[str, tuple], start_id: int) -> dict:
    """Sizes from the tensors; max distance and eps are BMInf's T5Configuration's."""
    vocab, d_model = shapes["input_embedding.weight"]
    heads, buckets = shapes["position_bias_enc.weight"]

    def count(stack: str) -> int:
        return 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith(stack + "."))

    return {"vocab_size": vocab, "d_model": d_model, "num_heads": heads,
            "d_kv": shapes["enc_layers.0.self_attn.project_q.weight"][0] // heads,
            "d_ff": shapes["enc_layers.0.ff.linear_in.weight"][0],
            "num_layers": count("enc_layers"), "num_decoder_layers": count("dec_layers"),
            "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
            "decoder_start_token_id": start_id}
