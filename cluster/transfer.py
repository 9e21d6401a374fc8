"""Store files from node to node: a node whose local store lacks files pulls exactly those
from a node that has them (the coordinator's, by default) over ZeroMQ.

`StoreServer` serves one store: a ROUTER socket on a thread answers a request for the
manifest, or for a chunk of a file the manifest lists, and nothing else (no path outside
the store, whatever the request or the manifest says). `fetch` is the client: a DEALER
socket that keeps a bounded window of chunk requests in flight, appends the chunks to
`<file>.partial`, checks the whole file's sha256 against the manifest and only then
renames it into place. An interrupted transfer keeps its .partial and continues from its
size the next time; a file that fails its checksum is deleted and fetched again, never
used.

Requests and replies are cluster/messages.py's ManifestRequest, ChunkRequest, FileData
and Refusal, packed by cluster/wire.py. Pure transport: no Ray, no models; a store is a
folder with a `manifest.json` whose `files` list `{name, bytes, sha256}`. A fetch hands
each file whose sha256 it checked to its `verified` callback (a worker passes the store's
`record_verified`, so loading the file hashes it no more).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from . import wire
from .links import Guard, LinkKeys
from .links import client as curve_client
from .messages import MAX_CHUNK_BYTES, ChunkRequest, FileData, ManifestRequest, Refusal
from .wire import TRANSFER_VERSION, WireError

__all__ = ["TRANSFER_VERSION", "CHUNK_BYTES", "WINDOW", "MANIFEST", "TransferError",
           "StoreSource", "StoreServer", "FetchStats", "fetch", "local_store_path",
           "log_to_stderr"]

log = logging.getLogger("llm_shard.transfer")

MANIFEST = "manifest.json"
CHUNK_BYTES = 4 * 2**20  # bytes per chunk message
WINDOW = 8  # chunk requests in flight per client: bounds memory and queueing at the server
# Replies the server queues for one peer (ZMQ_SNDHWM): a fetch never has more in flight; a
# peer that asks and never reads gets no more (the rest are dropped), so it holds at most
# SERVER_QUEUE * MAX_CHUNK_BYTES of the server's memory.
SERVER_QUEUE = 2 * WINDOW  # the writer sees reads in batches of half its HWM
TIMEOUT = 30.0  # seconds without a reply before a fetch reconnects and resumes
ATTEMPTS = 3  # tries per file (a timeout or a failed checksum costs one)
LOG_EVERY = 5.0  # seconds between progress lines of one file
_POLL_MS = 100
_LOCK = ".llm-shard-fetch.lock"
_REQUEST_BYTES = 64 * 1024  # a request's one frame is far smaller; a reply's header too


class TransferError(RuntimeError):
    """A store file that could not be fetched intact, or a request a server refuses."""


def _sha256(path: Path, limit: int | None = None, h=None):
    h = h or hashlib.sha256()
    left = limit if limit is not None else -1
    with open(path, "rb") as f:
        while left:
            chunk = f.read(1 << 22 if left < 0 else min(1 << 22, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk) if left > 0 else 0
    return h


def _inside(root: Path, name: str) -> Path:
    """root/name, refusing any name that would lead outside root (absolute, .., links)."""
    if (not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name)
            or ".." in Path(name).parts):
        raise TransferError(f"file name {name!r} is not a relative path inside the store")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):  # a link that leads out
        raise TransferError(f"file name {name!r} leads outside the store {root}")
    return path


def _entries(manifest_bytes: bytes, where: str) -> dict[str, dict]:
    """{name: {name, bytes, sha256}} of a manifest's files; TransferError if malformed."""
    try:
        manifest = json.loads(manifest_bytes)
        entries = {e["name"]: e for e in manifest["files"]}
        for e in entries.values():
            if not (isinstance(e["bytes"], int) and e["bytes"] >= 0
                    and isinstance(e["sha256"], str)):
                raise TypeError(f"entry {e!r}")
    except (ValueError, TypeError, KeyError) as e:
        raise TransferError(f"{where} is not a store manifest with files "
                            f"[{{name, bytes, sha256}}]: {e}") from None
    return entries


@dataclass(frozen=True)
class StoreSource:
    """What a worker needs to get a store's files: the StoreServer's address, the store
    root of the node that serves it (see `local_store_path`) and the sha256 of its
    manifest (a local copy whose manifest hashes the same, with the files a worker
    needs, is used without asking the server)."""

    address: str
    home: str
    manifest_sha256: str
    keys: LinkKeys | None = None  # the cluster's CURVE keys (cluster/links.py); None: plain


# ---------------------------------------------------------------------- server
class StoreServer:
    """Serves the files of the store at `store_dir` (those its manifest lists, and the
    manifest) to `fetch` clients, on a ROUTER socket bound to `host` (a random port unless
    `port`), from a daemon thread. `address` is what clients connect to. Close it (or use
    it as a context manager) to stop."""

    def __init__(self, store_dir: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 keys: LinkKeys | None = None):
        self.root = Path(store_dir).resolve()
        mf = self.root / MANIFEST
        try:
            self.manifest_bytes = mf.read_bytes()
        except OSError as e:
            raise TransferError(f"{self.root} is not a store to serve: {e}") from None
        self.manifest_sha256 = hashlib.sha256(self.manifest_bytes).hexdigest()
        self.files: dict[str, Path] = {}
        for name in _entries(self.manifest_bytes, str(mf)):
            try:
                # resolved now: a link swapped in later is refused (O_NOFOLLOW), not followed
                self.files[name] = _inside(self.root, name).resolve()
            except TransferError as e:
                log.warning("store server will not serve %s: %s", name, e)
        self.bytes_sent = 0
        self.requests = 0
        self._fds: dict[str, int] = {}
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, SERVER_QUEUE)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises, not blocks
        wire.limit_frames(self._sock, _REQUEST_BYTES)
        self.dropped = 0  # replies dropped: their peer did not read its earlier ones
        self.keys = keys
        self.guard = Guard(self._ctx, keys, "store server")
        self.guard.server(self._sock)
        if port is None:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
        self.address = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="store-server", daemon=True)
        self._thread.start()
        log.info("serving store %s (%d files) at %s", self.root, len(self.files), self.address)

    def source(self, home: str | Path) -> StoreSource:
        """This server as workers get it; `home`: the store root of this node."""
        return StoreSource(self.address, str(home), self.manifest_sha256, self.keys)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            frames = self._sock.recv_multipart()
            peer, body = frames[0], frames[1:]
            try:
                reply = self._answer(wire.decode_request(body))
            except (WireError, TransferError) as e:
                reply = Refusal(str(e))
            except OSError as e:  # the file vanished or cannot be read: say so, keep serving
                reply = Refusal(f"read failed: {e}")
            except Exception as e:  # a bug: log it, answer, and keep serving the others
                log.exception("store server failed on a request")
                reply = Refusal(f"{type(e).__name__}: {e}")
            self.requests += 1
            if isinstance(reply, FileData):
                self.bytes_sent += len(reply.data)
            try:
                self._sock.send_multipart([peer, *wire.encode_reply(reply)], zmq.NOBLOCK,
                                          copy=False)
            except zmq.ZMQError as e:  # its queue is full (it does not read) or it left
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, ...: not a flood
                    log.warning("store server dropped a reply (%d so far): %s", self.dropped,
                                e)

    def _answer(self, req: ManifestRequest | ChunkRequest) -> FileData:
        if isinstance(req, ManifestRequest):
            return FileData(req.OP, MANIFEST, 0, self.manifest_bytes)
        if req.file not in self.files:
            raise TransferError(f"{req.file!r} is not a file of this store's manifest")
        return FileData(req.OP, req.file, req.offset,
                        os.pread(self._fd(req.file), req.size, req.offset))

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            if len(self._fds) >= 16:  # a client fetches file after file: keep a few open
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[name] = os.open(self.files[name], os.O_RDONLY | os.O_NOFOLLOW)
        return fd

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self.guard.close()
        self._ctx.term()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- client
@dataclass
class FetchStats:
    """What one `fetch` did: the files it fetched, bytes received, and its seconds."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    refetched: list[str] = field(default_factory=list)  # failed a checksum, fetched again

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "seconds": self.seconds,
                "refetched": self.refetched}


class _Timeout(Exception):
    pass


class _BadChecksum(Exception):
    pass


class _Client:
    """One DEALER connection; `reset()` drops it (and every reply still in flight)."""

    def __init__(self, address: str, timeout: float, keys: LinkKeys | None = None) -> None:
        self.address, self.timeout, self.keys = address, timeout, keys
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.reset()

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        wire.limit_frames(self.sock, MAX_CHUNK_BYTES + _REQUEST_BYTES)
        curve_client(self.sock, self.keys)
        self.sock.connect(self.address)

    def send(self, req: ManifestRequest | ChunkRequest) -> None:
        self.sock.send(wire.encode_request(req))

    def recv(self) -> FileData:
        if not self.sock.poll(int(self.timeout * 1000)):
            raise _Timeout(f"no reply from {self.address} in {self.timeout:.0f} s")
        try:
            reply = wire.decode_reply(self.sock.recv_multipart(copy=False))
        except WireError as e:  # garbage from a peer that is not a StoreServer
            raise TransferError(f"{self.address} sent a malformed reply: {e}") from None
        if isinstance(reply, Refusal):
            raise TransferError(f"{self.address} refused: {reply.error}")
        return reply

    def manifest(self) -> bytes:
        self.send(ManifestRequest())
        return bytes(self.recv().data)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()


def _partial(path: Path) -> Path:
    """Where a file is written until its whole sha256 checks out."""
    return path.with_name(path.name + ".partial")


def _check_room(dest: Path, missing: list[str], entries: dict[str, dict],
                paths: dict[str, Path]) -> None:
    """Refuses, before writing, a fetch that the disk holding `dest` has no room for
    (partial files already there count as fetched), instead of failing half-way."""
    need = 0
    for n in missing:
        partial = _partial(paths[n])
        have = partial.stat().st_size if partial.is_file() else 0
        need += max(0, entries[n]["bytes"] - have)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise TransferError(
            f"not enough disk for the store's files at {dest}: {len(missing)} files need "
            f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free ({(need - free) / 2**20:.1f} "
            "MiB missing); free space there, or give this node a store folder on a larger "
            "disk (LLM_SHARD_HOME)")


def _present(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["bytes"]


def fetch(store_dir: str | Path, server_address: str, files: list[str] | None = None, *,
          chunk_bytes: int = CHUNK_BYTES, window: int = WINDOW, timeout: float = TIMEOUT,
          attempts: int = ATTEMPTS, manifest_sha256: str | None = None,
          progress: Callable[[str, int, int], None] | None = None,
          keys: LinkKeys | None = None,
          verified: Callable[[Path, dict[str, str]], object] | None = None) -> FetchStats:
    """Make `store_dir` hold the server's manifest and the named `files` (None: all of
    them), fetching only those it lacks. Returns what was fetched.

    A file counts as present when its size matches the manifest (as `Store` checks it);
    when the local manifest differs from the server's (another version of the store, or
    none), present files are first checked against the server's sha256 and deleted if
    they differ. Every fetched file is checked before it is renamed into place.
    With `manifest_sha256` (the server's, `StoreServer.source`), a folder whose manifest
    hashes to it and holds the files is left as it is without asking the server.
    `progress(name, done, total)` is called after each chunk; `verified(store_dir,
    {name: sha256})` with the files whose sha256 this fetch checked. Concurrent fetches
    into one folder (workers sharing a node) take turns on a lock file there."""
    dest = Path(store_dir)
    stats = FetchStats()
    if manifest_sha256 is not None and _complete(dest, manifest_sha256, files):
        return stats
    t0 = time.perf_counter()
    client = _Client(server_address, timeout, keys)
    try:
        try:
            manifest_bytes = client.manifest()
        except _Timeout as e:
            raise TransferError(f"cannot fetch the manifest of {dest.name}: {e}") from None
        entries = _entries(manifest_bytes, f"the manifest from {server_address}")
        names = list(entries) if files is None else list(files)
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise TransferError(f"{server_address}'s manifest lists no file {unknown}")
        paths = {n: _inside(dest, n) for n in names}
        local_mf = dest / MANIFEST
        if (local_mf.is_file() and local_mf.read_bytes() == manifest_bytes
                and all(_present(paths[n], entries[n]) for n in names)):
            return stats  # nothing to do: no lock, nothing written
        dest.mkdir(parents=True, exist_ok=True)
        with _locked(dest / _LOCK):
            checked = _adopt(dest, manifest_bytes, entries)
            if checked and verified is not None:
                verified(dest, checked)
            missing = [n for n in names if not _present(paths[n], entries[n])]
            _check_room(dest, missing, entries, paths)
            for n in missing:
                _fetch_file(client, paths[n], entries[n], chunk_bytes, window, attempts,
                            progress, stats)
                if verified is not None:
                    verified(dest, {n: entries[n]["sha256"]})
                stats.files.append(n)
    finally:
        client.close()
    stats.seconds = time.perf_counter() - t0
    if stats.files:
        log.info("fetched %d files (%.1f MB) of %s from %s in %.1f s (%.0f MB/s)",
                 len(stats.files), stats.bytes / 1e6, dest, server_address, stats.seconds,
                 stats.mb_per_s)
    return stats


def _complete(dest: Path, manifest_sha256: str, files: list[str] | None) -> bool:
    """Whether dest's manifest hashes to manifest_sha256 and dest holds `files`."""
    try:
        manifest_bytes = (dest / MANIFEST).read_bytes()
    except OSError:
        return False
    if hashlib.sha256(manifest_bytes).hexdigest() != manifest_sha256:
        return False
    entries = _entries(manifest_bytes, str(dest / MANIFEST))
    names = list(entries) if files is None else files
    try:
        return all(_present(_inside(dest, n), entries[n]) for n in names)
    except (KeyError, TransferError):
        return False  # let the full path say what is wrong


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _adopt(dest: Path, manifest_bytes: bytes, entries: dict[str, dict]) -> dict[str, str]:
    """Install the server's manifest in `dest`. Where the local one differs (or there is
    none), present files the two do not agree on are checked by sha256 first, and those
    that fail are deleted, so that afterwards a right-sized file is a right file. Returns
    {name: sha256} of the files it checked and kept."""
    local_mf = dest / MANIFEST
    old = local_mf.read_bytes() if local_mf.is_file() else None
    if old == manifest_bytes:
        return {}
    try:
        before = _entries(old, str(local_mf)) if old is not None else {}
    except TransferError:
        before = {}
    checked = {}
    for name, entry in entries.items():
        try:
            path = _inside(dest, name)
        except TransferError:
            continue  # never touched; fetch refuses such a name
        if not path.is_file() or before.get(name) == entry:
            continue
        if not _present(path, entry) or _sha256(path).hexdigest() != entry["sha256"]:
            log.warning("%s differs from the store's new manifest: deleting it", path)
            path.unlink()
        else:
            checked[name] = entry["sha256"]
    tmp = local_mf.with_name(MANIFEST + ".partial")
    tmp.write_bytes(manifest_bytes)
    os.replace(tmp, local_mf)
    return checked


def _fetch_file(client: _Client, path: Path, entry: dict, chunk_bytes: int, window: int,
                attempts: int, progress, stats: FetchStats) -> None:
    """Fetch one file into path (resuming path.partial), counting bytes in stats."""
    partial = _partial(path)
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(client, partial, entry, chunk_bytes, window, progress, stats)
        except _Timeout as e:
            got = partial.stat().st_size if partial.exists() else 0
            log.warning("%s: %s at %d of %d bytes (try %d of %d); resuming", entry["name"],
                        e, got, entry["bytes"], attempt, attempts)
            client.reset()  # replies still in flight go to the old socket, and are dropped
            continue
        except _BadChecksum:
            log.warning("%s fails its sha256 check (try %d of %d): fetching it again",
                        entry["name"], attempt, attempts)
            partial.unlink()
            stats.refetched.append(entry["name"])
            continue
        os.replace(partial, path)
        return
    raise TransferError(f"could not fetch {entry['name']} intact from {client.address} in "
                        f"{attempts} tries (a partial file, if any, is kept at {partial})")


def _transfer(client: _Client, partial: Path, entry: dict, chunk_bytes: int, window: int,
              progress, stats: FetchStats) -> None:
    """Append the rest of the file to `partial` and check the whole file's sha256.
    Raises _Timeout (partial kept, to resume) or _BadChecksum."""
    name, total = entry["name"], entry["bytes"]
    done = partial.stat().st_size if partial.exists() else 0
    if done > total:  # not a prefix of this file: start over
        partial.unlink()
        done = 0
    h = _sha256(partial, done) if done else hashlib.sha256()
    if done:
        log.info("%s: resuming at %d of %d bytes", name, done, total)
    start, t0, last_log = done, time.perf_counter(), time.perf_counter()
    inflight: deque[tuple[int, int]] = deque()
    asked = done
    with open(partial, "ab") as f:
        while done < total:
            while len(inflight) < window and asked < total:
                size = min(chunk_bytes, total - asked)
                client.send(ChunkRequest(name, asked, size))
                inflight.append((asked, size))
                asked += size
            reply = client.recv()
            offset, size = inflight.popleft()
            data = reply.data
            if reply.file != name or reply.offset != offset or len(data) != size:
                raise TransferError(f"{client.address} sent {len(data)} bytes of "
                                    f"{reply.file!r} at {reply.offset}, "
                                    f"expected {size} of {name!r} at {offset}: the served "
                                    "file is shorter than its manifest says")
            f.write(data)
            h.update(data)
            done += size
            stats.bytes += size
            if progress is not None:
                progress(name, done, total)
            now = time.perf_counter()
            if now - last_log >= LOG_EVERY:
                last_log = now
                log.info("%s: %.1f of %.1f MB (%.0f MB/s)", name, done / 1e6, total / 1e6,
                         (done - start) / 1e6 / max(now - t0, 1e-9))
    if h.hexdigest() != entry["sha256"]:
        raise _BadChecksum(name)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show this module's progress lines on stderr, for a process whose logging nobody
    set up (a Ray worker: Ray forwards its stderr to the driver)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


def local_store_path(store_path: str | Path, remote_home: str | Path | None,
                     local_home: str | Path) -> Path:
    """Where a node keeps its copy of the coordinator's store at `store_path`.

    A node whose store root (`$LLM_SHARD_HOME`, default ~/.cache/llm-shard) is the
    coordinator's uses the same path (one machine, a shared filesystem, or machines set
    up alike). A node with a root of its own keeps the store at the same place under its
    root; a store outside the coordinator's root goes under its folder name and a hash of
    its path (a folder called "fp32" must not replace another of that name)."""
    store_path = Path(store_path)
    if remote_home is None:
        return store_path
    remote = Path(os.path.abspath(Path(remote_home).expanduser()))
    local = Path(os.path.abspath(Path(local_home).expanduser()))
    if remote == local:
        return store_path
    absolute = Path(os.path.abspath(store_path))
    try:
        return local / absolute.relative_to(remote)
    except ValueError:
        tag = hashlib.sha256(str(absolute).encode()).hexdigest()[:8]
        return local / f"{absolute.name}-{tag}"
