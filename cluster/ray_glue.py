"""Ray glue: choose the cluster to join (or start a private one), find its nodes, place
worker actors, and set a worker process's environment before torch loads.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from .types import Capacity

log = logging.getLogger("llm_shard.cluster")


class ClusterError(RuntimeError):
    """The Ray cluster cannot give what was asked (a node that is not there, no nodes)."""


# Seconds a Ray cluster has to answer before connect gives up on it and names it (Ray's own
# driver would retry a silent address for minutes, saying nothing).
CONNECT_TIMEOUT = 30.0
PRIVATE = "local"  # ray.init's address for a new local cluster, found by no address file


def connect(address: str | None = None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Join the cluster `choose_cluster` picks, or start a private local one; a no-op when
    this process already joined one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=choose_cluster(address, timeout))


def choose_cluster(address: str | None = None, timeout: float = CONNECT_TIMEOUT) -> str:
    """The address to hand ray.init: the cluster the user named (`address`, else
    RAY_ADDRESS: "HOST:PORT", "ray://…", "auto" for Ray's own search, "local"), else the one
    in Ray's address file if `ray start` began it (`ray_start_record`), else PRIVATE: a
    new local cluster, which Ray records in no address file. A ClusterError, naming the
    address and what to do, when the cluster chosen does not answer within `timeout`."""
    named = address or os.environ.get("RAY_ADDRESS") or None
    if named == PRIVATE:
        return PRIVATE
    path, recorded, owner = _address_file()
    stale = (f"a cluster that stopped without `ray stop`? Delete {path} (`ray stop` does "
             "too, and stops every Ray of yours on this machine) for a private local Ray, "
             "or pass --address (RAY_ADDRESS) of a running cluster.")
    if named is not None:
        _ask_named(named, timeout, stale if recorded else "is its head running?")
        return named
    if recorded is None:
        return PRIVATE
    _auto_token()  # as ray.init does for a cluster it finds on its own
    record = _ask_gcs(recorded, timeout, f"the Ray cluster at {recorded}, named in {path},",
                      stale)
    why_not = ray_start_record(record, owner)
    if why_not is not None:
        log.warning("not joining the Ray cluster at %s named in %s: %s. Starting a private "
                    "local Ray (--address %s joins that one).", recorded, path, why_not,
                    recorded)
        return PRIVATE
    log.info("joining the Ray cluster at %s that `ray start` began (%s)", recorded, path)
    return recorded


def _ask_named(address: str, timeout: float, auto_advice: str) -> None:
    """A ClusterError unless the cluster at `address` ("HOST:PORT", "ray://…", "auto")
    answers within `timeout`."""
    if address == "auto":  # Ray's search: the address file, else the one local GCS
        _auto_token()
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            found = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise ClusterError(f"--address auto: {e}") from None
        _ask_gcs(found, timeout, f"the Ray cluster at {found} (found by auto)", auto_advice)
    elif address.startswith("ray://"):
        _ask_client_server(address, timeout)
    else:
        _ask_gcs(address, timeout, f"the Ray cluster at {address}",
                 "is its head running (`ray start --head`), and is the address right?")


def ray_start_record(record: dict, file_uid: int) -> str | None:
    """None if the cluster of `record` (`_ask_gcs`) is one `ray start` began for this user,
    else why not: the address file is another user's; Ray recorded it as ray.init()'s; or
    its GCS runs here as the child of a live Python program that is not `ray start`
    (ray.init() and ray.cluster_utils start the head inside the program, its children)."""
    if file_uid != os.getuid():
        return f"the address file is user {file_uid}'s"
    meta = record.get("metadata")
    if meta is None:
        return "Ray recorded no cluster metadata, so it cannot be told from a ray.init() one"
    if meta.get("ray_init_cluster"):
        return "Ray records it as started by ray.init() in another program"
    starter = _in_process_starter(record.get("gcs_pid"), record.get("session"))
    if starter is not None:
        return f"it was started inside another program ({starter})"
    return None


def _in_process_starter(gcs_pid: int | None, session: str | None) -> str | None:
    """`pid N: command line` of the Python program whose child the GCS of `session` is,
    when that GCS runs on this machine and its parent is not `ray start`; else None (a
    remote head, or one whose `ray start` exited, leaving it to init or a subreaper)."""
    import psutil

    if gcs_pid is None or session is None:
        return None
    try:
        gcs = psutil.Process(gcs_pid)
        if f"--session-name={session}" not in gcs.cmdline():
            return None  # that pid is no GCS of this cluster: the head is elsewhere
        parent = gcs.parent()
        if parent is None or parent.pid == 1:
            return None
        argv = parent.cmdline()
        name = parent.name()
    except psutil.Error:
        return None
    words = [os.path.basename(a) for a in argv[:3]]
    if "start" in argv and ("ray" in words or "ray.scripts.scripts" in argv):
        return None  # `ray start --block`, which waits on the head it started
    if not any(w.startswith("python") for w in [name, *words[:1]]):
        return None  # init, a subreaper (systemd --user, tini), a shell
    return f"pid {parent.pid}: {' '.join(argv)[:120]}"


def _address_file() -> tuple[str, str | None, int | None]:
    """Ray's address file (where `ray start` records its cluster), the address in it and
    the file's owner (uid); None, None where there is none."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return path, f.read().strip() or None, os.fstat(f.fileno()).st_uid
    except FileNotFoundError:
        return path, None, None


def _auto_token() -> None:
    """Ray's token from ~/.ray/auth_token when RAY_AUTH_MODE is unset, as ray.init does
    for a cluster it finds itself (an address file or "auto")."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _ask_gcs(address: str, timeout: float, what: str, advice: str) -> dict:
    """What the GCS at `address` records of its cluster: {"metadata": Ray's cluster
    metadata (ray_init_cluster...) or None, "gcs_pid", "session"}; a ClusterError naming
    `what` and `advice` when it does not answer within `timeout`."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.services import canonicalize_bootstrap_address
    from ray.core.generated import gcs_service_pb2 as pb
    from ray.core.generated import gcs_service_pb2_grpc as rpc

    try:
        target = canonicalize_bootstrap_address(address)
    except ValueError as e:
        raise ClusterError(f"{what}: {e}") from None
    deadline = time.monotonic() + timeout
    with init_grpc_channel(target) as channel:
        kv = rpc.InternalKVGcsServiceStub(channel)

        def get(key: bytes, namespace: bytes | None) -> bytes | None:
            reply = kv.InternalKVGet(pb.InternalKVGetRequest(key=key, namespace=namespace),
                                     timeout=max(0.1, deadline - time.monotonic()))
            return reply.value if reply.status.code == 0 else None

        try:
            meta, pid = get(b"CLUSTER_METADATA", b"cluster"), get(b"gcs_pid", None)
            session = get(b"session_name", b"session")
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                said, advice = e.details(), ("it runs with Ray's token auth: set "
                                             "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN "
                                             "or ~/.ray/auth_token)")
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                said = f"no answer within {timeout:.0f} s"
            else:  # e.g. "failed to connect to all addresses; …: Connection refused"
                said = f"{code.name}: {(e.details() or '').rsplit(': ', 1)[-1]}"
            raise ClusterError(f"{what} does not answer ({said}): {advice}") from None
    return {"metadata": json.loads(meta) if meta else None,
            "gcs_pid": int(pid) if pid else None,
            "session": session.decode() if session else None}


def _ask_client_server(address: str, timeout: float) -> None:
    """A ClusterError unless the Ray Client server at `address` (ray://HOST:PORT) accepts
    a connection within `timeout`."""
    import socket

    from ray._private.services import parse_address

    host_port = parse_address(address.removeprefix("ray://").split("/")[0])
    if host_port is None:
        raise ClusterError(f"{address} is no ray://HOST:PORT address")
    try:
        socket.create_connection((host_port[0], int(host_port[1])), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"the Ray Client server at {address} did not answer within "
                           f"{timeout:.0f} s ({e}): is its head running, with the client "
                           f"server on that port?") from None


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
