"""The terminal chat of `llm-shard chat`: read a line, stream the reply, keep the
conversation. A reply streams from an `LLM` in this process (`local_reply`) or from a
server's chat API (`remote_reply`); either prints its error and ends the reply."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

import click

Messages = list[dict[str, str]]


def chat_loop(reply: Callable[[Messages], Iterator[str]], system: str | None) -> None:
    """Until /quit, /exit, Ctrl-D or Ctrl-C at the prompt; /clear forgets the turns."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    click.echo("chat: /clear forgets the conversation, /quit leaves")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            messages = list(start)
            click.echo("(conversation cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        click.echo("bot> ", nl=False)
        text = ""
        try:
            for piece in reply(messages):
                text += piece
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": text})


def remote_reply(client, messages: Messages, sampling: dict) -> Iterator[str]:
    """One reply from a server, through `Client.chat_stream`."""
    import httpx

    from llm_shard.coordinator.client import ClientError

    try:
        yield from client.chat_stream(messages, **sampling)
    except (ClientError, httpx.TransportError) as e:
        click.echo(f"\nerror: {e}", err=True)


def local_reply(llm, messages: Messages, sampling: dict) -> Iterator[str]:
    """One reply of an in-process LLM: on_text (the scheduler thread) feeds a queue."""
    from llm_shard.cluster.types import SamplingParams

    tok, pieces = llm.tokenizer, queue.Queue()
    ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True))
    try:
        future = llm.submit(ids, SamplingParams(**sampling), on_text=pieces.put)
    except ValueError as e:  # the conversation no longer fits the context
        click.echo(f"error: {e}; /clear starts afresh", err=True)
        return
    future.add_done_callback(lambda f: pieces.put(None))
    try:
        while (piece := pieces.get()) is not None:
            yield piece
        if not future.cancelled() and future.exception() is not None:
            click.echo(f"\nerror: {future.exception()}", err=True)
    finally:
        if not future.done():
            llm.cancel(future)
