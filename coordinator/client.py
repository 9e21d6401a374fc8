"""Python clients of `llm-shard serve`: `Client` (threads) and `AsyncClient` (asyncio).

    from llm_shard import Client
    client = Client("http://127.0.0.1:8000")
    outs = client.generate(prompts, max_tokens=64, progress=True, checkpoint="out.jsonl")
    for piece in client.stream("Once upon a time"):
        print(piece, end="", flush=True)

`generate` sends every prompt to `/v1/completions` (at most `concurrency` at once),
returns `Completion`s in input order, retries connection failures with backoff, and with
`checkpoint=PATH` appends each finished prompt to a JSONL file as it arrives, so that a
re-run of the same batch skips the prompts already done. Sampling keywords are those of
`SamplingParams` (max_tokens, temperature, top_p, top_k, repetition_penalty, stop,
stop_token_ids, seed, logprobs, ignore_eos), checked here before anything is sent.
Light: needs httpx and tqdm, not torch or Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx

from llm_shard.cluster.types import Completion, SamplingParams

Prompt = str | Sequence[int]
RETRY_STATUS = (502, 504)  # a proxy in front of the server that lost it for a moment


class ClientError(RuntimeError):
    """The server refused a request (4xx/5xx): `status` and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    try:
        params = SamplingParams(**sampling).to_dict()
    except TypeError as e:
        raise TypeError(f"{e}; sampling keywords are those of SamplingParams") from None
    return {k: v for k, v in params.items() if v is not None}


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500]
    raise ClientError(resp.status_code, message)


def _completion(choice: dict, prompt: Prompt, index: int) -> Completion:
    lps = choice.get("id_logprobs")
    return Completion(
        text=choice["text"], token_ids=choice.get("token_ids", []),
        prompt_token_ids=choice.get("prompt_token_ids", []),
        finish_reason=choice.get("finish_reason"),
        logprobs=[{int(t): v for t, v in step.items()} for step in lps] if lps else None,
        prompt=prompt if isinstance(prompt, str) else None, index=index)


def _pieces(line: str, key: str) -> str | None:
    """The text of one SSE line of a completions (key "text") or chat ("content") stream;
    None at [DONE]."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        raise ClientError(chunk["error"].get("code") or 500, chunk["error"]["message"])
    out = []
    for c in chunk.get("choices", []):
        out.append(c.get("text") or "" if key == "text" else
                   (c.get("delta") or {}).get("content") or "")
    return "".join(out)


class Checkpoint:
    """A JSONL file of finished prompts: one line {"index", "prompt", "params", "completion"}
    each. `done` holds the lines that match this batch (same prompt at the same index, same
    sampling); a torn last line from an interrupted run is ignored."""

    def __init__(self, path: str | os.PathLike, prompts: list[Prompt], params: dict) -> None:
        self.path, self.params, self.lock = Path(path), params, threading.Lock()
        self.done: dict[int, Completion] = {}
        if self.path.exists():
            text = self.path.read_text()
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                    k, c = row["index"], dict(row["completion"])
                except (ValueError, KeyError, TypeError):
                    continue
                if 0 <= k < len(prompts) and row.get("prompt") == _jsonable(prompts[k]) \
                        and row.get("params") == params:
                    if c.get("logprobs") is not None:
                        c["logprobs"] = [{int(t): v for t, v in s.items()} for s in c["logprobs"]]
                    self.done[k] = Completion(**c)
            torn = bool(text) and not text.endswith("\n")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
        self.file = self.path.open("a")
        if torn:
            self.file.write("\n")

    def record(self, k: int, prompt: Prompt, c: Completion) -> None:
        line = json.dumps({"index": k, "prompt": _jsonable(prompt), "params": self.params,
                           "completion": c.to_dict()}, ensure_ascii=False)
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _jsonable(prompt: Prompt):
    return prompt if isinstance(prompt, str) else [int(t) for t in prompt]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="prompt")


def _check_prompts(prompts) -> list[Prompt]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for k, p in enumerate(prompts):
        if not isinstance(p, str) and not all(isinstance(t, int) for t in p):
            raise TypeError(f"prompt {k} must be a string or a list of token ids")
    return prompts


class _Base:
    def __init__(self, url: str, api_key: str | None, model: str | None, timeout: float,
                 concurrency: int, retries: int, backoff: float) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url, self.model = url.rstrip("/"), model
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        key = api_key or os.environ.get("LLM_SHARD_API_KEY")
        # as UTF-8 bytes: httpx encodes a str header as ASCII, and the server compares bytes
        self.headers = {"Authorization": f"Bearer {key}".encode()} if key else {}
        self.timeout = httpx.Timeout(timeout, connect=10.0)

    def _body(self, **fields) -> dict:
        return {"model": self.model, **fields} if self.model else fields

    def _delay(self, attempt: int) -> float:
        return self.backoff * 2 ** attempt


class Client(_Base):
    """A blocking client of one `llm-shard serve` (thread-safe)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 model: str | None = None, timeout: float = 600.0, concurrency: int = 8,
                 retries: int = 5, backoff: float = 0.5) -> None:
        super().__init__(url, api_key, model, timeout, concurrency, retries, backoff)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, path, json=body)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                    _raise_for(resp)
                    return resp
            time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def _stream(self, path: str, body: dict, key: str) -> Iterator[str]:
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        _raise_for(resp)
                    for line in resp.iter_lines():
                        piece = _pieces(line, key)
                        if piece is None:
                            return
                        if piece:
                            attempt = self.retries  # text was given: never replay it
                            yield piece
                return
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
            time.sleep(self._delay(attempt))

    def complete(self, prompt: Prompt, **sampling) -> Completion:
        """One prompt, one Completion (with token ids, and log-probs when asked)."""
        body = self._body(prompt=_jsonable(prompt), return_token_ids=True, **_sampling(sampling))
        return _completion(self._request("POST", "/v1/completions", body).json()["choices"][0],
                           prompt, 0)

    def generate(self, prompts: Prompt | Sequence[Prompt], *, progress: bool = False,
                 checkpoint: str | os.PathLike | None = None, concurrency: int | None = None,
                 **sampling) -> list[Completion]:
        """Complete every prompt, `concurrency` at a time; Completions in input order."""
        prompts, params = _check_prompts(prompts), _sampling(sampling)
        ckpt = Checkpoint(checkpoint, prompts, params) if checkpoint is not None else None
        outs: dict[int, Completion] = dict(ckpt.done) if ckpt else {}
        bar = _progress(len(prompts), len(outs), progress)

        def one(k: int) -> None:
            c = self.complete(prompts[k], **sampling)
            c.index = k
            outs[k] = c
            if ckpt:
                ckpt.record(k, prompts[k], c)
            bar.update(1)

        todo = [k for k in range(len(prompts)) if k not in outs]
        pool = ThreadPoolExecutor(concurrency or self.concurrency, "llm-shard-client")
        try:
            futures = [pool.submit(one, k) for k in todo]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # the first failure, raised here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            if ckpt:
                ckpt.close()
        return [outs[k] for k in range(len(prompts))]

    def stream(self, prompt: Prompt, **sampling) -> Iterator[str]:
        """Text pieces of one completion as the server generates them."""
        body = self._body(prompt=_jsonable(prompt), stream=True, **_sampling(sampling))
        yield from self._stream("/v1/completions", body, "text")

    def chat(self, messages: list[dict], **sampling) -> str:
        body = self._body(messages=messages, **_sampling(sampling))
        return self._request("POST", "/v1/chat/completions", body).json()[
            "choices"][0]["message"]["content"]

    def chat_stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        body = self._body(messages=messages, stream=True, **_sampling(sampling))
        yield from self._stream("/v1/chat/completions", body, "content")

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def health(self) -> dict:
        return self.http.get("/health").json()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods, awaited (streams are async iterators)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 model: str | None = None, timeout: float = 600.0, concurrency: int = 8,
                 retries: int = 5, backoff: float = 0.5) -> None:
        super().__init__(url, api_key, model, timeout, concurrency, retries, backoff)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers,
                                      timeout=self.timeout)

    async def _request(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = await self.http.request(method, path, json=body)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                    _raise_for(resp)
                    return resp
            await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    async def _stream(self, path: str, body: dict, key: str) -> AsyncIterator[str]:
        for attempt in range(self.retries + 1):
            try:
                async with self.http.stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        _raise_for(resp)
                    async for line in resp.aiter_lines():
                        piece = _pieces(line, key)
                        if piece is None:
                            return
                        if piece:
                            attempt = self.retries
                            yield piece
                return
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
            await asyncio.sleep(self._delay(attempt))

    async def complete(self, prompt: Prompt, **sampling) -> Completion:
        body = self._body(prompt=_jsonable(prompt), return_token_ids=True, **_sampling(sampling))
        resp = await self._request("POST", "/v1/completions", body)
        return _completion(resp.json()["choices"][0], prompt, 0)

    async def generate(self, prompts: Prompt | Sequence[Prompt], *, progress: bool = False,
                       checkpoint: str | os.PathLike | None = None,
                       concurrency: int | None = None, **sampling) -> list[Completion]:
        prompts, params = _check_prompts(prompts), _sampling(sampling)
        ckpt = Checkpoint(checkpoint, prompts, params) if checkpoint is not None else None
        outs: dict[int, Completion] = dict(ckpt.done) if ckpt else {}
        bar = _progress(len(prompts), len(outs), progress)
        gate = asyncio.Semaphore(concurrency or self.concurrency)

        async def one(k: int) -> None:
            async with gate:
                c = await self.complete(prompts[k], **sampling)
            c.index = k
            outs[k] = c
            if ckpt:
                ckpt.record(k, prompts[k], c)
            bar.update(1)

        tasks = [asyncio.ensure_future(one(k)) for k in range(len(prompts)) if k not in outs]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            bar.close()
            if ckpt:
                ckpt.close()
        return [outs[k] for k in range(len(prompts))]

    async def stream(self, prompt: Prompt, **sampling) -> AsyncIterator[str]:
        body = self._body(prompt=_jsonable(prompt), stream=True, **_sampling(sampling))
        async for piece in self._stream("/v1/completions", body, "text"):
            yield piece

    async def chat(self, messages: list[dict], **sampling) -> str:
        body = self._body(messages=messages, **_sampling(sampling))
        resp = await self._request("POST", "/v1/chat/completions", body)
        return resp.json()["choices"][0]["message"]["content"]

    async def chat_stream(self, messages: list[dict], **sampling) -> AsyncIterator[str]:
        body = self._body(messages=messages, stream=True, **_sampling(sampling))
        async for piece in self._stream("/v1/chat/completions", body, "content"):
            yield piece

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).json()["data"]]

    async def health(self) -> dict:
        return (await self.http.get("/health")).json()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


__all__ = ["Client", "AsyncClient", "ClientError", "Checkpoint"]
