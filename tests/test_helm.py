"""The Helm chart under helm/: it lints, renders for several value sets, every RayCluster
it renders passes KubeRay's CRD schema (strict: unknown fields are errors, as the API
server's strict field validation makes them) and every other object passes Kubernetes'
own schema (kubernetes-validate, strict); budgets reach `ray start` and the pods' requests;
every Ray container and serve run with Ray's token auth, the dashboard stays on loopback,
and NetworkPolicies keep Ray's ports to the release's own pods.

Needs the `deploy` extra (helm-python-sdk, kubernetes-validate) and ../shared/data.
"""

from __future__ import annotations

import base64
import json
import shlex
from pathlib import Path

import pytest
import yaml

from llm_shard.cluster.resources import RESOURCE_NAMES
from llm_shard.cluster.types import Memory

NEEDS = "is not installed: pip install -e '.[deploy]'"
helm_chart = pytest.importorskip("helm_python.chart", reason=f"helm-python-sdk {NEEDS}")
kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                          reason=f"kubernetes-validate {NEEDS}")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm"
CRD = REPO.parent / "shared" / "data" / "kuberay-rayclusters-crd.yaml"
K8S_VERSION = "1.30"

VALUE_SETS = {
    "defaults": {},
    "persistent-store": {"store": {"persistence": {"enabled": True, "storageClass": "nfs"}},
                         "apiKey": {"value": "s3cret"}},
    "existing-claim-and-secret": {
        "store": {"persistence": {"enabled": True, "existingClaim": "models"}},
        "apiKey": {"existingSecret": "my-key", "secretKey": "token"}},
    "cpu-only-head-worker": {
        "head": {"budget": {"ram": "2Gi", "disk": "10Gi", "gpuMem": 0},
                 "nodeSelector": {"kubernetes.io/hostname": "nuc"}},
        "workerGroups": {"gpu": {"enabled": False}},
        "service": {"type": "LoadBalancer"},
        "serve": {"extraArgs": ["--dtype", "int8"]}, "model": "smollm2-135m"},
    "own-ray-token-open-dashboard": {
        "rayAuth": {"existingSecret": "lab-ray", "secretKey": "token"},
        "head": {"rayStartParams": {"dashboard-host": "0.0.0.0"}},
        "networkPolicy": {"extraFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}]}},
    "no-network-policy": {"networkPolicy": {"enabled": False},
                          "rayAuth": {"token": "t0ken"}},
}


def render(values: dict, name: str = "rel") -> list[dict]:
    out = helm_chart.Chart.load(str(CHART)).render(values=values, name=name, namespace="lab")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def secret(docs: list[dict], suffix: str) -> dict:
    [found] = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith(suffix)]
    return found


def _strict(schema):
    """Unknown fields become errors where the CRD lists an object's fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def raycluster_schema() -> dict:
    if not CRD.is_file():
        pytest.skip(f"KubeRay CRD not found at {CRD} (../shared/data from the repo root)")
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def test_chart_lints_clean():
    report = helm_chart.lint(str(CHART), strict=True)
    assert report["errors"] == []
    worse_than_info = [m for m in report["messages"] if m["severity"] >= 2]
    assert worse_than_info == []


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_validates(values, raycluster_schema):
    docs = render(values)
    assert by_kind(docs, "RayCluster") and by_kind(docs, "Service")
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "RayCluster":
            assert doc["apiVersion"] == "ray.io/v1"
            try:
                jsonschema.validate(doc, raycluster_schema)
            except jsonschema.ValidationError as e:
                pytest.fail(f"{where}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_crd_schema_catches_a_misplaced_field(raycluster_schema):
    [rc] = by_kind(render({}), "RayCluster")
    rc["spec"]["headGroupSpec"]["replicas"] = 1  # heads have no replicas
    with pytest.raises(jsonschema.ValidationError, match="replicas"):
        jsonschema.validate(rc, raycluster_schema)


def ray_start_resources(group: dict) -> dict:
    """The budget JSON as `ray start` receives it: KubeRay writes `--KEY=VALUE` into a bash
    command line, so the value is unquoted the way bash does it."""
    [arg] = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    return json.loads(arg.removeprefix("--resources="))


def expected(budget: dict) -> dict:
    return {RESOURCE_NAMES["ram"]: int(Memory.parse(str(budget["ram"]))),
            RESOURCE_NAMES["disk"]: int(Memory.parse(str(budget["disk"]))),
            RESOURCE_NAMES["gpu_mem"]: int(Memory.parse(str(budget["gpuMem"])))}


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def quantity(q) -> int:
    return int(Memory.parse(str(q)))


def test_budgets_reach_ray_start_and_pod_requests():
    values = chart_values()
    [rc] = by_kind(render({}), "RayCluster")
    head = rc["spec"]["headGroupSpec"]
    workers = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(workers) == {"cpu", "gpu"}
    assert ray_start_resources(head) == expected(values["head"]["budget"])
    for name, group in workers.items():
        v = values["workerGroups"][name]
        assert ray_start_resources(group) == expected(v["budget"])
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == \
            (v["replicas"], v["minReplicas"], v["maxReplicas"])
        [ray] = group["template"]["spec"]["containers"]
        req, lim = ray["resources"]["requests"], ray["resources"]["limits"]
        ram = Memory.parse(str(v["budget"]["ram"])) + Memory.parse(v["memoryOverhead"])
        assert quantity(req["memory"]) == quantity(lim["memory"]) == ram
        assert quantity(req["ephemeral-storage"]) == Memory.parse(v["budget"]["disk"])
        assert req.get("nvidia.com/gpu", 0) == lim.get("nvidia.com/gpu", 0) == v["gpus"]
        [home] = [e for e in ray["env"] if e["name"] == "LLM_SHARD_HOME"]
        assert home["value"] == values["store"]["mountPath"]
    assert workers["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    assert ray_start_resources(workers["gpu"])["llm_shard_gpu_mem"] == 5 * 1024**3


def test_serve_runs_next_to_the_head_behind_the_service_with_the_api_key():
    docs = render({"apiKey": {"value": "s3cret"}})
    [rc], [svc] = (by_kind(docs, k) for k in ("RayCluster", "Service"))
    api_key = secret(docs, "-api-key")
    pod = rc["spec"]["headGroupSpec"]["template"]
    ray, serve = pod["spec"]["containers"]
    assert ray["name"] == "ray"  # KubeRay runs `ray start` in the first container
    script = serve["args"][0]
    assert 'llm-shard serve "$LLM_SHARD_MODEL" --address auto --host 0.0.0.0 --port 8000' \
        in " ".join(script.split())
    env = {e["name"]: e for e in serve["env"]}
    assert env["LLM_SHARD_MODEL"]["value"] == "pangualpha"
    ref = env["LLM_SHARD_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == api_key["metadata"]["name"]
    assert base64.b64decode(api_key["data"][ref["key"]]).decode() == "s3cret"
    # the serve container sees the head's /tmp/ray, so `--address auto` finds it
    shared = {m["name"] for m in ray["volumeMounts"]} & {m["name"] for m in serve["volumeMounts"]}
    assert "ray-tmp" in shared
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in serve["ports"]}
    # ready on /health (200 once the workers are up), not on the port, which serve takes
    # before it loads the model
    assert serve["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_generated_api_key_and_existing_secret():
    assert len(base64.b64decode(secret(render({}), "-api-key")["data"]["api-key"])) == 32
    docs = render(VALUE_SETS["existing-claim-and-secret"])
    assert [s["metadata"]["name"] for s in by_kind(docs, "Secret")] == ["rel-llm-shard-ray-auth"]
    assert by_kind(docs, "PersistentVolumeClaim") == []
    [rc] = by_kind(docs, "RayCluster")
    serve = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
    [key] = [e for e in serve["env"] if e["name"] == "LLM_SHARD_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "my-key", "key": "token"}
    volumes = [v for g in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
               for v in g["template"]["spec"]["volumes"] if v["name"] == "store"]
    assert all(v["persistentVolumeClaim"]["claimName"] == "models" for v in volumes)


def test_persistent_store_is_one_claim_mounted_everywhere():
    docs = render(VALUE_SETS["persistent-store"])
    [pvc], [rc] = by_kind(docs, "PersistentVolumeClaim"), by_kind(docs, "RayCluster")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "nfs"
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    for g in groups:
        [store] = [v for v in g["template"]["spec"]["volumes"] if v["name"] == "store"]
        assert store["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        # no emptyDir, so no ephemeral-storage request for the disk budget
        assert "ephemeral-storage" not in g["template"]["spec"]["containers"][0][
            "resources"]["requests"]


def test_bad_budget_fails_with_a_message():
    with pytest.raises(Exception, match="4GB.*Gi"):
        render({"workerGroups": {"cpu": {"budget": {"ram": "4GB"}}}})


def ray_auth_env(container: dict) -> tuple[str, dict]:
    """(RAY_AUTH_MODE, the secretKeyRef of RAY_AUTH_TOKEN) of a container."""
    env = {e["name"]: e for e in container.get("env", [])}
    assert "RAY_AUTH_MODE" in env and "RAY_AUTH_TOKEN" in env, \
        f"container {container['name']}: no Ray token auth in its env"
    return env["RAY_AUTH_MODE"]["value"], env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize("values, ref, token", [
    ({}, {"name": "rel-llm-shard-ray-auth", "key": "auth_token"}, None),
    ({"rayAuth": {"token": "t0ken"}}, {"name": "rel-llm-shard-ray-auth", "key": "auth_token"},
     "t0ken"),
    (VALUE_SETS["own-ray-token-open-dashboard"], {"name": "lab-ray", "key": "token"}, None),
], ids=["generated", "given", "existing-secret"])
def test_every_ray_container_and_serve_get_the_ray_token(values, ref, token):
    docs = render(values)
    [rc] = by_kind(docs, "RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in head] == ["ray", "serve"]
    workers = [g["template"]["spec"]["containers"] for g in rc["spec"]["workerGroupSpecs"]]
    assert len(workers) == 2 and all(len(c) == 1 for c in workers)
    for container in [*head, *(c for group in workers for c in group)]:
        assert ray_auth_env(container) == ("token", ref)
    if ref["name"] == "lab-ray":  # the user's Secret: none made
        assert [s["metadata"]["name"] for s in by_kind(docs, "Secret")] == [
            "rel-llm-shard-api-key"]
        return
    stored = base64.b64decode(secret(docs, "-ray-auth")["data"][ref["key"]]).decode()
    if token is None:
        assert len(stored) == 64 and stored.isalnum()
        assert stored != base64.b64decode(secret(render(values), "-ray-auth")["data"][
            ref["key"]]).decode(), "not random"
    else:
        assert stored == token


@pytest.mark.parametrize("params, host", [
    (None, "127.0.0.1"),  # values.yaml as shipped
    ({"num-cpus": "1"}, "127.0.0.1"),
    ({"dashboard-host": None}, "127.0.0.1"),  # unset: KubeRay's default would be 0.0.0.0
    ({"dashboard-host": "0.0.0.0"}, "0.0.0.0"),  # asked for
], ids=["shipped", "other-params", "unset", "asked-open"])
def test_dashboard_stays_on_loopback_unless_asked(params, host):
    values = {} if params is None else {"head": {"rayStartParams": params}}
    [rc] = by_kind(render(values), "RayCluster")
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == host
    assert chart_values()["head"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def selects(policy: dict, labels: dict) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_network_policies_keep_ray_ports_to_the_release():
    docs = render({})
    [rc] = by_kind(docs, "RayCluster")
    pods = {"head": rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]}
    pods |= {g["groupName"]: g["template"]["metadata"]["labels"]
             for g in rc["spec"]["workerGroupSpecs"]}
    policies = {p["metadata"]["name"].removeprefix("rel-llm-shard-"): p
                for p in by_kind(docs, "NetworkPolicy")}
    assert set(policies) == {"ray", "http"}
    ray, http = policies["ray"], policies["http"]
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies.values())
    # every Ray pod is isolated, and admits any port from the release's pods alone
    assert all(selects(ray, labels) for labels in pods.values())
    [rule] = ray["spec"]["ingress"]
    assert "ports" not in rule
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}
    assert all(peer["podSelector"]["matchLabels"].items() <= labels.items()
               for labels in pods.values())
    assert not peer["podSelector"]["matchLabels"].items() <= {
        **pods["head"], "app.kubernetes.io/instance": "other"}.items()
    # the serve port on the head only, from anywhere
    assert [name for name, labels in pods.items() if selects(http, labels)] == ["head"]
    [rule] = http["spec"]["ingress"]
    assert "from" not in rule and rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    [svc] = by_kind(docs, "Service")
    serve = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
    assert [p["containerPort"] for p in serve["ports"]] == [8000]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_network_policy_extra_peers_and_off():
    extra = VALUE_SETS["own-ray-token-open-dashboard"]["networkPolicy"]["extraFrom"]
    ray = next(p for p in by_kind(render(VALUE_SETS["own-ray-token-open-dashboard"]),
                                  "NetworkPolicy") if p["metadata"]["name"].endswith("-ray"))
    assert ray["spec"]["ingress"][0]["from"][1:] == extra
    assert by_kind(render(VALUE_SETS["no-network-policy"]), "NetworkPolicy") == []
