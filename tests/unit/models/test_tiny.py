"""The tiny-model factory: folders that transformers (and vLLM) load, seeded, built atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from slhf_models import tiny  # noqa: E402
from slhf_models.serving.manifest import Manifest  # noqa: E402
from slhf_models.serving.templates import DEFAULT_FOLLOWER_INSTRUCTION, TemplateRenderer  # noqa: E402

PROMPT = "What is the capital of France?"
ANSWER = "The answer is Paris."


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": tiny.build_tiny_model(root / "llama"),
        "qwen2": tiny.build_tiny_model(root / "qwen2", "qwen2"),
        "lora": tiny.build_tiny_model(root / "lora", "qwen2", adapters=True, seed=3),
        "plain": tiny.build_tiny_model(root / "plain", chat_template=False),
    }


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)


def _renderer(folder: Path) -> TemplateRenderer:
    return TemplateRenderer(_tokenizer(folder), Manifest.load(folder).template.to_config())


# -- model folder ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_config_matches_family_sizes_and_tokenizer(built: dict[str, Path], family: str) -> None:
    folder = built[family]
    config, tok = _config(folder), _tokenizer(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids(tiny.IM_END)
    assert config["architectures"] == [tiny.FAMILIES[family]]
    assert config["model_type"] == family
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU attention
    assert config.get("head_dim", 64) >= 32
    assert config["vocab_size"] == len(tok) == tiny.VOCAB_SIZE
    assert config["eos_token_id"] == tok.eos_token_id == im_end == generation["eos_token_id"]
    assert config["bos_token_id"] == tok.bos_token_id
    assert config["pad_token_id"] == tok.pad_token_id
    assert config["max_position_embeddings"] == 2048
    assert config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_demo_size_has_two_kv_heads_in_every_family_and_runs(tmp_path: Path, family: str) -> None:
    folder = tiny.build_tiny_model(tmp_path / family, family=family, size="demo")
    config = _config(folder)
    assert config["num_hidden_layers"] == 3 and config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2  # a size overrides the family's default
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM CPU's least
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([_renderer(folder).encode_role("leader", PROMPT, None)])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_transformers_loads_the_model_and_runs_it(built: dict[str, Path], family: str) -> None:
    folder = built[family]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = _renderer(folder).encode_role("leader", PROMPT, None)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # (1, T, vocab)
    assert logits.shape == (1, len(ids), tiny.VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_weights_and_another_seed_different(tmp_path: Path) -> None:
    a = load_file(tiny.build_tiny_model(tmp_path / "a", seed=7) / "model.safetensors")
    b = load_file(tiny.build_tiny_model(tmp_path / "b", seed=7) / "model.safetensors")
    c = load_file(tiny.build_tiny_model(tmp_path / "c", seed=8) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_building_does_not_touch_the_callers_torch_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


# -- tokenizer and templates -----------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["Hello! How can I help you today?", "héllo wörld — ✓ 42", "a\n\n  b\tc {}"]
)
def test_tokenizer_round_trips_text(built: dict[str, Path], text: str) -> None:
    tok = _tokenizer(built["llama"])
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids(built: dict[str, Path]) -> None:
    tok = _tokenizer(built["llama"])
    for i, token in enumerate(tiny.SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [i]
    assert tok.eos_token == tiny.IM_END


def test_chat_template_renders_leader_and_follower_prompts(built: dict[str, Path]) -> None:
    renderer = _renderer(built["qwen2"])
    assert renderer.uses_chat
    leader = renderer.render_leader(PROMPT)
    assert leader == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    follower = renderer.render_follower(PROMPT, ANSWER)
    assert follower.startswith(leader.removesuffix("<|im_start|>assistant\n"))
    assert f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n" in follower
    assert f"<|im_start|>user\n{DEFAULT_FOLLOWER_INSTRUCTION}<|im_end|>\n" in follower
    assert follower.endswith("<|im_start|>assistant\n")


def test_chat_template_renders_system_turns(built: dict[str, Path]) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    text = _renderer(built["llama"]).render_leader(messages)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_encoded_role_prompts_decode_back_to_the_rendered_text(built: dict[str, Path]) -> None:
    renderer = _renderer(built["llama"])
    ids = renderer.encode_role("follower", PROMPT, ANSWER)
    assert ids[0] == renderer.tokenizer.convert_tokens_to_ids(tiny.IM_START)
    assert renderer.tokenizer.decode(ids) == renderer.render_follower(PROMPT, ANSWER)


def test_plain_variant_has_no_chat_template_and_renders_plain_layout(
    built: dict[str, Path],
) -> None:
    folder = built["plain"]
    assert not _tokenizer(folder).chat_template
    assert Manifest.load(folder).template.layout == "plain"
    renderer = _renderer(folder)
    assert not renderer.uses_chat
    assert renderer.render_leader(PROMPT) == f"{PROMPT}\n\n"
    expected = f"{PROMPT}\n\n{ANSWER}\n\n{DEFAULT_FOLLOWER_INSTRUCTION}\n\n"
    assert renderer.render_follower(PROMPT, ANSWER) == expected


# -- manifest and adapters -------------------------------------------------------------------
def test_manifest_of_a_plain_build_is_shared(built: dict[str, Path]) -> None:
    manifest = Manifest.load(built["llama"])
    assert manifest.name == "slhf-tiny-llama"
    assert manifest.topology == "shared"
    assert manifest.template.layout == "chat"
    assert manifest.max_model_len == 2048
    assert manifest.leader.sampling.max_tokens == 32
    assert manifest.provenance["producer"] == "slhf_models.tiny"
    assert manifest.provenance["family"] == "llama"
    assert manifest.provenance["seed"] == 0


def test_manifest_with_adapters_is_lora_and_resolves_them(built: dict[str, Path]) -> None:
    folder = built["lora"]
    manifest = Manifest.load(folder)
    assert manifest.name == "slhf-tiny-qwen2-lora"
    assert manifest.topology == "lora"
    for role in ("leader", "follower"):
        adapter = manifest.resolve(manifest.role(role).adapter, folder)
        assert adapter is not None and Path(adapter, "adapter_config.json").is_file()


def test_adapters_have_peft_keys_and_shapes(built: dict[str, Path]) -> None:
    folder = built["lora"]
    base = load_file(folder / "model.safetensors")
    config = _config(folder)
    for adapter in ("leader-lora", "follower-lora"):
        adapter_config = json.loads((folder / adapter / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA"
        assert adapter_config["task_type"] == "CAUSAL_LM"
        assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
        assert set(adapter_config["target_modules"]) >= {"q_proj", "v_proj"}
        tensors = load_file(folder / adapter / "adapter_model.safetensors")
        expected = {
            f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
            for i in range(config["num_hidden_layers"])
            for m in adapter_config["target_modules"]
            for ab in "AB"
        }
        assert set(tensors) == expected
        for key, tensor in tensors.items():
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            out_features, in_features = base[f"{module}.weight"].shape
            shape = (8, in_features) if ".lora_A." in key else (out_features, 8)
            assert tuple(tensor.shape) == shape, key
            assert tensor.abs().sum() > 0, key  # B is not zero: the adapter changes the model


def test_leader_and_follower_adapters_differ(built: dict[str, Path]) -> None:
    leader = load_file(built["lora"] / "leader-lora" / "adapter_model.safetensors")
    follower = load_file(built["lora"] / "follower-lora" / "adapter_model.safetensors")
    assert all(not torch.equal(leader[k], follower[k]) for k in leader)


def test_adapters_change_the_greedy_next_tokens(built: dict[str, Path]) -> None:
    folder = built["lora"]
    ids = torch.tensor([_renderer(folder).encode_role("leader", PROMPT, None)])
    predictions = []
    for adapter in (None, "leader-lora", "follower-lora"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if adapter:
            _merge_lora(model, folder / adapter)
        with torch.no_grad():
            predictions.append(model(ids).logits[0].argmax(-1).tolist())  # (T,)
    assert len({tuple(p) for p in predictions}) == 3


def _merge_lora(model, adapter: Path) -> None:
    scale = tiny.LORA_ALPHA / tiny.LORA_RANK
    tensors = load_file(adapter / "adapter_model.safetensors")
    weights = model.state_dict()
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                target = key.removeprefix("base_model.model.").replace(".lora_A.", ".")
                weights[target] += scale * (b.float() @ a.float())


# -- building: idempotent, atomic, cached ----------------------------------------------------
def test_second_build_is_a_no_op(built: dict[str, Path], monkeypatch) -> None:
    folder = built["llama"]
    before = (folder / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt an existing model")

    monkeypatch.setattr(tiny, "_write_model", fail)
    assert tiny.build_tiny_model(folder, seed=99) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_overwrite_rebuilds_in_place(tmp_path: Path) -> None:
    folder = tiny.build_tiny_model(tmp_path / "m", seed=1)
    rebuilt = tiny.build_tiny_model(folder, "qwen2", seed=2, overwrite=True)
    assert rebuilt == folder
    assert Manifest.load(folder).provenance["seed"] == 2
    assert _config(folder)["model_type"] == "qwen2"
    assert [p.name for p in tmp_path.iterdir() if p.name != ".m.lock"] == ["m"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def fail(out: Path, *args, **kwargs):
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_write_model", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.build_tiny_model(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]


def test_existing_folder_without_manifest_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny.build_tiny_model(tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama, qwen2"):
        tiny.build_tiny_model(tmp_path / "m", "gpt2")


def test_random_model_dir_is_versioned_under_the_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLHF_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.random_model_dir(build=False) == (
        tmp_path / "xdg" / "slhf" / f"tiny-llama-v{tiny.FACTORY_VERSION}"
    )
    monkeypatch.setenv("SLHF_CACHE_DIR", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / f"tiny-llama-v{tiny.FACTORY_VERSION}"
    assert tiny.random_model_dir(build=False) == expected
    assert not expected.exists()
    assert tiny.random_model_dir() == expected
    assert Manifest.load(expected).provenance["family"] == "llama"


def test_cli_builds_and_prints_the_path(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    argv = [str(out), "--family", "qwen2", "--adapters", "--seed", "1", "--no-chat-template"]
    assert tiny.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    manifest = Manifest.load(out)
    assert manifest.topology == "lora"
    assert manifest.template.layout == "plain"
    assert manifest.provenance["seed"] == 1
    assert _config(out)["model_type"] == "qwen2"


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, slhf_models.tiny; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
