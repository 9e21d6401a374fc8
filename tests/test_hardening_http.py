"""Hostile requests against the real server (SmolLM2 int8 over two Ray workers) fail alone,
each with a 4xx naming the problem: sampling fields out of what they can mean (2**64
top_k, token ids outside the vocabulary, seeds over 64 bits), lone surrogates in every
text field, a non-ASCII bearer token, too many prompts, max_completion_tokens 0, the
docs without the key. While four long requests run, every hostile one is refused and the
four finish; the engine refuses the same values from Python, naming the field."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from llm_shard.cluster.types import SamplingParams
from llm_shard.coordinator.http import BackgroundServer, create_app

MODEL = "smollm2-135m"
KEY = "sesame"
WIDE_KEY = "clé-ключ-🔑"  # non-ASCII: compared as UTF-8 bytes
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = 49152  # SmolLM2's
HUGE = 2**64  # msgpack carries no integer this big
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(ray_cluster, smollm2_stores):
    from llm_shard import LLM

    with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB", "ram=1GiB"],
             use_all_workers=True, cache_tokens=2048) as model:
        assert model.store.config.vocab_size == VOCAB
        yield model


@pytest.fixture(scope="module")
def locked(llm):
    s = BackgroundServer(create_app(llm, model_name=MODEL, api_key=KEY))
    yield s
    s.stop()


def post(url: str, path: str, body, headers=AUTH, timeout: float = 60) -> httpx.Response:
    """`body` as JSON with every non-ASCII character escaped: a lone surrogate travels as
    `\\ud800`, as any JSON encoder may send it."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=timeout,
                      headers={"Content-Type": "application/json", **headers})


# (path, body, status, what the message must name)
HOSTILE = [
    (CMPL, {"prompt": "hi", "top_k": HUGE}, 400, "top_k"),
    (CMPL, {"prompt": "hi", "top_k": VOCAB + 1}, 400, "top_k"),
    (CMPL, {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    (CMPL, {"prompt": "hi", "top_k": HUGE, "stream": True}, 400, "top_k"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [HUGE]}, 400, "stop_token_ids"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (CMPL, {"prompt": "hi", "stop_token_ids": list(range(2000))}, 400, "stop_token_ids"),
    (CMPL, {"prompt": "hi", "stop": ["a"] * 100}, 400, "stop"),
    (CMPL, {"prompt": "hi", "seed": HUGE}, 400, "seed"),
    (CMPL, {"prompt": "hi", "seed": -1}, 400, "seed"),
    (CMPL, {"prompt": "hi", "max_tokens": HUGE}, 400, "max_tokens"),
    (CMPL, {"prompt": "hi", "logprobs": HUGE}, 400, "logprobs"),
    (CMPL, {"prompt": [HUGE]}, 400, "prompt"),
    (CMPL, {"prompt": [1, -5]}, 400, "prompt"),
    (CMPL, {"prompt": [[1, 2], [VOCAB]]}, 400, "prompt"),
    (CMPL, {"prompt": ["hi"] * 257}, 400, "256"),
    (CMPL, {"prompt": [[1]] * 257}, 400, "256"),
    (CHAT, {"messages": USER, "top_k": HUGE}, 400, "top_k"),
    (CHAT, {"messages": USER, "stop_token_ids": [HUGE], "stream": True}, 400,
     "stop_token_ids"),
    (CHAT, {"messages": USER, "seed": HUGE}, 400, "seed"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": HUGE}, 400, "logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0, "max_tokens": 4}, 400,
     "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": HUGE}, 400, "max_tokens"),
    ("/", {"prompt": "hi", "max_length": HUGE}, 400, "max_length"),
    # lone surrogates, in every text field
    (CMPL, {"prompt": "\ud800"}, 400, "prompt"),
    (CMPL, {"prompt": ["ok", "a\udfffb"]}, 400, "prompt"),
    (CMPL, {"prompt": "hi", "stop": "\ud800"}, 400, "stop"),
    (CMPL, {"prompt": "hi", "stop": ["ok", "\udc00"]}, 400, "stop"),
    (CMPL, {"prompt": "hi", "model": "\ud800"}, 400, "model"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}]},
     400, "messages"),
    (CHAT, {"messages": [{"role": "\ud800", "content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": USER, "stop": "\ud800", "stream": True}, 400, "stop"),
    ("/", {"prompt": "\ud800"}, 400, "prompt"),
    ("/", {"prompt": "hi", "history": [["\ud800", "a"]]}, 400, "history"),
    ("/", {"prompt": "hi", "history": [["q", "\udfff"]]}, 400, "history"),
]


@pytest.mark.parametrize("path,body,status,says", HOSTILE,
                         ids=[f"{h[0]}-{i}" for i, h in enumerate(HOSTILE)])
def test_a_hostile_field_gets_a_4xx_naming_it(locked, path, body, status, says):
    r = post(locked.url, path, body)
    assert r.status_code == status, r.text[:500]
    assert says in r.json()["error"]["message"], r.text[:500]


@pytest.mark.slow
def test_the_bounds_admit_what_they_should(locked):
    """The edges of each bound are served: top_k = the vocabulary (and -1, vLLM's "off"),
    the last token id, a 64-bit seed, 256 prompts."""
    r = post(locked.url, CMPL, {"prompt": [1, VOCAB - 1], "max_tokens": 1, "top_k": VOCAB,
                                "stop_token_ids": [VOCAB - 1], "seed": HUGE - 1})
    assert r.status_code == 200, r.text
    r = post(locked.url, CMPL, {"prompt": "hi", "max_tokens": 1, "top_k": -1})
    assert r.status_code == 200, r.text
    r = post(locked.url, CMPL, {"prompt": [[1, 2]] * 256, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 256, r.text[:500]
    r = post(locked.url, CHAT, {"messages": USER, "max_completion_tokens": 1, "max_tokens": 9})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text


def test_the_prompt_cap_is_a_setting(llm):
    s = BackgroundServer(create_app(llm, model_name=MODEL, max_prompts_per_request=2))
    try:
        r = post(s.url, CMPL, {"prompt": ["a", "b", "c"], "max_tokens": 1})
        assert r.status_code == 400 and "at most 2 prompts" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "prompt"
        assert post(s.url, CMPL, {"prompt": ["a", "b"], "max_tokens": 1}).status_code == 200
    finally:
        s.stop()


def test_bearer_tokens_are_compared_as_bytes(llm, locked):
    """A non-ASCII token (sent as UTF-8, or as bytes that are not UTF-8) is a 401 on a
    server with an ASCII key, and a non-ASCII key works, from raw headers and the Client."""
    from llm_shard.coordinator.client import Client

    for token in ("Bearer ключ".encode(), b"Bearer \xe9\xff", f"Bearer {KEY}é".encode()):
        r = httpx.get(locked.url + "/v1/models", headers={"Authorization": token})
        assert r.status_code == 401, r.text
    s = BackgroundServer(create_app(llm, model_name=MODEL, api_key=WIDE_KEY))
    try:
        ok = httpx.get(s.url + "/v1/models",
                       headers={"Authorization": f"Bearer {WIDE_KEY}".encode()})
        assert ok.status_code == 200, ok.text
        assert httpx.get(s.url + "/v1/models", headers=AUTH).status_code == 401
        latin1 = httpx.get(s.url + "/v1/models",  # the same characters, other bytes
                           headers={"Authorization": "Bearer clé".encode("latin-1")})
        assert latin1.status_code == 401
        with Client(s.url, api_key=WIDE_KEY, retries=0) as client:
            assert client.models() == [MODEL]
    finally:
        s.stop()


def test_docs_and_the_spec_need_the_key(locked, llm):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(locked.url + path).status_code == 401, path
        r = httpx.get(locked.url + path, headers=AUTH)
        assert r.status_code == 200, (path, r.text[:200])
    assert "/v1/completions" in httpx.get(locked.url + "/openapi.json",
                                          headers=AUTH).json()["paths"]
    s = BackgroundServer(create_app(llm, model_name=MODEL))  # no key: open, as before
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(s.url + path).status_code == 200, path
    finally:
        s.stop()


class Broken:
    """The engine as the server sees it, unready for an internal reason."""

    WHY = "worker 1 at 10.0.0.7:/srv/secret/store failed: Traceback (most recent call)"

    def __init__(self, llm) -> None:
        self.llm = llm

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def not_ready(self) -> str:
        return self.WHY


def test_health_shows_no_internal_error_text_without_the_key(llm, caplog):
    for key in (None, KEY):
        s = BackgroundServer(create_app(Broken(llm), model_name=MODEL, api_key=key))
        try:
            with caplog.at_level("WARNING", logger="llm_shard.coordinator"):
                r = httpx.get(s.url + "/health")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            assert "secret" not in r.text and "10.0.0.7" not in r.text, r.text
            assert Broken.WHY in caplog.text  # the server's log says why
            if key:
                r = httpx.get(s.url + "/health", headers=AUTH)
                assert r.status_code == 503 and r.json()["why"] == Broken.WHY
        finally:
            s.stop()


def test_the_engine_refuses_the_same_values_naming_the_field(llm):
    """`LLM.generate` and `LLM.submit` from Python: a ValueError naming the field, before
    anything is queued (not a wire error that fails every request in flight)."""
    for field, kw in (("top_k", {"top_k": HUGE}), ("top_k", {"top_k": VOCAB + 1}),
                      ("stop_token_ids", {"stop_token_ids": [HUGE]}),
                      ("stop_token_ids", {"stop_token_ids": [VOCAB]}),
                      ("stop", {"stop": ["\ud800"]}), ("max_tokens", {"max_tokens": HUGE})):
        with pytest.raises(ValueError, match=field):  # SamplingParams' bounds, or the LLM's
            llm.generate(["hi"], SamplingParams(**kw))
    taken = llm.metrics()["requests_total"]
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate(prompt_token_ids=[[1, 2], [HUGE]])  # the good one is not run either
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.generate(["hi", "a\ud800"])
    with pytest.raises(ValueError, match="top_k"):
        llm.submit([1, 2], SamplingParams(top_k=HUGE))
    time.sleep(1)  # what was submitted would be taken by now
    assert llm.metrics()["requests_total"] == taken, llm.metrics()
    out = llm.generate(["hi"], SamplingParams(max_tokens=2, temperature=0))
    assert out[0].finish_reason in ("stop", "length")


LONG = {"prompt": "Write a long story about a dragon.", "max_tokens": 160,
        "temperature": 0, "ignore_eos": True}


@pytest.mark.slow
def test_hostile_requests_fail_alone_while_four_long_ones_run(locked, llm):
    results: list = [None] * 4

    def long(k: int) -> None:
        try:
            results[k] = post(locked.url, CMPL, {**LONG, "seed": k}, timeout=600)
        except Exception as e:  # noqa: BLE001 — reported below
            results[k] = e

    threads = [threading.Thread(target=long, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while llm.metrics()["running"] < 4:
        assert time.monotonic() < deadline, llm.metrics()
        time.sleep(0.05)
    before = dict(llm.metrics()["finished_total"])
    for path, body, status, says in HOSTILE:
        r = post(locked.url, path, body)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text[:300]
    for token in ("Bearer ключ".encode(), b"Bearer \xff"):
        assert httpx.get(locked.url + "/v1/models",
                         headers={"Authorization": token}).status_code == 401
    assert httpx.get(locked.url + "/docs").status_code == 401
    still = llm.metrics()
    assert still["running"] == 4, ("the long requests ended before the hostile ones did: "
                                   f"make them longer; {still}")
    for t in threads:
        t.join(timeout=600)
    for r in results:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert r.json()["choices"][0]["finish_reason"] == "length", r.text[:300]
        assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    after = llm.metrics()["finished_total"]
    assert after.get("length", 0) == before.get("length", 0) + 4, (before, after)
    assert after.get("error", 0) == before.get("error", 0), (before, after)
    fresh = post(locked.url, CHAT, {"messages": USER, "max_tokens": 2, "temperature": 0})
    assert fresh.status_code == 200 and fresh.json()["choices"][0]["message"]["content"] \
        is not None
