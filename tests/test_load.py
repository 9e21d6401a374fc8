"""The HTTP server under load, and against its own OpenAPI spec: 200 concurrent requests
(streamed and not, completions and chat) from a second process with no error and none
lost, the server's RSS bounded; then schemathesis: no 5xx (503 included) and no hang on
any operation, its bodies also given huge integers and lone surrogates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

from llm_shard.coordinator.http import BackgroundServer, create_app

MODEL = "smollm2-135m"
N_REQUESTS = 200

# The load, as a script for a second process: prints one JSON line of results.
LOAD = textwrap.dedent("""
    import asyncio, json, sys, time
    import httpx

    URL, N = sys.argv[1], int(sys.argv[2])
    PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):",
               "Water boils at", "The three primary colors are"]

    async def one(client, k):
        chat, stream = k % 2 == 0, k % 4 >= 2
        body = {"model": "smollm2-135m", "max_tokens": 4 + k % 5, "temperature": 0,
                "stream": stream}
        if chat:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": PROMPTS[k % 5]}]
        else:
            path = "/v1/completions"
            body["prompt"] = PROMPTS[k % 5]
        t0 = time.perf_counter()
        try:
            if stream:
                events, done = [], False
                async with client.stream("POST", URL + path, json=body) as r:
                    if r.status_code != 200:
                        return k, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", 0
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            continue
                        events.append(json.loads(line[6:]))
                if not done or not events or events[-1]["choices"][0]["finish_reason"] is None:
                    return k, f"stream ended early: {events[-1:]}", 0
            else:
                r = await client.post(URL + path, json=body)
                if r.status_code != 200:
                    return k, f"HTTP {r.status_code}: {r.text[:200]}", 0
                out = r.json()
                if out["usage"]["completion_tokens"] < 1 or \\
                        out["choices"][0]["finish_reason"] not in ("stop", "length"):
                    return k, f"bad body {out}", 0
        except Exception as e:
            return k, f"{type(e).__name__}: {e}", 0
        return k, None, time.perf_counter() - t0

    async def main():
        limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(one(client, k) for k in range(N)))
            wall = time.perf_counter() - t0
        lat = sorted(t for _, err, t in got if err is None)
        print(json.dumps({"n": len(got), "ids": sorted(k for k, _, _ in got),
                          "errors": [(k, err) for k, err, _ in got if err][:10],
                          "n_errors": sum(1 for _, err, _ in got if err),
                          "p50": lat[len(lat) // 2] if lat else None,
                          "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                          "wall": wall}))

    asyncio.run(main())
""")


@pytest.fixture(scope="module")
def llm(ray_cluster, smollm2_stores):
    from llm_shard import LLM

    with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB", "ram=1GiB"],
             use_all_workers=True, cache_tokens=4096) as model:
        yield model


@pytest.fixture(scope="module")
def server(llm):
    s = BackgroundServer(create_app(llm, model_name=MODEL))
    yield s
    s.stop()


def _load(url: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, url, str(n)], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_200_concurrent_requests_from_another_process(server, llm):
    me = psutil.Process()
    _load(server.url, 20)  # warm up: first-request allocations are not a leak
    rss0 = me.memory_info().rss
    t0 = time.monotonic()
    got = _load(server.url, N_REQUESTS)
    rss1 = me.memory_info().rss
    print(f"\n{N_REQUESTS} requests in {got['wall']:.1f} s: latency p50 {got['p50']:.2f} s, "
          f"p99 {got['p99']:.2f} s; server RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB")
    assert got["n_errors"] == 0, got["errors"]
    assert got["ids"] == list(range(N_REQUESTS))  # none lost
    assert time.monotonic() - t0 < 200
    # every request finished and left nothing behind
    m = llm.metrics()
    assert m["running"] == 0 and m["waiting"] == 0
    assert rss1 - rss0 < 200 * 2**20, (rss0, rss1)


# generated values that would only make a case slow, never more interesting
_SMALL = {"max_tokens": 4, "max_completion_tokens": 4, "max_length": 64, "logprobs": None,
          "top_logprobs": 2}


def _small(body: dict, path: str) -> dict:
    for key, cap in _SMALL.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and \
                (cap is None or value > cap):
            body[key] = cap if cap is not None else min(value, 2)
    key, cap = ("max_length", 64) if path == "/" else ("max_tokens", 4)
    if body.get(key) is None:  # the defaults (up to 512 or 2048 tokens) are only slow
        body[key] = cap
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:4]
    return body


# What the spec's types allow but no field can mean: integers past 64 bits (msgpack carries
# none), token ids outside any vocabulary, and text that is not Unicode (a lone surrogate,
# sent as JSON's \ud800 escape). One of them, or none, goes into each generated body.
HUGE = [2**64, 2**64 - 1, 2**63, -(2**63) - 1, 10**30, -1]
SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]  # lone, however they are paired
INT_FIELDS = ["top_k", "seed", "max_tokens", "max_completion_tokens", "max_length",
              "logprobs", "top_logprobs", "n", "stop_token_ids", "prompt"]
TEXT_FIELDS = ["prompt", "stop", "model", "content", "role", "history"]


def _hostile(body: dict, field: str, value) -> dict:
    """`value` into `field` of `body` (in its place: a message's content, a prompt's token,
    a history turn), whatever the route; other routes ignore unknown fields."""
    if field == "content" or field == "role":
        body["messages"] = [{"role": "user", "content": "hi", field: value}]
    elif field == "history":
        body["history"] = [[value, "an answer"]]
    elif field in ("stop_token_ids", "prompt") and isinstance(value, int):
        body[field] = [1, value]
    else:
        body[field] = value
    return body


@pytest.mark.slow
def test_the_openapi_spec_gets_no_5xx_and_no_hang(server, llm):
    """Every operation of /openapi.json, 30 generated cases each, most with one hostile
    value; any 5xx fails, 503 included, and the engine serves on after them all
    (schemathesis' own pytest plugin is not used: it fails on this pytest with
    `no attribute '_nodeid'`)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings  # schemathesis brings hypothesis
    from hypothesis import strategies as st

    hostile = st.one_of(st.none(),
                        st.tuples(st.sampled_from(INT_FIELDS), st.sampled_from(HUGE)),
                        st.tuples(st.sampled_from(TEXT_FIELDS), st.sampled_from(SURROGATES)))
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen = []
    for result in api.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy(), bad=hostile)
        @settings(max_examples=30, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],  # no shrinking: report as found
                  suppress_health_check=list(HealthCheck))
        def check(case, bad):
            if isinstance(case.body, dict):
                case.body = _small(case.body, case.path)
                if bad is not None:
                    case.body = _hostile(case.body, *bad)
            t0 = time.monotonic()
            response = case.call(timeout=30)
            assert time.monotonic() - t0 < 30
            assert response.status_code < 500, \
                (case.method, case.path, case.body, response.status_code, response.text[:500])
            seen.append((case.method, case.path, response.status_code))

        check()
    counts = {}
    for method, path, status in seen:
        counts.setdefault(f"{method} {path}", {}).setdefault(status, 0)
        counts[f"{method} {path}"][status] += 1
    print(f"\nschemathesis: {len(seen)} cases; status counts {counts}")
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /"} <= set(counts)
    # what the first schemathesis run found: an unknown role was a 500 (now 400)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400 and "unknown role" in r.json()["error"]["message"]
    deadline = time.monotonic() + 30  # a stream's cancel reaches the scheduler in a moment
    while (m := llm.metrics())["running"] + m["waiting"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m["running"] == m["waiting"] == 0, m  # nothing left running
    assert m["finished_total"].get("error", 0) == 0, m  # nothing failed inside the engine
