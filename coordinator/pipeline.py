"""The Ray side of the coordinator: worker actors, their calibration, the plan, and the
re-plan after a failure. The scheduler (scheduler.py) owns the ZeroMQ side.

After a failure a lost worker is replaced: a fresh actor with the same budget on the same
node (when the node is still alive), at most `max_restarts` times per worker within
RESTART_WINDOW seconds, so a worker that dies on every start cannot stall the pipeline
forever. It keeps the lost one's index and measured speed (same node, same budget: no
new calibration), and the re-plan runs over the survivors and the replacements. Ray's
own actor restarts stay off (ray_glue.start_actor): a restarted actor would need a new
address and a new epoch anyway, and `ray.kill` never restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from llm_shard.cluster import ray_glue
from llm_shard.cluster.links import LinkKeys
from llm_shard.cluster.transfer import StoreSource
from llm_shard.cluster.types import Capacity, Plan, Tier, block_cache_budget
from llm_shard.models.checkpoint.store import Store
from llm_shard.worker.actor import Worker

from .costs import model_cost
from .planner import (
    DEFAULT_HOP_SECONDS,
    PlanError,
    PlanReport,
    WorkerSpec,
    plan,
    streams_to_gpu,
)

log = logging.getLogger("llm_shard.coordinator")

# A worker must answer a control call within this many seconds or be counted as dead.
CONTROL_TIMEOUT = 30.0
# A worker must be up (process started, store manifest opened or fetched) within this many
# seconds; a replacement, on a node that already ran one, within REPLACE_TIMEOUT (~3 s here;
# a node that died unnoticed fails it as soon as Ray marks the node dead).
START_TIMEOUT = 300.0
REPLACE_TIMEOUT = 60.0
RESTART_WINDOW = 600.0  # seconds over which `max_restarts` counts a worker's restarts
REPLAN_ATTEMPTS = 5  # re-plans in a row when workers die while being configured


@dataclass
class WorkerHandle:
    index: int
    capacity: Capacity
    node: ray_glue.Node
    actor: object
    info: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)  # tier -> bytes of weights/s, measured
    overhead: int = 0  # bytes: the runtime's resident set, measured after calibration
    threads: int = 1
    cpu_offset: int | None = None  # the first of its machine's CPUs it binds (None: unbound)
    watch: object = None  # the ObjectRef of its `watch` call: fails when the actor dies
    alive: bool = True
    restarts: list[float] = field(default_factory=list)  # monotonic time of each replacement

    @property
    def spec(self) -> WorkerSpec:
        """What the planner knows of this worker: its budget, measured speeds and runtime
        overhead (which its RAM budget pays first)."""
        return WorkerSpec(self.capacity, {Tier(t): v for t, v in self.speed.items()},
                          self.overhead)


def cpu_offsets(nodes: list[ray_glue.Node], threads: list[int]) -> list[int | None]:
    """Where each worker's CPUs start among its machine's: the workers of one machine (one
    IP: Ray nodes on one machine share its CPUs) take consecutive CPUs, wrapping around
    where they ask for more than it has (each worker binds its threads to its CPUs,
    worker/actor.py). All None (threads left unbound) with LLM_SHARD_PIN_THREADS=0."""
    if os.environ.get("LLM_SHARD_PIN_THREADS", "1") == "0":
        return [None] * len(nodes)
    used: dict[str, int] = {}
    out: list[int | None] = []
    for node, t in zip(nodes, threads):
        out.append(used.get(node.ip, 0))
        used[node.ip] = out[-1] + t
    return out


@dataclass(frozen=True)
class StageCores:
    """The CPUs a stage may compute a step with (scheduler.step_threads chooses): its own
    `share` of its machine's, or all of `machine_cpus` (the shares of every worker on the
    machine together, within what its process may use) when no other stage there is
    busy; `fixed` when its SPEC set threads=, which then stay as given."""

    start: int  # the stage's first block, by which a step names it
    machine: str  # the machine's IP: Ray nodes on one machine share its CPUs
    share: int
    machine_cpus: int
    fixed: bool


def link_host(nodes: list[ray_glue.Node], keys: LinkKeys | None,
              here: ray_glue.Node) -> str | None:
    """Where unencrypted links bind: loopback (127.0.0.1) when every worker is on this
    machine, so no one else reaches them; None (each node's own address) when the links
    are encrypted or must cross machines, which without encryption is warned about."""
    if keys is not None:
        return None
    if all(n.ip == here.ip for n in nodes):
        return "127.0.0.1"
    log.warning("UNENCRYPTED links between machines (--no-encrypt / encrypt=False): anyone "
                "who reaches the workers' ports (%s) can inject steps and read activations; "
                "use it on a trusted, firewalled network only",
                ", ".join(sorted({n.ip for n in nodes if n.ip != here.ip})))
    return None


class Pipeline:
    """Workers on Ray, calibrated, planned and configured for the current epoch."""

    def __init__(self, store: Store, capacities: list[Capacity], *, threads: list[int],
                 compute_dtype: str = "fp32", wire_dtype: str = "bf16",
                 objective: str = "latency", cache_tokens: int | None = None,
                 use_all_workers: bool = False, hop_seconds: float = DEFAULT_HOP_SECONDS,
                 result_address: str, store_source: StoreSource | None = None,
                 link_keys: LinkKeys | None = None, max_restarts: int = 3,
                 control_timeout: float = CONTROL_TIMEOUT, worker_host: str | None = None) -> None:
        """`worker_host`: the address workers bind (None: their node's; `link_host`).
        `store_source`: where workers fetch the store files their node lacks (store
        transfer, cluster/transfer.py); None: every node has the store at store.path.
        `max_restarts`: replacements per worker within RESTART_WINDOW (-1: no limit, 0:
        none, the re-plan runs over the survivors). `control_timeout`: seconds a worker
        has to answer a probe before it counts as dead."""
        import ray

        if max_restarts < -1:
            raise ValueError(f"max_restarts must be -1 (no limit), 0 or more, got {max_restarts}")
        if control_timeout <= 0:
            raise ValueError(f"control_timeout must be > 0 seconds, got {control_timeout}")
        self.max_restarts, self.control_timeout = max_restarts, control_timeout
        self.store = store
        self.objective, self.use_all_workers = objective, use_all_workers
        self.hop_seconds, self.cache_tokens = hop_seconds, cache_tokens
        self.result_address = result_address
        self.keys = link_keys  # CURVE on every ZeroMQ link (cluster/links.py); None: plain
        # None: the plan sizes the KV cache from the memory its stages leave
        self.cost = model_cost(store, cache_tokens)
        nodes = ray_glue.worker_nodes(capacities)
        self._worker_kwargs = dict(compute_dtype=compute_dtype, wire_dtype=wire_dtype,
                                   kv_dtype=store.kv_dtype,
                                   store_source=store_source, link_keys=link_keys,
                                   host=worker_host)
        offsets = cpu_offsets(nodes, threads)
        self.workers = [WorkerHandle(i, cap, node, None, threads=t, cpu_offset=o)
                        for i, (cap, node, t, o) in enumerate(zip(capacities, nodes, threads,
                                                                  offsets))]
        try:
            for w in self.workers:
                self._start(w)
            infos = ray.get([w.actor.info.remote() for w in self.workers], timeout=START_TIMEOUT)
            for w, info in zip(self.workers, infos):
                w.info = info
                w.watch = w.actor.watch.remote()
            # one at a time: workers sharing a machine would slow each other's measurement
            for w in self.workers:
                w.speed = ray.get(w.actor.calibrate.remote(
                    stream=int(w.capacity.gpu_mem) > 0), timeout=300)
                w.overhead = ray.get(w.actor.info.remote(), timeout=60)["overhead"]
                log.info("worker %d (%s, pid %s): GB/s of weights %s, runtime %.0f MiB",
                         w.index, w.capacity, w.info["pid"],
                         {t: round(v / 1e9, 2) for t, v in w.speed.items()},
                         w.overhead / 2**20)
            self.epoch = 0
            self.plan, self.report = self._plan()
            self.cache_capacity = self._configure()
        except BaseException:
            self.shutdown()
            raise

    def _start(self, w: WorkerHandle) -> None:
        w.actor = ray_glue.start_actor(Worker, w.node, str(self.store.path), threads=w.threads,
                                       cpu_offset=w.cpu_offset, **self._worker_kwargs)

    # ------------------------------------------------------------------ plan
    def alive(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.alive]

    def _plan(self) -> tuple[Plan, PlanReport]:
        alive = self.alive()
        specs = [w.spec for w in alive]
        p, report = plan(self.cost, specs, objective=self.objective,
                         hop_seconds=self.hop_seconds, use_all_workers=self.use_all_workers)
        # per block (types.block_cache_budget): K/V rows, or RWKV states
        self.cache_budget = block_cache_budget(self.store.config, report.cache_tokens)
        # the planner numbers the workers it was given; map back to ours (and the
        # report's stages keep the planner's numbering, in the same order as the plan's)
        stages = tuple(dataclasses.replace(s, worker=alive[s.worker].index) for s in p.stages)
        return Plan(stages, p.n_blocks), report

    def _configure(self) -> int:
        """Send every alive worker its part of the plan; returns the per-block cache budget
        every stage holds (the scheduler admits sequences within it)."""
        import ray

        stages = list(self.plan.stages)
        calls = []
        for k, s in enumerate(stages):
            w = self.workers[s.worker]
            nxt = (self.workers[stages[k + 1].worker].info["address"] if k + 1 < len(stages)
                   else self.result_address)
            gpu = streams_to_gpu(w.spec)  # every block on its GPU
            calls.append(w.actor.configure.remote(
                self.epoch, s.start, s.end, tiers=[t.value for t in s.tiers],
                cache_budget=self.cache_budget, next_address=nxt,
                result_address=self.result_address, stream_to="cuda" if gpu else None))
        used = {s.worker for s in stages}
        idle = [w.actor.configure.remote(self.epoch) for w in self.alive() if w.index not in used]
        got = ray.get(calls + idle, timeout=600)
        self.stage_cores = self._cores()
        return min(r["cache_budget"] for r in got[: len(calls)])

    def _cores(self) -> list[StageCores]:
        """Each stage's StageCores, in plan order."""
        shares: dict[str, int] = {}
        for w in self.alive():
            shares[w.node.ip] = shares.get(w.node.ip, 0) + w.threads
        out = []
        for s in self.plan.stages:
            w = self.workers[s.worker]
            machine = max(w.threads, min(shares[w.node.ip], w.info["machine_cpus"]))
            out.append(StageCores(s.start, w.node.ip, w.threads, machine,
                                  w.capacity.threads is not None))
        return out

    @property
    def first_address(self) -> str:
        return self.workers[self.plan.stages[0].worker].info["address"]

    # ------------------------------------------------------------------ failures
    def dead(self) -> list[WorkerHandle]:
        """Workers whose actor has died since the last look (no waiting)."""
        import ray

        watched = {w.watch: w for w in self.alive()}
        if not watched:
            return []
        done, _ = ray.wait(list(watched), num_returns=len(watched), timeout=0)
        return [watched[ref] for ref in done]

    def probe(self) -> list[WorkerHandle]:
        """Ask every alive worker for its stats; those that do not answer are dead."""
        import ray

        bad = []
        for w in self.alive():
            try:
                ray.get(w.actor.stats.remote(), timeout=self.control_timeout)
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.warning("worker %d does not answer: %s", w.index, e)
                bad.append(w)
        return bad

    def replan(self, lost: list[WorkerHandle]) -> None:
        """Replace the lost workers where allowed, re-plan over the workers alive and
        configure them for a new epoch. A worker that dies while being configured (say,
        killed for memory while loading the blocks it was given) is lost in turn, and
        the re-plan starts again, at most REPLAN_ATTEMPTS times. Raises PlanError when the
        workers left cannot hold the model."""
        import ray

        t0 = time.perf_counter()
        for _ in range(REPLAN_ATTEMPTS):
            for w in lost:
                w.alive = False
                try:
                    ray.kill(w.actor)
                except Exception:  # already gone
                    pass
            self.epoch += 1
            self._replace([w for w in lost if self._may_restart(w)])
            if not self.alive():
                raise PlanError("every worker has failed; nothing is left to run the model on")
            self.plan, self.report = self._plan()
            try:
                self.cache_capacity = self._configure()
            except ray.exceptions.RayActorError as e:
                lost = self.probe()
                if not lost:
                    raise
                log.warning("worker(s) %s died while being configured (%s); re-planning "
                            "again", [w.index for w in lost], type(e).__name__)
                continue
            log.warning("re-planned over %d workers in %.1f s (epoch %d)", len(self.alive()),
                        time.perf_counter() - t0, self.epoch)
            return
        raise PlanError(f"workers kept dying while being configured ({REPLAN_ATTEMPTS} "
                        "re-plans in a row)")

    def _may_restart(self, w: WorkerHandle) -> bool:
        recent = sum(time.monotonic() - t < RESTART_WINDOW for t in w.restarts)
        if self.max_restarts != -1 and recent >= self.max_restarts:
            log.warning("worker %d is not replaced: %d restarts in the last %.0f s "
                        "(max_restarts=%d)", w.index, recent, RESTART_WINDOW,
                        self.max_restarts)
            return False
        if w.node.node_id not in {n.node_id for n in ray_glue.nodes()}:
            log.warning("worker %d is not replaced: its node %s has left the cluster",
                        w.index, w.node.node_id[:12])
            return False
        return True

    def _replace(self, lost: list[WorkerHandle]) -> None:
        """A fresh actor for each of `lost`, on its node with its budget; those that are
        not up within REPLACE_TIMEOUT stay dead."""
        import ray

        for w in lost:
            w.restarts.append(time.monotonic())
            self._start(w)
        for w in lost:
            try:
                w.info = ray.get(w.actor.info.remote(), timeout=REPLACE_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.error("replacement for worker %d did not start: %s", w.index, e)
                try:
                    ray.kill(w.actor)
                except Exception:
                    pass
                continue
            w.watch, w.alive = w.actor.watch.remote(), True
            log.warning("worker %d replaced (pid %s, restart %d)", w.index, w.info["pid"],
                        len(w.restarts))

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            if w.alive:
                try:
                    ray.get(w.actor.shutdown.remote(), timeout=10)
                except Exception:
                    pass
                try:
                    ray.kill(w.actor)
                except Exception:
                    pass
                w.alive = False
