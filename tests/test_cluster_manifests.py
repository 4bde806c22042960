"""The Kubernetes manifests in cluster/, checked offline.

- RayCluster / RayJob documents (the base and every overlay, rendered) against the KubeRay CRDs'
  OpenAPI v3 schemas in ``../shared/kuberay-crds`` (or ``$CLIPLAB_KUBERAY_CRDS``), plus a check for
  fields the API server would silently prune, plus every embedded pod template against the
  Kubernetes PodTemplate schema in strict mode (unknown fields fail);
- built-in kinds (Deployment, Service, ConfigMap, NetworkPolicy, PriorityClass) against the
  Kubernetes schemas bundled in ``kubernetes-validate``;
- structure: non-root, read-only root filesystems, no privilege escalation, secrets only through
  ``secretKeyRef``, resources on every container, a GPU group that asks for GPUs, a head that does no
  training work, RayJobs whose entrypoints load and validate and whose clusters equal the RayCluster;
- scheduling (issue 15 item 3): node selection by labels that exist before a node boots, requests
  that fit the node shape each overlay declares in ``node-shape.yaml``, /dev/shm sized for Ray's
  object store, CPU pods that cannot claim GPUs, trials that do not hold a whole 8-GPU pod;
- RayJobs that survive the night (item 4), evidence after a failure (item 5), MLflow for a team
  (item 6), images pinned by digest (items 7, 8), and the NetworkPolicy (issue 18 item 10).

Overlays are rendered by a small JSON-6902 + images renderer below (all the overlays use), and
compared with ``kubectl kustomize`` / ``kustomize build`` where one is installed.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBE_VERSION = "1.31"  # the oldest Kubernetes the manifests are meant for
OVERLAYS = ["base", "base/jobs", "overlays/h100-x8", "overlays/h100-x8/jobs", "overlays/cpu-only",
            "overlays/cpu-only/jobs"]
# applied on their own: cluster-scoped objects (a cluster admin, once) and the Prometheus Operator's kinds
EXTRA_DIRS = [d for d in ("admin", "monitoring") if (CLUSTER / d / "kustomization.yaml").is_file()]
OVERLAYS += EXTRA_DIRS
# the overlays users apply (each declares the nodes its pods land on in node-shape.yaml)
SHAPED = ["overlays/h100-x8", "overlays/cpu-only"]
SECRET_NAME = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------------------------
# a minimal kustomize: resources, images, JSON 6902 patches (what cluster/ uses, nothing more)


def _load_docs(path: Path) -> list[dict]:
    # a JSON round trip unties YAML aliases (`*env` is one shared list once loaded; kustomize patches
    # each place on its own, so an `add .../env/-` must not reach the alias's other uses)
    return [json.loads(json.dumps(d)) for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, parts):
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        node, last = _parent(doc, _pointer(op["path"]))
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            elif kind == "test":
                assert node[index] == op["value"], f"patch test failed at {op['path']}"
            else:
                raise AssertionError(f"unsupported op {kind}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace":
                    assert last in node, f"replace of a missing path {op['path']}"
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            elif kind == "test":
                assert node.get(last) == op["value"], f"patch test failed at {op['path']}"
            else:
                raise AssertionError(f"unsupported op {kind}")
    return doc


def _matches(doc: dict, target: dict) -> bool:
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    return (target.get("kind", doc["kind"]) == doc["kind"] and target.get("group", group) == group
            and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"])


def _set_images(node, images: list[dict]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, tag = c.get("image", "").partition(":")
                    for img in images:
                        if img["name"] == name:
                            # kustomize: name:tag, or name:tag@digest, or name@digest when no tag is set
                            tag = img.get("newTag", tag or ("" if img.get("digest") else "latest"))
                            c["image"] = img.get("newName", name) + (f":{tag}" if tag else "") + (
                                f"@{img['digest']}" if img.get("digest") else "")
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "resources", "images", "patches"}, \
        f"{directory}: the test renderer knows resources, images and patches only"
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs += render(path) if path.is_dir() else _load_docs(path)
    for patch in kust.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{directory}: patches are JSON 6902 op lists"
        hits = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for i in hits:
            docs[i] = apply_json6902(docs[i], ops)
    if kust.get("images"):
        for d in docs:
            _set_images(d, kust["images"])
    return docs


RENDERED = {name: render(CLUSTER / name) for name in OVERLAYS}
ALL_DOCS = [(name, d) for name, docs in RENDERED.items() for d in docs]


def _id(item):
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def _of_kind(*kinds):
    return [pytest.param(item, id=_id(item)) for item in ALL_DOCS if item[1]["kind"] in kinds]


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_agrees_with_kustomize(name):
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed; the Python renderer alone is used")
    out = subprocess.run([*cmd, str(CLUSTER / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(_load_docs_text(out.stdout), key=key) == sorted(RENDERED[name], key=key)


def _load_docs_text(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=Loader) if d]


# ------------------------------------------------------------------------------------------------
# KubeRay CRD schemas


def _crd_dir() -> Path:
    env = os.environ.get("CLIPLAB_KUBERAY_CRDS")
    return Path(env) if env else REPO.parent / "shared" / "kuberay-crds"


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    root = _crd_dir()
    files = {"RayCluster": root / "ray.io_rayclusters.yaml", "RayJob": root / "ray.io_rayjobs.yaml"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"KubeRay CRDs not found ({', '.join(missing)}); put ray.io_rayclusters.yaml and "
                    "ray.io_rayjobs.yaml there or set CLIPLAB_KUBERAY_CRDS")
    schemas = {}
    for kind, path in files.items():
        crd = yaml.load(path.read_text(), Loader=Loader)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = version["schema"]["openAPIV3Schema"]
    return schemas


def _validator(schema):
    import jsonschema

    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict, schema: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(schema).iter_errors(doc)]


def pruned_fields(node, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would drop silently: not in the schema's properties of a structural
    object that neither preserves unknown fields nor has additionalProperties."""
    out = []
    if isinstance(node, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            for key, value in node.items():
                if key in props:
                    out += pruned_fields(value, props[key], f"{path}/{key}")
                elif not (schema.get("x-kubernetes-preserve-unknown-fields") or extra):
                    out.append(f"{path}/{key}")
        elif isinstance(extra, dict):
            for key, value in node.items():
                out += pruned_fields(value, extra, f"{path}/{key}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            out += pruned_fields(item, schema["items"], f"{path}/{i}")
    return out


@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob"))
def test_ray_resources_match_the_kuberay_crds(item, crd_schemas):
    _, doc = item
    schema = crd_schemas[doc["kind"]]
    assert schema_errors(doc, schema) == []
    assert pruned_fields(doc, schema) == []
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        as_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
                      "spec": doc["spec"]["rayClusterSpec"]}
        assert schema_errors(as_cluster, crd_schemas["RayCluster"]) == []


def _broken_cluster():
    (_, doc) = next(item for item in ALL_DOCS if item[1]["kind"] == "RayCluster")
    return copy.deepcopy(doc)


def test_the_crd_validation_catches_broken_manifests(crd_schemas):
    schema = crd_schemas["RayCluster"]
    wrong_type = _broken_cluster()
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    assert any("maxReplicas" in e for e in schema_errors(wrong_type, schema))

    no_containers = _broken_cluster()
    del no_containers["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert any("containers" in e for e in schema_errors(no_containers, schema))

    no_group_name = _broken_cluster()
    del no_group_name["spec"]["workerGroupSpecs"][1]["groupName"]
    assert any("groupName" in e for e in schema_errors(no_group_name, schema))

    bad_enum = _broken_cluster()
    bad_enum["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert schema_errors(bad_enum, schema)

    misspelled = _broken_cluster()
    misspelled["spec"]["enableInTreeAutoscalling"] = True
    misspelled["spec"]["headGroupSpec"]["rayStartParam"] = {}
    assert set(pruned_fields(misspelled, schema)) == {"/spec/enableInTreeAutoscalling", "/spec/headGroupSpec/rayStartParam"}

    job = copy.deepcopy(next(d for _, d in ALL_DOCS if d["kind"] == "RayJob"))
    job["spec"]["ttlSecondsAfterFinished"] = "1h"
    assert any("ttlSecondsAfterFinished" in e for e in schema_errors(job, crd_schemas["RayJob"]))


# ------------------------------------------------------------------------------------------------
# pod templates and built-in kinds against the Kubernetes schemas (kubernetes-validate, offline)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] not in ("RayJob", "RayCluster", "Deployment"):
        return []
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        out = [("submitterPodTemplate", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
        if "rayClusterSpec" in spec:
            out += pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
        return out
    if doc["kind"] == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"])] + [
            (f"worker:{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "Deployment":
        return [("pod", spec["template"])]
    return []


def _k8s_validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob", "Deployment"))
def test_pod_templates_are_valid_kubernetes(item):
    _, doc = item
    templates = pod_templates(doc)
    assert templates
    for _, template in templates:
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


@pytest.mark.parametrize("item", _of_kind("Deployment", "Service", "PersistentVolumeClaim", "ConfigMap",
                                          "NetworkPolicy", "PriorityClass"))
def test_builtin_kinds_are_valid_kubernetes(item):
    _k8s_validate(item[1])


def test_kubernetes_validation_catches_broken_manifests():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    deployment = copy.deepcopy(next(d for _, d in ALL_DOCS if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # misspelled
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(deployment)
    service = copy.deepcopy(next(d for _, d in ALL_DOCS if d["kind"] == "Service"))
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(service)


def test_only_known_kinds_and_no_secret_manifests():
    kinds = {d["kind"] for _, d in ALL_DOCS}
    assert kinds <= {"RayCluster", "RayJob", "Deployment", "Service", "ConfigMap", "NetworkPolicy",
                     "PriorityClass", "PodMonitor"}
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= kinds
    for path in CLUSTER.rglob("*.yaml"):
        for doc in _load_docs(path):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path}: no Secret manifests"


# ------------------------------------------------------------------------------------------------
# structure


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container of ``doc``."""
    return [(f"{where}:{c['name']}", t["spec"], c) for where, t in pod_templates(doc)
            for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]


def _walk(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


RAY_CONTAINERS = {"ray-head", "ray-worker"}  # KubeRay's Ray container is the first of each pod


@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob", "Deployment"))
def test_containers_are_unprivileged_with_resources_and_secret_refs(item):
    _, doc = item
    assert True not in list(_walk(doc, "privileged"))
    assert True not in list(_walk(doc, "allowPrivilegeEscalation"))
    found = containers(doc)
    assert found
    for where, pod, c in found:
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
        # the one capability added back: py-spy's ptrace for the dashboard's stack dumps, Ray containers only
        added = sc.get("capabilities", {}).get("add", [])
        assert added == (["SYS_PTRACE"] if c["name"] in RAY_CONTAINERS else []), f"{where}: capabilities.add {added}"
        non_root = sc.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
        user = sc.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
        assert non_root is True and user not in (None, 0), f"{where}: must run as the non-root ray user"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: {part} needs cpu and memory"
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]) or env["name"].startswith("MLFLOW_TRACKING_"):
                assert "value" not in env, f"{where}: {env['name']} must come from a Secret"
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} must use secretKeyRef"
        assert "envFrom" not in c or all("secretRef" in e or "configMapRef" in e for e in c["envFrom"])


def ray_cluster_specs(names=None) -> list[tuple[str, dict]]:
    out = []
    for name, doc in ALL_DOCS:
        if names is not None and name not in names:
            continue
        if doc["kind"] == "RayCluster":
            out.append((f"{name}:{doc['metadata']['name']}", doc["spec"]))
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            out.append((f"{name}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]))
    return out


def ray_groups(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, pod template, rayStartParams): the head as "head", then the worker groups."""
    head = spec["headGroupSpec"]
    return [("head", head["template"], head.get("rayStartParams", {}))] + [
        (g["groupName"], g["template"], g.get("rayStartParams", {})) for g in spec.get("workerGroupSpecs", [])]


def _specs_param(names=None):
    specs = ray_cluster_specs(names)
    return pytest.mark.parametrize("where,spec", specs, ids=[w for w, _ in specs])


@_specs_param()
def test_ray_cluster_layout(where, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    assert {"cpu", "memory"} <= set(spec["autoscalerOptions"]["resources"]["limits"])
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= head_ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "cpu" in groups
    assert "nvidia.com/gpu" not in str(groups["cpu"]["template"]["spec"]["containers"][0]["resources"])
    for group in groups.values():
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    if any("idleTimeoutSeconds" in g for g in groups.values()):
        # KubeRay's validation refuses a group's idleTimeoutSeconds unless autoscaler v2 is on
        assert spec["autoscalerOptions"].get("version") == "v2", "worker-group idleTimeoutSeconds needs autoscaler v2"
    if "/cpu-only" in where:
        assert "gpu" not in groups
        assert "nvidia.com/gpu" not in str([list(_walk(spec, "resources")), list(_walk(spec, "tolerations"))])
        return
    gpu = groups["gpu"]
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    # trials and small runs: one GPU per pod, so that eight of them share an 8-GPU node
    assert res["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_clusters_equal_the_raycluster():
    """Each overlay's RayJobs carry its RayCluster's spec (cluster/sync_rayjobs.py writes the base's)."""
    for overlay in ("base", "overlays/h100-x8", "overlays/cpu-only"):
        (cluster,) = [d for d in RENDERED[overlay] if d["kind"] == "RayCluster"]
        jobs = [d for d in RENDERED[f"{overlay}/jobs"] if d["kind"] == "RayJob"]
        assert len(jobs) == 2
        for job in jobs:
            assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
                f"{overlay}/jobs {job['metadata']['name']}: rayClusterSpec differs from {overlay}'s RayCluster; "
                "run `python cluster/sync_rayjobs.py` and keep the overlays' job patches in step")


@pytest.mark.parametrize("item", _of_kind("RayJob"))
def test_rayjobs_run_cliplab(item):
    _, job = item
    spec = job["spec"]
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert runtime_env["working_dir"] == "/home/ray/cliplab"  # the Dockerfile's WORKDIR
    assert not [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["python", RESUME_GUARD], "the entrypoint runs cliplab through the resume guard"
    assert (REPO / args[1]).is_file()
    assert args[2] in ("train", "sweep")
    assert (REPO / args[3]).is_file(), f"{args[3]} is not in the repo (the image copies it)"
    assert not {"--resume", "--name"} & set(args), "the guard adds --resume / --name itself"


RESUME_GUARD = "cluster/resume_or_start.py"


def _entrypoints():
    seen = {}
    for _, doc in ALL_DOCS:
        if doc["kind"] == "RayJob":
            seen[doc["spec"]["entrypoint"]] = doc["metadata"]["name"]
    return [pytest.param(e, id=n + ("-cpu" if "use_gpu=false" in e else "")) for e, n in seen.items()]


def _cliplab_args(entrypoint: str) -> list[str]:
    args = shlex.split(entrypoint)
    return args[2:] if args[:2] == ["python", RESUME_GUARD] else args[1:]


@pytest.mark.parametrize("entrypoint", _entrypoints())
def test_rayjob_entrypoints_load_and_validate(entrypoint, monkeypatch):
    """What the job would run, parsed by the same argparse and loaded (no data or Ray touched)."""
    from cliplab.cli.main import build_parser
    from cliplab.config import load_experiment

    monkeypatch.chdir(REPO)
    args = build_parser().parse_args(_cliplab_args(entrypoint))
    if args.command == "sweep":
        from cliplab.tune import load_sweep

        sweep = load_sweep(args.file, args.overrides)
        base = sweep.base
    else:
        base = load_experiment(args.config, args.overrides)
    assert base.storage_path.startswith("s3://")
    assert base.data.train.startswith("s3://")
    assert base.train.use_gpu is ("use_gpu=false" not in entrypoint)
    # trials do not hold a whole GPU node: at most one GPU per worker (fractions share one)
    assert base.train.gpus_per_worker <= 1


def test_secrets_referenced_are_documented():
    """Every (Secret, key) a manifest reads is created by a command in cluster/README.md."""
    readme = (CLUSTER / "README.md").read_text()
    refs = {(ref["name"], ref["key"]) for _, d in ALL_DOCS for ref in _walk(d, "secretKeyRef")}
    refs |= {(name, "auth_token") for _, d in ALL_DOCS for name in
             [o.get("secretName") for o in _walk(d, "authOptions")] if name}
    assert {name for name, _ in refs} == {"cliplab-s3", "cliplab-mlflow", "cliplab-ray-auth", "cliplab-mlflow-server"}
    for name, key in sorted(refs):
        assert f"kubectl create secret generic {name}" in readme, name
        assert f"--from-literal={key}=" in readme, f"{name}/{key}"


def _mlflow():
    (deploy,) = [d for d in RENDERED["base"] if d["kind"] == "Deployment"]
    (service,) = [d for d in RENDERED["base"] if d["kind"] == "Service"]
    return deploy, service, deploy["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_mlflow_server_allows_its_service_host():
    deploy, service, c = _mlflow()
    args = c["args"]
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert service["metadata"]["name"] in hosts
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_is_ready_for_a_team():
    """Issue 15 item 6, issue 18 item 10: Postgres (an external URI from a Secret), artifacts on S3
    through the server, mlflow's basic-auth app with the admin from a Secret, its own small image."""
    deploy, _, c = _mlflow()
    args, env = c["args"], _env(c)
    text = yaml.safe_dump(deploy)
    assert "sqlite" not in text, "no sqlite: two workers on one file give 'database is locked'"
    assert not [d for _, d in ALL_DOCS if d["kind"] == "PersistentVolumeClaim"]
    store = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert store["name"] == "cliplab-mlflow-server" and not store.get("optional")
    assert "--serve-artifacts" in args and any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert "--app-name=basic-auth" in args
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "cliplab-mlflow-server", name
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/tmp/")  # written at start (read-only root)
    image = c["image"].split("@")[0].split(":")[0]
    assert image.endswith("cliplab-mlflow"), f"MLflow runs its own small image, not {image}"
    assert deploy["spec"].get("strategy", {}).get("type") != "Recreate"
    assert deploy["spec"]["replicas"] >= 1  # stateless against Postgres: scale it freely


def test_mlflow_image_is_small_and_pinned():
    text = (CLUSTER / "mlflow.Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    base = next(ln for ln in lines if ln.startswith("ARG PYTHON_IMAGE="))
    assert re.match(r"ARG PYTHON_IMAGE=python:3\.\d+-slim", base), base
    assert not re.search(r"cuda|nvidia|rayproject|torch", "\n".join(lines), re.I)
    assert any(re.match(r"USER \d+", ln) and not ln.startswith("USER 0") for ln in lines)
    lock = (CLUSTER / "mlflow-requirements.lock").read_text()
    pins = dict(ln.split("==", 1) for ln in lock.splitlines() if "==" in ln and not ln.startswith("#"))
    pins = {k.lower(): v for k, v in pins.items()}
    assert pins["mlflow"] == "3.17.2"
    assert {"psycopg2-binary", "boto3", "flask-wtf"} <= set(pins)
    assert not [k for k in pins if k.startswith(("torch", "nvidia-", "ray"))]
    assert "mlflow-requirements.lock" in text and "--no-deps" in text


# ------------------------------------------------------------------------------------------------
# issue 15 item 3 / 7: scheduling from zero


def _qty(value) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    s = str(value)
    if s.endswith("m"):
        return int(s[:-1]) / 1000
    for unit, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40),
                         ("k", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12)):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * factor
    return float(s)


def _pod_requests(spec: dict, group: str, template: dict) -> dict[str, float]:
    """What one pod of ``group`` asks the scheduler for: its containers, plus the autoscaler sidecar
    KubeRay adds to the head."""
    out: dict[str, float] = {}
    reqs = [c.get("resources", {}).get("requests", {}) for c in template["spec"]["containers"]]
    if group == "head":
        reqs.append(spec["autoscalerOptions"]["resources"]["requests"])
    for req in reqs:
        for key, value in req.items():
            out[key] = out.get(key, 0) + _qty(value)
    return out


PRE_BOOT_LABELS = {  # known to an autoscaler (Karpenter, cluster-autoscaler, GKE) before the node exists
    "node.kubernetes.io/instance-type", "cloud.google.com/gke-nodepool", "cloud.google.com/gke-accelerator",
    "karpenter.sh/nodepool", "eks.amazonaws.com/nodegroup", "karpenter.k8s.aws/instance-family",
    "karpenter.k8s.aws/instance-gpu-name", "topology.kubernetes.io/zone", "kubernetes.io/arch"}


def _required_terms(pod: dict) -> list[list[dict]]:
    aff = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    return [t.get("matchExpressions", []) for t in aff.get("nodeSelectorTerms", [])]


def _selection_keys(pod: dict) -> set[str]:
    return set(pod.get("nodeSelector", {})) | {e["key"] for t in _required_terms(pod) for e in t
                                                if e["operator"] in ("In", "Exists")}


@_specs_param([o for o in OVERLAYS if o.startswith("overlays/h100")])
def test_gpu_pods_select_nodes_by_labels_known_before_boot(where, spec):
    """nvidia.com/gpu.product is set by GPU feature discovery after a node boots: an autoscaler that
    scales an empty pool up never sees it. Instance type and node-pool labels it does see."""
    gpu_groups = [(g, t) for g, t, _ in ray_groups(spec)
                  if _qty(t["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))]
    assert gpu_groups
    for group, template in gpu_groups:
        keys = _selection_keys(template["spec"])
        assert keys, f"{where} {group}: GPU pods must select their node type"
        assert keys <= PRE_BOOT_LABELS, f"{where} {group}: {sorted(keys - PRE_BOOT_LABELS)} only exist after boot"


def _shape(overlay: str) -> dict:
    path = CLUSTER / overlay / "node-shape.yaml"
    assert path.is_file(), f"{overlay} declares no node shape ({path.name})"
    return yaml.safe_load(path.read_text())


def _tolerates(pod: dict, key: str) -> bool:
    return any(t.get("key") == key and t.get("operator") == "Exists" and t.get("effect", "NoSchedule") == "NoSchedule"
               for t in pod.get("tolerations", []))


def _kept_off(pod: dict, selector: dict) -> bool:
    """A required node affinity whose every term excludes the node ``selector`` describes."""
    terms = _required_terms(pod)
    return bool(terms) and all(any(e["operator"] == "NotIn" and e["key"] == k and v in e["values"]
                                   for e in t for k, v in selector.items()) for t in terms)


@pytest.mark.parametrize("overlay", SHAPED)
def test_requests_fit_the_declared_node_shape(overlay):
    """Every Ray group's pods fit the node the overlay names, as many per node as node-shape.yaml says:
    CPU, memory and GPUs of perNode pods plus the node's own daemons within its allocatable."""
    shape = _shape(overlay)
    nodes, pods = shape["nodes"], shape["pods"]
    gpu_nodes = {n: v for n, v in nodes.items() if _qty(v["allocatable"].get("nvidia.com/gpu", 0))}
    specs = ray_cluster_specs([overlay, f"{overlay}/jobs"])
    assert specs
    for where, spec in specs:
        seen = set()
        for group, template, _ in ray_groups(spec):
            assert group in pods, f"{where}: node-shape.yaml places no {group} pods"
            seen.add(group)
            entry, pod = pods[group], template["spec"]
            node, per_node = nodes[entry["node"]], entry["perNode"]
            need = _pod_requests(spec, group, template)
            for res in ("cpu", "memory", "nvidia.com/gpu"):
                total = per_node * need.get(res, 0) + _qty(node.get("reserved", {}).get(res, 0))
                alloc = _qty(node["allocatable"].get(res, 0))
                assert total <= alloc, (f"{where} {group}: {per_node} pods need {total:g} {res} with the node's "
                                        f"daemons, {entry['node']} has {alloc:g} allocatable")
            limits = template["spec"]["containers"][0]["resources"]["limits"]
            assert _qty(limits["memory"]) <= _qty(node["allocatable"]["memory"]) / per_node
            selector = node.get("selector", {})
            assert selector.items() <= pod.get("nodeSelector", {}).items(), f"{where} {group}: not on {entry['node']}"
            if need.get("nvidia.com/gpu"):
                # the shape fills the node's GPUs exactly: none is left idle by it
                assert per_node * need["nvidia.com/gpu"] == _qty(node["allocatable"]["nvidia.com/gpu"]), group
                for taint in node.get("taints", []):
                    assert _tolerates(pod, taint), f"{where} {group}: does not tolerate {taint}"
            else:
                for name, gpu_node in gpu_nodes.items():
                    assert _kept_off(pod, gpu_node["selector"]), f"{where} {group}: may land on {name} nodes"
        assert seen == set(pods), f"{where}: node-shape.yaml places groups the cluster lacks"


@_specs_param()
def test_shm_holds_the_object_store(where, spec):
    """Ray puts its object store (30% of the container's memory, at most 200 GB) in /dev/shm when it
    fits, else in /tmp on disk. A memory-backed emptyDir counts against the pod's memory, so it stays
    under half of it."""
    for group, template, _ in ray_groups(spec):
        pod = template["spec"]
        ray = pod["containers"][0]
        limit = _qty(ray["resources"]["limits"]["memory"])
        mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
        (vol,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert vol["emptyDir"].get("medium") == "Memory", f"{where} {group}"
        size = _qty(vol["emptyDir"]["sizeLimit"])
        assert size >= min(0.3 * limit, 200 * 10**9), f"{where} {group}: /dev/shm {size / 2**30:g}Gi is below " \
                                                        f"Ray's object store default ({0.3 * limit / 2**30:g}Gi)"
        assert size <= 0.5 * limit, f"{where} {group}: /dev/shm leaves too little of the pod's memory"


@_specs_param()
def test_cpu_pods_cannot_claim_gpus(where, spec):
    """A pod without a GPU request on a GPU node sees every GPU when the runtime honours the CUDA
    image's NVIDIA_VISIBLE_DEVICES=all; Ray would then advertise them. num-gpus 0 and 'void' stop both."""
    for group, template, params in ray_groups(spec):
        pod = template["spec"]
        ray = pod["containers"][0]
        if _qty(ray["resources"]["limits"].get("nvidia.com/gpu", 0)):
            continue
        assert params.get("num-gpus") == "0", f"{where} {group}: rayStartParams num-gpus must be '0'"
        assert _env(ray).get("NVIDIA_VISIBLE_DEVICES", {}).get("value") == "void", f"{where} {group}"
        assert not _tolerates(pod, "nvidia.com/gpu"), f"{where} {group}: CPU pods must not tolerate GPU taints"


# ------------------------------------------------------------------------------------------------
# issue 15 item 4: RayJobs that survive the night


@pytest.mark.parametrize("item", _of_kind("RayJob"))
def test_rayjobs_survive_the_night(item):
    _, job = item
    spec = job["spec"]
    # no submitter whose dropped `ray job logs --follow` fails a running job 30 s later (kuberay#4921)
    assert spec.get("submissionMode") == "HTTPMode"
    assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec
    assert spec["activeDeadlineSeconds"] > 0
    # a bad image or a missing Secret fails within this, instead of "Initializing" for hours
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["backoffLimit"] >= 1  # each retry is a new cluster; the entrypoint resumes
    # deletionRules exclude shutdownAfterJobFinishes and the global TTL (KubeRay's validation)
    assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished")
    rules = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        cond = rule["condition"]
        rules[(cond.get("jobStatus") or cond["jobDeploymentStatus"], rule["policy"])] = cond.get("ttlSeconds", 0)
    assert "DeleteWorkers" not in {p for _, p in rules}  # KubeRay refuses it with autoscaling
    # a deadline (or a failure after the retries) deletes the cluster, which ends the Ray job and frees
    # its GPUs, within minutes rather than after an hour's TTL
    assert rules[("Failed", "DeleteCluster")] <= 600
    assert ("SUCCEEDED", "DeleteCluster") in rules
    for (status, policy), ttl in rules.items():
        if policy == "DeleteSelf" and (status, "DeleteCluster") in rules:
            assert ttl >= rules[(status, "DeleteCluster")]


@_specs_param()
def test_the_head_is_not_evicted(where, spec):
    """Karpenter's consolidation and the cluster autoscaler's scale-down evict pods; a lost head is a
    lost job. GPU workers hold a trial's state between checkpoints, so they are spared too."""
    priority_classes = {d["metadata"]["name"] for _, d in ALL_DOCS if d["kind"] == "PriorityClass"}
    for group, template, _ in ray_groups(spec):
        annotations = template.get("metadata", {}).get("annotations", {})
        gpu = _qty(template["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        if group == "head" or gpu:
            assert annotations.get("karpenter.sh/do-not-disrupt") == "true", f"{where} {group}"
            assert annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") == "false", f"{where} {group}"
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head.get("priorityClassName") in priority_classes, f"{where}: the head needs a PriorityClass from cluster/admin"


def test_priority_class():
    (pc,) = [d for _, d in ALL_DOCS if d["kind"] == "PriorityClass"]
    assert pc["value"] > 0 and pc.get("globalDefault") is not True
    assert pc.get("preemptionPolicy", "PreemptLowerPriority") == "PreemptLowerPriority"


@_specs_param()
def test_worker_group_start_timeout_is_raised_for_scale_up(where, spec):
    """Ray Train gives up on a worker group that does not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (60 s in Ray 2.60), less than a GPU node takes to boot and pull the image."""
    for group, template, _ in ray_groups(spec):
        env = _env(template["spec"]["containers"][0])
        assert float(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]["value"]) >= 900, f"{where} {group}"
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert float(runtime_env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 900


def test_ray_train_reads_the_start_timeout_variable():
    from ray.train.v2._internal import constants

    assert constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _fake_kubectl(tmp_path: Path, rendered: str) -> Path:
    (tmp_path / "rendered.yaml").write_text(rendered)
    fake = tmp_path / "kubectl"
    fake.write_text(f"""#!/bin/sh
case "$1" in
  kustomize) cat {tmp_path}/rendered.yaml ;;
  create) echo "$@" > {tmp_path}/args; cat > {tmp_path}/created.yaml; echo "rayjob.ray.io/x created" ;;
  *) exit 3 ;;
esac
""")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("overlay", ["overlays/h100-x8/jobs", "overlays/cpu-only/jobs"])
def test_rayjobs_are_created_with_generated_names(overlay, tmp_path):
    """kustomize needs metadata.name; cluster/create-rayjob.sh turns it into generateName so that a
    second submission of the same job creates a second RayJob instead of failing."""
    script = CLUSTER / "create-rayjob.sh"
    assert script.is_file()
    rendered = yaml.safe_dump_all(RENDERED[overlay], sort_keys=True)
    fake = _fake_kubectl(tmp_path, rendered)
    out = subprocess.run(["bash", str(script), str(CLUSTER / overlay), "sweep"], capture_output=True, text=True,
                         env={**os.environ, "KUBECTL": str(fake)}, timeout=60)
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["create", "-f", "-"] and "app.kubernetes.io/component=sweep" in args
    created = [d for d in yaml.safe_load_all((tmp_path / "created.yaml").read_text()) if d]
    assert len(created) == len(RENDERED[overlay])
    for doc in created:
        meta = doc["metadata"]
        assert "name" not in meta and meta["generateName"].endswith("-")
        name = meta["generateName"] + "x" * 5  # the API server appends 5 characters
        assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)  # KubeRay's RayJob name rule
        before = next(d for d in RENDERED[overlay] if d["metadata"]["name"] == meta["generateName"][:-1])
        assert {**doc, "metadata": {}} == {**before, "metadata": {}}


# ------------------------------------------------------------------------------------------------
# issue 15 item 5: evidence after a failure


def _fluentbit_sections(text: str) -> list[tuple[str, dict]]:
    sections, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = (line[1:-1].upper(), {})
            sections.append(current)
        elif current is not None:
            key, _, value = line.partition(" ")
            current[1][key.lower()] = value.strip()
    return sections


@_specs_param()
def test_ray_logs_are_shipped(where, spec):
    """A fluent-bit sidecar in every Ray pod tails /tmp/ray/session_latest/logs (KubeRay's sample) and
    ships it to S3 and to its stdout, so the logs outlive the pod's emptyDir."""
    (config,) = [d for d in RENDERED["base"] if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cliplab-fluentbit"]
    sections = _fluentbit_sections(config["data"]["fluent-bit.conf"])
    inputs = [s for k, s in sections if k == "INPUT"]
    outputs = {s["name"]: s for k, s in sections if k == "OUTPUT"}
    assert any(s["name"] == "tail" and s["path"].startswith("/tmp/ray/session_latest/logs/") for s in inputs)
    assert {"s3", "stdout"} <= set(outputs)
    assert outputs["s3"]["s3_key_format"].startswith("/ray-logs/")
    for group, template, _ in ray_groups(spec):
        pod = template["spec"]
        ray = pod["containers"][0]
        logs = next(m["name"] for m in ray["volumeMounts"] if m["mountPath"] == "/tmp/ray")
        (fb,) = [c for c in pod["containers"] if c["name"] == "fluentbit"]
        assert any(m["name"] == logs and m["mountPath"] == "/tmp/ray" for m in fb["volumeMounts"]), f"{where} {group}"
        config_vol = next(m["name"] for m in fb["volumeMounts"] if m["mountPath"].startswith("/fluent-bit/etc"))
        (vol,) = [v for v in pod["volumes"] if v["name"] == config_vol]
        assert vol["configMap"]["name"] == "cliplab-fluentbit"


@_specs_param()
def test_metrics_ports_are_declared(where, spec):
    for group, template, params in ray_groups(spec):
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0].get("ports", [])}
        assert ports.get("metrics") == 8080 and params.get("metrics-export-port") == "8080", f"{where} {group}"
    head_ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports.get("as-metrics") == 44217 and head_ports.get("dash-metrics") == 44227


def test_pod_monitor_scrapes_every_ray_pod():
    assert "monitoring" in RENDERED, "cluster/monitoring: a PodMonitor for Prometheus Operator"
    monitors = [d for d in RENDERED["monitoring"] if d["kind"] == "PodMonitor"]
    assert monitors
    for where, spec in ray_cluster_specs(["base"]):
        for group, template, _ in ray_groups(spec):
            # the labels KubeRay adds to every Ray pod, besides the template's
            labels = {**template["metadata"]["labels"], "ray.io/node-type": "head" if group == "head" else "worker",
                      "ray.io/group": "headgroup" if group == "head" else group, "ray.io/is-ray-node": "yes"}
            ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
            hits = [m for m in monitors if m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert hits, f"{where} {group}: no PodMonitor selects it"
            for m in hits:
                assert m["apiVersion"] == "monitoring.coreos.com/v1"
                assert {e["port"] for e in m["spec"]["podMetricsEndpoints"]} <= ports | {"as-metrics", "dash-metrics"}
                assert "metrics" in {e["port"] for e in m["spec"]["podMetricsEndpoints"]}


def test_readme_says_where_the_evidence_is():
    readme = (CLUSTER / "README.md").read_text()
    assert "## After a failure: where the logs, metrics and dashboards are" in readme
    section = readme.split("## After a failure", 1)[1].split("\n## ", 1)[0]
    for needed in ("s3://cliplab/ray-logs/", "kubectl logs", "-c fluentbit", "PodMonitor", "Grafana",
                   "RAY_GRAFANA_HOST", "py-spy", "SYS_PTRACE", "ray job logs", "kubectl get rayjob"):
        assert needed in section, needed


# ------------------------------------------------------------------------------------------------
# issue 18 item 10: read-only root filesystems and a NetworkPolicy


def _all_containers():
    out = []
    for name, doc in ALL_DOCS:
        for where, pod, c in containers(doc):
            out.append(pytest.param(pod, c, id=f"{name}:{doc['metadata']['name']}:{where}"))
    return out


@pytest.mark.parametrize("pod,container", _all_containers())
def test_root_filesystems_are_read_only(pod, container):
    assert container.get("securityContext", {}).get("readOnlyRootFilesystem") is True
    writable = {m["mountPath"] for m in container.get("volumeMounts", [])
                for v in pod.get("volumes", []) if v["name"] == m["name"] and "emptyDir" in v and not m.get("readOnly")}
    assert "/tmp" in writable or container["name"] == "fluentbit"
    if container["name"] in RAY_CONTAINERS:
        assert {"/tmp", "/tmp/ray", "/dev/shm", "/home/ray/.cache"} <= writable
        env = _env(container)
        for var in ("MPLCONFIGDIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
            assert any(env[var]["value"].startswith(w + "/") for w in writable), var


@_specs_param()
def test_the_autoscaler_sidecar_is_read_only_too(where, spec):
    sc = spec["autoscalerOptions"]["securityContext"]
    assert sc.get("readOnlyRootFilesystem") is True and "ALL" in sc["capabilities"]["drop"]
    mounts = {m["mountPath"] for m in spec["autoscalerOptions"].get("volumeMounts", [])}
    assert "/tmp" in mounts


def _selects(selector: dict, labels: dict) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        if e["operator"] == "In" and value not in e["values"]:
            return False
        if e["operator"] == "NotIn" and value in e["values"]:
            return False
        if e["operator"] == "Exists" and e["key"] not in labels:
            return False
    return True


def _pod_labels(names) -> dict[str, dict]:
    out = {}
    for name, doc in ALL_DOCS:
        if name in names:
            for where, template in pod_templates(doc):
                out[f"{doc['kind']}/{doc['metadata']['name']}:{where}"] = template["metadata"]["labels"]
    return out


def test_network_policy_admits_only_the_head_workers_and_mlflow():
    policies = [d for d in RENDERED["base"] if d["kind"] == "NetworkPolicy"]
    assert policies, "base has no NetworkPolicy"
    pods = _pod_labels(["base"])
    ray = {k: v for k, v in pods.items() if v["app.kubernetes.io/component"].startswith("ray-")}
    mlflow = {k: v for k, v in pods.items() if v["app.kubernetes.io/component"] == "mlflow"}
    assert ray and mlflow

    def admitted(src: dict, dst: dict, *, all_ports: bool) -> bool:
        for p in policies:
            if not _selects(p["spec"]["podSelector"], dst):
                continue
            for rule in p["spec"].get("ingress", []):
                if all_ports and rule.get("ports"):
                    continue
                if any(set(peer) == {"podSelector"} and _selects(peer["podSelector"], src) for peer in rule.get("from", [])):
                    return True
        return False

    for where, labels in pods.items():
        covering = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert any("Ingress" in p["spec"]["policyTypes"] for p in covering), f"{where}: no ingress policy selects it"
    for a in ray.values():
        for b in ray.values():
            assert admitted(a, b, all_ports=True), f"{a} cannot reach {b} (Ray uses many ports)"
        for b in mlflow.values():
            assert admitted(a, b, all_ports=False), f"{a} cannot reach MLflow"
    for p in policies:
        assert p["spec"]["podSelector"], "a policy selects cliplab pods, not the whole namespace"
        for rule in p["spec"].get("ingress", []):
            assert rule.get("from"), f"{p['metadata']['name']}: a rule without 'from' admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:  # the KubeRay operator, Prometheus: named ports only
                    assert peer["namespaceSelector"] and peer.get("podSelector") and rule.get("ports"), peer
                else:
                    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "cliplab", peer
    # the operator reaches the head's dashboard port (HTTPMode submits and polls the job through it)
    head = next(v for v in ray.values() if v["app.kubernetes.io/component"] == "ray-head")
    assert any(_selects(p["spec"]["podSelector"], head) and any(
        "namespaceSelector" in peer and {"port": 8265, "protocol": "TCP"} in rule.get("ports", [])
        for rule in p["spec"].get("ingress", []) for peer in rule["from"]) for p in policies)


# ------------------------------------------------------------------------------------------------
# issue 15 items 7, 8: images pinned by digest; the README


DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9./_-]*(:[A-Za-z0-9_.-]+)?@sha256:[0-9a-f]{64}$")


@pytest.mark.parametrize("name", [o for o in OVERLAYS if o.startswith("overlays/")])
def test_overlays_pin_images_by_digest(name):
    images = {c["image"] for _, d in ((n, d) for n, d in ALL_DOCS if n == name)
              for _, _, c in containers(d)}
    assert images
    for image in images:
        assert DIGEST_REF.match(image), f"{name}: {image} is not pinned by digest (name[:tag]@sha256:<64 hex>)"


def test_pin_script_and_placeholder_are_documented():
    readme = (CLUSTER / "README.md").read_text()
    assert (CLUSTER / "pin-digests.sh").is_file()
    assert "cluster/pin-digests.sh" in readme and "sha256:" + "0" * 64 in readme


def test_readme_kuberay_version():
    readme = (CLUSTER / "README.md").read_text()
    versions = re.findall(r"kuberay-operator --version (\d+)\.(\d+)\.(\d+)", readme)
    assert versions and all(tuple(map(int, v)) >= (1, 6, 0) for v in versions)
    assert "1.5.1" not in readme  # authOptions.secretName, preRunningDeadlineSeconds: 1.6.0


README_KNOBS = [
    "node.kubernetes.io/instance-type", "node-shape.yaml", "nvidia.com/gpu", "NVIDIA_VISIBLE_DEVICES", "num-gpus",
    "gpus_per_worker", "/dev/shm", "submissionMode", "HTTPMode", "activeDeadlineSeconds", "preRunningDeadlineSeconds",
    "backoffLimit", "deletionRules", "cluster/resume_or_start.py", "--resume", "karpenter.sh/do-not-disrupt",
    "cluster-autoscaler.kubernetes.io/safe-to-evict", "PriorityClass", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
    "generateName", "cluster/create-rayjob.sh", "fluent-bit", "PodMonitor", "SYS_PTRACE", "readOnlyRootFilesystem",
    "NetworkPolicy", "basic-auth", "cliplab-mlflow-server", "Postgres", "mlflow.Dockerfile", "requirements.lock",
    "make image-check", "sha256", "cluster/sync_rayjobs.py"]


def test_readme_names_every_knob():
    readme = (CLUSTER / "README.md").read_text()
    missing = [k for k in README_KNOBS if k not in readme]
    assert not missing, f"cluster/README.md does not name {missing}"
    # a walk from an empty GPU pool to a registered model
    assert "## From an empty GPU pool to a registered sweep" in readme


# ------------------------------------------------------------------------------------------------
# image and runtime env


def test_dockerfile():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    tag = next(line for line in lines if line.startswith("ARG RAY_TAG="))
    assert tag.split("=", 1)[1].startswith("2.60.0-py3")
    assert any(line.startswith("FROM ${RAY_IMAGE}:${RAY_TAG}") for line in lines)
    assert "ARG RAY_IMAGE=rayproject/ray" in lines
    users = [line for line in lines if line.startswith("USER ")]
    assert users[-1] == "USER ray"
    assert "WORKDIR /home/ray/cliplab" in lines
    # the exact versions of the lock file first, then the package itself without resolving anything
    assert re.search(r"pip install [^\n]*--no-deps [^\n]*-r [^\n]*\$\{LOCK\}", text)
    assert re.search(r"pip install --no-deps \.( |$)", text, re.M)
    assert not re.search(r"\b(curl|wget)\b|ADD https?://", text), "no downloads outside package registries"
    ignore = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for needed in ("!pyproject.toml", "!platform/", "!sweeps/", "!cluster/experiments/", "!cluster/requirements.lock",
                   "!cluster/resume_or_start.py"):
        assert needed in ignore, needed
    assert ignore[0] == "*"  # everything else (.venv, .git, .cliplab, data) stays out of the context
    assert "COPY --chown=ray:users cluster/resume_or_start.py" in text


def test_secret_name_pattern():
    assert SECRET_NAME.search("AWS_ACCESS_KEY_ID") and SECRET_NAME.search("MLFLOW_TRACKING_PASSWORD")
    assert SECRET_NAME.search("RAY_AUTH_TOKEN") and SECRET_NAME.search("AWS_SECRET_ACCESS_KEY")
    assert not SECRET_NAME.search("TOKENIZERS_PARALLELISM") and not SECRET_NAME.search("MONKEY_MODE")


def test_runtime_env_file():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= {"env_vars", "excludes"}  # working_dir comes from the submit command
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert not [k for k in env["env_vars"] if SECRET_NAME.search(k)]
    assert {".venv", ".git", ".cliplab", "mlruns", "runs", "*.tar"} <= set(env["excludes"])


def test_submit_builds_the_job_from_the_runtime_env(monkeypatch):
    from cliplab.jobspec import build_job

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "forwarded-secret")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = build_job("sweeps/cloob_beta_tau.py", overrides=["train.epochs=1"])
    if "forward_secrets" in inspect.signature(build_job).parameters:  # issue 18: secrets stay on the cluster
        assert "AWS_SECRET_ACCESS_KEY" not in job.runtime_env["env_vars"]
        job = build_job("sweeps/cloob_beta_tau.py", overrides=["train.epochs=1"], forward_secrets=True)
    assert job.entrypoint == "cliplab sweep sweeps/cloob_beta_tau.py --set train.epochs=1"
    assert job.runtime_env["working_dir"] == str(REPO)
    assert job.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert job.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "forwarded-secret"
    assert "AWS_SECRET_ACCESS_KEY" in job.forwarded
    assert {".venv", ".git", ".cliplab"} <= set(job.runtime_env["excludes"])
    job = build_job("cluster/experiments/emoji_clip.yaml", forward_env=False)
    assert job.entrypoint == "cliplab train cluster/experiments/emoji_clip.yaml"
    assert "AWS_SECRET_ACCESS_KEY" not in job.runtime_env["env_vars"]


def test_job_runtime_envs_leave_the_drivers_variables_alone(monkeypatch):
    """cliplab's driver passes its own runtime env to ray.init; Ray fails a job whose runtime env sets
    one of the same variables, so neither runtime_env.yaml nor a RayJob may set them."""
    import ray

    from cliplab.jobspec import DRIVER_ENV_VARS
    from cliplab.ray_connect import init_ray

    seen = {}
    monkeypatch.setattr(os, "environ", os.environ.copy())  # init_ray sets defaults in os.environ
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    init_ray("127.0.0.1:1")
    driver_keys = set((seen.get("runtime_env") or {}).get("env_vars", {}))
    assert driver_keys <= set(DRIVER_ENV_VARS)
    job_envs = [yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())]
    job_envs += [yaml.safe_load(d["spec"]["runtimeEnvYAML"]) for _, d in ALL_DOCS if d["kind"] == "RayJob"]
    for env in job_envs:
        assert not driver_keys & set(env.get("env_vars", {}))


@_specs_param([o for o in OVERLAYS if o.startswith("overlays/h100")])
def test_the_sweep_driver_knows_the_largest_node_the_autoscaler_can_add(where, spec):
    """``cliplab sweep`` runs on the head and cannot read the sidecar autoscaler's node types: the
    head's CLIPLAB_MAX_NODE_RESOURCES must be the Ray shape of one gpu-group pod (its rayStartParams,
    else the container's CPU limit and GPU count), or a GPU sweep either waits for a node that can
    never hold it or is refused one that could."""
    from cliplab.tune.capacity import parse_resources

    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    declared = {e["name"]: e.get("value") for e in head.get("env", [])}.get("CLIPLAB_MAX_NODE_RESOURCES")
    assert declared, f"{where}: the head has no CLIPLAB_MAX_NODE_RESOURCES"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = gpu.get("rayStartParams", {})
    ray_shape = {"CPU": float(params.get("num-cpus", _qty(limits["cpu"]))),
                 "GPU": float(params.get("num-gpus", _qty(limits["nvidia.com/gpu"])))}
    assert parse_resources(declared) == ray_shape, f"{where}: {declared} but a gpu pod is {ray_shape}"
