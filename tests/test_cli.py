"""The command line's shared parts: one error style for every verb, model names wherever a
store is asked for (verify too), and the serve/chat flags that are EngineConfig's fields."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from llm_shard.coordinator.cli import ENGINE_FLAGS, cli, engine_options
from llm_shard.coordinator.config import EngineConfig

LLM_SHARD = str(Path(sys.executable).with_name("llm-shard"))


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, prog_name="llm-shard")


@pytest.fixture()
def home(tmp_path, smollm2_stores):
    """A store folder that holds smollm2-135m (the session's int8 store, linked)."""
    (tmp_path / "smollm2-135m").symlink_to(smollm2_stores["int8"].path)
    return tmp_path


def test_verify_takes_a_model_name_and_a_path(home, smollm2_stores):
    env = {"LLM_SHARD_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    by_name = invoke("verify", "smollm2-135m", env=env)
    assert by_name.exit_code == 0 and "files OK" in by_name.stdout, by_name.output
    by_path = invoke("verify", str(smollm2_stores["int8"].path), env=env)
    assert by_path.exit_code == 0 and "files OK" in by_path.stdout, by_path.output
    unknown = invoke("verify", "no-such-model", env=env)
    assert unknown.exit_code == 2
    assert unknown.stderr.startswith("error: unknown model 'no-such-model'"), unknown.output


def test_verify_names_a_corrupt_file(home, smollm2_stores, tmp_path_factory):
    import shutil

    copy = tmp_path_factory.mktemp("corrupt") / "store"
    shutil.copytree(smollm2_stores["int8"].path, copy)
    head = copy / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    out = invoke("verify", str(copy))
    assert out.exit_code == 2 and "head.safetensors fails its sha256" in out.stderr, out.output


def _one_error(res, code: int, says: str) -> None:
    assert res.exit_code == code, res.output
    assert res.stderr.startswith(f"error: {says}"), res.stderr
    assert "Error:" not in res.output and "Traceback" not in res.output, res.output


def test_every_kind_of_failure_is_one_error_line(home, smollm2_stores, tmp_path):
    env = {"LLM_SHARD_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    # a refused request of a verb (was click's "Error: ...")
    _one_error(invoke("models", "--remove", "nope", env=env), 1, "no store named 'nope'")
    # a plan that cannot fit
    _one_error(invoke("plan", "smollm2-135m", "--worker", "ram=10MiB", env=env), 1,
               "cannot place 30 blocks")
    # bad usage: a bad value, a missing option, an unknown verb, an unknown flag
    bad = invoke("plan", "smollm2-135m", "--worker", "lots", env=env)
    _one_error(bad, 2, "Invalid value for --worker: worker spec 'lots'")
    assert "llm-shard plan -h" in bad.stderr
    _one_error(invoke("plan", "smollm2-135m", env=env), 2, "Missing option '--worker'")
    _one_error(invoke("nope"), 2, "No such command 'nope'")
    _one_error(invoke("--bogus"), 2, "No such option '--bogus'")
    # an expected error of the library: a folder that is neither a store nor a checkpoint
    (tmp_path / "empty").mkdir()
    _one_error(invoke("verify", str(tmp_path / "empty"), env=env), 2,
               f"{tmp_path / 'empty'}: not a checkpoint folder")
    # help is not an error
    assert invoke("plan", "--help").exit_code == 0


def test_the_console_script_says_error_too(tmp_path):
    out = subprocess.run([LLM_SHARD, "models", "--remove", "nope"], capture_output=True,
                         text=True, timeout=60, env={"LLM_SHARD_HOME": str(tmp_path),
                                                     "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and out.stderr.startswith("error: no store named 'nope'")
    assert "Error:" not in out.stderr


def _parsed(*flags: str) -> EngineConfig:
    seen = []

    @click.command()
    @engine_options
    def probe(engine: EngineConfig) -> None:
        seen.append(engine)

    res = CliRunner().invoke(probe, list(flags))
    assert res.exit_code == 0, res.output
    return seen[0]


def test_serve_and_chat_flags_are_engine_config_fields():
    assert set(ENGINE_FLAGS) <= set(EngineConfig.names())
    assert _parsed() == EngineConfig()  # every flag's default is the field's
    got = _parsed("--address", "10.0.0.1:6379", "--worker", "ram=1GiB", "--worker",
                  "ram=2GiB,disk=8GiB", "--dtype", "fp32", "--cache-tokens", "512",
                  "--micro-batches", "3", "--wire-dtype", "fp16", "--no-encrypt",
                  "--max-restarts", "0")
    assert got == EngineConfig(address="10.0.0.1:6379",
                               workers=["ram=1GiB", "ram=2GiB,disk=8GiB"], dtype="fp32",
                               cache_tokens=512, micro_batches=3, wire_dtype="fp16",
                               encrypt=False, max_restarts=0)
    for verb in ("serve", "chat"):
        params = {p.name for p in cli.commands[verb].params}
        assert set(ENGINE_FLAGS) <= params, verb


def test_engine_config_replace_and_llm_keywords():
    base = EngineConfig(workers=2, cache_tokens=1024)
    assert base.replace(cache_tokens=512) == EngineConfig(workers=2, cache_tokens=512)
    with pytest.raises(TypeError, match="cache_tokenz"):
        base.replace(cache_tokenz=1)
    from llm_shard import LLM

    with pytest.raises(TypeError, match="cache_tokenz"):  # before any Ray or store work
        LLM("no-such-model", workers=1, cache_tokenz=1)


class _NoEngine:
    """What `serve` builds its app on, without Ray or workers."""

    scheduler = None

    def __init__(self, store) -> None:
        self.store = store

    def describe_plan(self) -> str:
        return "plan"

    def shutdown(self) -> None:
        pass


def _served(monkeypatch, smollm2_stores, *flags: str, env: dict | None = None):
    """(result, app) of `serve` with its engine and its uvicorn stubbed out."""
    import llm_shard.coordinator.cli as cli_module
    import llm_shard.coordinator.http as http

    apps = []
    monkeypatch.setattr(cli_module, "_open_llm",
                        lambda model, engine: _NoEngine(smollm2_stores["int8"]))
    monkeypatch.setattr(http, "run", lambda app, sock, log_level: apps.append(app))
    # no Ray here: serve's own disconnect would end this test session's Ray connection
    monkeypatch.setattr(cli_module, "_stop_ray", lambda: None)
    env = {"LLM_SHARD_API_KEY": "", **(env or {})}
    res = invoke("serve", "smollm2-135m", "--port", "0", *flags, env=env)
    return res, apps[0] if apps else None


def test_serve_reads_its_api_key_from_a_file_or_the_environment(monkeypatch, smollm2_stores,
                                                                tmp_path):
    """--api-key-file (or LLM_SHARD_API_KEY) keeps the key out of `ps`; a non-ASCII key is
    kept as UTF-8 bytes (what a client's header carries)."""
    key = tmp_path / "key"
    key.write_text("clé-ключ\n")
    res, app = _served(monkeypatch, smollm2_stores, "--api-key-file", str(key))
    assert res.exit_code == 0, res.output
    assert app.state.api_key == "clé-ключ".encode() and "API key required" in res.stderr
    res, app = _served(monkeypatch, smollm2_stores, env={"LLM_SHARD_API_KEY": "sesame"})
    assert res.exit_code == 0 and app.state.api_key == b"sesame", res.output
    res, app = _served(monkeypatch, smollm2_stores)
    assert res.exit_code == 0 and app.state.api_key is None, res.output
    res, _ = _served(monkeypatch, smollm2_stores, "--api-key-file", str(key),
                     env={"LLM_SHARD_API_KEY": "sesame"})
    _one_error(res, 2, "give --api-key (or LLM_SHARD_API_KEY) or --api-key-file, not both")
    (tmp_path / "empty").write_text(" \n")
    res, _ = _served(monkeypatch, smollm2_stores, "--api-key-file", str(tmp_path / "empty"))
    _one_error(res, 2, "Invalid value for --api-key-file: ")
    assert "is empty" in res.stderr
    res, _ = _served(monkeypatch, smollm2_stores, "--api-key-file", str(tmp_path / "none"))
    _one_error(res, 2, "Invalid value for --api-key-file: cannot read a key")


def test_serve_caps_prompts_per_request(monkeypatch, smollm2_stores):
    res, app = _served(monkeypatch, smollm2_stores)
    assert res.exit_code == 0 and app.state.served.max_prompts == 256, res.output
    res, app = _served(monkeypatch, smollm2_stores, "--max-prompts-per-request", "3")
    assert res.exit_code == 0 and app.state.served.max_prompts == 3, res.output
    res, _ = _served(monkeypatch, smollm2_stores, "--max-prompts-per-request", "0")
    _one_error(res, 2, "Invalid value for '--max-prompts-per-request'")
