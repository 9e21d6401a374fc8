"""Token tables at their stored size: int8 rows with scales (int8 stores) or the store's
float dtype, read by rows from the memory map; a tied head kept once."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_llama

from llm_shard.models.base import Part
from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.checkpoint.catalog import resolve
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.checkpoint.store import VERSION, Store, StoreError
from llm_shard.models.quant import Int8Linear, quantize_weight
from llm_shard.models.quant.embedding import RowEmbedding
from llm_shard.models.runner import StageModel

VOCAB, HIDDEN = 65536, 512  # a 32 MiB int8 table, 128 MiB in fp32
TIED = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
UNTIED = dict(TIED, tie_word_embeddings=False)


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of the file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.fixture(scope="module")
def tied_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    hf_llama(vocab_size=VOCAB, hidden_size=HIDDEN, **TIED).save_pretrained(root / "hf")
    hf_llama(vocab_size=VOCAB, hidden_size=HIDDEN, **UNTIED).save_pretrained(root / "untied")
    stores = {dtype: convert(root / "hf", root / dtype, dtype=dtype, progress=False)
              for dtype in ("int8", "fp16", "fp32")}
    stores.update({f"untied-{dtype}": convert(root / "untied", root / f"untied-{dtype}",
                                              dtype=dtype, progress=False)
                   for dtype in ("int8", "fp32")})
    return stores, root / "hf"


@pytest.mark.parametrize("dtype", ["untied-int8", "int8", "fp16"])
def test_embedding_rows_come_from_the_map(tied_stores, dtype):
    """int8 rows (an untied int8 store), fp16 rows (a tied int8 store's, an fp16 store's)."""
    store = tied_stores[0][dtype]
    path = (store.path / "embed.safetensors").resolve()
    embed = store.load(Part("embed"))
    table = embed.embed_tokens
    assert isinstance(table, RowEmbedding)
    assert table.weight.dtype == (torch.int8 if dtype == "untied-int8" else torch.float16)
    size = table.weight.numel() * table.weight.element_size()
    assert size >= 32 << 20
    tokens = torch.tensor([3, 40000, 65535])
    out = embed(tokens, Batch.of([3], [SequenceCache()]))
    assert out.dtype == torch.float32 and out.shape == (3, HIDDEN)
    # the rows looked up, each with the pages the kernel maps around a fault (up to a 2 MiB
    # folio; and the scales'): never the whole table
    assert _mapped_rss(path) < size / 4
    # and they are the stored rows, dequantized
    rows = table.weight[tokens].float()
    if table.scales is not None:
        rows = rows * table.scales[tokens, None]
    torch.testing.assert_close(out, rows, rtol=0, atol=0)


def test_an_int8_stores_table_is_rounded_per_row_or_fp16_under_a_tied_head(tied_stores):
    stores, _ = tied_stores
    ref = stores["untied-fp32"].tensors(Part("embed"))["embed_tokens.weight"]
    int8 = stores["untied-int8"].tensors(Part("embed"))
    q, scales = quantize_weight(ref)
    assert torch.equal(int8["embed_tokens.weight"], q)
    assert torch.equal(int8["embed_tokens.scales"], scales)
    assert stores["untied-int8"].manifest["embedding"]["tables"] == {"embed_tokens": "int8"}
    tied = stores["int8"].tensors(Part("embed"))
    assert set(tied) == {"embed_tokens.weight"}
    assert torch.equal(tied["embed_tokens.weight"],
                       stores["fp32"].tensors(Part("embed"))["embed_tokens.weight"].half())


@pytest.mark.parametrize("dtype", ["int8", "fp32"])
def test_a_tied_head_is_stored_and_held_once(tied_stores, dtype):
    store = tied_stores[0][dtype]
    table = store.part_bytes(Part("embed"))
    assert store.tied == {"lm_head": "embed_tokens"}
    assert store.tied_bytes() == VOCAB * HIDDEN * (2 if dtype == "int8" else 4)
    # head.safetensors holds the final norm only; the head counts the table it reads
    assert store.file_entry(Part("head").file)["bytes"] < 4096
    assert store.part_bytes(Part("head")) == (store.file_entry(Part("head").file)["bytes"]
                                              + store.tied_bytes())
    parts = [Part("embed"), Part("block", 0), Part("block", 1), Part("head")]
    assert store.parts_bytes(parts) == sum(store.part_bytes(p) for p in parts) - \
        store.tied_bytes()
    assert table > store.tied_bytes()
    stage = StageModel(store, 0, store.n_blocks)
    lin = stage.head.lm_head
    assert not isinstance(lin, Int8Linear)  # float rows: fp16 through an int8 screen (int8)
    assert lin.weight.dtype == (torch.float16 if dtype == "int8" else torch.float32)
    # one copy: the embedding reads its rows from the head's layer
    assert stage.embed.embed_tokens.weight.data_ptr() == lin.weight.data_ptr()
    logits = stage(torch.tensor([1, 2, 3]), Batch.of([3], [SequenceCache()]))
    assert logits.shape == (1, VOCAB)


def test_the_table_keeps_its_stored_dtype_through_module_to(tied_stores):
    embed = tied_stores[0]["untied-int8"].load(Part("embed"))
    embed.to(torch.bfloat16)
    assert embed.embed_tokens.weight.dtype == torch.int8
    assert embed.embed_tokens.scales.dtype == torch.float32


def test_a_version_1_store_is_refused_by_path_and_converted_again_in_home(
        tied_stores, tmp_path, monkeypatch):
    _, hf = tied_stores
    monkeypatch.setenv("LLM_SHARD_HOME", str(tmp_path / "home"))
    store = resolve(str(hf), dtype="fp16", progress=False)
    manifest = store.path / "manifest.json"
    old = json.loads(manifest.read_text())
    old["version"] = 1
    manifest.write_text(json.dumps(old))
    with pytest.raises(StoreError, match=f"version 1, this llm-shard reads version {VERSION}"):
        Store.open(store.path)
    again = resolve(str(hf), dtype="fp16", progress=False)
    assert again.path == store.path and again.manifest["version"] == VERSION
