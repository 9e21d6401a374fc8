"""The bridge from the scheduler's thread to the server's asyncio loop: prompts submitted
together, their text pieces and results delivered on an asyncio queue, and cancellation
when the client goes away (which frees the caches on every stage)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from fastapi import Request

from llm_shard.cluster.types import Completion, SamplingParams

from ..scheduler import RequestError
from .errors import ApiError


class Generation:
    """Prompts submitted together; text pieces and finished Completions arrive on `queue`
    as (index, piece) and (index, Future) from the scheduler thread."""

    def __init__(self, llm, ids: list[list[int]], params: list[SamplingParams]) -> None:
        self.llm, self.loop, self.queue = llm, asyncio.get_running_loop(), asyncio.Queue()
        self.futures: list[Future] = []
        try:
            for k, (i, p) in enumerate(zip(ids, params)):
                f = llm.submit(i, p, on_text=lambda piece, k=k: self._put((k, piece)),
                               request=self)
                f.add_done_callback(lambda f, k=k: self._put((k, f)))
                self.futures.append(f)
        except ValueError as e:  # what LLM.check_request refuses (an InvalidRequest)
            self.cancel()
            raise ApiError(400, str(e), param=getattr(e, "param", None)) from None
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
            try:
                return gathered.result()
            except RequestError as e:
                raise ApiError(503, str(e), "server_error") from None
        finally:
            watcher.cancel()
            self.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
