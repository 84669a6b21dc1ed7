"""Optimizer and learning-rate schedule from config (per-step schedule with warm-up)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig, TrainConfig

log = logging.getLogger(__name__)


def build_optimizer(module: nn.Module | Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over ``module``'s trainable parameters (or over these parameters).

    Weight decay is not applied to biases and normalisation parameters (1-D tensors); without
    weight decay all parameters share one group. With ``cfg.fused`` the update runs in torch's
    fused kernel when the parameters' device has one (one kernel instead of a Python loop of
    per-tensor ops: the same update rule, several times faster for small models); otherwise,
    or where it is unavailable, torch's default implementation.
    """
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for p in module.parameters() if isinstance(module, nn.Module) else module:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and cfg.weight_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        kind: Any = torch.optim.SGD
        kwargs: dict[str, Any] = {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    else:
        kind = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        kwargs = {"lr": cfg.lr, "betas": cfg.betas}
    if cfg.fused and groups:
        try:
            return kind(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError) as err:  # no fused kernel for this device/dtype
            log.debug("fused %s unavailable (%s); using the default implementation", cfg.name, err)
    return kind(groups, **kwargs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], module: nn.Module) -> None:
    """``optimizer.load_state_dict(saved)``, also from checkpoints of the older grouping.

    Before one group was used without weight decay, ``build_optimizer`` always split the
    parameters into matrices then vectors (two groups); such a state is re-indexed into this
    optimizer's single group (momentum and Adam moments follow their parameters).

    Raises:
        ValueError: The saved state fits neither grouping.
    """
    groups = saved["param_groups"]
    if len(groups) == 2 and len(optimizer.param_groups) == 1:
        params = [p for p in module.parameters() if p.requires_grad]
        old = [p for p in params if p.ndim > 1] + [p for p in params if p.ndim <= 1]  # the old saved order
        if len(old) == sum(len(g["params"]) for g in groups) == len(optimizer.param_groups[0]["params"]):
            new_index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
            saved_ids = [i for g in groups for i in g["params"]]  # flat ids in the old order
            remap = {sid: new_index[id(p)] for sid, p in zip(saved_ids, old)}
            saved = {
                "state": {remap[k]: v for k, v in saved["state"].items()},
                "param_groups": [{**groups[0], "params": sorted(remap.values())}],
            }
    optimizer.load_state_dict(saved)


def lr_factor(cfg: SchedulerConfig, step: int, steps_per_epoch: int, epochs: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_epochs``, then ``constant``, ``cosine`` (to
    ``min_lr_ratio``), ``step`` (x gamma every ``step_size`` epochs) or ``multistep``.
    ``epochs`` may be fractional: a budget of ``train.steps`` spans ``steps / steps_per_epoch``
    epochs, so the cosine reaches its floor at the last of those steps.
    """
    epoch = step / max(1, steps_per_epoch)
    warm = cfg.warmup_epochs
    if warm > 0 and epoch < warm:
        return (step + 1) / max(1.0, warm * steps_per_epoch)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        total = max(1e-8, epochs - warm)
        progress = min(1.0, (epoch - warm) / total)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "step":
        return cfg.gamma ** int(epoch // cfg.step_size)
    return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


class StepSchedule:
    """Sets every group's lr to ``base_lr * factor(step)`` after each optimizer step.

    A lean ``LambdaLR``: one Python call per step, and the groups are only written when the
    factor changes. Its state dict (``last_epoch``, ``base_lrs``) matches ``LambdaLR``'s, so
    checkpoints of either load into it.

    Args:
        optimizer: Its groups' current ``lr`` are the base rates.
        factor: Multiplier at optimizer step ``step`` (0-based).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_epoch = 0
        self._applied: float | None = None
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.last_epoch)
        if f != self._applied:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * f
            self._applied = f

    def set_factor(self, factor: Callable[[int], float]) -> None:
        """Follow ``factor`` from the current step on (the base rates stay), e.g. a schedule spanning
        a budget of ``train.steps`` instead of whole epochs."""
        self.factor = factor
        self._applied = None
        self._apply()

    def step(self) -> None:
        """Advance one optimizer step."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step. The base rates stay this schedule's own (the config's): a
        resume with a lower ``lr`` takes effect from the saved step on, not the saved rates."""
        self.last_epoch = int(state["last_epoch"])
        self._applied = None
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, steps_per_epoch: int, epochs: float
) -> StepSchedule:
    """A per-optimizer-step schedule following :func:`lr_factor`."""
    return StepSchedule(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, epochs))


def step_budget(cfg: TrainConfig, n_batches: int) -> tuple[int, int | None]:
    """``(epochs, last_step)`` of a stage with ``n_batches`` training batches per epoch.

    By epochs: ``(cfg.epochs, None)``. With ``cfg.steps``: the epochs needed for that many
    steps (``ceil(steps / steps per epoch)``, the last one cut short) and ``cfg.steps``. With
    ``cfg.min_steps``: by epochs when ``cfg.epochs`` reach that many steps, else a budget of
    ``cfg.min_steps`` steps. A stage's steps per epoch are ``ceil(n_batches / grad_accum)``:
    optimizer steps of a one-part task, batches of a task with several parts (which trains with
    ``grad_accum`` 1).
    """
    per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    steps = cfg.steps
    if steps is None and cfg.min_steps is not None and cfg.epochs * per_epoch < cfg.min_steps:
        steps = cfg.min_steps  # a small training set: the epochs would be too few steps
    if steps is None:
        return cfg.epochs, None
    return math.ceil(steps / per_epoch), steps
