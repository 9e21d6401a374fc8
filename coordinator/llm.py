"""`LLM`: a model split over Ray workers, driven from this process.

    from llm_shard import LLM, SamplingParams
    with LLM("smollm2-135m", workers=["ram=1GiB", "ram=1GiB"]) as llm:
        outs = llm.generate(["prompt a", "prompt b"], SamplingParams(max_tokens=64, temperature=0))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq

from llm_shard.cluster import ray_glue, wire
from llm_shard.cluster.links import Guard, LinkKeys
from llm_shard.cluster.resources import budgets_from_ray_nodes, detect_ram
from llm_shard.cluster.transfer import StoreServer
from llm_shard.cluster.types import (
    Capacity,
    Completion,
    Memory,
    Plan,
    SamplingParams,
    sequence_bytes,
)
from llm_shard.models.checkpoint.catalog import home, resolve
from llm_shard.models.checkpoint.store import StoreError

from .config import EngineConfig
from .pipeline import Pipeline, link_host
from .planner import PlanReport, format_plan
from .scheduler import RequestError, Scheduler

log = logging.getLogger("llm_shard.coordinator")

# Share of this machine's available memory that `workers=N` divides between N workers.
LOCAL_RAM_SHARE = 0.8
UNBOUNDED_CONTEXT = 1 << 20  # a recurrent model (RWKV): nothing bounds a sequence
# Stop rules are checked on the scheduler's thread at every token of a sequence: a request
# may not bring more than this many (OpenAI allows 4 stop strings).
MAX_STOP_STRINGS = 32
MAX_STOP_TOKEN_IDS = 1024


class InvalidRequest(ValueError):
    """A request the engine refuses before queueing it; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_text(name: str, text: str) -> str:
    """`text`, if it is valid Unicode; an InvalidRequest naming `name` for a lone surrogate
    (a tokenizer, a JSON encoder and msgpack all refuse one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(name, f"{name} holds a lone surrogate (U+{ord(text[e.start]):04X} "
                             f"at {e.start}): text must be valid Unicode") from None
    return text


def _out_of_vocab(ids, vocab: int) -> list:
    return [t for t in ids if not 0 <= t < vocab][:5]


def worker_capacities(workers) -> list[Capacity]:
    """`workers` as LLM takes it: N (N workers sharing this machine's memory evenly), a
    list of SPEC strings or Capacity objects, or None (every Ray node's advertised budget,
    else each node's memory as Ray counts it)."""
    if isinstance(workers, bool):
        raise ValueError(f"workers must be a count, a list of specs or None, got {workers!r}")
    if isinstance(workers, int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ram = Memory(int(detect_ram()[1] * LOCAL_RAM_SHARE / workers))
        return [Capacity(ram=ram) for _ in range(workers)]
    if workers is None:
        import ray

        advertised = [cap for _, _, cap in budgets_from_ray_nodes(ray.nodes())]
        if advertised:
            return advertised
        log.warning("no Ray node advertises an llm-shard budget (`ray start --resources="
                    "\"$(llm-shard node-resources)\"`): one worker per node, with the "
                    "memory Ray counts for it")
        return [Capacity(ram=Memory(n.memory), node=n.node_id) for n in ray_glue.nodes()]
    if isinstance(workers, (str, Capacity)):
        workers = [workers]
    caps = []
    for i, w in enumerate(workers):
        if isinstance(w, Capacity):
            caps.append(w)
        elif isinstance(w, str):
            try:
                caps.append(Capacity.parse(w))
            except ValueError as e:
                raise ValueError(f"worker {i} ({w!r}): {e}") from None
        else:
            raise ValueError(f"worker {i} must be a SPEC string or a Capacity, got {w!r}")
    if not caps:
        raise ValueError("workers is an empty list")
    return caps


def _threads(caps: list[Capacity], nodes: list[ray_glue.Node]) -> list[int]:
    """Each worker's torch threads: its SPEC's threads=, else its node's CPUs shared evenly
    among the workers on that node (Ray would otherwise give it OMP_NUM_THREADS=num_cpus)."""
    per_node: dict[str, int] = {}
    for n in nodes:
        per_node[n.node_id] = per_node.get(n.node_id, 0) + 1
    return [c.threads or max(1, n.cpus // per_node[n.node_id]) for c, n in zip(caps, nodes)]


class LLM:
    """A model served by a pipeline of Ray workers, with continuous batching.

    `model`: a catalog name, a store path or a checkpoint path. The engine's settings
    are an `EngineConfig` (config.py): `config=`, or its fields as keywords (`workers`
    may come second, positionally); keywords given with `config=` replace its fields.
    """

    def __init__(self, model: str, workers=None, *, config: EngineConfig | None = None,
                 **settings) -> None:
        if workers is not None:
            settings["workers"] = workers
        self.config = cfg = (config or EngineConfig()).replace(**settings)
        self.pipeline = self.scheduler = self._guard = None
        self.store_server = None  # store transfer
        self.store = resolve(model, dtype=cfg.dtype).with_kv_dtype(cfg.kv_dtype)
        try:
            self.tokenizer = self.store.tokenizer()
        except StoreError:  # token ids in, token ids out
            self.tokenizer = None
        ray_glue.connect(cfg.address)
        caps = worker_capacities(cfg.workers)
        nodes = ray_glue.worker_nodes(caps)
        self._ctx = zmq.Context()
        self._results = self._ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        wire.limit_frames(self._results, wire.MAX_HEADER_BYTES)  # a Result is a header only
        # CURVE on every ZeroMQ link, keys handed to the workers over Ray (cluster/links.py)
        self.keys = LinkKeys.generate() if cfg.encrypt else None
        self._guard = Guard(self._ctx, self.keys, "coordinator")
        self._guard.server(self._results)
        here = ray_glue.this_node()
        plain = link_host(nodes, self.keys, here)  # loopback: unencrypted, every worker here
        host = cfg.host or plain or here.ip
        port = self._results.bind_to_random_port(f"tcp://{host}")
        try:
            # store transfer: workers on nodes without this store fetch its files from here
            self.store_server = StoreServer(self.store.path, host, keys=self.keys)
            self.pipeline = Pipeline(
                self.store, caps, threads=_threads(caps, nodes),
                compute_dtype=cfg.compute_dtype, wire_dtype=cfg.wire_dtype,
                objective=cfg.objective, cache_tokens=cfg.cache_tokens,
                use_all_workers=cfg.use_all_workers, hop_seconds=cfg.hop_seconds,
                result_address=f"tcp://{host}:{port}",
                store_source=self.store_server.source(home()), link_keys=self.keys,
                max_restarts=cfg.max_restarts, control_timeout=cfg.control_timeout,
                worker_host=plain)
            self.scheduler = Scheduler(self.pipeline, self.tokenizer, self._results,
                                       micro_batches=cfg.micro_batches,
                                       max_len=self.store.config.max_context,
                                       step_timeout=cfg.step_timeout,
                                       prefix_cache=cfg.prefix_cache)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ API
    @property
    def plan(self) -> Plan:
        return self.pipeline.plan

    @property
    def plan_report(self) -> PlanReport:
        return self.pipeline.report

    def describe_plan(self) -> str:
        return format_plan(self.pipeline.plan, self.pipeline.report, self.pipeline.cost)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
               on_text=None, request: object = None):
        """Queue one tokenized prompt; returns a Future of its Completion. An
        InvalidRequest (a ValueError naming the field) for what `check_request` refuses.
        Prompts of one `request` take turns with other requests' as one (Scheduler.submit)."""
        params = params or SamplingParams()
        self.check_request(prompt_token_ids, params)
        return self.scheduler.submit(prompt_token_ids, params, on_text, request)

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """An InvalidRequest naming the field of a request this model cannot mean: a token
        id outside its vocabulary (prompt, stop_token_ids), top_k over it, more stop rules
        than MAX_STOP_*, a stop string that is not valid Unicode, or a prompt and
        max_tokens that no context or cache holds (`check_fits`). SamplingParams itself
        bounds the rest (seed within 64 bits, logprobs, ...)."""
        vocab = self.store.config.vocab_size
        if not prompt_token_ids:
            raise InvalidRequest("prompt", "a prompt needs at least one token")
        bad = _out_of_vocab(prompt_token_ids, vocab)
        if bad:
            raise InvalidRequest("prompt", f"prompt token ids {bad} are outside the "
                                 f"vocabulary [0, {vocab})")
        if params.top_k > vocab:
            raise InvalidRequest("top_k", f"top_k must be <= the vocabulary size {vocab} "
                                 f"(0 is off), got {params.top_k}")
        if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest("stop_token_ids", f"stop_token_ids holds "
                                 f"{len(params.stop_token_ids)} ids; at most "
                                 f"{MAX_STOP_TOKEN_IDS}")
        bad = _out_of_vocab(params.stop_token_ids, vocab)
        if bad:
            raise InvalidRequest("stop_token_ids", f"stop_token_ids {bad} are outside the "
                                 f"vocabulary [0, {vocab})")
        if len(params.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"stop holds {len(params.stop)} strings; at most "
                                 f"{MAX_STOP_STRINGS}")
        for k, s in enumerate(params.stop):
            check_text(f"stop[{k}]", s)
        self.check_fits(len(prompt_token_ids), params.max_tokens)

    def cancel(self, future) -> None:
        """Stop a submitted request and free its caches (its Future is cancelled)."""
        self.scheduler.cancel(future)

    def metrics(self) -> dict:
        return self.scheduler.metrics()

    @property
    def max_model_len(self) -> int:
        """The longest sequence served: the model's context, else what a stage's cache
        holds (an encoder-decoder, or a model with no position limit), else
        UNBOUNDED_CONTEXT."""
        cfg = self.store.config
        if cfg.max_context is not None:
            return cfg.max_context
        per_token = cfg.cache_bytes_per_token
        return self.pipeline.cache_capacity // per_token if per_token else UNBOUNDED_CONTEXT

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """An InvalidRequest (max_tokens) for a request no stage's cache can ever hold (the
        scheduler would fail it after queueing), and for one longer than the context."""
        context = self.max_model_len
        if prompt_len + max_tokens > context or max_tokens < 1:
            raise InvalidRequest("max_tokens", f"prompt of {prompt_len} tokens + max_tokens "
                                 f"{max_tokens} is longer than the model's {context}-token "
                                 "context")
        capacity = self.pipeline.cache_capacity  # bytes per block, all sequences together
        if sequence_bytes(self.store.config, prompt_len + max_tokens) > capacity:
            per_token = self.store.config.cache_bytes_per_token
            held = f" ({capacity // per_token} tokens)" if per_token else ""
            raise InvalidRequest("max_tokens", f"prompt of {prompt_len} tokens + max_tokens "
                                 f"{max_tokens} needs more cache than a stage holds{held}: "
                                 "ask for fewer tokens")

    def not_ready(self) -> str | None:
        """Why this engine cannot serve now (shut down, no plan fits, a worker of the plan
        dead); None when it can."""
        if self.scheduler is None:
            return "the model is shut down"
        if self.scheduler.failed:
            return self.scheduler.failed
        workers = {w["index"]: w for w in self.stats()["workers"]}
        dead = [i for i in self.plan.workers if not workers[i]["alive"]]
        return f"workers {dead} of the plan are not alive" if dead else None

    def generate(self, prompts: str | Sequence[str] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[Completion]:
        """Complete every prompt (all in flight together); outputs in input order.
        `params` is one SamplingParams for all, or one per prompt."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts and prompt_token_ids")
        texts: list[str | None]
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not all(isinstance(p, str) for p in texts):
                raise ValueError("prompts must be strings (token ids go in prompt_token_ids)")
            if self.tokenizer is None:
                raise ValueError(f"the store {self.store.path} has no tokenizer: "
                                 "pass prompt_token_ids")
            ids = [self.tokenizer.encode(check_text(f"prompts[{k}]", p))
                   for k, p in enumerate(texts)]
        else:
            ids = [list(map(int, p)) for p in prompt_token_ids]
            texts = [None] * len(ids)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(ids)
        elif len(params) != len(ids):
            raise ValueError(f"{len(params)} SamplingParams for {len(ids)} prompts")
        for i, p in zip(ids, params):  # all of them before any runs
            self.check_request(i, p)
        batch = object()  # one request: it takes turns with others, not all of them first
        futures = [self.submit(i, p, request=batch) for i, p in zip(ids, params)]
        outs = []
        for k, (f, text) in enumerate(zip(futures, texts)):
            c = f.result()
            c.prompt, c.index = text, k
            outs.append(c)
        return outs

    def stats(self) -> dict:
        return {"epoch": self.pipeline.epoch, "recoveries": self.scheduler.recoveries,
                "workers": [{"index": w.index, "alive": w.alive, "restarts": len(w.restarts),
                             "pid": w.info.get("pid"),
                             "node_id": w.info.get("node_id"), "speed": w.speed,
                             "capacity": w.capacity.to_spec()}
                            for w in self.pipeline.workers]}

    def worker_stats(self, timeout: float = 5.0) -> dict[int, dict]:
        """Each live worker's own figures (worker/actor.py `stats`): bytes per tier, swap
        reads, RSS; a worker that does not answer within `timeout` is left out."""
        import ray

        live = [w for w in self.pipeline.workers if w.alive]
        refs = {w.index: w.actor.stats.remote() for w in live}
        out = {}
        for index, ref in refs.items():
            try:
                out[index] = ray.get(ref, timeout=timeout)
            except Exception:  # died or stalled: /health and recovery report it
                continue
        return out

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        if self.pipeline is not None:
            self.pipeline.shutdown()
            self.pipeline = None
        if self.store_server is not None:  # store transfer
            self.store_server.close()
            self.store_server = None
        if not self._results.closed:
            self._results.close(linger=0)
        if self._guard is not None:
            self._guard.close()
        self._ctx.term()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["LLM", "EngineConfig", "InvalidRequest", "RequestError", "check_text",
           "worker_capacities"]
