"""`llm-shard serve` as the README runs it, in a subprocess with its own fresh Ray: it
serves, and SIGINT stops it cleanly, leaving no Ray or worker process behind."""

from __future__ import annotations

import os
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.slow
def test_serve_answers_then_stops_cleanly_on_sigint(smollm2_stores, tmp_path):
    store = smollm2_stores["int8"].path
    port = _free_port()
    # its own Ray: no RAY_ADDRESS, and a temp folder where no cluster address is recorded
    # (the session's test cluster records its address under /tmp/ray)
    ray_tmp = tempfile.mkdtemp(prefix="lsray", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("w")
    cmd = [LLM_SHARD, "serve", str(store), "--worker", "ram=1GiB", "--worker", "ram=1GiB",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not become healthy in 300 s"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        out = httpx.post(url + "/v1/completions", timeout=120,
                         json={"prompt": "The capital of France is", "max_tokens": 4,
                               "temperature": 0}).json()
        assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] >= 1
        chat = httpx.post(url + "/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 4}).json()
        assert chat["choices"][0]["message"]["content"] is not None

        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in _alive(tree))
        assert "raylet" in names and ray_tmp in names, "serve did not start a Ray of its own"
        assert "Worker" in names or "ray::" in names or "default_worker" in names

        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        text = (tmp_path / "serve.log").read_text()
        assert rc == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        deadline = time.monotonic() + 30
        while (_alive(tree) or [p for p in psutil.process_iter() if _ours(p, ray_tmp)]) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(tree) + [p for p in psutil.process_iter() if _ours(p, ray_tmp)]
        assert not left, [" ".join(p.cmdline())[:200] for p in left]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in _alive(tree) + [p for p in psutil.process_iter() if _ours(p, ray_tmp)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_serve_and_chat_have_help():
    for verb in ("serve", "chat", "models", "node-resources"):
        out = subprocess.run([LLM_SHARD, verb, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "Usage:" in out.stdout, out.stderr


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
