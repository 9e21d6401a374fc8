"""The request bodies: OpenAI's completions and chat (sampling names as vLLM's
SamplingParams) and the JittorLLMs/ChatGLM api.py shape. Unknown fields are ignored; every
text field must be valid Unicode (no lone surrogate). The bounds that depend on the model
(token ids, top_k, lengths) are the engine's: `LLM.check_request`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm_shard.cluster.types import SamplingParams

from ..llm import check_text


def _valid_text(value: Any, name: str) -> Any:
    """`value` as sent, once every string in it is valid Unicode (an InvalidRequest, a
    ValueError, names the first that is not: `prompt[1]`). A loop, not recursion: JSON
    nests as deep as its parser allows."""
    todo = [(name, value)]
    for where, v in todo:  # grows as it goes: breadth first
        if isinstance(v, str):
            check_text(where, v)
            continue
        items = enumerate(v) if isinstance(v, (list, tuple)) else \
            v.items() if isinstance(v, dict) else ()
        for k, x in items:
            if type(x) is int or type(x) is str and _encodes(x):  # the common cases, fast
                continue
            if isinstance(x, (str, list, tuple, dict)):
                todo.append((f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}", x))
    return value


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_fields(*names: str):
    """A before-validator of `names`: their strings, however nested, are valid Unicode."""
    return field_validator(*names, mode="before")(
        lambda cls, value, info: _valid_text(value, info.field_name))


class SamplingFields(BaseModel):
    """The sampling fields both OpenAI routes take."""

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
    _text = _text_fields("model", "stop")

    def sampling_params(self, max_tokens: int, **extra) -> SamplingParams:
        """These fields as SamplingParams (top_k -1 is off, as vLLM's); a ValueError names
        a bad value."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=0 if self.top_k == -1 else self.top_k,
                              repetition_penalty=self.repetition_penalty,
                              stop=self.stop or (), stop_token_ids=self.stop_token_ids or (),
                              seed=self.seed, ignore_eos=self.ignore_eos, **extra)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    _prompt_text = _text_fields("prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None
    _text = _text_fields("role", "content")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's minimum; 0 is no default
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
    _text = _text_fields("prompt", "history")
