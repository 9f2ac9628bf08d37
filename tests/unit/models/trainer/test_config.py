"""``StackelbergConfig``: paper defaults, validation messages, YAML + ``key=value`` overrides."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import itertools
from pathlib import Path

import pytest

from slhf_models.serving.templates import DEFAULT_FOLLOWER_INSTRUCTION
from slhf_models.trainer.config import ConfigError, StackelbergConfig


def make(**kw: object) -> StackelbergConfig:
    return StackelbergConfig(model="m", dataset="prompts.jsonl", **kw)  # type: ignore[arg-type]


def test_defaults_are_the_papers_small_run() -> None:
    cfg = make()
    assert (cfg.learning_rate, cfg.kappa, cfg.tau_leader, cfg.tau_follower) == (1e-5, 5, 1e-3, 1e-3)
    assert (cfg.batch_size, cfg.steps, cfg.temperature) == (32, 1000, 0.9)
    # departures from the paper's small runs (docs/algorithm.md): k1, and the Leader's full value
    assert (cfg.kl_estimator, cfg.leader_objective) == ("k1", "full")
    assert (cfg.lr_schedule, cfg.warmup_steps) == ("constant", 0)
    assert (cfg.use_lora, cfg.lora_r, cfg.lora_alpha, cfg.baseline) == (True, 64, 128, "constant")
    assert cfg.follower_instruction == DEFAULT_FOLLOWER_INSTRUCTION
    assert cfg.reference_model == "m"  # the reference defaults to the initial model


def test_every_field_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(StackelbergConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    documented = {
        stmt.target.id
        for stmt, nxt in itertools.pairwise(body)
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant)
    }
    assert documented == {f.name for f in dataclasses.fields(StackelbergConfig)}


def test_follower_learning_rate_is_kappa_eta_only_with_separate_weights() -> None:
    assert make(learning_rate=1e-5, kappa=5.0).follower_learning_rate == 1e-5
    separate = make(learning_rate=1e-5, kappa=5.0, follower_weights="separate_adapter")
    assert separate.follower_learning_rate == pytest.approx(5e-5)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"learning_rate": 0.0}, "learning_rate must be > 0; got 0.0"),
        ({"kappa": -1.0}, "kappa must be > 0; got -1.0"),
        ({"tau_follower": -0.1}, "tau_follower must be ≥ 0; got -0.1"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of 'k1', 'k3'; got 'k4'"),
        ({"kl_estimator": "k2"}, "kl_estimator 'k2' was removed: ½(log r)² does not average"),
        ({"leader_objective": "x"}, "leader_objective must be one of 'full', 'paper'; got 'x'"),
        ({"warmup_steps": -1}, "warmup_steps must be ≥ 0; got -1"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in [0, 1]; got 1.5"),
        ({"max_preference_error_rate": -0.1}, "error_rate must be in [0, 1]; got -0.1"),
        ({"max_preference_error_rate": "1.5"}, "error_rate must be in [0, 1]; got 1.5"),
        ({"push_to_hub": True}, "push_to_hub: true needs hub_model_id (e.g. my-org/"),
        ({"hub_model_id": "no-owner"}, "hub_model_id must look like user-or-org/name; got"),
        ({"baseline": "mean"}, "baseline must be one of 'constant', 'leave_one_out'"),
        ({"baseline": "leave_one_out", "batch_size": 1}, "leave_one_out baseline needs batch_size"),
        ({"use_lora": False, "follower_weights": "separate_adapter"}, "set use_lora: true or"),
        ({"batch_size": 32, "gradient_accumulation_steps": 5}, "not divisible by gradient_acc"),
        ({"temperature": 0.0}, "temperature must be > 0 (REINFORCE needs sampled answers)"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0 (or none for no clipping)"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1); got 1.0"),
        ({"lora_r": 0}, "lora_r must be ≥ 1; got 0"),
        ({"leader_update_every": 0}, "leader_update_every must be ≥ 1; got 0"),
        ({"eval_every": 50}, "set eval_dataset or eval_every: 0"),
        ({"follower_instruction": " "}, "follower_instruction must not be empty"),
        ({"report_to": "mlflow"}, "report_to must be one of"),
        ({"batch_size": 2.5}, "batch_size must be an integer; got 2.5"),
        ({"use_lora": "maybe"}, "use_lora must be true or false; got 'maybe'"),
        ({"top_k": 50}, "top_k 50: training samples from the full softmax (top_k: 0)"),
        ({"dtype": "fp8"}, "dtype must be one of 'auto', 'bfloat16', 'float16', 'float32'"),
        ({"logprob_chunk_tokens": 0}, "logprob_chunk_tokens must be ≥ 1; got 0"),
    ],
)
def test_invalid_values_name_the_value_and_the_fix(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(**kw)
    assert message in str(e.value)


def test_rollout_backend_is_hf_by_default_and_vllm_is_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert make().rollout_backend == "hf"
    with pytest.raises(ConfigError, match="rollout_backend must be one of 'hf', 'vllm'"):
        make(rollout_backend="sglang")
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
        make(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="vllm_max_model_len must be ≥ 1"):
        make(vllm_max_model_len=0)
    with pytest.raises(ConfigError, match="lora_r 1024 is above vLLM's largest max_lora_rank"):
        make(rollout_backend="vllm", lora_r=1024)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"needs vLLM, which is not installed.*rollout_backend: hf"
    ):
        make(rollout_backend="vllm")
    assert make(rollout_backend="hf").rollout_backend == "hf"  # hf never needs vllm


def test_lora_settings_are_ignored_for_a_full_fine_tune() -> None:
    assert make(use_lora=False, lora_r=0).use_lora is False


def test_empty_model_is_rejected() -> None:
    with pytest.raises(ConfigError, match="model must be set"):
        StackelbergConfig(model=" ", dataset="d.jsonl")


# -- YAML and overrides ------------------------------------------------------------------------
def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_from_yaml_with_typed_overrides(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-5 (no dot) as a string; it is converted to the float field anyway
    path = write_yaml(tmp_path, "model: m\ndataset: d.jsonl\nlearning_rate: 1e-5\nkappa: 2\n")
    cfg = StackelbergConfig.from_yaml(
        path,
        [
            "kappa=3",
            "use_lora=false",
            "max_grad_norm=none",
            "lora_target_modules=q_proj, v_proj",
            "steps=10",
            "follower_instruction=Do better = now.",  # only the first '=' splits
        ],
    )
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.kappa == 3.0 and isinstance(cfg.kappa, float)
    assert cfg.use_lora is False and cfg.max_grad_norm is None and cfg.steps == 10
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.follower_instruction == "Do better = now."
    assert StackelbergConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_name_the_close_matches(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model: m\ndataset: d.jsonl\n")
    with pytest.raises(ConfigError, match="unknown setting 'learnin_rate'; did you mean learning"):
        StackelbergConfig.from_yaml(path, ["learnin_rate=1e-4"])
    with pytest.raises(ConfigError, match="'tau'; did you mean tau_leader, tau_follower"):
        StackelbergConfig.from_yaml(write_yaml(tmp_path, "model: m\ndataset: d\ntau: 1\n"))


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model: m\ndataset: d\n", ["steps"], "override 'steps' must look like key=value"),
        ("model: m\ndataset: d\n", ["steps=ten"], "steps must be an integer; got 'ten'"),
        ("model: m\n", [], "missing required setting(s): dataset"),
        ("- a\n- b\n", [], "must be a mapping of settings"),
        ("model: [unclosed\n", [], "is not valid YAML"),
        ("model: m\ndataset: d\nlora_target_modules: 3\n", [], "must be a list of strings"),
    ],
)
def test_bad_yaml_and_overrides(tmp_path: Path, text: str, overrides: list, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        StackelbergConfig.from_yaml(write_yaml(tmp_path, text), overrides)
    assert message in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        StackelbergConfig.from_yaml(tmp_path / "nope.yaml")


def test_lr_schedules_warm_up_then_decay_to_the_floor() -> None:
    # 10 steps, 2 of warm-up: factors ½, 1, then linear from 1 (step 2) to 0.1 (step 10)
    linear = make(steps=10, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.1)
    assert [linear.lr_factor(s) for s in (1, 2)] == [0.5, 1.0]
    assert linear.lr_factor(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert linear.lr_factor(10) == pytest.approx(0.1)
    cosine = make(steps=10, warmup_steps=2, lr_schedule="cosine")
    assert cosine.lr_factor(6) == pytest.approx(0.5)  # half-way: cos(π/2) = 0
    assert cosine.lr_factor(10) == pytest.approx(0.0)
    assert [make(steps=10).lr_factor(s) for s in (1, 10)] == [1.0, 1.0]


def test_template_bos_auto_follows_the_models_manifest(tiny: Path, tmp_path: Path) -> None:
    """``auto``: weights an earlier slhf run wrote keep the BOS rule they were trained with (a
    manifest without the field: ``as_rendered``); a model without a manifest gets the paper's
    reference rule (``ensure``), which the artefact then records for the server."""
    import shutil

    from slhf_models.serving.manifest import RoleSpec
    from slhf_models.serving.templates import ROLES
    from slhf_models.trainer.artefact import manifest

    assert StackelbergConfig(model=str(tiny), dataset="x").resolved_template_bos() == "as_rendered"
    plain = tmp_path / "plain"
    shutil.copytree(tiny, plain)
    (plain / "slhf.json").unlink()
    cfg = StackelbergConfig(model=str(plain), dataset="x")
    assert cfg.resolved_template_bos() == "ensure"
    assert StackelbergConfig(model="org/name", dataset="x").resolved_template_bos() == "ensure"
    explicit = StackelbergConfig(model=str(tiny), dataset="x", template_bos="ensure")
    assert explicit.resolved_template_bos() == "ensure"
    roles = {role: RoleSpec() for role in ROLES}
    assert manifest(cfg, roles, base_model=".", uses_chat=True).template.bos == "ensure"
