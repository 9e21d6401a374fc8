"""The request bodies: OpenAI's completions and chat (sampling names as vLLM's
SamplingParams) and the JittorLLMs/ChatGLM api.py shape. Unknown fields are ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llm_shard.cluster.types import SamplingParams


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

    def sampling_params(self, max_tokens: int, **extra) -> SamplingParams:
        """These fields as SamplingParams; a ValueError names a bad value."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k,
                              repetition_penalty=self.repetition_penalty,
                              stop=self.stop or (), stop_token_ids=self.stop_token_ids or (),
                              seed=self.seed, ignore_eos=self.ignore_eos, **extra)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingFields):
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
