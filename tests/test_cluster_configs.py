"""The `ray up` configs under cluster/: Ray's own schema accepts them, and their start
commands, run through bash, hand `ray start` the budget JSON of `llm-shard node-resources`
and run it with Ray's token auth, the token shipped to every node by file_mounts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_shard.cluster.resources import RESOURCE_NAMES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))


def ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_configs_are_there():
    assert {p.name for p in CONFIGS} >= {"homelab.yaml", "single-node.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_cluster_schema(path):
    cfg = load(path)
    assert cfg["provider"]["type"] == "local"
    assert {"head_ip", "worker_ips"} <= set(cfg["provider"])
    assert {"ssh_user", "ssh_private_key"} <= set(cfg["auth"])
    prepared = ray_validate(cfg)
    n_workers = len(cfg["provider"]["worker_ips"])
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == n_workers


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_installs_llm_shard_and_advertises_budgets(path):
    cfg = load(path)
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "llm-shard" in setup
    assert "git+https://" in path.read_text()  # the comment on installing from git
    kinds = ["head_start_ray_commands"] + (["worker_start_ray_commands"]
                                           if cfg["provider"]["worker_ips"] else [])
    for kind in kinds:
        commands = cfg[kind]
        assert all(isinstance(c, str) for c in commands), f"{kind}: an item is not a string"
        start = [c for c in commands if "ray start" in c]
        assert len(start) == 1, f"{kind}: expected one `ray start`"
        assert '--resources="$(llm-shard node-resources' in start[0]
        assert ("--head" in start[0]) == (kind == "head_start_ray_commands")


def test_ray_schema_rejects_unfolded_json_in_a_start_command():
    """Why the configs fold start commands: the validation above has teeth."""
    bad = yaml.safe_load("""
cluster_name: x
provider: {type: local, head_ip: 10.0.0.1, worker_ips: []}
auth: {ssh_user: me}
head_start_ray_commands:
  - ray start --head --resources='{"llm_shard_ram": 1}'
""")
    assert isinstance(bad["head_start_ray_commands"][0], dict)
    with pytest.raises(Exception, match="is not of type 'string'"):
        ray_validate(bad)


# `llm-shard` stands in for the console script (registered by the CLI module) and `ray`
# prints its arguments one per line, then the RAY_AUTH_MODE it sees, instead of starting
# anything.
SHIMS = f"""
llm-shard() {{
  [ "$1" = node-resources ] || return 99; shift
  {sys.executable} -c 'import sys; from llm_shard.cluster.resources import node_resources
node_resources(sys.argv[1:], prog_name="llm-shard node-resources")' "$@"
}}
ray() {{ printf '%s\\n' "$@" "auth=${{RAY_AUTH_MODE-}}"; }}
"""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_start_commands_give_ray_start_the_budget_json(path, tmp_path):
    cfg = load(path)
    kinds = ["head_start_ray_commands"] + (["worker_start_ray_commands"]
                                           if cfg["provider"]["worker_ips"] else [])
    env = {**os.environ, "RAY_HEAD_IP": "10.0.0.1", "LLM_SHARD_HOME": str(tmp_path),
           "LLM_SHARD_RAM": "3GiB", "LLM_SHARD_GPU_MEM": "0",
           "RAY_AUTH_MODE": "disabled"}  # the command itself must turn token auth on
    for kind in kinds:
        [start] = [c for c in cfg[kind] if "ray start" in c]
        out = subprocess.run(["bash", "-c", SHIMS + start], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        *args, auth = out.stdout.splitlines()
        assert auth == "auth=token", f"{kind}: `ray start` runs without token auth"
        assert args[0] == "start"
        [given] = [a for a in args if a.startswith("--resources=")]
        budget = json.loads(given.removeprefix("--resources="))
        assert set(budget) == set(RESOURCE_NAMES.values())
        assert budget["llm_shard_ram"] == 3 * 1024**3 and budget["llm_shard_gpu_mem"] == 0
        assert isinstance(budget["llm_shard_disk"], int)
        if kind == "worker_start_ray_commands":
            assert "--address=10.0.0.1:6379" in args


TOKEN_FILE = "~/.ray/auth_token"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_ray_start_and_serve_runs_with_token_auth(path):
    cfg, text = load(path), path.read_text()
    starts = [c for kind in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cfg.get(kind) or [] if "ray start" in c]
    assert starts
    for command in starts:
        assert re.search(r"(^|[;\s])RAY_AUTH_MODE=token ray start ", command), command
        assert "dashboard-host=0.0.0.0" not in command
    # the serve lines the comments give (joining the cluster) carry the mode too
    serves = [line for line in text.splitlines() if "llm-shard serve" in line
              and "--address auto" in line]
    assert serves and all("RAY_AUTH_MODE=token llm-shard serve" in s for s in serves), serves
    # and `ray attach`/`ray exec` shells get it from ~/.bashrc
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c
               for c in cfg["setup_commands"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_token_is_made_first_and_shipped_to_every_node(path):
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
    )

    cfg = load(path)
    # the path `ray get-auth-token --generate` writes and `ray start` reads (no
    # RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH set), on the launching side and on each node
    assert Path(os.path.expanduser(TOKEN_FILE)) == _get_default_token_path()
    assert cfg["file_mounts"][TOKEN_FILE] == TOKEN_FILE
    assert "chmod 600 ~/.ray/auth_token" in cfg["setup_commands"][0]
    header = path.read_text().split("\n\n", 1)[0]
    [first] = [line for line in header.splitlines() if "ray " in line and "#   " in line][:1]
    assert "ray get-auth-token --generate" in first, "the header's first command"
    # Ray's schema, as `ray up` reads it, keeps the mount
    assert ray_validate(cfg)["file_mounts"][TOKEN_FILE] == TOKEN_FILE
