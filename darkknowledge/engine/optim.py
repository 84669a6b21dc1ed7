"""Optimizer and learning-rate schedule from config (per-step schedule with warm-up)."""

from __future__ import annotations

import math

import torch
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig


def build_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over ``module``'s trainable parameters.

    Weight decay is not applied to biases and normalisation parameters (1-D tensors).
    """
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(cfg: SchedulerConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_epochs``, then ``constant``, ``cosine`` (to
    ``min_lr_ratio``), ``step`` (x gamma every ``step_size`` epochs) or ``multistep``.
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step ``LambdaLR`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, epochs)
    )
