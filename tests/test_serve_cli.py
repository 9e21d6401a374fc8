"""`llm-shard serve` as the README runs it, in a subprocess with its own fresh Ray: it
serves, and SIGINT stops it cleanly, leaving no Ray or worker process behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

LLM_SHARD = str(Path(sys.executable).with_name("llm-shard"))


def _ours(proc: psutil.Process, ray_tmp: str) -> bool:
    """A process of this test's Ray: its command line names the Ray temp folder."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and \
            any(ray_tmp in a for a in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _serve(store, ray_tmp: str, log, port: int = 0) -> subprocess.Popen:
    """`llm-shard serve` exactly as the README says, with a Ray of its own: no RAY_ADDRESS,
    and a Ray temp folder of its own (its processes' command lines name it), where no
    cluster address is recorded. Port 0: serve takes a free one, and says which."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [LLM_SHARD, "serve", str(store), "--worker", "ram=1GiB", "--worker", "ram=1GiB",
           "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_healthy(proc: subprocess.Popen, log_path: Path) -> str:
    """The URL serve says it serves on, once its /health answers 200."""
    deadline = time.monotonic() + 300
    while True:
        text = log_path.read_text()
        assert proc.poll() is None, text[-3000:]
        assert time.monotonic() < deadline, "serve did not become healthy in 300 s"
        said = re.search(r"^serving \S+ on (http://\S+) ", text, re.M)
        try:
            if said and httpx.get(said[1] + "/health", timeout=5).status_code == 200:
                return said[1]
        except httpx.TransportError:
            pass
        time.sleep(1)


def _recorded(ray_tmp: str) -> bool:
    """Whether Ray's address file in `ray_tmp` names a cluster (serve's private one must
    not: no other process may find it there, and a killed serve must leave no record)."""
    return (Path(ray_tmp) / "ray" / "ray_current_cluster").exists()


def _completes(url: str) -> None:
    out = httpx.post(url + "/v1/completions", timeout=120,
                     json={"prompt": "The capital of France is", "max_tokens": 4,
                           "temperature": 0}).json()
    assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] >= 1


def _leftovers(tree: list[psutil.Process], ray_tmp: str, wait: float,
               but=lambda p: False) -> list[psutil.Process]:
    """What is still running of `tree` or of the Ray under `ray_tmp`, other than `but`,
    after up to `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        left = [p for p in _alive(tree) + [p for p in psutil.process_iter()
                                           if _ours(p, ray_tmp)] if not but(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _agent(p: psutil.Process) -> bool:
    try:
        return p.name().endswith("Agent")
    except psutil.NoSuchProcess:
        return False


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_serve_answers_then_stops_cleanly_on_sigint(smollm2_stores, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="lsray", dir="/tmp")
    log = (tmp_path / "serve.log").open("w")
    proc = _serve(smollm2_stores["int8"].path, ray_tmp, log)
    tree: list[psutil.Process] = []
    try:
        url = _wait_healthy(proc, tmp_path / "serve.log")
        _completes(url)
        chat = httpx.post(url + "/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 4}).json()
        assert chat["choices"][0]["message"]["content"] is not None

        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in _alive(tree))
        assert "raylet" in names and ray_tmp in names, "serve did not start a Ray of its own"
        assert not _recorded(ray_tmp)
        assert "Worker" in names or "ray::" in names or "default_worker" in names

        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        text = (tmp_path / "serve.log").read_text()
        assert rc == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        left = _leftovers(tree, ray_tmp, 30)
        assert not left, [" ".join(p.cmdline())[:200] for p in left]
        assert not _recorded(ray_tmp)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_all(_leftovers(tree, ray_tmp, 0))
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_serve_killed_and_restarted_leaves_no_orphans_and_serves(smollm2_stores, tmp_path):
    """The coordinator's own crash: `serve` SIGKILLed (no chance to clean up) takes its
    Ray and workers with it; started again on the same port, it serves again."""
    tmps = [tempfile.mkdtemp(prefix="lsray", dir="/tmp") for _ in range(2)]
    logs = [(tmp_path / f"serve{k}.log").open("w") for k in range(2)]
    procs: list[subprocess.Popen] = []
    trees: list[list[psutil.Process]] = [[], []]
    try:
        procs.append(_serve(smollm2_stores["int8"].path, tmps[0], logs[0]))
        url = _wait_healthy(procs[0], tmp_path / "serve0.log")
        _completes(url)
        trees[0] = psutil.Process(procs[0].pid).children(recursive=True)
        procs[0].kill()  # SIGKILL of the coordinator alone, not its process group
        procs[0].wait()
        # Ray's raylet, GCS and every worker go with it; raylet's agents (DashboardAgent,
        # RuntimeEnvAgent) may outlive it (known: reported, then killed below): no worker,
        # no weights, no port of ours
        left = _leftovers(trees[0], tmps[0], 60, but=_agent)
        assert not left, [" ".join(p.cmdline())[:200] for p in left]
        assert not _recorded(tmps[0])  # no stale record for the next serve to trip on
        agent = _leftovers(trees[0], tmps[0], 0)
        if agent:
            print(f"\nleft after SIGKILL of serve: {[p.name() for p in agent]}")
            _kill_all(agent)

        port = int(url.rsplit(":", 1)[1])
        procs.append(_serve(smollm2_stores["int8"].path, tmps[1], logs[1], port=port))
        assert _wait_healthy(procs[1], tmp_path / "serve1.log") == url
        _completes(url)
        trees[1] = psutil.Process(procs[1].pid).children(recursive=True)
        procs[1].send_signal(signal.SIGINT)
        assert procs[1].wait(timeout=120) == 0
        left = _leftovers(trees[1], tmps[1], 30)
        assert not left, [" ".join(p.cmdline())[:200] for p in left]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for tree, tmp in zip(trees, tmps):
            _kill_all(_leftovers(tree, tmp, 0))
            shutil.rmtree(tmp, ignore_errors=True)
        for log in logs:
            log.close()


def test_serve_on_a_busy_port_fails_at_once_naming_it(tmp_path):
    """The port is taken before anything loads: a busy one is the first and only error
    (not the model's, which this empty home does not hold), with no Ray started."""
    env = {**os.environ, "LLM_SHARD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([LLM_SHARD, "serve", "smollm2-135m", "--port", str(port)],
                             capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot bind 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "not in" not in out.stderr and "Ray" not in out.stderr + out.stdout, out.stderr


def test_serve_and_chat_have_help():
    for verb in ("serve", "chat", "models", "node-resources"):
        out = subprocess.run([LLM_SHARD, verb, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "Usage:" in out.stdout, out.stderr


TORCH_FREE = """
import sys
from click.testing import CliRunner
from llm_shard.coordinator.cli import cli
for args in (["--help"], *([verb, "--help"] for verb in cli.commands)):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "usage:" in res.output.lower(), (args, res.output)
res = CliRunner().invoke(cli, ["models"])  # the catalog and what is on disk
assert res.exit_code == 0 and "smollm2-135m" in res.output, res.output
from llm_shard.coordinator import client  # what `chat URL` talks through
loaded = sorted(m for m in ("torch", "numpy", "ray", "zmq") if m in sys.modules)
assert not loaded, f"loaded for help alone: {loaded}"
"""


def test_help_and_the_http_client_load_no_torch():
    """`llm-shard --help`, every verb's help, `models` and `chat URL`'s client answer in a
    fraction of a second: none loads torch, numpy, Ray or ZeroMQ."""
    out = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["cpm2", "llama-7b"])
def test_a_model_not_stored_says_what_to_run_offline(tmp_path, name):
    """No store and no hub (this machine is offline; HF_HUB_OFFLINE makes sure): one
    message with the convert command, no traceback, no hang."""
    env = {**os.environ, "LLM_SHARD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([LLM_SHARD, "serve", name], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode != 0 and f"{name} is not in {tmp_path}" in out.stderr
    assert "llm-shard convert <folder> --arch" in out.stderr
    assert "Traceback" not in out.stderr


def test_models_remove_and_clean_partial(tmp_path):
    env = {**os.environ, "LLM_SHARD_HOME": str(tmp_path)}
    store = tmp_path / "smollm2-135m"
    (store / "blocks").mkdir(parents=True)
    (store / "manifest.json").write_text("{}")
    (store / "blocks" / "000.safetensors").write_bytes(b"x" * 4096)
    (tmp_path / "llama-7b.partial").mkdir()
    (tmp_path / "llama-7b.partial" / "embed.safetensors").write_bytes(b"y" * 100)
    (tmp_path / "notes").mkdir()

    def run(*args):
        return subprocess.run([LLM_SHARD, "models", *args], capture_output=True, text=True,
                              timeout=60, env=env)

    out = run("--remove", "nope")
    assert out.returncode != 0 and "no store named 'nope'" in out.stderr
    assert run("--remove", "notes").returncode != 0 and (tmp_path / "notes").exists()
    assert run("--remove", "..").returncode != 0
    out = run("--remove", "smollm2-135m")
    assert out.returncode == 0 and "removed" in out.stdout and not store.exists()
    out = run("--clean-partial")
    assert out.returncode == 0 and not (tmp_path / "llama-7b.partial").exists()
    assert (tmp_path / "notes").exists()
