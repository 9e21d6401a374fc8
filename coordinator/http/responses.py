"""Response bodies in OpenAI's shapes, from finished `Completion`s: choices, usage and
log-probabilities (completions: tokens and offsets; chat: content entries with bytes)."""

from __future__ import annotations

from llm_shard.cluster.types import Completion

from .schemas import ChatRequest, CompletionRequest


def usage(outs: list[Completion]) -> dict:
    prompt = sum(len(c.prompt_token_ids) for c in outs)
    done = sum(len(c.token_ids) for c in outs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def completion_choice(k: int, c: Completion, prompt: str | None, req: CompletionRequest,
                      tok) -> dict:
    text = (prompt or "") + c.text if req.echo else c.text
    choice = {"index": k, "text": text, "finish_reason": c.finish_reason,
              "logprobs": _completion_logprobs(c, tok) if c.logprobs is not None else None}
    if req.return_token_ids:
        choice.update(token_ids=c.token_ids, prompt_token_ids=c.prompt_token_ids)
        if c.logprobs is not None:
            choice["id_logprobs"] = [{str(t): v for t, v in s.items()} for s in c.logprobs]
    return choice


def finish_chat_choice(choice: dict, c: Completion, req: ChatRequest, tok) -> dict:
    """A finished chat choice's reason, its logprobs when asked, and (vLLM's extension)
    its token ids, set on `choice`."""
    choice["finish_reason"] = c.finish_reason
    if req.logprobs:
        choice["logprobs"] = _chat_logprobs(c, tok, req.top_logprobs or 0)
    if req.return_token_ids:
        choice.update(token_ids=c.token_ids, prompt_token_ids=c.prompt_token_ids)
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
