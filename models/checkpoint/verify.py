"""sha256 checks of a store's files, recorded in a sidecar like git's index.

A file whose stat identity (device, inode, size, mtime, ctime) matches the one recorded
in STORE/.llm-shard-verified.json when it last passed its sha256 check (or was written
by convert, or fetched and checked by cluster/transfer.py) is not hashed again. A copy
(cp, rsync, scp, another disk) has another inode and ctime, an edit another mtime and
ctime, so either is hashed once. `Checks` is one store folder's: the sidecar's records,
and the checks it made itself, remembered where the sidecar cannot be written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from llm_shard.models.errors import StoreError

log = logging.getLogger(__name__)

VERIFIED = ".llm-shard-verified.json"  # {"version", "files": {name: {sha256, stat}}}
VERIFIED_LOCK = ".llm-shard-verified.lock"  # writers merge into VERIFIED under flock
LOG_EVERY = 10.0  # seconds between progress lines of one file's check

Identity = tuple[int, ...]


def sha256_file(path: Path, log_every: float | None = None) -> str:
    """sha256 of a file, read in 4 MiB chunks; with `log_every` (seconds), a progress line
    at info level that often."""
    h = hashlib.sha256()
    total = os.path.getsize(path) if log_every else 0
    done, last = 0, time.monotonic()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if log_every:
                done += len(chunk)
                if time.monotonic() - last >= log_every:
                    last = time.monotonic()
                    log.info("%s: %.0f of %.0f MB verified", path, done / 1e6, total / 1e6)
    return h.hexdigest()


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _records(root: Path) -> dict:
    """The sidecar's {name: {sha256, stat}}; {} where it is missing or unreadable."""
    try:
        data = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == 1 else None
    return files if isinstance(files, dict) else {}


class Checks:
    """The sha256 checks of the store folder `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._seen: dict[Identity, str] = {}  # stat identity -> sha256, checked here
        self._lock = threading.Lock()
        self._warned = False  # that the sidecar cannot be written

    def __reduce__(self):  # a copy elsewhere starts with the sidecar's records only
        return Checks, (self.root,)

    def is_recorded(self, name: str, sha256: str, st: os.stat_result) -> bool:
        identity = _identity(st)
        with self._lock:
            if self._seen.get(identity) == sha256:
                return True
        rec = _records(self.root).get(name)
        if (isinstance(rec, dict) and rec.get("sha256") == sha256
                and rec.get("stat") == list(identity)):
            with self._lock:
                self._seen[identity] = sha256
            return True
        return False

    def record_verified(self, files: dict[str, str]) -> bool:
        """Record that the files `{name: sha256}` hold that sha256 as they are now (the
        caller hashed them, or checked them against the manifest), so loading them does
        not hash them again. Concurrent writers (workers loading parts of one store) merge
        their records under a lock. Where the folder is not writable, warns once that the
        checks will repeat, and returns False."""
        now = {}
        for name, sha256 in files.items():
            with contextlib.suppress(OSError):  # a file that is gone has nothing to record
                now[name] = (sha256, _identity((self.root / name).stat()))
        return self._record(now)

    def _record(self, files: dict[str, tuple[str, Identity]]) -> bool:
        """record_verified with the stat identities the files had when they were hashed."""
        new = {}
        for name, (sha256, identity) in files.items():
            with self._lock:
                self._seen[identity] = sha256
            new[name] = {"sha256": sha256, "stat": list(identity)}
        if not new:
            return True
        root = self.root
        tmp = root / f"{VERIFIED}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(root / VERIFIED_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
                records = _records(root)
                records.update(new)
                tmp.write_text(json.dumps(
                    {"version": 1, "about": "sha256 checks llm-shard made of this store's "
                     "files (deleting this file only makes the next load check them again)",
                     "files": dict(sorted(records.items()))}, indent=1))
                os.replace(tmp, root / VERIFIED)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._warned:
                self._warned = True
                log.warning("cannot record sha256 checks in %s (%s): every process that "
                            "loads its files checks them again", root, e.strerror or e)
            return False
        return True

    def check(self, name: str, entry: dict, st: os.stat_result) -> None:
        """Check the store file `name` against its manifest `entry` {name, bytes, sha256}:
        hash it unless its record says it passed as it is, and record it when it passes.
        StoreError naming the file if it fails."""
        path = self.root / name
        if self.is_recorded(name, entry["sha256"], st):
            return
        log.info("verifying %d bytes of %s (sha256 against the store's manifest)",
                 st.st_size, path)
        if sha256_file(path, log_every=LOG_EVERY) != entry["sha256"]:
            raise StoreError(
                f"{path} fails its sha256 check against {self.root / 'manifest.json'}: the "
                "file is corrupt or was changed since the store was written. Convert the "
                "checkpoint again (llm-shard convert SRC -o STORE --overwrite), or delete the "
                "file and copy it again from an intact store (a worker that fetches its store "
                "from the coordinator fetches a deleted file by itself)")
        self._record_unchanged(name, entry, st)

    def verify(self, name: str, entry: dict, st: os.stat_result) -> None:
        """Hash the store file `name` whatever its record says; StoreError if it fails,
        recorded if it passes."""
        path = self.root / name
        if sha256_file(path, LOG_EVERY) != entry["sha256"]:
            raise StoreError(f"{path} fails its sha256 check: the file is corrupt or was "
                             "changed since the store was written")
        self._record_unchanged(name, entry, st)

    def _record_unchanged(self, name: str, entry: dict, st: os.stat_result) -> None:
        if _identity((self.root / name).stat()) == _identity(st):  # not changed while hashed
            self._record({name: (entry["sha256"], _identity(st))})


def record_verified(root: str | Path, files: dict[str, str]) -> bool:
    """`Checks.record_verified` for the store at `root`: for writers of its files (convert,
    cluster/transfer.py)."""
    return Checks(root).record_verified(files)
