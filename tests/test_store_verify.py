"""sha256 checks of store files on load (models/checkpoint/verify.py), recorded like git's
stat cache: a fresh convert or a fetched file is not hashed again, a copied or changed file
is hashed once, a corrupt one is refused by name, and a read-only store is still checked.
Each Store.open starts from the sidecar's records alone, as a new process does."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from llm_shard.cluster.transfer import StoreServer, fetch
from llm_shard.models.base import Part, parts_of
from llm_shard.models.checkpoint import store as store_mod
from llm_shard.models.checkpoint import verify as verify_mod
from llm_shard.models.checkpoint.convert import convert
from llm_shard.models.checkpoint.store import VERIFIED, Store, StoreError, record_verified

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    path = tmp_path_factory.mktemp("hf") / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture()
def store(hf_folder, tmp_path):
    return convert(hf_folder, tmp_path / "store", dtype="fp32", progress=False)


@pytest.fixture()
def hashed(monkeypatch):
    """The paths verify.sha256_file is called on, in order."""
    calls: list[Path] = []
    real = verify_mod.sha256_file

    def spy(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verify_mod, "sha256_file", spy)
    return calls


def load_all(path: Path) -> None:
    s = Store.open(path)
    for part in parts_of(s.n_blocks):
        s.load(part)


def names(store: Store) -> list[str]:
    return [f["name"] for f in store.manifest["files"]]


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    """Change one byte in the middle of the file, in place (same size, same inode)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:  # what a careless tool could do; the ctime still changes
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_a_fresh_convert_loads_without_hashing(store, hashed):
    records = json.loads((store.path / VERIFIED).read_text())["files"]
    assert sorted(records) == sorted(names(store))
    for f in store.manifest["files"]:
        assert records[f["name"]]["sha256"] == f["sha256"]
    assert VERIFIED not in names(store)  # the sidecar is no file of the store
    load_all(store.path)  # a new Store: the sidecar alone says the files are checked
    assert hashed == []


def test_a_corrupt_copy_is_refused_by_name(store, tmp_path, hashed):
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)  # the sidecar comes along; its records do not match
    flip_byte(copy / "blocks/001.safetensors")
    s = Store.open(copy)
    with pytest.raises(StoreError, match=r"blocks/001\.safetensors fails its sha256 check.*"
                                         r"corrupt or was changed.*llm-shard convert"):
        s.load(Part("block", 1))
    s.load(Part("block", 0))  # the other files are fine
    with pytest.raises(StoreError, match=r"blocks/001\.safetensors"):  # refused every time
        Store.open(copy).load(Part("block", 1))
    hashed.clear()
    load_all(store.path)  # the original is untouched and recorded
    assert hashed == []


def test_a_file_changed_in_place_is_refused_even_with_its_old_mtime(store):
    flip_byte(store.path / "head.safetensors", keep_mtime=True)
    with pytest.raises(StoreError, match=r"head\.safetensors fails its sha256 check"):
        Store.open(store.path).load(Part("head"))


def test_an_intact_copy_is_hashed_once(store, tmp_path, hashed, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    with caplog.at_level(logging.INFO, logger=verify_mod.log.name):
        load_all(copy)
    assert Counter(p.relative_to(copy).as_posix() for p in hashed) == \
        Counter(names(store))
    assert any(r.getMessage().startswith("verifying ") and "bytes of" in r.getMessage()
               for r in caplog.records)
    records = json.loads((copy / VERIFIED).read_text())["files"]
    assert sorted(records) == sorted(names(store))
    hashed.clear()
    load_all(copy)  # another Store (or process) reads the sidecar
    assert hashed == []
    Store.open(copy).verify()  # on demand: every file, whatever the records say
    assert len(hashed) == len(names(store))


def test_a_read_only_store_is_still_checked(store, tmp_path, hashed, monkeypatch, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    flip_byte(copy / "blocks/000.safetensors")
    sidecar = (copy / VERIFIED).read_bytes()
    paths = [copy, *copy.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:  # root writes anyway: refuse as a read-only filesystem would
        real_open = open

        def read_only_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and Path(file).is_relative_to(copy):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(verify_mod, "open", read_only_open, raising=False)
    try:
        with caplog.at_level(logging.WARNING, logger=verify_mod.log.name):
            s = Store.open(copy)
            s.load(Part("embed"))
            s.load(Part("head"))
            with pytest.raises(StoreError, match=r"blocks/000\.safetensors fails its sha256"):
                s.load(Part("block", 0))
            s.load(Part("block", 1))
        warnings = [r for r in caplog.records if "cannot record sha256 checks" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert (copy / VERIFIED).read_bytes() == sidecar
        assert not list(copy.glob(f"{VERIFIED}.*.tmp"))
        checked = ["embed.safetensors", "head.safetensors", "blocks/000.safetensors",
                   "blocks/001.safetensors"]
        assert [p.relative_to(copy).as_posix() for p in hashed] == checked
        hashed.clear()  # another Store checks again, and refuses the corrupt file again
        with pytest.raises(StoreError, match=r"blocks/000\.safetensors"):
            Store.open(copy).load(Part("block", 0))
        Store.open(copy).load(Part("block", 1))
        assert len(hashed) == 2
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_fetched_files_are_recorded(store, tmp_path, hashed):
    dest = tmp_path / "node" / "store"
    with StoreServer(store.path) as server:
        fetch(dest, server.address, ["embed.safetensors", "blocks/000.safetensors"],
              verified=record_verified)
        records = json.loads((dest / VERIFIED).read_text())["files"]
        assert sorted(records) == ["blocks/000.safetensors", "embed.safetensors"]
        fetch(dest, server.address, verified=record_verified)
    hashed.clear()
    load_all(dest)
    assert hashed == []  # checked once, as it arrived
    records = json.loads((dest / VERIFIED).read_text())["files"]
    assert sorted(records) == sorted(names(store))


def test_concurrent_records_merge(store, monkeypatch):
    """Workers loading parts of one store record at once: no record is lost (a slow read
    of the sidecar widens the window that an unlocked read-modify-write would lose in)."""
    files = {f["name"]: f["sha256"] for f in store.manifest["files"]}
    (store.path / VERIFIED).unlink()
    read = verify_mod._records

    def slow_read(root):
        time.sleep(0.01)
        return read(root)

    monkeypatch.setattr(verify_mod, "_records", slow_read)
    errors, start = [], threading.Barrier(len(files))

    def record(name):
        try:
            start.wait()
            assert record_verified(store.path, {name: files[name]})
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=record, args=(n,)) for n in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(json.loads((store.path / VERIFIED).read_text())["files"]) == sorted(files)


def test_the_command_lines_dtype_names_are_the_stores():
    """The CLI offers models/errors.DTYPE_NAMES (no torch); the store maps the same names."""
    from llm_shard.models.errors import DTYPE_NAMES

    assert tuple(store_mod.DTYPES) == DTYPE_NAMES


@pytest.mark.parametrize("name", ["../../secret.json", "ABSOLUTE", "out.json"])
def test_a_manifests_tokenizer_path_stays_inside_the_store(tmp_path, name):
    """`..`, an absolute path and a link that leads out: a StoreError naming the path,
    before any tokenizer file is read."""
    from types import SimpleNamespace

    (tmp_path / "secret.json").write_text("{}")
    root = tmp_path / "store"
    (root / "tokenizer").mkdir(parents=True)
    os.symlink(tmp_path / "secret.json", root / "tokenizer" / "out.json")
    name = str(tmp_path / "secret.json") if name == "ABSOLUTE" else name
    spec = {"kind": "bpe", "file": name, "bos_id": None, "eos_ids": [0], "add_bos": False,
            "chat_template": None}
    fake = SimpleNamespace(path=root, manifest={"tokenizer": spec})
    with pytest.raises(StoreError, match=f"tokenizer file '{re.escape(name)}' is not inside"):
        Store.tokenizer(fake)
