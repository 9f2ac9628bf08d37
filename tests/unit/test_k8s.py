"""The Kubernetes package (docker/k8s): every overlay renders with ``kubectl kustomize``; every
object validates against the Kubernetes schemas (kubernetes-validate, strict) or, for custom
resources, against the CRD schemas vendored in docker/k8s/schemas; checkov finds nothing (each
skip carries its reason); and the rendered objects agree with the server: the shutdown budget
arithmetic, the settings, the metrics the autoscaler and the alerts read, the route timeouts.

Where ``kubectl`` (kustomize v5) or checkov (``make checkov``: its own virtual environment,
.cache/checkov-venv) is missing the tests skip, saying so; with ``CI`` set they fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from slhf.cli import _serve_parser
from slhf_server.settings import ServerSettings
from tests.unit.test_deploy_files import exported_metrics, vllm_metric_names

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
SERVING = ["cpu-demo", "gpu", "multinode"]
#: Oldest Kubernetes the package is written for (matchLabelKeys in topology spread,
#: unhealthyPodEvictionPolicy), and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]
CHECKOV = REPO / ".cache" / "checkov-venv" / "bin" / "checkov"
PAPER_MODEL = "pasztorb/Llama-3.1-Tulu-3-8B-SLHF"


def _missing(what: str, hint: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI for the Kubernetes package's tests: {hint}")
    pytest.skip(f"{what} is not installed: {hint}")


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        _missing("kubectl (with kustomize v5)", "https://kubernetes.io/docs/tasks/tools/")
    assert exe is not None
    return exe


@cache
def _render(overlay: str) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def settings_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {k: str(v) for k, v in one(docs, "ConfigMap")["data"].items()}


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of a workload."""
    if doc["kind"] in ("Deployment", "Job"):
        yield doc["kind"], doc["spec"]["template"]
    elif doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        yield "leaderTemplate", lwt["leaderTemplate"]
        yield "workerTemplate", lwt["workerTemplate"]


def server_pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pod templates whose container runs `slhf serve`."""
    return [
        t
        for d in docs
        for _, t in pod_templates(d)
        if any("slhf serve" in " ".join(c.get("args", [])) for c in t["spec"]["containers"])
    ]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def test_every_overlay_is_tested() -> None:
    assert set(OVERLAYS) == {"cpu-demo", "gpu", "multinode", "train"}


# -- schemas --------------------------------------------------------------------------------
@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    path = SCHEMAS / f"{group}_{kind}_{version}.json".lower()
    assert path.exists(), f"no vendored schema for {kind} {api_version} ({path.name})"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def is_core(api_version: str) -> bool:
    group = api_version.split("/")[0] if "/" in api_version else ""
    return "." not in group or (group.endswith(".k8s.io") and not group.startswith("gateway."))


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_its_schema(overlay: str, version: str) -> None:
    for doc in rendered(overlay):
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if is_core(doc["apiVersion"]):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {what}: {e.message} at {list(e.path)}")
        else:
            errors = sorted(
                jsonschema.Draft7Validator(crd_schema(doc["apiVersion"], doc["kind"])).iter_errors(
                    doc
                ),
                key=str,
            )
            assert not errors, f"{overlay}: {what}: {errors[0].message} at {list(errors[0].path)}"
        for where, template in pod_templates(doc):
            if doc["kind"] == "LeaderWorkerSet":  # open in the vendored schema: checked here
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                try:
                    kubernetes_validate.validate({**pod, "template": template}, version, True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{overlay}: {what} {where}: {e.message} at {list(e.path)}")


def test_strict_schemas_refuse_a_misspelt_field() -> None:
    """The vendored schemas are strict (extract.py), as kubernetes-validate's strict mode is."""
    monitor = one(rendered("gpu"), "ServiceMonitor")
    bad = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    validator = jsonschema.Draft7Validator(crd_schema(monitor["apiVersion"], "ServiceMonitor"))
    assert any("endpoint" in e.message for e in validator.iter_errors(bad))
    deployment = one(rendered("gpu"), "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)


def test_every_custom_resource_kind_has_a_vendored_schema() -> None:
    kinds = {
        (d["apiVersion"], d["kind"])
        for o in OVERLAYS
        for d in rendered(o)
        if not is_core(d["apiVersion"])
    }
    assert {k for _, k in kinds} >= {
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
        "LeaderWorkerSet",
    }
    for api_version, kind in kinds:
        assert crd_schema(api_version, kind)["x-source"]


# -- checkov --------------------------------------------------------------------------------
def test_checkov_finds_nothing_and_every_skip_says_why(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        _missing("checkov", "`make checkov` (an isolated virtual environment in .cache/)")
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(_render(overlay))
    args = ["-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "-o", "json"]
    proc = subprocess.run(
        [str(CHECKOV), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BC_API_KEY": ""},
    )
    report = json.loads(proc.stdout)
    results = report["results"]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({Path(c['file_path']).name})"
        for c in results.get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)
    assert report["summary"]["passed"] > 100, "checkov checked (almost) nothing"
    skipped = results.get("skipped_checks", [])
    assert len(skipped) == report["summary"]["skipped"]
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 40, f"{check['check_id']} skipped without a reason: {reason!r}"
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- shutdown budget ------------------------------------------------------------------------
def drain_of(
    overlay: str, pod: dict[str, Any], tmp_path: Path, grace: int | None = None
) -> tuple[int, list[str]]:
    """Run the server container's start command (sh) with stand-ins for the programs it
    starts: the SLHF_DRAIN_GRACE_S it exports, and the `slhf` arguments."""
    c = container(pod, "slhf")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        "slhf": 'echo "$SLHF_DRAIN_GRACE_S"; echo "$@"',
        "ray": "exit 0",
        "python3": 'echo "$LWS_GROUP_SIZE"',  # the multinode leader's count of Ray nodes
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**settings_map(rendered(overlay)), **env_of(c)}
    if grace is not None:
        env["TERMINATION_GRACE_PERIOD_S"] = str(grace)
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "LWS_GROUP_SIZE": "2"}
    proc = subprocess.run(
        [*c["command"], *c["args"]], capture_output=True, text=True, env=env, timeout=30
    )
    if proc.returncode != 0:
        return proc.returncode, [proc.stderr]
    drain, args = proc.stdout.splitlines()[-2:]
    return int(drain), args.split()


@pytest.mark.parametrize("overlay", SERVING)
def test_the_grace_period_covers_drain_prestop_abort_and_teardown(
    overlay: str, tmp_path: Path
) -> None:
    """The one value is the pod's terminationGracePeriodSeconds; the container's start command
    derives SLHF_DRAIN_GRACE_S from it, so preStop + drain + 2 s (the abort wait) +
    SLHF_SHUTDOWN_TIMEOUT_S always fits (docs/deploy.md, "Operating the service")."""
    docs = rendered(overlay)
    pods = server_pods(docs)
    assert pods, f"{overlay} runs no `slhf serve`"
    settings = settings_map(docs)
    for pod in pods:
        # the Service named slhf would otherwise inject SLHF_PORT=tcp://... and friends
        assert pod["spec"]["enableServiceLinks"] is False
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        c = container(pod, "slhf")
        # an overlay that patches the grace must repeat the replacement (base/shutdown-budget.yaml)
        assert env_of(c)["TERMINATION_GRACE_PERIOD_S"] == str(grace)
        assert c["lifecycle"]["preStop"]["exec"]["command"] == [
            "/bin/sh",
            "-c",
            'sleep "$PRE_STOP_S"',
        ]
        assert "SLHF_DRAIN_GRACE_S" not in settings  # derived, never set
        pre_stop = int(settings["PRE_STOP_S"])
        teardown = float(settings["SLHF_SHUTDOWN_TIMEOUT_S"])
        drain, argv = drain_of(overlay, pod, tmp_path)
        assert drain >= 10, f"{overlay}: a {drain} s drain is too short to finish anything"
        assert pre_stop + drain + 2 + teardown <= grace
        assert argv[0] == "serve"
        # the drain follows the grace: a longer grace, a longer drain; too short, no start
        longer, _ = drain_of(overlay, pod, tmp_path, grace=grace + 50)
        assert longer == drain + 50
        rc, err = drain_of(overlay, pod, tmp_path, grace=pre_stop + 2)
        assert rc == 2 and "is shorter than preStop" in err[0]


def test_an_overlay_grace_without_its_replacement_is_caught(tmp_path: Path) -> None:
    """What the arithmetic test catches: the gpu overlay's grace patch without the overlay's own
    replacement leaves the base's 60 s in the container."""
    shutil.copytree(K8S, tmp_path / "k8s")
    gpu = tmp_path / "k8s" / "overlays" / "gpu"
    text = (gpu / "kustomization.yaml").read_text()
    (gpu / "kustomization.yaml").write_text(text[: text.index("replacements:")])
    proc = subprocess.run(
        [kubectl(), "kustomize", str(gpu)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    deployment = one(list(yaml.safe_load_all(proc.stdout)), "Deployment")
    pod = deployment["spec"]["template"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120
    assert env_of(container(pod, "slhf"))["TERMINATION_GRACE_PERIOD_S"] == "60"


# -- what the servers run -------------------------------------------------------------------
def serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slhf")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    return parser.parse_known_args(argv)[0]


SLHF_NAME = re.compile(r"\bSLHF_[A-Z0-9_]+\b")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_slhf_name_is_a_setting(overlay: str) -> None:
    known = {f"SLHF_{n.upper()}" for n in ServerSettings.model_fields} | {"SLHF_JUDGE_API_KEY"}
    used = set(SLHF_NAME.findall(_render(overlay)))
    assert used <= known, sorted(used - known)


@pytest.mark.parametrize("overlay", SERVING)
def test_server_settings_are_valid_and_fit_the_overlay(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered(overlay)
    for k in list(os.environ):
        if k.startswith("SLHF_"):
            monkeypatch.delenv(k)
    pod = server_pods(docs)[0]
    for k, v in {**settings_map(docs), **env_of(container(pod, "slhf"))}.items():
        if k.startswith("SLHF_") and k != "SLHF_API_KEYS_FILE":
            monkeypatch.setenv(k, v)
    settings = ServerSettings()
    assert settings.host == "0.0.0.0" and settings.port == 8000
    c = container(pod, "slhf")
    assert env_of(c)["HF_HUB_OFFLINE"] == "1"
    gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    if overlay == "cpu-demo":
        assert gpus == 0 and settings.model is None  # the shipped model
    else:
        assert gpus >= 1
        assert settings.max_model_len is not None
        assert settings.max_num_seqs is not None
        assert settings.max_inflight_generations >= 2 * settings.max_num_seqs
    if overlay == "gpu":
        assert settings.model == PAPER_MODEL and settings.max_model_len == 8192
        assert settings.tensor_parallel_size * settings.pipeline_parallel_size == gpus == 1
    if overlay == "multinode":
        lws = one(docs, "LeaderWorkerSet")
        size = lws["spec"]["leaderWorkerTemplate"]["size"]
        tp, pp = settings.tensor_parallel_size, settings.pipeline_parallel_size
        assert tp == gpus and pp == size == 2, "TP inside a node, PP across the group's nodes"
        worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == gpus
        assert "--distributed-executor-backend ray" in c["args"][0]
        assert 'ray start --address="$LWS_LEADER_ADDRESS:6379"' in worker["args"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    for doc in rendered(overlay):
        for where, pod in pod_templates(doc):
            spec = pod["spec"]
            what = f"{overlay} {doc['kind']}/{doc['metadata']['name']} {where}"
            sc = spec["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, what
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
            assert spec["automountServiceAccountToken"] is False, what
            for c in spec.get("initContainers", []) + spec["containers"]:
                csc = c["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False, (what, c["name"])
                assert csc["capabilities"] == {"drop": ["ALL"]}, (what, c["name"])
                assert csc["readOnlyRootFilesystem"] is True, (what, c["name"])
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (what, c["name"])
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (what, c["name"])
                gpu = c["resources"]["limits"].get("nvidia.com/gpu")
                assert gpu == c["resources"]["requests"].get("nvidia.com/gpu"), (what, c["name"])
            assert not spec.get("hostNetwork") and not spec.get("hostIPC"), what


@pytest.mark.parametrize("overlay", SERVING)
def test_cache_staging_rollout_disruption_and_spread(overlay: str) -> None:
    docs = rendered(overlay)
    claim = one(docs, "PersistentVolumeClaim", "slhf-model-cache")["metadata"]["name"]
    stage = one(docs, "Job", "slhf-stage-model")["spec"]["template"]["spec"]
    stager = stage["containers"][0]
    assert "HF_HUB_OFFLINE" not in env_of(stager)
    assert "snapshot_download" in stager["args"][0]
    stage_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in stage["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert stage_claims == {claim}
    for pod in server_pods(docs):
        mounts = {m["name"]: m for m in container(pod, "slhf")["volumeMounts"]}
        cache_volume = next(
            v
            for v in pod["spec"]["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        )
        mount = mounts[cache_volume["name"]]
        assert mount["readOnly"] is True
        (wait,) = pod["spec"]["initContainers"]  # waits for the staging Job, offline
        assert env_of(wait)["HF_HUB_OFFLINE"] == "1" and "local_files_only=True" in wait["args"][0]
        assert mount["mountPath"] == env_of(container(pod, "slhf"))["HF_HOME"]
        assert env_of(stager)["HF_HOME"] == mount["mountPath"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    if overlay == "multinode":
        lws = one(docs, "LeaderWorkerSet")
        assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]["maxSurge"] == 0
        return
    deployment = one(docs, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}  # no spare GPU
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb_selector = pdb["spec"]["selector"]["matchLabels"]
    assert pdb_selector.items() <= labels.items()
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} >= {"kubernetes.io/hostname"}
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_references_resolve(overlay: str) -> None:
    """Generated names carry a content hash: every reference must have been rewritten."""
    docs = rendered(overlay)
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        for where, pod in pod_templates(doc):
            spec = pod["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                for ref in c.get("envFrom", []):
                    assert ref["configMapRef"]["name"] in configmaps, (overlay, where)
            for v in spec.get("volumes", []):
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps, (overlay, where)


# -- monitoring, autoscaling, routing -------------------------------------------------------
def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:slhf_[a-z_]+|vllm:[a-z_]+)", expr))


def test_prometheus_rules_are_the_same_in_compose_and_kubernetes() -> None:
    rules = yaml.safe_load((REPO / "docker" / "prometheus" / "rules.yml").read_text())
    rule = one(rendered("gpu"), "PrometheusRule")
    assert rule["spec"] == rules, "edit docker/prometheus/rules.yml and the PrometheusRule alike"


def test_alerts_read_metrics_that_exist() -> None:
    rules = yaml.safe_load((REPO / "docker" / "prometheus" / "rules.yml").read_text())
    known = exported_metrics() | vllm_metric_names()
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for topic in ("Down", "EngineDead", "Overloaded", "ServerErrors", "Saturated"):
        assert f"SLHF{topic}" in alerts
    for name, expr in alerts.items():
        assert metric_names(expr) <= known, (name, metric_names(expr) - known)
    assert "slhf_admission_limit_generations" in alerts["SLHFSaturated"]


def test_the_autoscaler_reads_saturation_and_owns_the_replica_count() -> None:
    docs = rendered("gpu")
    scaled = one(docs, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    deployment = one(docs, target["kind"], target["name"])
    assert "replicas" not in deployment["spec"]  # the HPA's
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert metric_names(query) == {
        "slhf_admission_inflight_generations",
        "slhf_admission_limit_generations",
    }
    assert metric_names(query) <= exported_metrics()
    assert 0 < float(trigger["metadata"]["threshold"]) < 1


def test_the_service_monitor_scrapes_the_service() -> None:
    docs = rendered("gpu")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"] and "http" in ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert service["metadata"]["name"] == "slhf"  # the job label the rules and dashboard use


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", duration))


def test_route_timeouts_outlast_the_deadline_and_affinity_is_on_a_header() -> None:
    docs = rendered("gpu")
    deadline = float(settings_map(docs)["SLHF_MAX_DEADLINE_S"])
    route = one(docs, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "slhf", "port": 80}]
    for value in rule["timeouts"].values():
        assert seconds(value) > deadline
    policy = one(docs, "BackendTrafficPolicy")
    assert policy["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    assert policy["spec"]["loadBalancer"]["consistentHash"]["type"] == "Header"
    for value in policy["spec"]["timeout"]["http"].values():
        assert seconds(value) > deadline


# -- training -------------------------------------------------------------------------------
def test_the_training_job_launches_slhf_train_under_accelerate_against_the_judge() -> None:
    from slhf_models.trainer.cli import build_preference
    from slhf_models.trainer.config import StackelbergConfig

    docs = rendered("train")
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["train.yaml"])
    # the same example run as compose's train profile (kustomize reads no file outside the
    # overlay's folder, so it is a copy)
    assert config == yaml.safe_load((REPO / "docker" / "train" / "train.yaml").read_text())
    cfg = StackelbergConfig(**config)
    judge = build_preference(cfg.preference)
    host, port = judge.url.removeprefix("http://").split("/")[0].split(":")  # type: ignore[attr-defined]
    service = one(docs, "Service", host)
    assert service["spec"]["ports"][0]["port"] == int(port)
    judge_pod = one(docs, "Deployment", host)["spec"]["template"]["spec"]
    args = judge_pod["containers"][0]["args"]
    assert f"--served-model-name={judge.model}" in args  # type: ignore[attr-defined]
    assert "--max-logprobs=20" in args
    job = one(docs, "Job", "slhf-train")["spec"]["template"]["spec"]
    train = job["containers"][0]
    command = " ".join(train["args"])
    assert "accelerate launch --config_file /opt/slhf/recipes/accelerate/multi_gpu.yaml" in command
    assert (REPO / "recipes" / "accelerate" / "multi_gpu.yaml").exists()
    assert "-m slhf_models.trainer.cli /config/train.yaml" in command
    assert "dtype=bfloat16" in command and "output_dir=/runs/" in command
    assert "COPY recipes ./recipes" in (REPO / "docker" / "Dockerfile").read_text()
    # the trainer and the judge each hold their own GPUs
    assert int(train["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert int(judge_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "judge:8000/health" in job["initContainers"][0]["args"][0]
