"""`llm-shard chat URL` in a pseudo-terminal (pexpect): two turns that keep the history,
/clear that forgets it, /quit that leaves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llm_shard.coordinator.http import BackgroundServer, create_app

pexpect = pytest.importorskip("pexpect")
LLM_SHARD = str(Path(sys.executable).with_name("llm-shard"))


class Recording:
    def __init__(self, llm) -> None:
        self.llm, self.submitted = llm, []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def submit(self, ids, params=None, on_text=None, request=None):
        self.submitted.append(list(ids))
        return self.llm.submit(ids, params, on_text, request)


@pytest.fixture(scope="module")
def served(ray_cluster, smollm2_stores):
    from llm_shard import LLM, EngineConfig

    config = EngineConfig(workers=["ram=1GiB", "ram=1GiB"], cache_tokens=1024)
    with LLM(str(smollm2_stores["int8"].path), config=config) as llm:
        assert llm.config == config and llm.pipeline.cache_tokens == 1024
        recording = Recording(llm)
        s = BackgroundServer(create_app(recording, model_name="smollm2-135m"))
        yield s, recording
        s.stop()


def _turn(child, line: str) -> str:
    child.sendline(line)
    child.expect_exact("bot> ")
    child.expect_exact("you> ", timeout=120)
    return child.before.strip()


def test_chat_against_a_server_for_two_turns(served):
    server, recording = served
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    child = pexpect.spawn(LLM_SHARD, ["chat", server.url, "--max-tokens", "12",
                                      "--temperature", "0"],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect_exact("/quit")
        child.expect_exact("you> ")
        first = _turn(child, "What is the capital of France?")
        assert first, "no reply"
        second = _turn(child, "And of Italy?")
        assert second
        tok = recording.tokenizer
        history = tok.decode(recording.submitted[-1])
        assert "capital of France" in history and "And of Italy?" in history
        assert first.split()[0] in history  # the first reply is in the second prompt
        child.sendline("/clear")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        _turn(child, "Hello")
        assert "France" not in tok.decode(recording.submitted[-1])
        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=30)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():
            child.terminate(force=True)
