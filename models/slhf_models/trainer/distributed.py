"""How the trainer runs under several processes: ``none``, ``ddp`` or ``fsdp2`` (docs/trainer.md,
"Several processes").

- ``ddp``: accelerate's own preparation (``accelerate launch`` with a multi-GPU config, or
  torchrun with ``ACCELERATE_USE_CPU=1`` on CPUs): every process holds the whole model, gradients
  are averaged once per step.
- ``fsdp2``: asked for by accelerate's FSDP environment (``accelerate launch --config_file
  recipes/accelerate/fsdp.yaml``, which sets ``ACCELERATE_USE_FSDP=true``; ``FSDP_VERSION`` must
  be 2). The trainer shards with torch's ``fully_shard`` itself, on GPUs and CPUs alike: each
  decoder layer (the model's ``_no_split_modules``, as accelerate's transformer-based wrap) and
  then the root, over a one-dimensional mesh of every process; a full fine-tune's reference is
  sharded the same way. Sharding here rather than in ``accelerator.prepare`` gives one code path
  that is tested on CPUs (accelerate on a CPU silently runs DDP or nothing under that
  environment) and the parameters and optimizer exist only once, after sharding.
  ``FSDP_RESHARD_AFTER_FORWARD`` and accelerate's ``mixed_precision`` are honoured.
- DeepSpeed is refused: accelerate's DeepSpeed engine steps the optimizer inside ``backward``,
  which this trainer's accumulation, clipping and learning-rate schedule do not go through.

Checkpoints of a sharded run are written with ``torch.distributed.checkpoint`` (every process
writes its shards of the trainable parameters and their optimizer state); the final weights are
gathered into one unsharded copy on the main process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

Mode = Literal["none", "ddp", "fsdp2"]
_TRUE = ("1", "true", "yes")


class DistributedError(RuntimeError):
    """A launch configuration the trainer cannot run correctly."""


def fsdp_requested(accelerator: Accelerator | None = None) -> bool:
    """accelerate's FSDP environment is set, or the accelerator was built for FSDP."""
    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE


def make_accelerator(*, find_unused_parameters: bool) -> Accelerator:
    """The trainer's accelerator. Under the FSDP environment on CPUs, accelerate's own choice is
    DDP (``ACCELERATE_USE_CPU``) or no distribution at all: ask for its CPU multi-process state
    so its collectives span every process; the sharding is ours (``shard``)."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    if fsdp_requested() and not torch.cuda.is_available():
        return Accelerator(cpu=True, kwargs_handlers=[ddp])
    return Accelerator(kwargs_handlers=[ddp])


def mode_of(accelerator: Accelerator) -> Mode:
    """The run's mode; raises ``DistributedError`` for what the trainer does not support."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise DistributedError(
            "DeepSpeed is not supported: its engine steps the optimizer inside backward(), "
            "bypassing this trainer's gradient accumulation, clipping and learning-rate schedule. "
            "Use FSDP (recipes/accelerate/fsdp.yaml) or DDP (recipes/accelerate/multi_gpu.yaml)"
        )
    if fsdp_requested(accelerator):
        version = os.environ.get("FSDP_VERSION", "2")
        if version != "2":
            raise DistributedError(
                f"FSDP_VERSION {version}: the trainer shards with FSDP2 (torch's fully_shard); "
                "set fsdp_version: 2 in the accelerate config"
            )
        return "fsdp2" if accelerator.num_processes > 1 else "none"
    return "ddp" if accelerator.num_processes > 1 else "none"


def _layer_classes(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    wrap = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return names | {n.strip() for n in wrap.split(",") if n.strip()}


def mixed_precision(accelerator: Accelerator) -> Any:
    """FSDP2's policy for accelerate's ``mixed_precision``: compute in bf16/fp16 on float32
    weights, reduce gradients in float32; None without mixed precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    return None if dtype is None else MixedPrecisionPolicy(dtype, torch.float32)


def shard(model: Any, accelerator: Accelerator) -> Any:
    """``model`` sharded in place with ``fully_shard``: each decoder layer, then the root (the
    peft wrapper's base model). Parameters become DTensors on the accelerator's device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in (*_TRUE, "full_shard")
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
    policy = mixed_precision(accelerator)
    if policy is not None:
        options["mp_policy"] = policy
    classes = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise DistributedError(
            f"FSDP: no decoder layer to shard in {type(model).__name__} (looked for "
            f"{sorted(classes) or 'its _no_split_modules'}); set fsdp_transformer_layer_cls_to_wrap"
        )
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model.get_base_model() if hasattr(model, "get_base_model") else model, **options)
    return model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every process calls it); a tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


# -- checkpoints of a sharded run -----------------------------------------------------------------
def _trainable_state(model: Any, optimizer: Any, names: set[str]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": {k: v for k, v in model_state.items() if k in names}, "optim": optim_state}


def save_sharded(folder: Path, model: Any, optimizer: Any, names: set[str]) -> None:
    """Every process writes its shards of the trainable parameters and their optimizer state to
    ``folder`` (``torch.distributed.checkpoint``); a collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_trainable_state(model, optimizer, names), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: Any, optimizer: Any, names: set[str]) -> None:
    """``save_sharded``'s inverse, into the live (sharded) model and optimizer; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _trainable_state(model, optimizer, names)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )


def unsharded_copy(model: Any, rebuild: Any) -> Any | None:
    """The whole model, gathered onto the main process's CPU (a collective; None on the others).

    ``rebuild(config)`` makes the same architecture on the meta device (with the same adapters);
    the gathered weights are assigned into it, so nothing is initialised or held twice.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        copy = rebuild(base.config)
    copy.load_state_dict(state, strict=True, assign=True)
    (copy.get_base_model() if hasattr(copy, "get_base_model") else copy).tie_weights()
    return copy
