"""slhf_models.sft: the masked Leader-template loss, a few steps lower it, the saved folder."""

from __future__ import annotations

import pytest

from slhf_models.serving.manifest import Manifest
from slhf_models.serving.templates import TemplateRenderer
from slhf_models.sft import IGNORE, SFTConfig, _collate, encode_row, save_sft, train_sft
from slhf_models.tasks.arith import demonstrations
from slhf_models.tiny import build_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", family="llama", seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, model, tokenizer


def test_encode_row_masks_the_prompt_and_ends_with_eos(tiny):
    _, _, tokenizer = tiny
    renderer = TemplateRenderer(tokenizer)
    ids, labels = encode_row(renderer, tokenizer, {"prompt": "Add 1 and 2.", "answer": "3."}, 64)
    n_prompt = len(renderer.encode_role("leader", "Add 1 and 2.", None))
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == "3."


def _loss(model, tokenizer, rows):
    renderer = TemplateRenderer(tokenizer)
    batch = [encode_row(renderer, tokenizer, r, 128) for r in rows]
    ids, labels, mask = _collate(batch, tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_a_few_steps_lower_the_loss_and_the_folder_is_servable(tiny, tmp_path):
    path, model, tokenizer = tiny
    rows = demonstrations(16, seed=0)
    before = _loss(model, tokenizer, rows)
    config = SFTConfig(steps=6, batch_size=8, learning_rate=3e-3, warmup_steps=1, seed=0)
    losses = train_sft(model, tokenizer, rows, config)
    assert len(losses) == 6
    assert _loss(model, tokenizer, rows) < before - 0.5
    out = save_sft(model, tokenizer, path, tmp_path / "sft", config, final_loss=losses[-1])
    manifest = Manifest.load(out)
    assert manifest.name == "slhf-tiny-llama-sft"
    assert manifest.provenance["sft"]["steps"] == 6
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)


def test_a_row_with_a_response_is_encoded_in_the_follower_template(tiny):
    _, _, tokenizer = tiny
    renderer = TemplateRenderer(tokenizer)
    row = {"prompt": "Add 1 and 2.", "answer": "1 plus 2 is 3.", "response": "4."}
    ids, labels = encode_row(renderer, tokenizer, row, 256)
    prompt = renderer.encode_role("follower", "Add 1 and 2.", "4.")
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert tokenizer.decode(ids[len(prompt) : -1]) == "1 plus 2 is 3."
    leader_ids, _ = encode_row(renderer, tokenizer, {**row, "response": None}, 256)
    assert leader_ids[: len(renderer.encode_role("leader", "Add 1 and 2.", None))] != prompt
