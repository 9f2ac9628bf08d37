"""Real-architecture random models (models/slhf_models/shapes.py): the configs' numbers, the
parameter counts (meta device), the Qwen2.5 tokenizer against tiktoken on the same ranks, and a
folder that ``from_pretrained`` loads (a narrow hidden size where the width is not under test)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from slhf_models import shapes

#: Scripts, accents (NFC and NFD), emoji, code, CRLF, digits, spaces: the regex's every branch.
TEXT = (
    "Hello world! 毕老师！1 + 1 = 2 naïve café Ünïcödé 😀🤖 \n\n\tdef f(x):\n"
    "    return x**2  # ok\r\n Привет мир, مرحبا بالعالم, नमस्ते, こんにちは世界 12345.678 "
    "it's THEY'RE   we'll\u00a0\u2003end"
)


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Any:
    return shapes.build_tokenizer("qwen2.5-0.5b")


def tiktoken_encoding(n_ranks: int) -> Any:
    import tiktoken

    ranks = {t: r for t, r in shapes.qwen_ranks().items() if r < n_ranks}
    return tiktoken.Encoding(
        "qwen", pat_str=shapes.QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )


def test_the_configs_have_the_released_models_numbers() -> None:
    qwen = shapes.shape_config("qwen2.5-0.5b")
    assert type(qwen).__name__ == "Qwen2Config" and qwen.architectures == ["Qwen2ForCausalLM"]
    got = {k: getattr(qwen, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")}
    assert got == {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14}
    assert (qwen.num_key_value_heads, qwen.intermediate_size, qwen.vocab_size) == (2, 4864, 151_936)
    assert qwen.tie_word_embeddings and qwen.rope_parameters["rope_theta"] == 1e6
    assert (qwen.max_position_embeddings, qwen.rms_norm_eps, qwen.hidden_act) == (
        32768,
        1e-6,
        "silu",
    )
    llama = shapes.shape_config("llama3.1-8b", num_layers=2)
    assert llama.architectures == ["LlamaForCausalLM"] and llama.num_hidden_layers == 2
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads) == (
        4096,
        32,
        8,
    )
    assert (llama.intermediate_size, llama.vocab_size, llama.tie_word_embeddings) == (
        14336,
        128_256,
        False,
    )
    assert llama.rope_parameters["rope_theta"] == 500_000.0
    assert llama.rope_parameters["rope_type"] == "llama3"


def test_parameter_counts_are_the_released_models() -> None:
    assert shapes.parameter_count("qwen2.5-0.5b") == 494_032_768  # tied embeddings counted once
    assert shapes.parameter_count("llama3.1-8b") == 8_030_261_248
    per_layer = 218_112_000  # q, k, v, o, gate, up, down, two norms
    embeddings = 2 * 128_256 * 4096 + 4096  # untied input and output, the final norm
    assert shapes.parameter_count("llama3.1-8b", num_layers=2) == embeddings + 2 * per_layer


def test_qwen_tokenizer_is_qwen25s(qwen_tokenizer: Any) -> None:
    tok = qwen_tokenizer
    assert len(tok) == 151_665
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # as Qwen2.5's own tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tok.convert_ids_to_tokens(151664) == "<|file_sep|>"
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    # every rank: the same byte string under the same id (GPT-2's byte -> character mapping)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = tok.get_vocab()
    assert all(vocab["".join(chars[b] for b in t)] == r for t, r in shapes.qwen_ranks().items())
    # and the same encoding as tiktoken (the ranks' reference encoder) on unicode text
    ids = tok.encode(TEXT)
    assert ids == tiktoken_encoding(151_643).encode(TEXT)
    assert tok.decode(ids) == TEXT


def test_qwen_chat_template_is_chatml(qwen_tokenizer: Any) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = qwen_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = qwen_tokenizer.apply_chat_template(own, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_llama_tokenizer_is_128256_ids_of_truncated_qwen_ranks() -> None:
    tok = shapes.build_tokenizer("llama3.1-8b")
    assert len(tok) == 128_256
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"]) == [128000, 128009]
    assert tok.convert_ids_to_tokens(128255) == "<|reserved_special_token_247|>"
    ids = tok.encode(TEXT)
    assert ids[0] == 128000 and ids[1:] == tiktoken_encoding(128_000).encode(TEXT)
    assert max(ids[1:]) < 128_000 and tok.decode(ids, skip_special_tokens=True) == TEXT
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert chat.endswith("Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def narrow(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The shape with hidden 64 (the vocabulary and tokenizer stay real): builds in seconds."""
    spec = shapes.SHAPES[name]
    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    small |= {"num_key_value_heads": 2, "head_dim": 16} if "head_dim" in spec.config else {}
    monkeypatch.setitem(
        shapes.SHAPES, name, dataclasses.replace(spec, config={**spec.config, **small})
    )


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_a_built_folder_loads_and_is_reused(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    narrow(monkeypatch, name)
    out = shapes.build_shaped_model(tmp_path / "m", name, num_layers=1, dtype="bfloat16", seed=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    spec = shapes.SHAPES[name]
    assert type(model).__name__ == spec.architecture and model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 1 and len(tok) == spec.ranks + len(spec.added)
    assert model.config.vocab_size >= len(tok) and tok.eos_token == spec.eos
    std = model.get_input_embeddings().weight.float().std().item()
    assert std == pytest.approx(0.02, rel=0.05)  # HF's init with initializer_range
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert eos == tok.convert_tokens_to_ids(list(spec.generation_eos))
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    record = json.loads((out / "shape.json").read_text())
    assert (record["shape"], record["num_layers"], record["seed"]) == (name, 1, 3)
    # the same settings (here from the command line): the folder as it is; others: refused
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    argv = [str(out), "--shape", name, "--num-layers", "1", "--dtype", "bfloat16", "--seed", "3"]
    assert shapes.main(argv) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert f"{out}: " in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="was not built with"):
        shapes.build_shaped_model(out, name, num_layers=1, dtype="bfloat16", seed=4)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape must be one of"):
        shapes.build_shaped_model(tmp_path, "gpt-5")
    with pytest.raises(ValueError, match="dtype must be one of"):
        shapes.build_shaped_model(tmp_path, "qwen2.5-0.5b", dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers must be"):
        shapes.build_shaped_model(tmp_path, "qwen2.5-0.5b", num_layers=0)
