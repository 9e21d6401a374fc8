"""`llm_shard.Client` and `AsyncClient` against a running server: ordered batches, streams,
retries of connection failures, and a checkpointed batch that resumes where it stopped."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from llm_shard import AsyncClient, Client
from llm_shard.coordinator.client import ClientError
from llm_shard.coordinator.http import BackgroundServer, create_app

PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]


class Recording:
    """The LLM as the server sees it: counts submitted prompts; can fail after N of them."""

    def __init__(self, llm) -> None:
        self.llm, self.submitted, self.fail_after = llm, [], None
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def submit(self, ids, params=None, on_text=None, request=None):
        with self.lock:
            if self.fail_after is not None and len(self.submitted) >= self.fail_after:
                raise ValueError("the test stops this batch here")
            self.submitted.append(list(ids))
        return self.llm.submit(ids, params, on_text, request)


@pytest.fixture(scope="module")
def llm(ray_cluster, smollm2_stores):
    from llm_shard import LLM

    with LLM(str(smollm2_stores["int8"].path), workers=["ram=1GiB", "ram=1GiB"],
             cache_tokens=1024) as model:
        yield model


@pytest.fixture(scope="module")
def recording(llm):
    return Recording(llm)


@pytest.fixture(scope="module")
def server(recording):
    s = BackgroundServer(create_app(recording, model_name="smollm2-135m"))
    yield s
    s.stop()


def test_generate_16_prompts_in_order(server, llm):
    with Client(server.url, concurrency=4) as client:
        outs = client.generate(PROMPTS, max_tokens=4, temperature=0, progress=True)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.index for o in outs] == list(range(16))
    local = llm.generate(PROMPTS, _greedy(4))
    assert [o.token_ids for o in outs] == [o.token_ids for o in local]
    assert [o.text for o in outs] == [o.text for o in local]
    assert all(o.prompt_token_ids and o.finish_reason in ("stop", "length") for o in outs)


def _greedy(n):
    from llm_shard import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)


def test_stream_and_chat(server):
    with Client(server.url) as client:
        pieces = list(client.stream("The capital of France is", max_tokens=6, temperature=0))
        whole = client.generate(["The capital of France is"], max_tokens=6, temperature=0)[0]
        assert len(pieces) > 1 and "".join(pieces) == whole.text
        messages = [{"role": "user", "content": "Say hi"}]
        text = client.chat(messages, max_tokens=5, temperature=0)
        assert "".join(client.chat_stream(messages, max_tokens=5, temperature=0)) == text
        assert client.models() == ["smollm2-135m"]
        lp = client.generate(["Hi"], max_tokens=2, temperature=0, logprobs=2)[0]
        assert len(lp.logprobs) == len(lp.token_ids)
        assert all(lp.token_ids[i] in step for i, step in enumerate(lp.logprobs))


def test_bad_sampling_is_refused_before_sending(server):
    with Client(server.url) as client:
        with pytest.raises(ValueError, match="temperature"):
            client.generate(["Hi"], temperature=-1)
        with pytest.raises(TypeError, match="SamplingParams"):
            client.generate(["Hi"], temprature=0)
        with pytest.raises(ClientError, match="context") as e:
            client.generate(["Hi"], max_tokens=10**6)
        assert e.value.status == 400


def test_an_interrupted_checkpointed_batch_resumes(server, recording, tmp_path):
    ckpt = tmp_path / "out.jsonl"
    sampling = {"max_tokens": 3, "temperature": 0}
    start = len(recording.submitted)
    recording.fail_after = start + 6
    try:
        with Client(server.url, concurrency=2) as client, pytest.raises(ClientError):
            client.generate(PROMPTS, checkpoint=ckpt, **sampling)
    finally:
        recording.fail_after = None
    first_run = len(recording.submitted) - start
    lines = ckpt.read_text().splitlines()
    assert first_run == 6 and len(lines) == 6
    with ckpt.open("a") as f:  # a torn last line, as a kill mid-write leaves
        f.write('{"index": 15, "prompt": "Quest')
    done = {json.loads(line)["index"] for line in lines}
    with Client(server.url, concurrency=4) as client:
        outs = client.generate(PROMPTS, checkpoint=ckpt, **sampling)
    assert len(recording.submitted) - start == 16  # each prompt sent once in all
    assert [o.prompt for o in outs] == PROMPTS
    again = {json.loads(line)["index"] for line in ckpt.read_text().splitlines()
             if line.startswith("{") and line.endswith("}")}
    assert again == set(range(16)) and done < again
    # the same batch once more: nothing is sent
    with Client(server.url) as client:
        assert [o.text for o in client.generate(PROMPTS, checkpoint=ckpt, **sampling)] == \
            [o.text for o in outs]
    assert len(recording.submitted) - start == 16
    # other sampling: the checkpoint's lines do not match, all are redone
    with Client(server.url, concurrency=8) as client:
        client.generate(PROMPTS[:2], checkpoint=ckpt, max_tokens=2, temperature=0)
    assert len(recording.submitted) - start == 18


def test_connection_failures_are_retried(server):
    """The first connection attempts are refused; the client backs off and gets through."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on `port` for now
    host, real = server.url.removeprefix("http://").split(":")
    stop = threading.Event()

    def forward_later():  # after 1 s, a plain TCP forwarder on `port` to the server
        stop.wait(1.0)
        listener = socket.create_server(("127.0.0.1", port))
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection((host, int(real)))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()
        listener.close()

    t = threading.Thread(target=forward_later, daemon=True)
    t.start()
    try:
        with Client(f"http://127.0.0.1:{port}", retries=6, backoff=0.2) as client:
            out = client.generate(["Hello"], max_tokens=2, temperature=0)
        assert out[0].text is not None
    finally:
        stop.set()
        t.join()
    with Client(f"http://127.0.0.1:{port}", retries=1, backoff=0.01) as client:
        with pytest.raises(Exception, match="(?i)connect"):
            client.generate(["Hello"], max_tokens=2)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_async_client(server, tmp_path):
    async def main():
        async with AsyncClient(server.url, concurrency=3) as client:
            outs = await client.generate(PROMPTS[:5], max_tokens=3, temperature=0,
                                         checkpoint=tmp_path / "a.jsonl")
            pieces = [p async for p in client.stream("The capital of France is",
                                                     max_tokens=5, temperature=0)]
            chat = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=3)
            return outs, pieces, chat, await client.models()

    outs, pieces, chat, models = asyncio.run(main())
    assert [o.prompt for o in outs] == PROMPTS[:5] and len(pieces) > 1
    assert isinstance(chat, str) and models == ["smollm2-135m"]
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 5
