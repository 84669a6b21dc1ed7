"""FSDP2 for a frozen teacher: its weights sharded across ranks, no gradients, no optimizer state.

A teacher too large for one device's memory is split with ``torch.distributed.fsdp.fully_shard``
(FSDP2): each decoder layer is its own unit (its parameters are gathered for its forward and
freed after it), then the root holds the rest (embeddings, final norm, head). The teacher is
frozen (``requires_grad_(False)``, ``eval()``) and never enters an optimizer, so each rank keeps
``1 / world_size`` of its weights and nothing else. Every rank must run the teacher's forward
the same number of times (the loaders give each rank the same number of steps); each rank runs
it on its own share of the batch.

The students are wrapped by the engine as usual (DDP). The other way to keep a huge teacher out
of training is a teacher-output cache (:mod:`darkknowledge.teachers.token_cache`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from darkknowledge.errors import ConfigError

log = logging.getLogger(__name__)

SHARDED_ATTR = "dk_sharded"
"""Set on a model sharded here: its parameters are DTensors and must not be moved or hashed per rank."""


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: those whose class the model lists as ``_no_split_modules``
    (Hugging Face's decoder layers), else the children of its longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if units:
        return units
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    sizes = [len(m) for m in lists]
    return list(lists[sizes.index(max(sizes))])  # the first longest


def shard_frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard the frozen ``model`` in place with FSDP2 over every rank of the default process group.

    Raises:
        ConfigError: No process group is initialised (run under ``torchrun``).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "distributed.teacher=fsdp shards the teacher across processes: launch with torchrun "
            "(nproc_per_node >= 2), or use distributed.teacher=replicate"
        )
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    setattr(model, SHARDED_ATTR, True)
    log.info("teacher sharded with FSDP2 over %d ranks (%d units + root)", dist.get_world_size(), len(units))
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_frozen` sharded ``model``."""
    return bool(getattr(model, SHARDED_ATTR, False))
