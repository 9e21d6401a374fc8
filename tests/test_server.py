"""The HTTP server against a real LLM (SmolLM2 int8 over two Ray workers): the official
`openai` package (chat and completions, streamed and not), the ChatGLM api.py shape,
models, health, metrics, the API key, every bad input's 4xx, and disconnects that cancel."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from llm_shard.coordinator.http import BackgroundServer, bind, create_app

MODEL = "smollm2-135m"
KEY = "sesame"


class Recording:
    """The LLM as the server sees it, counting what it submits and cancels."""

    def __init__(self, llm) -> None:
        self.llm, self.submitted, self.cancelled = llm, [], []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def submit(self, ids, params=None, on_text=None, request=None):
        self.submitted.append((list(ids), params))
        return self.llm.submit(ids, params, on_text, request)

    def cancel(self, future) -> None:
        self.cancelled.append(future)
        self.llm.cancel(future)


@pytest.fixture(scope="module")
def llm(ray_cluster, smollm2_stores):
    from llm_shard import LLM

    with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB", "ram=1GiB"],
             use_all_workers=True, cache_tokens=1024) as model:
        yield model


@pytest.fixture(scope="module")
def recording(llm):
    return Recording(llm)


@pytest.fixture(scope="module")
def server(recording):
    s = BackgroundServer(create_app(recording, model_name=MODEL))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def locked(llm):
    s = BackgroundServer(create_app(llm, model_name=MODEL, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_completions(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=8, temperature=0, logprobs=2, seed=1)
    choice = out.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert len(choice.logprobs.tokens) == out.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    again = openai_client.completions.create(model=MODEL, prompt="The capital of France is",
                                             max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_openai_completions_stream_and_stop(openai_client):
    pieces, reasons, usage = [], [], None
    stream = openai_client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            reasons.append(c.finish_reason)
    text = "".join(pieces)
    assert len([p for p in pieces if p]) > 1, "the reply came in one piece, not streamed"
    assert reasons[-1] in ("stop", "length") and usage.completion_tokens >= 1
    whole = openai_client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,",
                                             max_tokens=10, temperature=0)
    assert text == whole.choices[0].text
    # a stop string cuts the text before it, finish_reason "stop"
    stop = text.strip()[:2] if len(text.strip()) >= 2 else None
    if stop:
        cut = openai_client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,",
                                               max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_openai_chat(openai_client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                temperature=0.7, seed=7)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content
    same = openai_client.chat.completions.create(model=MODEL, messages=messages,
                                                 max_tokens=12, temperature=0.7, seed=7)
    assert same.choices[0].message.content == msg.content  # a seed reproduces sampling
    pieces = []
    for chunk in openai_client.chat.completions.create(model=MODEL, messages=messages,
                                                       max_tokens=12, temperature=0.7, seed=7,
                                                       stream=True):
        pieces += [c.delta.content or "" for c in chunk.choices]
    assert "".join(pieces) == msg.content and len([p for p in pieces if p]) > 1
    lp = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                               temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert len(content[0].top_logprobs) == 3


def test_models_health_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # a step first: the per-stage gauges exist once a step has been timed (so that this
    # test does not depend on the module's earlier tests having generated)
    done = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                      timeout=120)
    assert done.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("llm_shard_requests_total", "llm_shard_generated_tokens_total",
                 "llm_shard_queue_waiting", "llm_shard_stage_seconds{stage=\"1\"}",
                 "llm_shard_stage_busy_seconds{stage=\"1\"}", "llm_shard_wire_seconds",
                 "llm_shard_http_requests_total", "llm_shard_recoveries_total",
                 "llm_shard_scheduler_failures_total 0.0",
                 "llm_shard_worker_restarts_total{worker=\"0\"} 0.0",
                 "llm_shard_worker_block_bytes{tier=\"ram\",worker=\"0\"}",
                 "llm_shard_swap_read_bytes_total{worker=\"0\"}",
                 "llm_shard_gpu_stream_bytes_total{worker=\"0\"} 0.0",
                 "llm_shard_worker_rss_bytes{worker=\"0\"}"):
        assert name in text
    assert "<html" in httpx.get(server.url + "/").text.lower()


def test_seed_api_with_history(server, recording):
    first = httpx.post(server.url + "/", json={"prompt": "Hello! What is 2+2?",
                                               "max_length": 120, "temperature": 0.1},
                       timeout=120).json()
    assert first["status"] == 200 and first["response"] and first["time"]
    assert first["history"] == [["Hello! What is 2+2?", first["response"]]]
    before = len(recording.submitted[-1][0])
    second = httpx.post(server.url + "/", json={"prompt": "And 3+3?",
                                                "history": first["history"],
                                                "max_length": 200, "top_p": 0.9},
                        timeout=120).json()
    assert second["history"][0] == first["history"][0] and len(second["history"]) == 2
    assert second["history"][1][0] == "And 3+3?"
    assert len(recording.submitted[-1][0]) > before  # the history went into the prompt


BAD = [
    ("/v1/completions", b"{not json", 400, "malformed JSON"),
    ("/v1/completions", [1, 2], 400, "body"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "context"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi " * 9000, "max_tokens": 4}, 400, "context"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [99999999]}, 400, "vocabulary"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n must be 1"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "gpt-9"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages is empty"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "stream": True, "max_tokens": 10**6}, 400, "context"),
    ("/", {"history": []}, 400, "prompt"),
    ("/", {"prompt": "hi", "history": "none"}, 400, "history"),
    ("/", {"prompt": "hi", "max_length": 3}, 400, "max_length"),
    ("/", {"prompt": "hi", "max_length": 0}, 400, "max_length"),  # not "the default"
]


@pytest.mark.parametrize("path,body,status,says", BAD, ids=[f"{b[0]}-{i}"
                                                            for i, b in enumerate(BAD)])
def test_bad_input_gets_a_4xx_naming_the_problem(server, path, body, status, says):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"Content-Type": "application/json"},
                   timeout=30, **kw)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"], r.text


def test_api_key(locked):
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    assert httpx.post(locked.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(locked.url + "/v1/completions", json=body,
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(locked.url + "/v1/models").status_code == 401
    assert httpx.get(locked.url + "/metrics").status_code == 401
    ok = httpx.post(locked.url + "/v1/completions", json=body, timeout=60,
                    headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    assert httpx.get(locked.url + "/health").status_code == 200  # open, by design
    assert httpx.get(locked.url + "/").status_code == 200  # the page asks for the key


def _wait_cancelled(recording, n, llm):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = llm.metrics()
        if len(recording.cancelled) >= n and m["running"] == 0 and m["waiting"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"not cancelled: {len(recording.cancelled)} cancels, {llm.metrics()}")


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_generation(server, recording, llm, stream):
    before = dict(llm.metrics()["finished_total"])
    cancels = len(recording.cancelled)
    s = _raw_post(server.url, "/v1/completions",
                  {"prompt": "Write a long story about a dragon.", "max_tokens": 400,
                   "temperature": 0, "ignore_eos": True, "stream": stream})
    deadline = time.monotonic() + 60
    while llm.metrics()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    m = _wait_cancelled(recording, cancels + 1, llm)
    assert m["finished_total"].get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert m["finished_total"].get("length", 0) == before.get("length", 0)


def test_a_body_over_the_limit_gets_413(server):
    from llm_shard.coordinator.http import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "Traceback" not in r.text


def test_bind_takes_the_port_before_serving_and_names_what_is_wrong():
    """`bind` (what `serve` calls before it loads a model): port 0 takes a free port that
    no other socket can then take, SO_REUSEADDR or not (a bound socket that did not
    listen would let one), and a busy port or a host that does not resolve is a
    ValueError naming it."""
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(ValueError, match=rf"cannot bind 127.0.0.1:{port}: .*--port"):
            bind("127.0.0.1", port)
        with socket.socket() as other, pytest.raises(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("127.0.0.1", port))
    finally:
        sock.close()
    with pytest.raises(ValueError, match="cannot bind no-such-host.invalid:8000"):
        bind("no-such-host.invalid", 8000)
