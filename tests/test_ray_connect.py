"""Which Ray cluster `serve` and LLM() join (cluster/ray_glue.choose_cluster): the one the
user named (--address, RAY_ADDRESS), else the one `ray start` recorded in Ray's address file,
else a private local one. A recorded cluster that is dead fails at once or within
CONNECT_TIMEOUT, naming its address; one that another program started inside itself
(ray.init(), a test suite's ray.cluster_utils.Cluster) is not joined.

Every test has a Ray temp folder of its own (RAY_TMPDIR), so the address file it reads or
writes is no one else's; the Ray clusters it starts run in subprocesses it stops."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import random_hf_state, write_hf_port

from llm_shard.cluster import ray_glue
from llm_shard.cluster.ray_glue import PRIVATE, ClusterError, choose_cluster, ray_start_record

VENV_BIN = Path(sys.executable).parent
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_tmp(monkeypatch):
    """A Ray temp folder of this test's (short: Ray's socket paths live under it), named
    by RAY_TMPDIR, with RAY_ADDRESS unset."""
    folder = Path(tempfile.mkdtemp(prefix="lsray", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _address_file(ray_tmp: Path) -> Path:
    return ray_tmp / "ray" / "ray_current_cluster"


def _record(ray_tmp: Path, address: str) -> Path:
    """Ray's address file naming `address`, as `ray start` leaves it."""
    path = _address_file(ray_tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(address)
    return path


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _timed_error(*args, **kw) -> tuple[str, float]:
    t = time.monotonic()
    with pytest.raises(ClusterError) as e:
        choose_cluster(*args, **kw)
    return str(e.value), time.monotonic() - t


# ---- no cluster, a dead one, a silent one (no Ray started) ------------------------------

def test_no_address_file_means_a_private_cluster(ray_tmp):
    assert choose_cluster() == PRIVATE == "local"
    assert not _address_file(ray_tmp).exists()


def test_a_stale_address_file_fails_at_once_naming_it(ray_tmp):
    """A killed `ray start` head or an interrupted test run leaves its address recorded:
    nothing listens there, and the error says so at once, with the file and what to do."""
    port = _free_port()
    path = _record(ray_tmp, f"127.0.0.1:{port}")
    said, took = _timed_error()
    assert took < 5, took
    assert f"127.0.0.1:{port}" in said and str(path) in said, said
    assert "Connection refused" in said and f"Delete {path}" in said and "--address" in said


def test_a_silent_listener_fails_within_the_timeout(ray_tmp):
    """Something that accepts the connection and never answers (a hung head, another
    program on the port): the probe's deadline ends it."""
    with socket.socket() as silent:
        silent.bind(("0.0.0.0", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        _record(ray_tmp, address)
        said, took = _timed_error(timeout=2)
    assert 2 <= took < 10, took
    assert address in said and "no answer within 2 s" in said, said


def test_auto_finding_a_stale_record_fails_naming_it(ray_tmp, monkeypatch):
    # no live head on this machine: Ray's "auto" would take a lone live one (the test
    # session's own cluster, when it runs) over the address file
    import ray._private.services as services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    port = _free_port()
    path = _record(ray_tmp, f"127.0.0.1:{port}")
    said, took = _timed_error("auto")
    assert took < 5 and f":{port} (found by auto)" in said and f"Delete {path}" in said, said


@pytest.mark.parametrize("how", ["argument", "RAY_ADDRESS", "ray://"])
def test_a_named_address_that_does_not_answer_fails_naming_it(ray_tmp, monkeypatch, how):
    address = f"127.0.0.1:{_free_port()}"
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
        said, took = _timed_error()
    else:
        address = "ray://" + address if how == "ray://" else address
        said, took = _timed_error(address)
    assert took < 5 and address in said, said


def test_local_is_a_private_cluster_whatever_is_recorded(ray_tmp, monkeypatch):
    _record(ray_tmp, f"127.0.0.1:{_free_port()}")
    assert choose_cluster("local") == PRIVATE
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert choose_cluster() == PRIVATE


def test_what_tells_a_ray_start_cluster():
    me = os.getuid()
    started = {"metadata": {"ray_init_cluster": False}, "gcs_pid": os.getpid(),
               "session": "session_of_a_head_elsewhere"}
    assert ray_start_record(started, me) is None  # this pid is no GCS: a remote head
    assert "user 4242's" in ray_start_record(started, 4242)
    assert "ray.init()" in ray_start_record({**started, "metadata": {"ray_init_cluster": True}},
                                            me)
    assert "no cluster metadata" in ray_start_record({**started, "metadata": None}, me)


# ---- `llm-shard serve` with a dead cluster recorded --------------------------------------

@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from llm_shard.models.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    write_hf_port(root / "hf", random_hf_state(seed=3))
    return convert(root / "hf", root / "store", dtype="fp32", progress=False).path


def _serve(store, ray_tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, **ENV, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    t = time.monotonic()
    out = subprocess.run([str(VENV_BIN / "llm-shard"), "serve", str(store), "--port", "0",
                          "--worker", "ram=256MiB"], capture_output=True, text=True,
                         timeout=120, env=env)
    return out, time.monotonic() - t


def test_serve_with_a_stale_address_file_fails_fast_naming_it(ray_tmp, tiny_store):
    address = f"127.0.0.1:{_free_port()}"
    _record(ray_tmp, address)
    out, took = _serve(tiny_store, ray_tmp)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: the Ray cluster at {address}" in out.stderr, out.stderr[-3000:]
    assert took < 60, took
    print(f"\nserve with a stale address file failed in {took:.1f} s")


@pytest.mark.slow
def test_serve_with_a_silent_port_recorded_fails_within_a_minute(ray_tmp, tiny_store):
    with socket.socket() as silent:
        silent.bind(("0.0.0.0", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        _record(ray_tmp, address)
        out, took = _serve(tiny_store, ray_tmp)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # gRPC's own connect timeout (about 20 s) or the probe's 30 s deadline, whichever first
    assert f"the Ray cluster at {address}" in out.stderr and "does not answer" in out.stderr, \
        out.stderr[-3000:]
    assert took < 60, took
    print(f"\nserve with a silent port recorded failed in {took:.1f} s")


# ---- live clusters: another program's, and `ray start`'s --------------------------------

FOREIGN = {
    # a program that starts Ray inside itself and keeps it while its stdin is open
    "ray.init": "import ray, sys; ray.init(num_cpus=1, include_dashboard=False); "
                "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()",
    # a test suite's multi-node cluster, which records itself in the address file
    "cluster_utils": "import sys; from ray.cluster_utils import Cluster; "
                     "c = Cluster(initialize_head=True, head_node_args={'num_cpus': 1, "
                     "'include_dashboard': False}); print(c.address, flush=True); "
                     "sys.stdin.read(); c.shutdown()",
}


def _stop(proc: subprocess.Popen) -> None:
    """Stop a subprocess started in a session of its own and every process left in that
    session (a `ray start` head outlives its CLI)."""
    import psutil

    def left() -> list:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (psutil.Error, ProcessLookupError):
                pass
        return out

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not left():
            break
    proc.wait(timeout=10)


def _joined(ray_tmp: Path, **env) -> str:
    """The GCS address that ray_glue.connect() joins in a fresh process."""
    code = ("from llm_shard.cluster import ray_glue; import ray; ray_glue.connect(); "
            "print('JOINED', ray.get_runtime_context().gcs_address); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "RAY_TMPDIR": str(ray_tmp), **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("JOINED ")[1].split()[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("starter", list(FOREIGN))
def test_a_cluster_another_program_started_is_not_joined_unless_named(ray_tmp, monkeypatch,
                                                                     caplog, starter):
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN[starter]], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    try:
        address = proc.stdout.readline().strip()
        assert address, "the foreign program did not start Ray"
        path = _address_file(ray_tmp)
        if starter == "ray.init":
            assert not path.exists()  # ray.init() records nothing; say a stale record
            _record(ray_tmp, address)  # names the port it now holds
        assert path.read_text() == address
        with caplog.at_level(logging.WARNING, logger=ray_glue.log.name):
            assert choose_cluster() == PRIVATE
        said = caplog.text
        assert f"not joining the Ray cluster at {address}" in said and str(path) in said
        assert ("ray.init()" if starter == "ray.init" else f"pid {proc.pid}") in said, said

        assert choose_cluster(address) == address  # named: honoured
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert choose_cluster() == address
        assert _joined(ray_tmp, RAY_ADDRESS=address) == address
    finally:
        proc.stdin.close()
        _stop(proc)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", [False, True])
def test_a_ray_start_cluster_is_joined(ray_tmp, block):
    """`ray start --head` records its address; a later LLM() or serve without --address
    joins it, whether the CLI exited (the head left to init) or waits on it (--block, as
    in a container or a service)."""
    ports = {flag: str(_free_port()) for flag in ("--ray-client-server-port",
                                                   "--dashboard-port",
                                                   "--dashboard-agent-listen-port")}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--port=0", "--num-cpus=1",
           "--include-dashboard=false", *(f"{k}={v}" for k, v in ports.items()),
           *(["--block"] if block else [])]
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **ENV})
    try:
        path = _address_file(ray_tmp)
        deadline = time.monotonic() + 120
        while not (path.exists() and (not block or _gcs_answers(path.read_text()))):
            assert head.poll() in (None, 0), head.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "ray start recorded no cluster in 120 s"
            time.sleep(0.5)
        if not block:
            assert head.wait(timeout=120) == 0, head.stderr.read()[-3000:]
        address = path.read_text().strip()
        assert choose_cluster() == address
        assert _joined(ray_tmp) == address
    finally:
        _stop(head)  # the head's processes stay in the session `ray start` began


def _gcs_answers(address: str) -> bool:
    try:
        choose_cluster(address.strip(), timeout=5)
        return True
    except ClusterError:
        return False


def test_the_session_test_cluster_records_no_address(ray_cluster):
    """The session's ray_cluster fixture (conftest.py) writes nothing to Ray's address
    file: no later serve or LLM() on this machine finds it there, and an interrupted test
    run leaves no stale record behind."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    assert not path.exists() or path.read_text().strip() != ray_cluster.address
