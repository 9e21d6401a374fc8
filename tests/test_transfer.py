"""Store files from node to node (cluster/transfer.py): the server and `fetch` on loopback
(resume after a cut-off, corrupt chunks and files fetched again, paths outside the store
refused), then two Ray nodes whose stores are separate folders, one empty, running
SmolLM2 with the same greedy tokens as one process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import zmq

from llm_shard.cluster.transfer import (
    MANIFEST,
    TRANSFER_VERSION,
    StoreServer,
    TransferError,
    fetch,
    local_store_path,
)

CHUNK = 64 * 1024


def make_store(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """A folder with random files and a manifest listing them, as models/checkpoint/store.py
    writes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    data, files = {}, []
    for name, size in sizes.items():
        data[name] = rng.randbytes(size)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data[name])
        files.append({"name": name, "bytes": size,
                      "sha256": hashlib.sha256(data[name]).hexdigest()})
    (root / MANIFEST).write_text(json.dumps({"format": "llm-shard-store", "version": 1,
                                             "files": files}))
    return data


SIZES = {"embed.safetensors": 300_000, "blocks/000.safetensors": 1_000_000,
         "blocks/001.safetensors": 1_000_003, "head.safetensors": 0}


@pytest.fixture
def store(tmp_path):
    data = make_store(tmp_path / "src", SIZES)
    return tmp_path / "src", data


def test_fetch_takes_exactly_the_files_asked_for(store, tmp_path):
    src, data = store
    dest = tmp_path / "node" / "model"
    with StoreServer(src) as server:
        stats = fetch(dest, server.address, ["blocks/001.safetensors", "head.safetensors"],
                      chunk_bytes=CHUNK)
        assert stats.files == ["blocks/001.safetensors", "head.safetensors"]
        assert stats.bytes == SIZES["blocks/001.safetensors"]
        assert (dest / MANIFEST).read_bytes() == (src / MANIFEST).read_bytes()
        assert (dest / "blocks/001.safetensors").read_bytes() == data["blocks/001.safetensors"]
        assert (dest / "head.safetensors").read_bytes() == b""
        assert not (dest / "blocks/000.safetensors").exists()
        assert not (dest / "embed.safetensors").exists()
        assert not list(dest.rglob("*.partial"))
        # present files are not fetched again: one manifest request, no chunks
        before = server.requests
        again = fetch(dest, server.address, ["blocks/001.safetensors"])
        assert again.files == [] and server.requests == before + 1
        # None: every file of the manifest
        rest = fetch(dest, server.address)
        assert sorted(rest.files) == ["blocks/000.safetensors", "embed.safetensors"]
    for name, content in data.items():
        assert (dest / name).read_bytes() == content


def test_checked_files_go_to_the_verified_callback(store, tmp_path):
    """The files whose sha256 a fetch checked, fetched ones and kept ones alike, are handed
    to `verified` (a worker passes the store's record_verified); nothing else is."""
    src, data = store
    dest = tmp_path / "node"
    seen = []
    with StoreServer(src) as server:
        fetch(dest, server.address, ["embed.safetensors"], verified=lambda *a: seen.append(a))
        sha = hashlib.sha256(data["embed.safetensors"]).hexdigest()
        assert seen == [(dest, {"embed.safetensors": sha})]
        seen.clear()
        fetch(dest, server.address, ["embed.safetensors"], verified=lambda *a: seen.append(a))
        assert seen == []  # present and the same manifest: nothing checked
        (dest / MANIFEST).write_text("{}")  # another version of the store's manifest
        fetch(dest, server.address, ["embed.safetensors"], verified=lambda *a: seen.append(a))
        assert seen == [(dest, {"embed.safetensors": sha})]  # checked again, and kept


def test_transfer_knows_no_models():
    """cluster/transfer.py is pure transport: importing it loads nothing of llm_shard.models
    (a fetch reports what it checked through its `verified` callback)."""
    code = ("import sys, llm_shard.cluster.transfer; "
            "print(sorted(m for m in sys.modules if m.startswith('llm_shard.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_fetch_the_disk_has_no_room_for_is_refused_before_writing(store, tmp_path,
                                                                    monkeypatch):
    """The free space is checked first: a full disk is a clear error naming the bytes
    missing, not an ENOSPC half-way through a block. (The free figure is patched: no test
    fills a real disk.)"""
    from llm_shard.cluster import transfer

    src, _ = store
    dest = tmp_path / "node" / "model"
    real = shutil.disk_usage
    need = SIZES["embed.safetensors"] + SIZES["blocks/000.safetensors"]
    monkeypatch.setattr(transfer.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=need - 1))
    with StoreServer(src) as server:
        with pytest.raises(TransferError, match=r"not enough disk .* 2 files need 1\.2 MiB"):
            fetch(dest, server.address, ["embed.safetensors", "blocks/000.safetensors"])
        assert not list(dest.rglob("*.safetensors*"))  # nothing written
        monkeypatch.setattr(transfer.shutil, "disk_usage",
                            lambda p: real(p)._replace(free=need))
        assert len(fetch(dest, server.address,
                         ["embed.safetensors", "blocks/000.safetensors"]).files) == 2


def test_an_interrupted_transfer_resumes_from_its_partial_file(store, tmp_path, caplog):
    """The server goes away halfway through a file; the fetch gives up (keeping the
    .partial); a fetch from a new server continues where it stopped."""
    src, data = store
    name, total = "blocks/000.safetensors", SIZES["blocks/000.safetensors"]
    dest = tmp_path / "node"
    server = StoreServer(src)
    address = server.address

    closed = []

    def cut(file, done, size):
        if done >= size // 2 and not closed:
            closed.append(done)
            server.close()

    with pytest.raises(TransferError, match="could not fetch blocks/000"):
        fetch(dest, address, [name], chunk_bytes=CHUNK, window=2, timeout=0.5, attempts=2,
              progress=cut)
    partial = dest / "blocks/000.safetensors.partial"
    kept = partial.stat().st_size
    assert total // 2 <= kept < total
    assert partial.read_bytes() == data[name][:kept]  # a prefix of the file
    assert not (dest / name).exists()
    seen = []
    with caplog.at_level("INFO", logger="llm_shard.transfer"), \
            StoreServer(src, host="127.0.0.1", port=int(address.rsplit(":", 1)[1])) as again:
        stats = fetch(dest, again.address, [name], chunk_bytes=CHUNK,
                      progress=lambda f, d, t: seen.append(d))
        assert again.bytes_sent == len((src / MANIFEST).read_bytes()) + total - kept
    assert stats.bytes == total - kept and seen[0] == kept + CHUNK
    assert (dest / name).read_bytes() == data[name] and not partial.exists()
    assert f"resuming at {kept} of {total} bytes" in caplog.text
    assert "fetched 1 files" in caplog.text


def test_a_corrupt_chunk_fails_the_checksum_and_the_file_is_fetched_again(store, tmp_path):
    src, data = store
    name = "blocks/001.safetensors"
    with StoreServer(src) as server:
        answer, spoiled = server._answer, []

        def corrupt_once(request):
            reply = answer(request)
            if reply.file == name and reply.offset == 3 * CHUNK and not spoiled:
                spoiled.append(True)
                reply = replace(reply, data=bytes([reply.data[0] ^ 0xFF]) + reply.data[1:])
            return reply

        server._answer = corrupt_once
        stats = fetch(tmp_path / "node", server.address, [name], chunk_bytes=CHUNK)
    assert spoiled and stats.refetched == [name]
    assert stats.bytes == 2 * SIZES[name]
    assert (tmp_path / "node" / name).read_bytes() == data[name]


def test_a_corrupt_partial_file_is_not_trusted(store, tmp_path):
    src, data = store
    name = "embed.safetensors"
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / f"{name}.partial").write_bytes(b"\0" * 1000)  # not its prefix
    with StoreServer(src) as server:
        stats = fetch(tmp_path / "node", server.address, [name], chunk_bytes=CHUNK)
    assert stats.refetched == [name]
    assert (tmp_path / "node" / name).read_bytes() == data[name]


def test_a_file_corrupt_at_the_source_is_never_used(store, tmp_path):
    src, _ = store
    name = "blocks/000.safetensors"
    raw = bytearray((src / name).read_bytes())
    raw[12345] ^= 1
    (src / name).write_bytes(raw)
    with StoreServer(src) as server, pytest.raises(TransferError, match="in 3 tries"):
        fetch(tmp_path / "node", server.address, [name], chunk_bytes=CHUNK)
    assert not (tmp_path / "node" / name).exists()


def test_a_short_file_at_the_source_is_an_error_not_a_hang(store, tmp_path):
    src, _ = store
    name = "blocks/000.safetensors"
    (src / name).write_bytes((src / name).read_bytes()[:500_000])
    with StoreServer(src) as server, pytest.raises(TransferError, match="shorter"):
        fetch(tmp_path / "node", server.address, [name], chunk_bytes=CHUNK, timeout=5)


def _ask(address: str, request: dict) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(msgpack.packb(request))
        assert sock.poll(5000)
        header, data = sock.recv_multipart()
        return {**msgpack.unpackb(header), "data": data}
    finally:
        sock.close()
        ctx.term()


def test_no_path_outside_the_store_is_served(tmp_path):
    (tmp_path / "secret").write_bytes(b"not yours")
    src = tmp_path / "store"
    make_store(src, {"blocks/000.safetensors": 10})
    os.symlink(tmp_path / "secret", src / "link")
    mf = json.loads((src / MANIFEST).read_text())
    sha = hashlib.sha256(b"not yours").hexdigest()
    # a manifest that itself names files outside the store: refused too
    mf["files"] += [{"name": "../secret", "bytes": 9, "sha256": sha},
                    {"name": "link", "bytes": 9, "sha256": sha},
                    {"name": str(tmp_path / "secret"), "bytes": 9, "sha256": sha}]
    (src / MANIFEST).write_text(json.dumps(mf))
    with StoreServer(src) as server:
        assert set(server.files) == {"blocks/000.safetensors"}
        for name in ("../secret", "link", str(tmp_path / "secret"),
                     "blocks/../../secret", "blocks/../blocks/000.safetensors", MANIFEST):
            got = _ask(server.address, {"v": TRANSFER_VERSION, "op": "chunk", "file": name,
                                        "offset": 0, "size": 9})
            assert not got["ok"] and "not a file of this store" in got["error"]
            assert got["data"] == b""
        bad = [{"v": 99, "op": "manifest"}, {"v": TRANSFER_VERSION, "op": "list"},
               {"v": TRANSFER_VERSION, "op": "chunk", "file": "blocks/000.safetensors",
                "offset": -1, "size": 9},
               {"v": TRANSFER_VERSION, "op": "chunk", "file": "blocks/000.safetensors",
                "offset": 0, "size": 2**40}]
        for request in bad:
            assert not _ask(server.address, request)["ok"]
        ok = _ask(server.address, {"v": TRANSFER_VERSION, "op": "chunk",
                                   "file": "blocks/000.safetensors", "offset": 0, "size": 9})
        assert ok["ok"] and len(ok["data"]) == 9  # and it still serves
        # the client refuses such names from a server's manifest too, writing nothing
        dest = tmp_path / "node" / "store"
        for name in ("../secret", str(tmp_path / "secret")):
            with pytest.raises(TransferError, match="not a relative path inside"):
                fetch(dest, server.address, [name])
    assert not (tmp_path / "node" / "secret").exists()


def test_a_changed_manifest_replaces_stale_files_and_keeps_the_same_ones(tmp_path):
    old = make_store(tmp_path / "node", SIZES, seed=1)
    new = make_store(tmp_path / "src", SIZES, seed=2)
    # embed unchanged between the two versions: kept; block 0 same size, other bytes
    shutil.copy(tmp_path / "node" / "embed.safetensors", tmp_path / "src" / "embed.safetensors")
    mf = json.loads((tmp_path / "src" / MANIFEST).read_text())
    for e in mf["files"]:
        if e["name"] == "embed.safetensors":
            e["sha256"] = hashlib.sha256(old["embed.safetensors"]).hexdigest()
    (tmp_path / "src" / MANIFEST).write_text(json.dumps(mf))
    with StoreServer(tmp_path / "src") as server:
        stats = fetch(tmp_path / "node", server.address, ["embed.safetensors"])
        assert stats.files == []
        # block 0 of the old version was deleted when the new manifest came in
        assert not (tmp_path / "node" / "blocks/000.safetensors").exists()
        stats = fetch(tmp_path / "node", server.address, ["blocks/000.safetensors"])
        assert stats.files == ["blocks/000.safetensors"]
    got = tmp_path / "node" / "blocks/000.safetensors"
    assert got.read_bytes() == new["blocks/000.safetensors"]


def test_fetches_into_one_folder_take_turns(store, tmp_path):
    src, data = store
    errors, stats = [], []
    with StoreServer(src) as server:
        def one():
            try:
                stats.append(fetch(tmp_path / "node", server.address, chunk_bytes=CHUNK))
            except Exception as e:  # noqa: BLE001 - reported by the assert below
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert sum(s.bytes for s in stats) == sum(SIZES.values())  # each file fetched once
    for name, content in data.items():
        assert (tmp_path / "node" / name).read_bytes() == content


def test_an_absent_server_is_a_clear_error(tmp_path):
    with pytest.raises(TransferError, match="cannot fetch the manifest"):
        fetch(tmp_path / "node", "tcp://127.0.0.1:9", timeout=0.3)


def test_where_a_node_keeps_its_copy(tmp_path):
    home = tmp_path / "home"
    assert local_store_path(home / "m", home, home) == home / "m"
    assert local_store_path(home / "m", None, tmp_path / "other") == home / "m"
    assert local_store_path(home / "a/m", home, tmp_path / "b") == tmp_path / "b/a/m"
    elsewhere = local_store_path("/data/x/m", home, tmp_path / "b")
    assert elsewhere.parent == tmp_path / "b" and elsewhere.name.startswith("m-")
    assert local_store_path("/data/y/m", home, tmp_path / "b") != elsewhere
    assert local_store_path("/data/x/m", home, tmp_path / "b") == elsewhere


def test_loopback_throughput(tmp_path, capsys):
    """Not a speed limit: prints MB/s for the record (~64 MB, default chunks and window)."""
    src = tmp_path / "src"
    make_store(src, {"blocks/000.safetensors": 64 * 2**20})
    with StoreServer(src) as server:
        t0 = time.perf_counter()
        stats = fetch(tmp_path / "node", server.address)
        seconds = time.perf_counter() - t0
    assert stats.bytes == 64 * 2**20
    with capsys.disabled():
        print(f"\nstore transfer on loopback: {stats.bytes / 1e6 / seconds:.0f} MB/s "
              f"(64 MiB, sha256 included)")


# ---------------------------------------------------------------------- on Ray
@pytest.mark.slow
def test_a_node_with_an_empty_store_fetches_what_it_runs(ray_cluster, smollm2_stores, tmp_path):
    """Two Ray nodes whose store roots ($LLM_SHARD_HOME) are separate folders: one holds a
    copy of the store, one is empty. The empty one's worker fetches the manifest, block 0
    (calibration) and its stage's files from the coordinator, nothing else, and the split
    model gives the unsplit model's greedy tokens."""
    import ray

    from llm_shard import LLM, SamplingParams
    from llm_shard.models.checkpoint.store import VERIFIED, VERIFIED_LOCK
    from llm_shard.models.runner import LocalModel

    store = smollm2_stores["fp32"]
    prompts = ["The capital of France is", "def fibonacci(n):"]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    tok, local = store.tokenizer(), LocalModel(store)
    reference = [local.greedy(tok.encode(p), greedy.max_tokens, tok.eos_ids) for p in prompts]
    del local
    from llm_shard.models.checkpoint.catalog import home

    full, empty = tmp_path / "home-a", tmp_path / "home-b"
    copy = local_store_path(store.path, home(), full)  # where node a looks for it
    shutil.copytree(store.path, copy)
    empty.mkdir()
    nodes = [ray_cluster.add_node(num_cpus=1, env_vars={"LLM_SHARD_HOME": str(home)})
             for home in (full, empty)]
    try:
        ray_cluster.wait_for_nodes()
        with LLM(str(store.path), workers=[f"ram=1GiB,node={n.node_id}" for n in nodes],
                 use_all_workers=True, wire_dtype="fp32", cache_tokens=512) as model:
            outs = model.generate(prompts, greedy)
            stats = [ray.get(w.actor.stats.remote()) for w in model.pipeline.workers]
            stage = {s.worker: s for s in model.plan.stages}[1]
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)
    assert [o.token_ids for o in outs] == reference
    assert stats[0]["store_path"] == str(copy)
    assert stats[0]["fetched"] == []
    got = local_store_path(store.path, home(), empty)
    assert stats[1]["store_path"] == str(got)
    want = {f"blocks/{i:03d}.safetensors" for i in {0, *range(stage.start, stage.end)}}
    want |= {"embed.safetensors"} if stage.start == 0 else set()
    if stage.end == store.n_blocks:  # a tied head (SmolLM2) reads the embedding's file
        want |= {"head.safetensors"} | ({"embed.safetensors"} if store.tied else set())
    fetched = [f for s in stats[1]["fetched"] for f in s["files"]]
    assert sorted(fetched) == sorted(want)
    on_disk = {str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()}
    assert on_disk - {".llm-shard-fetch.lock", VERIFIED_LOCK} == want | {MANIFEST, VERIFIED}
    assert sorted(json.loads((got / VERIFIED).read_text())["files"]) == sorted(want)
    for name in want:
        assert (got / name).read_bytes() == (store.path / name).read_bytes()


def test_a_link_swapped_into_the_store_after_start_is_refused(tmp_path):
    """A file replaced by a symlink (to a file outside) once the server runs is refused
    (O_NOFOLLOW), not followed; the other files are still served."""
    (tmp_path / "secret").write_bytes(b"not yours")
    src = tmp_path / "store"
    make_store(src, {"a.safetensors": 9, "b.safetensors": 9})
    with StoreServer(src) as server:
        (src / "a.safetensors").unlink()
        os.symlink(tmp_path / "secret", src / "a.safetensors")
        got = _ask(server.address, {"v": TRANSFER_VERSION, "op": "chunk",
                                    "file": "a.safetensors", "offset": 0, "size": 9})
        assert not got["ok"] and "read failed" in got["error"] and got["data"] == b""
        ok = _ask(server.address, {"v": TRANSFER_VERSION, "op": "chunk",
                                   "file": "b.safetensors", "offset": 0, "size": 9})
        assert ok["ok"] and len(ok["data"]) == 9


_SERVE = """
import sys, time
from llm_shard.cluster.transfer import StoreServer
server = StoreServer(sys.argv[1])
print(server.address, flush=True)
sys.stdin.read()  # until the test closes our stdin
print(server.dropped, flush=True)
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_peer_that_asks_and_never_reads_holds_a_bounded_memory(tmp_path):
    """40 requests for the largest chunk from a raw peer that reads nothing: the server
    (its own process) grows by at most its per-peer queue of chunks, dropping the rest."""
    from llm_shard.cluster.messages import MAX_CHUNK_BYTES
    from llm_shard.cluster.transfer import SERVER_QUEUE

    src = tmp_path / "store"
    make_store(src, {"big.safetensors": 2 * MAX_CHUNK_BYTES})
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(src)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    try:
        address = proc.stdout.readline().strip()
        before = _rss(proc.pid)
        peer.setsockopt(zmq.LINGER, 0)
        peer.setsockopt(zmq.RCVHWM, 1)
        peer.setsockopt(zmq.RCVBUF, 4096)
        peer.connect(address)
        for k in range(40):
            peer.send(msgpack.packb({"v": TRANSFER_VERSION, "op": "chunk",
                                     "file": "big.safetensors",
                                     "offset": (k % 2) * MAX_CHUNK_BYTES,
                                     "size": MAX_CHUNK_BYTES}))
        peak = before
        for _ in range(30):  # 3 s: the server answers (or drops) every request
            time.sleep(0.1)
            peak = max(peak, _rss(proc.pid))
        assert peak - before < (SERVER_QUEUE + 4) * MAX_CHUNK_BYTES
        proc.stdin.close()
        assert int(proc.stdout.readline()) > 0  # it dropped what the peer did not read
    finally:
        peer.close()
        ctx.term()
        proc.kill()
        proc.wait()


def test_a_frame_over_a_requests_size_is_dropped_unread(store):
    """ZMQ_MAXMSGSIZE on the server: a peer's frame larger than any request closes that
    peer's connection, unanswered; others are served."""
    src, _ = store
    with StoreServer(src) as server:
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(server.address)
        try:
            rogue.send(bytes(1 << 20))
            assert not rogue.poll(1000)
        finally:
            rogue.close()
            ctx.term()
        assert server.requests == 0
        got = _ask(server.address, {"v": TRANSFER_VERSION, "op": "manifest"})
        assert got["ok"] and server.requests == 1
