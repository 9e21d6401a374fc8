"""A GGUF's block-quantized weights read back as int8 blocks exactly (models/checkpoint/sources.py),
for every block type int8 can hold; other types are left to per-channel rounding."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llm_shard.models.checkpoint.sources import GGUFFile  # noqa: E402

KINDS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for kind in (*KINDS, "BF16", "F16"):
        w = (rng.standard_normal((24, 256)) * 0.05 + 0.01).astype(np.float32)
        w[3, 40] = 0.9  # an outlier
        w[5, :32] = 0  # a block of zeros: scale 0
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F16":
            writer.add_tensor(f"{kind}.weight", w.astype(np.float16))
        else:
            writer.add_tensor(f"{kind}.weight", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


@pytest.mark.parametrize("kind", KINDS)
def test_block_types_read_back_exactly(gguf_file, kind):
    key = f"{kind}.weight"
    b = gguf_file.blocks(key)
    assert b is not None and b.kind == kind
    assert b.q.dtype == torch.int8 and b.q.shape == (24, 256)
    assert b.scales.dtype == torch.float16 and b.scales.shape == (24, 8)
    assert (b.mins is not None) == kind.endswith("_1")
    w = b.q.view(24, 8, 32).float() * b.scales.float()[..., None]
    if b.mins is not None:
        w = w + b.mins.float()[..., None]
    assert torch.equal(w.view(24, 256), gguf_file.get(key))  # what dequantizing gives, bitwise


@pytest.mark.parametrize("kind", ["BF16", "F16"])
def test_other_types_are_not_blocks(gguf_file, kind):
    assert gguf_file.blocks(f"{kind}.weight") is None


def _write_one(path, value: float) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w.weight", np.full((4, 32), value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_is_parsed_once_while_held_and_unchanged(tmp_path):
    """Opening the same file again, while a reader of it is held, reuses its parse; a file
    rewritten since is read anew; the last holder gone, the parse is freed."""
    path = tmp_path / "one.gguf"
    _write_one(path, 1.0)
    first = GGUFFile(path)
    assert GGUFFile(path).reader is first.reader
    _write_one(path, 2.0)  # the same size
    os.utime(path, ns=(1, 1))  # another modification time, however coarse the clock
    again = GGUFFile(path)
    assert again.reader is not first.reader
    assert torch.equal(again.get("w.weight"), torch.full((4, 32), 2.0))
    gone = [weakref.ref(first.reader), weakref.ref(again.reader)]
    del first, again
    gc.collect()
    assert [r() for r in gone] == [None, None]
