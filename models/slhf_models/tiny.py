"""Tiny, randomly initialised Hugging Face model folders: test fixtures and the demo model.

``build_tiny_model(out_dir)`` writes a complete model folder that both ``transformers`` and vLLM
load (vLLM on CPU included), in a few seconds and without any download::

    out_dir/
      config.json  generation_config.json  model.safetensors    # 2 layers, hidden 128
      tokenizer.json  tokenizer_config.json  chat_template.jinja # byte-level BPE + ChatML
      slhf.json                                                  # the weights manifest
      leader-lora/  follower-lora/                               # only with adapters=True

The model is random (seeded: the same seed gives the same weights), so its text is gibberish
and it almost never samples EOS (expect finish_reason "length"; use ``stop`` or ``max_tokens``
in tests). Under greedy decoding near-tied logits make exact text depend on the kernels (vLLM
with and without ``enable_lora`` can diverge after a dozen tokens). Still, it is a real model:
prompt templates, tokenisation, stop tokens, LoRA and the whole serving path run as they do with
a trained model. Sizes respect vLLM's CPU limits (head_dim 64; its CPU attention rejects < 32).
Weights are bfloat16, which vLLM on CPU runs anyway; load with ``dtype=torch.float32`` to train.

The tokenizer is trained here, on a small English corpus generated in code, so it is the same
for every seed and family. ``<|im_end|>`` ends a turn and is the EOS token.

With ``adapters=True`` two PEFT-format LoRA adapters are written by hand (no ``peft`` needed),
with random non-zero ``A`` and ``B`` large enough that base, leader and follower decode
differently, and the manifest serves them as topology "lora".

Usage::

    from slhf_models.tiny import build_tiny_model, random_model_dir
    path = build_tiny_model(tmp_path / "m", family="qwen2", adapters=True, seed=1)
    path = random_model_dir()         # a random tiny llama, built once into the cache

    python -m slhf_models.tiny OUT_DIR [--family qwen2] [--adapters] [--seed 1] [--no-chat-template]

Builds are atomic (a temporary sibling folder renamed into place) and serialised by a lock file,
so concurrent test workers can ask for the same folder. torch and transformers are imported only
when a model is built.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slhf_models.serving.manifest import (
    Manifest,
    ManifestError,
    RoleSpec,
    SamplingDefaults,
    TemplateSpec,
)

#: Bump when the factory's output changes, so cached default models are rebuilt.
FACTORY_VERSION = 2
#: Model families the factory builds, with their HF architecture.
FAMILIES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
#: vLLM on CPU downcasts float32 checkpoints to bfloat16 (with a warning per tensor).
DTYPE = "bfloat16"
VOCAB_SIZE = 1024  # the corpus supports ~1,035 tokens; a multiple of 64
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CONFIG = {
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    # HF's default 0.02 leaves the tied embedding dominant: greedy decoding then repeats the
    # last prompt token whatever the prompt. 0.2 gives prompt-dependent (random) text.
    "initializer_range": 0.2,
}
#: Shapes by size: "tiny" for tests (~0.4M parameters); "demo" for the shipped Condorcet model
#: (~0.6M parameters: three layers of four 32-wide heads, two key/value heads in every family,
#: which copies the prompt's names where "tiny" did not, docs/demo.md). A size may set
#: ``num_key_value_heads``; else the family's default (``_KV_HEADS``) applies.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 128,
        "num_attention_heads": 2,  # head_dim 64
        "num_hidden_layers": 2,
        "intermediate_size": 256,
    },
    "demo": {
        "hidden_size": 128,
        "num_attention_heads": 4,  # head_dim 32, the least vLLM's CPU attention takes
        "num_key_value_heads": 2,
        "num_hidden_layers": 3,
        "intermediate_size": 256,
    },
}
_KV_HEADS = {"llama": 1, "qwen2": 2}

LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "v_proj", "o_proj")
LORA_STD = 0.15  # std of A and B entries: scaled delta-W std ~ 0.13, large next to the base's
ADAPTERS = {"leader": "leader-lora", "follower": "follower-lora"}
_ADAPTER_SEED_OFFSET = {"leader": 1_000_003, "follower": 2_000_003}


# -- public API ------------------------------------------------------------------------------
def build_tiny_model(
    out_dir: str | os.PathLike[str],
    family: str = "llama",
    *,
    seed: int = 0,
    size: str = "tiny",
    adapters: bool = False,
    chat_template: bool = True,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a tiny random model folder at ``out_dir`` and return its path.

    An existing folder with a valid ``slhf.json`` is returned unchanged unless ``overwrite``.
    An existing non-empty folder without one is an error unless ``overwrite``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    out = Path(out_dir).absolute()
    manifest = tiny_manifest(
        family, seed=seed, size=size, adapters=adapters, chat_template=chat_template, name=name
    )
    if not overwrite and _is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        if not overwrite and _is_built(out):  # another process built it while we waited
            return out
        if out.exists() and not overwrite and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and holds no slhf.json; pass overwrite=True to replace it"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_model(
                tmp, family, seed=seed, size=size, adapters=adapters, chat_template=chat_template
            )
            manifest.save(tmp)
            _make_readable(tmp)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def cache_dir() -> Path:
    """``$SLHF_CACHE_DIR``, else ``$XDG_CACHE_HOME/slhf``, else ``~/.cache/slhf``."""
    if explicit := os.environ.get("SLHF_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "slhf"


def random_model_dir(*, build: bool = True) -> Path:
    """A tiny random llama in the cache, built on first use (tests, benchmarks: it rarely stops).

    ``build=False`` only returns the path (the folder may not exist yet).
    """
    path = cache_dir() / f"tiny-llama-v{FACTORY_VERSION}"
    return build_tiny_model(path, family="llama", seed=0) if build else path


# -- folder handling -------------------------------------------------------------------------
def _is_built(out: Path) -> bool:
    try:
        Manifest.load(out)
    except ManifestError:
        return False
    return True


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only modes; a model folder is for everyone."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- tokenizer -------------------------------------------------------------------------------
_WORDS = {
    "subject": "cat dog student neighbour engineer team leader follower writer model child doctor "
    "robot teacher city river farmer pilot artist scientist baker driver nurse judge poet "
    "friend company library village committee musician gardener captain reader",
    "verb": "reads writes improves explains builds answers finds likes follows leads checks "
    "measures describes repairs plans paints carries opens closes teaches learns compares "
    "chooses sells buys cooks cleans visits remembers forgets translates summarises",
    "adjective": "short long simple clear new old small large quiet bright careful friendly "
    "honest quick slow green blue red warm cold famous strange useful better previous "
    "original complete wooden golden ancient modern gentle",
    "object": "story answer report question bridge apple weather summary map letter result "
    "garden song recipe window mountain problem lesson picture machine table river book "
    "computer language market ticket flower planet museum argument sentence",
    "tail": "every morning|before lunch|with great care|in the evening|again|for the first time|"
    "without any help|at the station|very quickly|because it matters|as if it was new|"
    "in two steps|on Monday|after the rain|during the winter|near the harbour|"
    "for the whole family|until midnight|in a few words|step by step",
    "question": "What is|Why does|How can|Where is|When will|Who wrote|Which answer is|"
    "Can you explain|Please describe|Tell me about|Is there|How many",
}
_FIXED_LINES = (
    "Improve the previous answer. Phrase it as if it was the original response.",
    "You are a helpful assistant.",
    "Hello! How can I help you today?",
    "Sure, here is a better answer: the result is correct.",
    "def add(a, b):\n    return a + b",
    "Sure! Here is the answer. Sure! Let me work it out step by step.",
    '{"name": "tiny", "rounds": 2, "ok": true}',
)


def training_corpus(n_sentences: int = 800) -> list[str]:
    """A deterministic English corpus of varied short sentences, questions and sums."""
    rng = random.Random(20261126)
    words = {k: v.split("|" if k in ("tail", "question") else None) for k, v in _WORDS.items()}

    def pick(kind: str) -> str:
        return rng.choice(words[kind])

    lines = list(_FIXED_LINES)
    for _ in range(n_sentences):
        kind = rng.random()
        noun = f"the {pick('adjective')} {pick('object')}"
        if kind < 0.5:
            lines.append(f"The {pick('subject')} {pick('verb')} {noun} {pick('tail')}.")
        elif kind < 0.75:
            lines.append(f"{pick('question')} {noun} {pick('tail')}?")
        elif kind < 0.9:
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            lines.append(f"The {pick('subject')}s counted {a} + {b} = {a + b} {pick('object')}s!")
        else:
            lines.append(f'{pick("subject").capitalize()}: "{pick("adjective")}, {pick("tail")}"')
    for _ in range(
        n_sentences // 8
    ):  # the arithmetic task's phrasing (models/slhf_models/tasks/arith.py)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"Add {a} and {b}. What is {a} plus {b}? {a} plus {b} is {a + b}.")
        lines.append(f"Subtract {b} from {a}. What is {a} minus {b}? {a} minus {b} is {a - b}.")
    return lines


def build_tokenizer(chat_template: bool = True) -> Any:
    """Train the byte-level BPE tokenizer; return it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits are single tokens (as in Qwen2's and Llama's tokenizers): "17" and " 17" then share
    # their digits, which a model that must copy and add numbers needs.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=_CONFIG["max_position_embeddings"],
        chat_template=CHATML_TEMPLATE if chat_template else None,
    )


# -- model and adapters ----------------------------------------------------------------------
@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _write_model(
    out: Path, family: str, *, seed: int, size: str, adapters: bool, chat_template: bool
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(chat_template)
    tokenizer.save_pretrained(out)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        architectures=[FAMILIES[family]],
        **{"num_key_value_heads": _KV_HEADS[family], **SIZES[size]},
        **_CONFIG,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):  # seed locally; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    with _quiet_progress_bars():
        model.save_pretrained(out)
    if adapters:
        weights = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for role, folder in ADAPTERS.items():
            write_lora_adapter(out / folder, weights, seed=seed + _ADAPTER_SEED_OFFSET[role])


def lora_tensors(weight_shapes: dict[str, tuple[int, ...]], *, seed: int) -> dict[str, Any]:
    """Random PEFT LoRA tensors for the ``LORA_TARGETS`` among ``weight_shapes``.

    ``weight_shapes`` maps base weight names (``model.layers.0.self_attn.q_proj.weight``) to
    ``(out_features, in_features)``; keys come out PEFT-style
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(weight_shapes.items()):
        module = key.removesuffix(".weight")
        if module == key or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        out_features, in_features = shape
        prefix = f"base_model.model.{module}"
        a = torch.randn(LORA_RANK, in_features, generator=gen) * LORA_STD  # (r, in)
        b = torch.randn(out_features, LORA_RANK, generator=gen) * LORA_STD  # (out, r)
        tensors[f"{prefix}.lora_A.weight"] = a.to(getattr(torch, DTYPE))
        tensors[f"{prefix}.lora_B.weight"] = b.to(getattr(torch, DTYPE))
    return tensors


def write_lora_adapter(
    folder: Path, weight_shapes: dict[str, tuple[int, ...]], *, seed: int
) -> None:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(lora_tensors(weight_shapes, seed=seed), str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "..",  # the model folder holding this adapter
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tiny_manifest(
    family: str,
    *,
    seed: int,
    adapters: bool,
    chat_template: bool,
    size: str = "tiny",
    name: str | None = None,
) -> Manifest:
    """The ``slhf.json`` of a tiny model: "shared" topology, or "lora" with adapters."""
    sampling = SamplingDefaults(max_tokens=32, temperature=0.9, top_k=50)
    return Manifest(
        name=name or f"slhf-tiny-{family}" + ("-lora" if adapters else ""),
        base_model=".",
        leader=RoleSpec(adapter=ADAPTERS["leader"] if adapters else None, sampling=sampling),
        follower=RoleSpec(adapter=ADAPTERS["follower"] if adapters else None, sampling=sampling),
        template=TemplateSpec(layout="chat" if chat_template else "plain"),
        default_rounds=2,
        max_model_len=_CONFIG["max_position_embeddings"],
        provenance={
            "producer": "slhf_models.tiny",
            "family": family,
            "seed": seed,
            "size": size,
            "format": "hf-safetensors",
            "dtype": DTYPE,
            "factory_version": FACTORY_VERSION,
        },
    )


# -- CLI -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slhf_models.tiny", description="Build a tiny random SLHF model folder."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=list(FAMILIES), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--adapters", action="store_true", help="add leader/follower LoRAs")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    parser.add_argument("--name", help="manifest name (default: slhf-tiny-FAMILY[-lora])")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing folder")
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out_dir,
        args.family,
        seed=args.seed,
        size=args.size,
        adapters=args.adapters,
        chat_template=args.chat_template,
        name=args.name,
        overwrite=args.overwrite,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
