"""Bad inputs to convert and to the store give one clear line that names the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from llm_shard.coordinator.cli import cli
from llm_shard.models.base import Part
from llm_shard.models.checkpoint.convert import ConvertError, convert
from llm_shard.models.checkpoint.store import Store, StoreError

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def hf_folder(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_weights(folder, fn):
    path = folder / "model.safetensors"
    sd = dict(load_file(path))
    fn(sd)
    save_file(sd, path)


def run_cli(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_unknown_key_is_named(hf_folder, tmp_path):
    edit_weights(hf_folder, lambda sd: sd.__setitem__("model.layers.0.extra.weight",
                                                      torch.zeros(3)))
    with pytest.raises(ConvertError, match=r"unknown key 'model\.layers\.0\.extra\.weight' "
                                           r"in model\.safetensors"):
        convert(hf_folder, tmp_path / "s", dtype="fp32", progress=False)


def test_missing_key_is_named(hf_folder, tmp_path):
    edit_weights(hf_folder, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConvertError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj"
                                           r"\.weight' \(block 1\)"):
        convert(hf_folder, tmp_path / "s", dtype="fp32", progress=False)


def test_wrong_shape_is_named(hf_folder, tmp_path):
    edit_weights(hf_folder, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(31)))
    with pytest.raises(ConvertError, match=r"'model\.norm\.weight' in model\.safetensors has "
                                           r"shape \[31\], the config expects \[32\]"):
        convert(hf_folder, tmp_path / "s", dtype="fp32", progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_cli_errors_are_one_line(hf_folder, tmp_path):
    code, out = run_cli("convert", str(tmp_path / "nope"), "-o", str(tmp_path / "s"))
    assert code == 2 and out.strip() == f"error: {tmp_path / 'nope'} does not exist"
    code, out = run_cli("convert", str(hf_folder), "--arch", "bogus", "-o", str(tmp_path / "s"))
    assert code == 2 and "Invalid value for '--arch'" in out and "Traceback" not in out
    (hf_folder / "config.json").write_text("{not json")
    code, out = run_cli("convert", str(hf_folder), "-o", str(tmp_path / "s"))
    assert code == 2 and "config.json is unreadable" in out and len(out.strip().splitlines()) == 1


def test_gguf_rounding_of_a_float_checkpoint_is_refused(hf_folder, tmp_path):
    code, out = run_cli("convert", str(hf_folder), "--rounding", "gguf", "-o",
                        str(tmp_path / "s"))
    assert code == 2 and len(out.strip().splitlines()) == 1
    assert "int8 rounding 'gguf' keeps a GGUF file's blocks" in out
    assert "choose 'nearest' or 'gptq'" in out and not (tmp_path / "s.partial").exists()


def test_cli_convert_and_refuse_overwrite(hf_folder, tmp_path):
    out_dir = str(tmp_path / "s")
    code, out = run_cli("convert", str(hf_folder), "--dtype", "int8", "-o", out_dir)
    assert code == 0, out
    assert "llama, 2 blocks, int8" in out
    code, out = run_cli("convert", str(hf_folder), "-o", out_dir)
    assert code == 2 and "--overwrite" in out
    code, out = run_cli("verify", out_dir)
    assert code == 0 and "OK" in out


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llm_shard.coordinator", "convert",
                           str(tmp_path / "missing"), "-o", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture()
def store(hf_folder, tmp_path):
    return convert(hf_folder, tmp_path / "store", dtype="fp32", progress=False)


def test_truncated_file_is_refused(store):
    path = store.path / Part("block", 1).file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"blocks/001\.safetensors has \d+ bytes, the manifest"):
        Store.open(store.path).load(Part("block", 1))


def test_checksum_mismatch_is_refused(store):
    path = store.path / "head.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"head\.safetensors fails its sha256 check"):
        store.verify()
    code, out = run_cli("verify", str(store.path))
    assert code == 2 and "sha256" in out


def test_store_of_another_version_is_refused(store):
    mf = store.path / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["version"] = 99
    mf.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="store version 99"):
        Store.open(store.path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        Store.open(tmp_path)
