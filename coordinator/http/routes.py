"""The routes: each turns a request into token ids and SamplingParams, hands them to the
engine (`LLM.submit` through a `Generation`) and shapes the answer; the work is the
engine's."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from llm_shard.cluster.types import SamplingParams

from .auth import authorized, check_key
from .bridge import Generation
from .errors import ApiError
from .limits import MAX_PROMPTS_PER_REQUEST
from .responses import completion_choice, finish_chat_choice, usage
from .schemas import ChatRequest, CompletionRequest, SamplingFields, SeedRequest
from .streaming import ChatChunks, CompletionChunks, sse

PAGE = Path(__file__).parent.parent / "web" / "index.html"
DEFAULT_CHAT_MAX_TOKENS = 512  # chat requests that name no max_tokens (OpenAI: no limit)
SEED_MAX_LENGTH = 2048  # the ChatGLM api.py default of max_length (prompt + reply tokens)

log = logging.getLogger("llm_shard.coordinator")
router = APIRouter()
AUTH = [Depends(check_key)]


@dataclass
class Served:
    """What the routes serve (`app.state.served`): the engine under its names, and the
    counter of HTTP requests by (path, status)."""

    llm: Any
    model_name: str
    names: set[str]
    http_requests: Any
    max_prompts: int = MAX_PROMPTS_PER_REQUEST
    logged_why: str | None = None  # the last reason /health logged

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.names:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                           f"{self.model_name!r}", "not_found_error", "model")
        return self.model_name

    def tokenizer(self):
        if self.llm.tokenizer is None:
            raise ApiError(400, f"the store {self.llm.store.path.name} has no tokenizer: "
                           "send token ids as the prompt of /v1/completions")
        return self.llm.tokenizer

    def params(self, req: SamplingFields, ids: list[int], max_tokens: int | None,
               **extra) -> SamplingParams:
        """The request's SamplingParams, once the engine takes them with prompt `ids`
        (`LLM.check_request`: token ids, top_k, stop rules, context and cache)."""
        if req.n != 1:
            raise ApiError(400, f"n must be 1, got {req.n}", param="n")
        if max_tokens is None:
            max_tokens = min(DEFAULT_CHAT_MAX_TOKENS, self.llm.max_model_len - len(ids))
        try:
            p = req.sampling_params(max_tokens, **extra)
            self.llm.check_request(ids, p)
        except ValueError as e:
            raise ApiError(400, str(e), param=getattr(e, "param", None)) from None
        return p

    def answered(self, path: str) -> None:
        self.http_requests.labels(path, "200").inc()


def served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(PAGE.read_text())


@router.get("/health")
async def health(request: Request, s: ServedDep):
    """200 or 503 and a generic status, for anyone (probes); why it is unavailable only
    to a request that sent the API key, and in the server's log (once per reason)."""
    why = s.llm.not_ready()
    if why and why != s.logged_why:
        log.warning("/health: unavailable: %s", why)
    s.logged_why = why
    body = {"status": "unavailable" if why else "ok", "model": s.model_name}
    if why and request.app.state.api_key is not None and authorized(request):
        body["why"] = why
    return JSONResponse(body, status_code=503 if why else 200)


@router.get("/openapi.json", include_in_schema=False, dependencies=AUTH)
async def openapi(request: Request):
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=AUTH)
async def docs():
    return get_swagger_ui_html(openapi_url="/openapi.json", title="llm-shard API")


@router.get("/redoc", include_in_schema=False, dependencies=AUTH)
async def redoc():
    return get_redoc_html(openapi_url="/openapi.json", title="llm-shard API")


@router.get("/metrics", dependencies=AUTH)
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=AUTH)
async def list_models(s: ServedDep):
    return {"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": 0, "owned_by": "llm-shard",
        "max_model_len": s.llm.max_model_len}]}


@router.post("/v1/completions", dependencies=AUTH)
async def completions(req: CompletionRequest, request: Request, s: ServedDep):
    name = s.check_model(req.model)
    prompts = _prompts(req.prompt, s.max_prompts)
    ids = [p if isinstance(p, list) else s.tokenizer().encode(p) for p in prompts]
    sp = [s.params(req, i, 16 if req.max_tokens is None else req.max_tokens,
                   logprobs=req.logprobs) for i in ids]
    texts = [p if isinstance(p, str) else None for p in prompts]
    run = Generation(s.llm, ids, sp)
    s.answered("/v1/completions")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if req.stream:
        return sse(run, CompletionChunks(head, req, texts, s.llm.tokenizer))
    outs = await run.wait(request)
    return {**head, "object": "text_completion",
            "choices": [completion_choice(k, c, texts[k], req, s.llm.tokenizer)
                        for k, c in enumerate(outs)], "usage": usage(outs)}


@router.post("/v1/chat/completions", dependencies=AUTH)
async def chat_completions(req: ChatRequest, request: Request, s: ServedDep):
    name = s.check_model(req.model)
    if not req.messages:
        raise ApiError(400, "messages is empty: send at least one message", param="messages")
    messages = [{"role": m.role, "content": _content(m.content)} for m in req.messages]
    try:  # an unknown role, a system message where the template allows none
        text = s.tokenizer().render_chat(messages, add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    ids = s.tokenizer().encode(text)
    sp = s.params(req, ids, req.max_tokens if req.max_completion_tokens is None
                  else req.max_completion_tokens,
                  logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    run = Generation(s.llm, [ids], [sp])
    s.answered("/v1/chat/completions")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if req.stream:
        return sse(run, ChatChunks(head, req, s.llm.tokenizer))
    (out,) = await run.wait(request)
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
              "logprobs": None, "finish_reason": None}
    return {**head, "object": "chat.completion",
            "choices": [finish_chat_choice(choice, out, req, s.llm.tokenizer)],
            "usage": usage([out])}


@router.post("/", dependencies=AUTH)
async def seed_api(req: SeedRequest, request: Request, s: ServedDep):
    messages = []
    for q, a in req.history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": req.prompt})
    ids = s.tokenizer().encode(s.tokenizer().render_chat(messages, add_generation_prompt=True))
    max_length = (req.max_length if req.max_length is not None
                  else min(SEED_MAX_LENGTH, s.llm.max_model_len))  # 0 is no default
    if max_length <= len(ids):
        raise ApiError(400, f"max_length {max_length} leaves no room to answer: the "
                       f"prompt with its history is {len(ids)} tokens", param="max_length")
    if max_length > s.llm.max_model_len:
        raise ApiError(400, f"max_length {max_length} is over the model's "
                       f"{s.llm.max_model_len}-token context", param="max_length")
    sp = s.params(SamplingFields(temperature=req.temperature, top_p=req.top_p), ids,
                  max_length - len(ids))
    (out,) = await Generation(s.llm, [ids], [sp]).wait(request)
    s.answered("/")
    return {"response": out.text, "history": [*map(list, req.history), [req.prompt, out.text]],
            "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _prompts(prompt, most: int) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]
    if len(prompt) > most:
        raise ApiError(400, f"{len(prompt)} prompts in one request; at most {most} prompts "
                       "per request (the server's --max-prompts-per-request)", param="prompt")
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
