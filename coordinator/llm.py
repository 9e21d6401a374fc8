"""`LLM`: a model split over Ray workers, driven from this process.

    from llm_shard import LLM, SamplingParams
    with LLM("smollm2-135m", workers=["ram=1GiB", "ram=1GiB"]) as llm:
        outs = llm.generate(["prompt a", "prompt b"], SamplingParams(max_tokens=64, temperature=0))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq

from llm_shard.cluster import ray_glue
from llm_shard.cluster.links import Guard, LinkKeys
from llm_shard.cluster.resources import budgets_from_ray_nodes
from llm_shard.cluster.transfer import StoreServer
from llm_shard.cluster.types import Capacity, Completion, Memory, Plan, SamplingParams
from llm_shard.models.checkpoint.catalog import home, resolve
from llm_shard.models.checkpoint.store import StoreError

from .pipeline import Pipeline
from .planner import DEFAULT_HOP_SECONDS, PlanReport, format_plan
from .scheduler import RequestError, Scheduler

log = logging.getLogger("llm_shard.coordinator")

# Share of this machine's available memory that `workers=N` divides between N workers.
LOCAL_RAM_SHARE = 0.8


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def worker_capacities(workers) -> list[Capacity]:
    """`workers` as LLM takes it: N (N workers sharing this machine's memory evenly), a
    list of SPEC strings or Capacity objects, or None (every Ray node's advertised budget,
    else each node's memory as Ray counts it)."""
    if isinstance(workers, bool):
        raise ValueError(f"workers must be a count, a list of specs or None, got {workers!r}")
    if isinstance(workers, int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ram = Memory(int(_available_ram() * LOCAL_RAM_SHARE / workers))
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

    `model`: a catalog name, a store path or a checkpoint path. `workers`: see
    `worker_capacities`. `address`: the Ray cluster (None: the running one, else a new
    local one). `dtype`: the store's weights; `compute_dtype`/`wire_dtype`: what stages
    compute in and send between them. `cache_tokens`: KV-cache tokens every stage keeps
    for all sequences together. `micro_batches`: groups in flight (default: one per
    stage). `use_all_workers`: give every worker a stage even where fewer would be faster.
    `encrypt`: CURVE-encrypt and authenticate every ZeroMQ link with keys made here and
    handed to the workers (cluster/links.py); False only on a trusted single machine.
    `max_restarts`: how many times a lost worker is replaced by a fresh one (same node,
    same budget) within 10 minutes; -1 without limit, 0 never (the re-plan then runs over
    the workers left). `step_timeout`: seconds a step may take before the workers are
    probed; `control_timeout`: seconds a probed worker has to answer before it counts as
    dead.
    """

    def __init__(self, model: str, workers=None, *, address: str | None = None,
                 dtype: str = "int8", compute_dtype: str = "fp32", wire_dtype: str = "bf16",
                 objective: str = "latency", cache_tokens: int = 4096,
                 micro_batches: int | None = None, use_all_workers: bool = False,
                 hop_seconds: float = DEFAULT_HOP_SECONDS, step_timeout: float = 120.0,
                 host: str | None = None, encrypt: bool = True, max_restarts: int = 3,
                 control_timeout: float = 30.0) -> None:
        self.pipeline = self.scheduler = self._guard = None
        self.store_server = None  # store transfer
        self.store = resolve(model, dtype=dtype)
        try:
            self.tokenizer = self.store.tokenizer()
        except StoreError:  # token ids in, token ids out
            self.tokenizer = None
        ray_glue.connect(address)
        caps = worker_capacities(workers)
        nodes = ray_glue.worker_nodes(caps)
        self._ctx = zmq.Context()
        self._results = self._ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        # CURVE on every ZeroMQ link, keys handed to the workers over Ray (cluster/links.py)
        self.keys = LinkKeys.generate() if encrypt else None
        self._guard = Guard(self._ctx, self.keys, "coordinator")
        self._guard.server(self._results)
        host = host or ray_glue.this_node().ip
        port = self._results.bind_to_random_port(f"tcp://{host}")
        try:
            # store transfer: workers on nodes without this store fetch its files from here
            self.store_server = StoreServer(self.store.path, host, keys=self.keys)
            self.pipeline = Pipeline(
                self.store, caps, threads=_threads(caps, nodes), compute_dtype=compute_dtype,
                wire_dtype=wire_dtype, objective=objective, cache_tokens=cache_tokens,
                use_all_workers=use_all_workers, hop_seconds=hop_seconds,
                result_address=f"tcp://{host}:{port}",
                store_source=self.store_server.source(home()), link_keys=self.keys,
                max_restarts=max_restarts, control_timeout=control_timeout)
            cfg = self.store.config
            self.scheduler = Scheduler(self.pipeline, self.tokenizer, self._results,
                                       micro_batches=micro_batches,
                                       max_len=cfg.max_context,
                                       step_timeout=step_timeout)
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
               on_text=None):
        """Queue one tokenized prompt; returns a Future of its Completion."""
        return self.scheduler.submit(prompt_token_ids, params or SamplingParams(), on_text)

    def cancel(self, future) -> None:
        """Stop a submitted request and free its caches (its Future is cancelled)."""
        self.scheduler.cancel(future)

    def metrics(self) -> dict:
        return self.scheduler.metrics()

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
            ids = [self.tokenizer.encode(p) for p in texts]
        else:
            ids = [list(map(int, p)) for p in prompt_token_ids]
            texts = [None] * len(ids)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(ids)
        elif len(params) != len(ids):
            raise ValueError(f"{len(params)} SamplingParams for {len(ids)} prompts")
        futures = [self.submit(i, p) for i, p in zip(ids, params)]
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


__all__ = ["LLM", "RequestError", "worker_capacities"]
