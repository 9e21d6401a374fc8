"""The HTTP server: routes and schemas only; every request becomes `LLM.submit`/`cancel`.

    sock = bind("127.0.0.1", 8000)  # before the model loads: a busy port fails at once
    app = create_app(llm, model_name="smollm2-135m", api_key=None)
    run(app, sock)

Routes: `POST /` (the JittorLLMs/ChatGLM `api.py` shape), `POST /v1/completions` and
`POST /v1/chat/completions` (OpenAI-compatible, `stream: true` as server-sent events),
`GET /v1/models`, `GET /health` (503 until every worker of the plan is alive), `GET
/metrics` (Prometheus text) and `GET /` (the chat page). With an API key every route but
`/health` and the page demands `Authorization: Bearer KEY` (401 otherwise).

Errors are `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape): 400 for bad
input (malformed JSON, wrong types, bad sampling values, a prompt too long for the
context or the cache), 401 for a missing or wrong key, 404 for an unknown model, 503 when
the pipeline cannot serve. A client that disconnects cancels its generation, which frees
its caches on every stage.
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from llm_shard.cluster.types import Completion, SamplingParams

from .scheduler import RequestError

PAGE = Path(__file__).parent / "web" / "index.html"
MAX_BODY_BYTES = 8 << 20  # a request body over this gets 413 before it is parsed
DEFAULT_CHAT_MAX_TOKENS = 512  # chat requests that name no max_tokens (OpenAI: no limit)
SEED_MAX_LENGTH = 2048  # the ChatGLM api.py default of max_length (prompt + reply tokens)


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(status, message)
        self.kind, self.param = kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


# ---------------------------------------------------------------------------- schemas
class _Sampling(BaseModel):
    """The sampling fields both OpenAI routes take; names follow vLLM's SamplingParams."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    return_token_ids: bool = False  # vLLM's extension: token ids on each choice


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class SeedRequest(BaseModel):
    """The JittorLLMs/ChatGLM api.py body; history is [[question, answer], ...]."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    history: list[tuple[str, str]] = Field(default_factory=list)
    max_length: int | None = None
    top_p: float = 0.7
    temperature: float = 0.95


# ---------------------------------------------------------------------------- app
def create_app(llm, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `llm` (an `LLM`) under `model_name`."""
    app = FastAPI(title="llm-shard", version="0.1.0")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.llm = llm
    names = {model_name, Path(model_name).name, llm.store.path.name}
    registry, http_requests = _registry(llm)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        http_requests.labels(request.url.path, str(e.status_code)).inc()
        return _error(e.status_code, e.detail, e.kind, e.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        http_requests.labels(request.url.path, "400").inc()
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', '')}")
            elif isinstance(err.get("input"), bytes):
                problems.append("the body must be a JSON object, sent with Content-Type: "
                                "application/json")
            else:
                got = (f" (got {json.dumps(err['input'], default=str)[:60]})"
                       if "input" in err else "")
                problems.append(f"{where or 'body'}: {err.get('msg')}{got}")
        return _error(400, "; ".join(problems) or "invalid request")

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error")

    auth = [Depends(check_key)]

    def check_model(name: str | None) -> str:
        if name is not None and name not in names:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                           f"{model_name!r}", "not_found_error", "model")
        return model_name

    def tokenizer():
        if llm.tokenizer is None:
            raise ApiError(400, f"the store {llm.store.path.name} has no tokenizer: send "
                           "token ids as the prompt of /v1/completions")
        return llm.tokenizer

    def params(req: _Sampling, prompt_len: int, max_tokens: int | None, **extra) -> SamplingParams:
        if req.n != 1:
            raise ApiError(400, f"n must be 1, got {req.n}", param="n")
        if max_tokens is None:
            max_tokens = min(DEFAULT_CHAT_MAX_TOKENS, _context(llm) - prompt_len)
        try:
            p = SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                               top_p=req.top_p, top_k=req.top_k,
                               repetition_penalty=req.repetition_penalty,
                               stop=req.stop or (), stop_token_ids=req.stop_token_ids or (),
                               seed=req.seed, ignore_eos=req.ignore_eos, **extra)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        _check_fits(llm, prompt_len, p.max_tokens)
        return p

    # ------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        ready, why = _ready(llm)
        body = {"status": "ok" if ready else "unavailable", "model": model_name, "why": why}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return _raw(generate_latest(registry), CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "llm-shard",
            "max_model_len": _context(llm)}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        name = check_model(req.model)
        prompts = _prompts(req.prompt)
        ids = [p if isinstance(p, list) else tokenizer().encode(p) for p in prompts]
        sp = [params(req, len(i), 16 if req.max_tokens is None else req.max_tokens,
                     logprobs=req.logprobs) for i in ids]
        texts = [p if isinstance(p, str) else None for p in prompts]
        run = _Run(llm, ids, sp)
        http_requests.labels("/v1/completions", "200").inc()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:
            return _sse(run, _CompletionStream(head, req, texts, llm.tokenizer))
        outs = await run.wait(request)
        return {**head, "object": "text_completion",
                "choices": [_completion_choice(k, c, texts[k], req, llm.tokenizer)
                            for k, c in enumerate(outs)], "usage": _usage(outs)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest, request: Request):
        name = check_model(req.model)
        if not req.messages:
            raise ApiError(400, "messages is empty: send at least one message", param="messages")
        messages = [{"role": m.role, "content": _content(m.content)} for m in req.messages]
        try:  # an unknown role, a system message where the template allows none
            text = tokenizer().render_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = tokenizer().encode(text)
        top = req.top_logprobs or 0
        sp = params(req, len(ids), req.max_completion_tokens or req.max_tokens,
                    logprobs=top if req.logprobs else None)
        run = _Run(llm, [ids], [sp])
        http_requests.labels("/v1/chat/completions", "200").inc()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": name}
        if req.stream:
            return _sse(run, _ChatStream(head, req, llm.tokenizer))
        (out,) = await run.wait(request)
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "logprobs": _chat_logprobs(out, llm.tokenizer, top) if req.logprobs else None,
                  "finish_reason": out.finish_reason}
        if req.return_token_ids:
            choice.update(token_ids=out.token_ids, prompt_token_ids=out.prompt_token_ids)
        return {**head, "object": "chat.completion", "choices": [choice],
                "usage": _usage([out])}

    @app.post("/", dependencies=auth)
    async def seed_api(req: SeedRequest, request: Request):
        messages = []
        for q, a in req.history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": req.prompt})
        ids = tokenizer().encode(tokenizer().render_chat(messages, add_generation_prompt=True))
        max_length = (req.max_length if req.max_length is not None
                      else min(SEED_MAX_LENGTH, _context(llm)))  # 0 is no default
        if max_length <= len(ids):
            raise ApiError(400, f"max_length {max_length} leaves no room to answer: the "
                           f"prompt with its history is {len(ids)} tokens", param="max_length")
        sp = params(_Sampling(temperature=req.temperature, top_p=req.top_p), len(ids),
                    max_length - len(ids))
        (out,) = await _Run(llm, [ids], [sp]).wait(request)
        http_requests.labels("/", "200").inc()
        return {"response": out.text, "history": [*map(list, req.history), [req.prompt, out.text]],
                "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The server's socket, listening: taken before the model loads, so a busy port fails
    in a second rather than after minutes of loading, and nothing the load starts (Ray,
    workers, ZeroMQ) can take the port meanwhile. Listening, not just bound: Linux lets
    another SO_REUSEADDR socket bind a port that no socket listens on. Connections made
    meanwhile wait in its queue until `run` serves them. port=0 takes a free port (see
    `.getsockname()`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError as e:  # socket.gaierror too: a host name that does not resolve
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror}"
                         + (" (is another server on it? pick another with --port)"
                            if e.errno == errno.EADDRINUSE else "")) from None
    return sock


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` (from `bind`) until SIGINT or SIGTERM, then return (so the
    caller can stop the workers).

    uvicorn stops gracefully on either signal and then raises it again with the handlers
    it found; the handler set here turns that into a plain return."""
    import signal

    import uvicorn

    class Stopped(Exception):
        pass

    def stopped(sig, frame):
        raise Stopped(sig)

    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                      timeout_graceful_shutdown=5)).run(sockets=[sock])
    except Stopped:
        pass
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """`app` served from a thread of this process (notebooks, tests): `.url`, `.stop()`.
    port=0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 naming the limit, from
    its Content-Length or, for a chunked body, once that many bytes have arrived."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        messages, size = [], 0  # chunked: buffer up to the limit, then replay
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"the request body is over {self.max_bytes} bytes")
        await response(scope, receive, send)


# ---------------------------------------------------------------------------- engine bridge
class _Run:
    """Prompts submitted together; text pieces and finished Completions arrive on an asyncio
    queue as (index, piece) and (index, Future) from the scheduler thread."""

    def __init__(self, llm, ids: list[list[int]], params: list[SamplingParams]) -> None:
        self.llm, self.loop, self.queue = llm, asyncio.get_running_loop(), asyncio.Queue()
        self.futures: list[Future] = []
        try:
            for k, (i, p) in enumerate(zip(ids, params)):
                f = llm.submit(i, p, on_text=lambda piece, k=k: self._put((k, piece)))
                f.add_done_callback(lambda f, k=k: self._put((k, f)))
                self.futures.append(f)
        except ValueError as e:  # the prompt does not fit the context, or bad token ids
            self.cancel()
            raise ApiError(400, str(e)) from None
        except RequestError as e:
            self.cancel()
            raise ApiError(503, str(e), "server_error") from None

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def cancel(self) -> None:
        for f in self.futures:
            if not f.done():
                self.llm.cancel(f)

    async def wait(self, request: Request) -> list[Completion]:
        """Every Completion, in order; a client that disconnects first cancels them all."""
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in self.futures))
            done, _ = await asyncio.wait({watcher, gathered}, return_when="FIRST_COMPLETED")
            if gathered not in done:
                gathered.cancel()
                raise ApiError(499, "client disconnected")
            return _results(gathered)
        finally:
            watcher.cancel()
            self.cancel()


def _results(gathered) -> list[Completion]:
    try:
        return gathered.result()
    except RequestError as e:
        raise ApiError(503, str(e), "server_error") from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _CompletionStream:
    def __init__(self, head: dict, req: CompletionRequest, texts, tok) -> None:
        self.head, self.req, self.texts, self.tok = head, req, texts, tok

    def chunk(self, k: int, text: str, done: Completion | None) -> dict:
        choice = {"index": k, "text": text, "logprobs": None, "finish_reason": None}
        if done is not None:
            choice = _completion_choice(k, done, self.texts[k], self.req, self.tok)
            choice["text"] = text
        return {**self.head, "object": "text_completion", "choices": [choice]}

    def usage(self, outs) -> dict:
        return {**self.head, "object": "text_completion", "choices": [], "usage": _usage(outs)}


class _ChatStream:
    def __init__(self, head: dict, req: ChatRequest, tok) -> None:
        self.head, self.req, self.tok, self.started = head, req, tok, False

    def chunk(self, k: int, text: str, done: Completion | None) -> dict:
        delta = {"content": text} if text or done is None else {}
        if not self.started:
            delta, self.started = {"role": "assistant", **delta}, True
        choice = {"index": k, "delta": delta, "logprobs": None, "finish_reason": None}
        if done is not None:
            choice["finish_reason"] = done.finish_reason
            if self.req.logprobs:
                choice["logprobs"] = _chat_logprobs(done, self.tok, self.req.top_logprobs or 0)
            if self.req.return_token_ids:
                choice.update(token_ids=done.token_ids, prompt_token_ids=done.prompt_token_ids)
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    def usage(self, outs) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": [],
                "usage": _usage(outs)}


def _sse(run: _Run, fmt) -> StreamingResponse:
    """Server-sent events: `data: {chunk}` per text piece, a last chunk per choice with its
    finish_reason, a usage chunk when stream_options.include_usage, then `data: [DONE]`. An
    error after the stream began is sent as `data: {"error": …}`. If the client goes away,
    Starlette cancels this generator and its `finally` cancels the generation."""

    async def events():
        outs: dict[int, Completion] = {}
        try:
            while len(outs) < len(run.futures):
                k, item = await run.queue.get()
                if isinstance(item, str):
                    yield _data(fmt.chunk(k, item, None))
                    continue
                if item.cancelled():
                    return
                try:
                    outs[k] = item.result()
                except RequestError as e:
                    yield _data({"error": {"message": str(e), "type": "server_error",
                                           "param": None, "code": 503}})
                    break
                yield _data(fmt.chunk(k, "", outs[k]))
            else:
                if (fmt.req.stream_options or {}).get("include_usage"):
                    yield _data(fmt.usage([outs[k] for k in sorted(outs)]))
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------- metrics
def _registry(llm):
    """A registry of this app's own (so several apps in one process do not clash): the
    scheduler's counters read at scrape time, and HTTP requests by path and status."""
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class SchedulerCollector:
        def collect(self):
            if llm.scheduler is None:
                return
            m = llm.metrics()
            yield CounterMetricFamily("llm_shard_requests", "Requests the scheduler took",
                                      value=m["requests_total"])
            yield CounterMetricFamily("llm_shard_generated_tokens", "Tokens generated",
                                      value=m["tokens_total"])
            done = CounterMetricFamily("llm_shard_finished", "Requests finished, by reason",
                                       labels=["reason"])
            for reason, n in sorted(m["finished_total"].items()):
                done.add_metric([reason], n)
            yield done
            yield CounterMetricFamily("llm_shard_recoveries", "Re-plans after a worker loss",
                                      value=m["recoveries_total"])
            restarts = CounterMetricFamily("llm_shard_worker_restarts", "Times the worker "
                                           "was replaced after a loss", labels=["worker"])
            for w in llm.stats()["workers"]:
                restarts.add_metric([str(w["index"])], w["restarts"])
            yield restarts
            yield GaugeMetricFamily("llm_shard_queue_waiting", "Requests waiting for cache",
                                    value=m["waiting"])
            yield GaugeMetricFamily("llm_shard_running", "Requests being generated",
                                    value=m["running"])
            stage = GaugeMetricFamily("llm_shard_stage_seconds", "Compute seconds of one "
                                      "step per stage (moving average)", labels=["stage"])
            for i, s in enumerate(m["stage_seconds"]):
                stage.add_metric([str(i)], s)
            yield stage
            busy = GaugeMetricFamily("llm_shard_stage_busy_seconds", "Seconds a stage "
                                     "holds a step, receipt to send: compute, decoding, "
                                     "caches, sampling (moving average)", labels=["stage"])
            for i, s in enumerate(m["busy_seconds"]):
                busy.add_metric([str(i)], s)
            yield busy
            yield GaugeMetricFamily("llm_shard_step_seconds", "A micro-batch's round trip "
                                    "through every stage (moving average)",
                                    value=m["step_seconds"])
            yield GaugeMetricFamily("llm_shard_wire_seconds", "A step's round trip less the "
                                    "time stages held it: every hop's transport, and queueing "
                                    "behind other micro-batches (moving average)",
                                    value=m["wire_seconds"])
            yield CounterMetricFamily("llm_shard_cache_waits", "Requests that waited in the "
                                      "queue for cache room", value=m["cache_waits_total"])
            yield from worker_families()

    def worker_families():
        """Per worker: bytes of its blocks in each tier, disk-tier bytes read (rate() gives
        swap reads per second) and the seconds they took, bytes streamed to its GPU,
        resident memory."""
        tiers = GaugeMetricFamily("llm_shard_worker_block_bytes", "Bytes of the worker's "
                                  "blocks in each memory tier", labels=["worker", "tier"])
        read = CounterMetricFamily("llm_shard_swap_read_bytes", "Bytes of disk-tier blocks "
                                   "read (streamed)", labels=["worker"])
        read_s = CounterMetricFamily("llm_shard_swap_read_seconds", "Seconds spent reading "
                                     "disk-tier blocks", labels=["worker"])
        copied = CounterMetricFamily("llm_shard_gpu_stream_bytes", "Bytes of RAM- and "
                                     "disk-tier blocks copied to a GPU worker's GPU",
                                     labels=["worker"])
        rss = GaugeMetricFamily("llm_shard_worker_rss_bytes", "Resident memory of the worker "
                                "process", labels=["worker"])
        for index, st in sorted(llm.worker_stats().items()):
            w = str(index)
            for tier, n in sorted(st["bytes_by_tier"].items()):
                tiers.add_metric([w, tier], n)
            read.add_metric([w], st["swap_bytes_read"])
            read_s.add_metric([w], st["swap_read_seconds"])
            copied.add_metric([w], st["gpu_stream_bytes"])
            rss.add_metric([w], st["rss"])
        yield from (tiers, read, read_s, copied, rss)

    registry = CollectorRegistry()
    registry.register(SchedulerCollector())
    http = Counter("llm_shard_http_requests", "HTTP requests by path and status",
                   ["path", "status"], registry=registry)
    return registry, http


# ---------------------------------------------------------------------------- helpers
def _raw(body: bytes, media_type: str):
    from fastapi.responses import Response

    return Response(body, media_type=media_type)


UNBOUNDED_CONTEXT = 1 << 20  # a recurrent model (RWKV): nothing bounds a sequence


def _context(llm) -> int:
    """The longest sequence served: the model's context, else what a stage's cache holds
    (an encoder-decoder, or a model with no position limit), else UNBOUNDED_CONTEXT."""
    cfg = llm.store.config
    if cfg.max_context is not None:
        return cfg.max_context
    per_token = cfg.cache_bytes_per_token
    return llm.pipeline.cache_capacity // per_token if per_token else UNBOUNDED_CONTEXT


def _check_fits(llm, prompt_len: int, max_tokens: int) -> None:
    """A clear 400 for a request no stage's cache can ever hold (the scheduler would fail it
    after queueing), and for one longer than the model's context."""
    from llm_shard.worker.stage import sequence_bytes

    if prompt_len + max_tokens > _context(llm) or max_tokens < 1:
        raise ApiError(400, f"prompt of {prompt_len} tokens + max_tokens {max_tokens} is "
                       f"longer than the model's {_context(llm)}-token context",
                       param="max_tokens")
    capacity = llm.pipeline.cache_capacity  # bytes per block, all sequences together
    if sequence_bytes(llm.store.config, prompt_len + max_tokens) > capacity:
        per_token = llm.store.config.cache_bytes_per_token
        held = f" ({capacity // per_token} tokens)" if per_token else ""
        raise ApiError(400, f"prompt of {prompt_len} tokens + max_tokens {max_tokens} needs "
                       f"more cache than a stage holds{held}: ask for fewer tokens",
                       param="max_tokens")


def _ready(llm) -> tuple[bool, str | None]:
    if llm.scheduler is None:
        return False, "the model is shut down"
    if llm.scheduler.failed:
        return False, llm.scheduler.failed
    workers = {w["index"]: w for w in llm.stats()["workers"]}
    dead = [i for i in llm.plan.workers if not workers[i]["alive"]]
    return (False, f"workers {dead} of the plan are not alive") if dead else (True, None)


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def _content(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"message content parts must be {{'type': 'text', 'text': "
                           f"...}}; got type {part.get('type')!r}", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _usage(outs: list[Completion]) -> dict:
    prompt = sum(len(c.prompt_token_ids) for c in outs)
    done = sum(len(c.token_ids) for c in outs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _completion_choice(k: int, c: Completion, prompt: str | None, req: CompletionRequest,
                       tok) -> dict:
    text = (prompt or "") + c.text if req.echo else c.text
    choice = {"index": k, "text": text, "finish_reason": c.finish_reason,
              "logprobs": _completion_logprobs(c, tok) if c.logprobs is not None else None}
    if req.return_token_ids:
        choice.update(token_ids=c.token_ids, prompt_token_ids=c.prompt_token_ids)
        if c.logprobs is not None:
            choice["id_logprobs"] = [{str(t): v for t, v in s.items()} for s in c.logprobs]
    return choice


def _piece(tok, token: int) -> str:
    return tok.decode([token]) if tok is not None else f"<{token}>"


def _completion_logprobs(c: Completion, tok) -> dict:
    tokens, offsets, offset = [], [], 0
    for t in c.token_ids:
        tokens.append(_piece(tok, t))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens,
            "token_logprobs": [s[t] for t, s in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [{_piece(tok, i): v for i, v in s.items()} for s in c.logprobs],
            "text_offset": offsets}


def _chat_logprobs(c: Completion, tok, top: int) -> dict:
    def entry(t: int, v: float) -> dict:
        text = _piece(tok, t)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}

    def best(step: dict[int, float]) -> list[dict]:
        return [entry(i, v) for i, v in sorted(step.items(), key=lambda x: -x[1])[:top]]

    return {"content": [{**entry(t, s[t]), "top_logprobs": best(s)}
                        for t, s in zip(c.token_ids, c.logprobs or [])]}


__all__ = ["create_app", "run", "BackgroundServer", "ChatRequest", "CompletionRequest",
           "SeedRequest"]
