"""The Kubernetes manifests in cluster/, checked offline.

- RayCluster / RayJob documents (the base and every overlay, rendered) against the KubeRay CRDs'
  OpenAPI v3 schemas in ``../shared/kuberay-crds`` (or ``$CLIPLAB_KUBERAY_CRDS``), plus a check for
  fields the API server would silently prune, plus every embedded pod template against the
  Kubernetes PodTemplate schema in strict mode (unknown fields fail);
- Deployment / Service / PVC against the Kubernetes schemas bundled in ``kubernetes-validate``;
- structure: non-root, no privilege escalation, secrets only through ``secretKeyRef``, resources on
  every container, a GPU group that asks for GPUs, a head that does no training work, RayJobs whose
  entrypoints load and validate and whose clusters equal the RayCluster.

Overlays are rendered by a small JSON-6902 + images renderer below (all the overlays use), and
compared with ``kubectl kustomize`` / ``kustomize build`` where one is installed.
"""

from __future__ import annotations

import copy
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
SECRET_NAME = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------------------------
# a minimal kustomize: resources, images, JSON 6902 patches (what cluster/ uses, nothing more)


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


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
                            c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag or 'latest')}"
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


@pytest.mark.parametrize("item", _of_kind("Deployment", "Service", "PersistentVolumeClaim"))
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
    assert kinds == {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"}
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


def ray_cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for name, doc in ALL_DOCS:
        if doc["kind"] == "RayCluster":
            out.append((f"{name}:{doc['metadata']['name']}", doc["spec"]))
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            out.append((f"{name}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]))
    return out


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
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
        pod = group["template"]["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert shm and mounts[shm[0]["name"]] == "/dev/shm"
    if "/cpu-only" in where:
        assert "gpu" not in groups and "nvidia.com/gpu" not in str(spec)
        return
    gpu = groups["gpu"]
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    if "h100-x8" in where:
        assert res["limits"]["nvidia.com/gpu"] == "8"
        assert gpu["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H100")


def test_rayjob_clusters_equal_the_raycluster():
    (cluster,) = [d for d in RENDERED["base"] if d["kind"] == "RayCluster"]
    jobs = [d for d in RENDERED["base/jobs"] if d["kind"] == "RayJob"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
            f"{job['metadata']['name']}: rayClusterSpec differs from base/raycluster.yaml's spec")


@pytest.mark.parametrize("item", _of_kind("RayJob"))
def test_rayjobs_run_cliplab_and_clean_up(item):
    name, job = item
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert runtime_env["working_dir"] == "/home/ray/cliplab"  # the Dockerfile's WORKDIR
    assert not [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)]
    args = shlex.split(spec["entrypoint"])
    assert args[0] == "cliplab" and args[1] in ("train", "sweep")
    assert (REPO / args[2]).is_file(), f"{args[2]} is not in the repo (the image copies it)"


def _entrypoints():
    seen = {}
    for _, doc in ALL_DOCS:
        if doc["kind"] == "RayJob":
            seen[doc["spec"]["entrypoint"]] = doc["metadata"]["name"]
    return [pytest.param(e, id=n + ("-cpu" if "use_gpu=false" in e else "")) for e, n in seen.items()]


@pytest.mark.parametrize("entrypoint", _entrypoints())
def test_rayjob_entrypoints_load_and_validate(entrypoint, monkeypatch):
    """What the job would run, parsed by the same argparse and loaded (no data or Ray touched)."""
    from cliplab.cli.main import build_parser
    from cliplab.config import load_experiment

    monkeypatch.chdir(REPO)
    args = build_parser().parse_args(shlex.split(entrypoint)[1:])
    if args.command == "sweep":
        from cliplab.tune import load_sweep

        sweep = load_sweep(args.file, args.overrides)
        base = sweep.base
    else:
        base = load_experiment(args.config, args.overrides)
    assert base.storage_path.startswith("s3://")
    assert base.data.train.startswith("s3://")
    assert base.train.use_gpu is ("use_gpu=false" not in entrypoint)


def test_secrets_referenced_are_documented():
    """Every (Secret, key) a manifest reads is created by a command in cluster/README.md."""
    readme = (CLUSTER / "README.md").read_text()
    refs = {(ref["name"], ref["key"]) for _, d in ALL_DOCS for ref in _walk(d, "secretKeyRef")}
    refs |= {(name, "auth_token") for _, d in ALL_DOCS for name in
             [o.get("secretName") for o in _walk(d, "authOptions")] if name}
    assert {name for name, _ in refs} == {"cliplab-s3", "cliplab-mlflow", "cliplab-ray-auth"}
    for name, key in sorted(refs):
        assert f"kubectl create secret generic {name}" in readme, name
        assert f"--from-literal={key}=" in readme, f"{name}/{key}"


def test_mlflow_server_allows_its_service_host():
    (deploy,) = [d for d in RENDERED["base"] if d["kind"] == "Deployment"]
    (service,) = [d for d in RENDERED["base"] if d["kind"] == "Service"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert service["metadata"]["name"] in hosts
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert any(a.startswith("--backend-store-uri=sqlite:////mlflow/") for a in args)
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


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
    assert any(re.match(r"RUN pip install \.( |$)", line) for line in lines)
    assert not re.search(r"\b(curl|wget)\b|ADD https?://", text), "no downloads outside package registries"
    ignore = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for needed in ("!pyproject.toml", "!platform/", "!sweeps/", "!cluster/experiments/"):
        assert needed in ignore
    assert ignore[0] == "*"  # everything else (.venv, .git, .cliplab, data) stays out of the context


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
    from cliplab.submit import build_job

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "forwarded-secret")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = build_job("sweeps/cloob_beta_tau.py", overrides=["train.epochs=1"])
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

    from cliplab.submit import DRIVER_ENV_VARS
    from cliplab.train.launch import init_ray

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
