"""Server-sent events for `stream: true`: the chunk formats of completions and chat, and
the event stream that feeds them from a `Generation`."""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse

from llm_shard.cluster.types import Completion

from ..scheduler import RequestError
from .bridge import Generation
from .responses import completion_choice, finish_chat_choice, usage
from .schemas import ChatRequest, CompletionRequest


class CompletionChunks:
    def __init__(self, head: dict, req: CompletionRequest, texts, tok) -> None:
        self.head, self.req, self.texts, self.tok = head, req, texts, tok

    def chunk(self, k: int, text: str, done: Completion | None) -> dict:
        choice = {"index": k, "text": text, "logprobs": None, "finish_reason": None}
        if done is not None:
            choice = completion_choice(k, done, self.texts[k], self.req, self.tok)
            choice["text"] = text
        return {**self.head, "object": "text_completion", "choices": [choice]}

    def usage(self, outs) -> dict:
        return {**self.head, "object": "text_completion", "choices": [], "usage": usage(outs)}


class ChatChunks:
    def __init__(self, head: dict, req: ChatRequest, tok) -> None:
        self.head, self.req, self.tok, self.started = head, req, tok, False

    def chunk(self, k: int, text: str, done: Completion | None) -> dict:
        delta = {"content": text} if text or done is None else {}
        if not self.started:
            delta, self.started = {"role": "assistant", **delta}, True
        choice = {"index": k, "delta": delta, "logprobs": None, "finish_reason": None}
        if done is not None:
            finish_chat_choice(choice, done, self.req, self.tok)
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    def usage(self, outs) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": [],
                "usage": usage(outs)}


def sse(run: Generation, fmt: CompletionChunks | ChatChunks) -> StreamingResponse:
    """`data: {chunk}` per text piece, a last chunk per choice with its finish_reason, a
    usage chunk when stream_options.include_usage, then `data: [DONE]`. An error after the
    stream began is sent as `data: {"error": …}`. If the client goes away, Starlette
    cancels this generator and its `finally` cancels the generation."""

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
