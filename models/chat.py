"""Chat templates as plain Python: a conversation in, the prompt text out.

Each template reproduces the text the model was trained on (Jinja templates in
checkpoints are mapped to a name here, never executed). BOS/EOS appear as literal
"<s>"/"</s>" where the model's own format has them inside the conversation (llama2,
atom); the tokenizer turns those strings into the BOS/EOS ids, so text and ids agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class ChatTemplate:
    render: Callable[[list[dict], bool], str]
    stop_strings: tuple[str, ...] = ()
    system: str = "any"  # where the format has a place for system messages: any, first, none


def _check(name: str, messages: list[dict], system: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected a dict with role and content, got "
                             f"{type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: missing content (a string)")
        if role == "system" and not (system == "any" or system == "first" and i == 0):
            where = "only as the first message" if system == "first" else "not at all"
            raise ValueError(f"message {i}: template {name!r} takes a system message {where}")


def _chatml(default_system: str | None):
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        if messages and messages[0]["role"] != "system" and default_system is not None:
            messages = [{"role": "system", "content": default_system}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    return render


def _llama2(messages: list[dict], add_generation_prompt: bool) -> str:
    # Meta's chat_completion: the system prompt is folded into the first user turn, contents
    # are stripped, and each finished exchange is wrapped in BOS ... EOS. "[/INST]" already
    # opens the answer, so there is no separate generation prompt.
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    turns = [m["content"] for m in messages[offset:]]
    for i, m in enumerate(messages[offset:], offset):
        want = "user" if (i - offset) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i}: template 'llama2' needs user and assistant turns "
                             f"alternating from a user turn, got {m['role']!r}")
    if offset:
        if not turns:
            raise ValueError("message 0: template 'llama2' needs a user message after the "
                             "system message")
        turns[0] = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{turns[0]}"
    return "".join(f"<s>[INST] {t.strip()} [/INST]" if i % 2 == 0 else f" {t.strip()} </s>"
                   for i, t in enumerate(turns))


def _turns(user: str, assistant: str, prompt: str):
    """A format where each turn is its own piece: user/assistant are format strings of
    {content}, and prompt opens the assistant's turn."""
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        text = "".join((user if m["role"] == "user" else assistant).format(content=m["content"])
                       for m in messages)
        return text + (prompt if add_generation_prompt else "")
    return render


def _plain(messages: list[dict], add_generation_prompt: bool) -> str:
    return "".join(m["content"] for m in messages)


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(_chatml(None), ("<|im_end|>", "<|im_start|>")),
    # SmolLM2-Instruct's own template: ChatML plus a default system message.
    "smollm2": ChatTemplate(_chatml(SMOLLM_SYSTEM), ("<|im_end|>", "<|im_start|>")),
    # "[INST]": a model that runs on into the next user turn.
    "llama2": ChatTemplate(_llama2, ("[INST]",), system="first"),
    # FlagAlpha's prompt format; "Human:" likewise marks a run-on into the next turn.
    "atom": ChatTemplate(_turns("<s>Human: {content}\n</s>", "<s>Assistant: {content}\n</s>",
                                "<s>Assistant: "), ("Human:",), system="none"),
    # JittorLLMs' PanGu-α prompt; generation stops where 问/答 markers would start a new turn.
    "pangu": ChatTemplate(_turns("问：{content}？", "答：{content}", "答："), ("问：", "答："),
                          system="none"),
    "plain": ChatTemplate(_plain),
}


def _template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


def render(name: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    template = _template(name)
    _check(name, messages, template.system)
    return template.render(messages, add_generation_prompt)


def stop_strings(name: str) -> tuple[str, ...]:
    return _template(name).stop_strings


def template_for_jinja(source: str | None, default: str) -> str:
    """Our name for a checkpoint's Jinja chat template, recognised by its markers."""
    if not source:
        return default
    if "<|im_start|>" in source:
        return "smollm2" if SMOLLM_SYSTEM in source else "chatml"
    if "[INST]" in source:
        return "llama2"
    if "Human:" in source and "Assistant:" in source:
        return "atom"
    if "问：" in source and "答：" in source:
        return "pangu"
    return default
