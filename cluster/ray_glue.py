"""Ray glue: connect to (or start) a cluster, find its nodes, place worker actors, and set
a worker process's environment before torch loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .types import Capacity

log = logging.getLogger("llm_shard.cluster")


class ClusterError(RuntimeError):
    """The Ray cluster cannot give what was asked (a node that is not there, no nodes)."""


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT", "ray://…"); with None, the
    one RAY_ADDRESS or a local `ray start` names, else start a local one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address)


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    cpus: int
    memory: int  # bytes Ray counts as this node's memory for tasks and actors
    resources: dict


def nodes() -> list[Node]:
    """The cluster's alive nodes, head first."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        out.append(Node(n["NodeID"], n["NodeManagerAddress"], int(res.get("CPU", 1)),
                        int(res.get("memory", 0)), dict(res)))
    return out


def this_node() -> Node:
    import ray

    me = ray.get_runtime_context().get_node_id()
    for n in nodes():
        if n.node_id == me:
            return n
    raise ClusterError(f"this process's node {me} is not among the cluster's alive nodes")


def find_node(name: str) -> Node:
    """A node by its id (or a unique prefix of it) or its IP address."""
    alive = nodes()
    hits = [n for n in alive if n.node_id == name] or \
        [n for n in alive if n.node_id.startswith(name) or n.ip == name]
    if not hits:
        raise ClusterError(f"no alive Ray node has id or IP {name!r}; nodes: "
                           + ", ".join(f"{n.node_id[:12]} ({n.ip})" for n in alive))
    if len(hits) > 1:
        raise ClusterError(f"{len(hits)} Ray nodes match {name!r}: name one by its node id")
    return hits[0]


# libgomp's busy-wait after each parallel region, in spins: its default (300000) keeps a
# stage's idle threads on the cores that the next stage on the same machine needs; 20000
# keeps them spinning between the ops of one step but not after. libgomp reads it once, as
# torch loads it; a GOMP_SPINCOUNT in the environment of `ray start` wins.
GOMP_SPINCOUNT = "20000"
_worker_env: dict | None = None


def worker_process_env() -> dict:
    """In a Ray worker process, before anything loads torch (`import llm_shard` calls it
    there): GOMP_SPINCOUNT unless the environment sets one. Returns {"GOMP_SPINCOUNT":
    value, "applied": whether libgomp read it (set before torch loaded libgomp, or given
    by the environment)}. Not a Ray runtime_env: one of those makes every worker start a
    fresh process instead of taking one of Ray's idle ones."""
    global _worker_env
    if _worker_env is None:
        import sys

        given, loaded = "GOMP_SPINCOUNT" in os.environ, "torch" in sys.modules
        _worker_env = {"GOMP_SPINCOUNT": os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT),
                       "applied": given or not loaded}
    return _worker_env


def start_actor(cls: type, node: Node, *args, **kwargs):
    """An actor of `cls` pinned to `node`. It takes no Ray CPU slot (the budget, not Ray's
    CPU count, says what it may use), answers control calls while its `watch` call waits,
    and is not restarted by Ray: the coordinator replaces it (coordinator/pipeline.py)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(cls).options(
        num_cpus=0, max_concurrency=4, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False))
    return remote.remote(*args, **kwargs)


def worker_nodes(capacities: list[Capacity]) -> list[Node]:
    """The node each capacity runs on: the one it names, else the driver's own node."""
    here = None
    out = []
    for c in capacities:
        if c.node is not None:
            out.append(find_node(c.node))
        else:
            here = here or this_node()
            out.append(here)
    return out
