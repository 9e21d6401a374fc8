"""`llm-shard node-resources` and its inverse, `budgets_from_ray_nodes`.

The command is tested through click's CliRunner (detection stubbed where a figure must be
exact, real where only its bounds are known); the inverse on a recorded `ray.nodes()`
entry and on a real two-node `ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from click.testing import CliRunner

from llm_shard.cluster import resources as res
from llm_shard.cluster.resources import (
    MAX_QUANTITY,
    RESOURCE_NAMES,
    budgets_from_ray_nodes,
    node_resources,
    to_ray_resources,
)
from llm_shard.cluster.types import Capacity, GiB, Memory, MiB

NAMES = ("llm_shard_ram", "llm_shard_disk", "llm_shard_gpu_mem")


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(node_resources, list(args), env=env, catch_exceptions=False)


@pytest.fixture(autouse=True)
def _no_budget_env(monkeypatch):
    for var in ("LLM_SHARD_RAM", "LLM_SHARD_DISK", "LLM_SHARD_GPU_MEM"):
        monkeypatch.delenv(var, raising=False)


# ---- the rules -----------------------------------------------------------------------


def test_ram_rule_leaves_max_of_1gib_and_a_tenth():
    assert res.ram_budget(total=8 * GiB, available=5 * GiB) == 4 * GiB  # 1 GiB > 0.8 GiB
    assert res.ram_budget(total=64 * GiB, available=40 * GiB) == 40 * GiB - int(6.4 * GiB)
    assert res.ram_budget(total=2 * GiB, available=GiB // 2) == 0  # floored, never negative
    assert isinstance(res.ram_budget(GiB, GiB), Memory)


def test_disk_and_gpu_rules():
    assert res.disk_budget(100 * GiB) == 99 * GiB
    assert res.disk_budget(GiB // 2) == 0
    assert res.gpu_budget(6 * GiB) == 6 * GiB - 512 * MiB
    assert res.gpu_budget(0) == 0


def test_store_dir_follows_llm_shard_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_SHARD_HOME", str(tmp_path / "store"))
    assert res.store_dir() == tmp_path / "store"
    monkeypatch.delenv("LLM_SHARD_HOME")
    assert res.store_dir() == res.Path("~/.cache/llm-shard").expanduser()


def test_detect_disk_walks_up_to_an_existing_folder(tmp_path):
    free = res.detect_disk(tmp_path / "not" / "yet" / "made")
    assert 0 < free <= os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize + GiB


def test_gpu_detection_reads_the_first_cuda_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (6 * GiB, 8 * GiB) if d == 0
                        else pytest.fail(f"asked device {d}"))
    assert res.detect_gpu_mem() == 6 * GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert res.detect_gpu_mem() == 0


def test_ray_limit_is_rays_own():
    from ray._private import ray_constants

    assert MAX_QUANTITY == ray_constants.MAX_RESOURCE_QUANTITY
    big = to_ray_resources(Capacity(disk=Memory(2 * 10**14), ram=3 * GiB + 1))
    assert big == {"llm_shard_ram": 3 * GiB + 1, "llm_shard_disk": 10**14,
                   "llm_shard_gpu_mem": 0}
    assert all(type(v) is int for v in big.values())


# ---- the command ---------------------------------------------------------------------


def test_overrides_print_exact_bytes_as_compact_json():
    out = run("--ram", "2GiB", "--disk", "1.5GB", "--gpu-mem", "0")
    assert out.exit_code == 0, out.output
    line = out.output.strip()
    assert " " not in line  # survives an unquoted $(...)
    assert json.loads(line) == {"llm_shard_ram": 2 * GiB, "llm_shard_disk": 1_500_000_000,
                                "llm_shard_gpu_mem": 0}
    assert tuple(json.loads(line)) == NAMES and tuple(RESOURCE_NAMES.values()) == NAMES


def test_overrides_come_from_the_environment_too():
    out = run("--disk", "8GiB", "--gpu-mem", "1Gi",
              env={"LLM_SHARD_RAM": "512MiB", "LLM_SHARD_DISK": "1GiB"})
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"llm_shard_ram": 512 * MiB, "llm_shard_disk": 8 * GiB,
                                      "llm_shard_gpu_mem": GiB}  # the flag beats the env


def test_bad_amount_is_a_usage_error_that_says_what_is_accepted():
    out = run("--ram", "two gigs")
    assert out.exit_code == 2
    assert "--ram" in out.output and "2GiB" in out.output and "Traceback" not in out.output
    assert run("--disk", "-1GiB").exit_code == 2


def test_detection_applies_the_rules(monkeypatch, tmp_path):
    monkeypatch.setattr(res, "detect_ram", lambda: (Memory(16 * GiB), Memory(10 * GiB)))
    seen = []
    monkeypatch.setattr(res, "detect_disk", lambda p: seen.append(p) or Memory(50 * GiB))
    monkeypatch.setattr(res, "detect_gpu_mem", lambda: Memory(6 * GiB))
    out = run("--store", str(tmp_path / "s"))
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {
        "llm_shard_ram": 10 * GiB - int(1.6 * GiB),
        "llm_shard_disk": 49 * GiB,
        "llm_shard_gpu_mem": 6 * GiB - 512 * MiB,
    }
    assert seen == [tmp_path / "s"]
    monkeypatch.setenv("LLM_SHARD_HOME", str(tmp_path / "home"))
    assert run("--ram", "1GiB").exit_code == 0 and seen[-1] == tmp_path / "home"


def test_real_detection_on_this_machine(tmp_path):
    total, available = res.detect_ram()
    assert 0 < available <= total
    out = run("--store", str(tmp_path))
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    assert 0 <= got["llm_shard_ram"] <= available
    assert 0 <= got["llm_shard_disk"] <= res.detect_disk(tmp_path)
    import torch

    if not torch.cuda.is_available():
        assert got["llm_shard_gpu_mem"] == 0


# ---- the inverse ---------------------------------------------------------------------

# One entry of ray.nodes() from Ray 2.60, started with `ray start --head
# --resources="$(llm-shard node-resources)"`, which printed {"llm_shard_ram":21397895988,
# "llm_shard_disk":79952080896,"llm_shard_gpu_mem":0}; Ray drops zero quantities.
RAY_NODE = {
    "NodeID": "b4b8b5762433b9d5e0df9ccbfd9e3fb5868c61c8a30ae5e2dfe604bf", "Alive": True,
    "NodeManagerAddress": "192.0.2.2", "NodeManagerHostname": "vm", "NodeManagerPort": 44355,
    "ObjectManagerPort": 38345,
    "ObjectStoreSocketName": "/tmp/ray/session_2026-11-22_13-51-52_412326_6574/sockets/"
                             "plasma_store",
    "RayletSocketName": "/tmp/ray/session_2026-11-22_13-51-52_412326_6574/sockets/raylet",
    "MetricsExportPort": 35195, "MetricsAgentPort": 37365, "DashboardAgentListenPort": 52365,
    "NodeName": "192.0.2.2", "RuntimeEnvAgentPort": 34551, "DeathReason": 0,
    "DeathReasonMessage": "", "alive": True,
    "Resources": {"CPU": 1.0, "memory": 16951101440.0, "llm_shard_ram": 21397895988.0,
                  "node:__internal_head__": 1.0, "object_store_memory": 7264757760.0,
                  "llm_shard_disk": 79952080896.0, "node:192.0.2.2": 1.0},
    "Labels": {"ray.io/node-id": "b4b8b5762433b9d5e0df9ccbfd9e3fb5868c61c8a30ae5e2dfe604bf"},
}


def _node(node_id: str, ip: str, alive: bool = True, **resources: float) -> dict:
    n = copy.deepcopy(RAY_NODE)
    n.update(NodeID=node_id, NodeManagerAddress=ip, Alive=alive, alive=alive)
    n["Resources"] = {"CPU": 2.0, "memory": 8e9, f"node:{ip}": 1.0, **resources}
    return n


def test_budgets_from_a_recorded_ray_nodes_entry():
    [(node_id, ip, cap)] = budgets_from_ray_nodes([RAY_NODE])
    assert (node_id, ip) == (RAY_NODE["NodeID"], "192.0.2.2")
    assert cap == Capacity(ram=Memory(21397895988), disk=Memory(79952080896),
                           gpu_mem=Memory(0), node=RAY_NODE["NodeID"])
    assert isinstance(cap.ram, Memory)


def test_budgets_skip_dead_nodes_and_nodes_without_a_budget():
    nodes = [
        _node("a" * 56, "10.0.0.1", llm_shard_ram=2.0 * GiB),
        _node("b" * 56, "10.0.0.2"),  # runs Ray, offers llm-shard nothing
        _node("c" * 56, "10.0.0.3", alive=False, llm_shard_ram=8.0 * GiB),
        _node("d" * 56, "10.0.0.4", llm_shard_gpu_mem=5.0 * GiB, llm_shard_disk=1e10),
    ]
    got = budgets_from_ray_nodes(nodes)
    assert [(i[0][0], i[1]) for i in got] == [("a", "10.0.0.1"), ("d", "10.0.0.4")]
    assert got[0][2] == Capacity(ram=2 * GiB, node="a" * 56)
    assert got[1][2] == Capacity(gpu_mem=5 * GiB, disk=Memory(10**10), node="d" * 56)
    assert budgets_from_ray_nodes([]) == []


def test_budgets_refuse_a_fractional_byte_count():
    with pytest.raises(ValueError, match="llm_shard_ram.*whole number of bytes"):
        budgets_from_ray_nodes([_node("e" * 56, "10.0.0.5", llm_shard_ram=1.5)])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_budgets_from_a_real_two_node_ray_cluster(ray_cluster):
    """Two nodes added to the session's Ray cluster advertise budgets as resources; they
    come back exactly, and a task asking for a node's whole budget lands there."""
    import ray

    # Odd byte counts and > 2**32 values: they must come back exactly.
    caps = [Capacity(ram=3 * GiB + 1, disk=100 * GiB, gpu_mem=Memory(0)),
            Capacity(ram=Memory(10**10), disk=GiB + 7, gpu_mem=5 * GiB)]
    nodes = [ray_cluster.add_node(num_cpus=1, resources=to_ray_resources(c)) for c in caps]
    try:
        ray_cluster.wait_for_nodes()
        got = {node_id: (ip, cap) for node_id, ip, cap in budgets_from_ray_nodes(ray.nodes())}
        assert got[nodes[0].node_id][1] == Capacity(ram=caps[0].ram, disk=caps[0].disk,
                                                    node=nodes[0].node_id)  # no GPU
        assert got[nodes[1].node_id][1] == Capacity(ram=caps[1].ram, disk=caps[1].disk,
                                                    gpu_mem=caps[1].gpu_mem,
                                                    node=nodes[1].node_id)

        # A task asking for a node's whole budget, to the byte, lands on that node.
        @ray.remote(num_cpus=0)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        ask = where.options(resources={"llm_shard_ram": float(caps[1].ram),
                                       "llm_shard_gpu_mem": float(caps[1].gpu_mem)})
        assert ray.get(ask.remote(), timeout=60) == nodes[1].node_id
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)
