"""One trainable part's optimizer step: scaling, clipping, the update, the LR schedule.

The training loop reads ``stepper.backward(loss)`` then ``stepper.step()``, or its two halves
``unscale_and_clip()`` and ``update()`` with the divergence check in between. Behind those plain
calls sit the fast paths: the update goes through :class:`~darkknowledge.engine.lean_step.LeanStep`
(torch's fused kernel called directly once the optimizer's state exists), gradients are reset
by setting them to None without ``Optimizer.zero_grad``'s per-call overhead, and the LR
schedule only writes the groups when the rate changes. Each computes what the plain path
computes (tested against it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from darkknowledge.config import TrainConfig
from darkknowledge.engine.device import make_grad_scaler
from darkknowledge.engine.lean_step import LeanStep
from darkknowledge.engine.optim import (
    build_optimizer,
    build_scheduler,
    load_optimizer_state,
)
from darkknowledge.engine.task import Part


class PartStepper:
    """The optimizer, LR schedule and (fp16) gradient scaler of one :class:`Part`.

    Args:
        part: The part (its module's trainable parameters are optimised).
        cfg: The stage's training settings (the part's own optimizer/scheduler win).
        steps_per_epoch: Optimizer steps per epoch of this part (for the LR schedule).
        device: The training device (a grad scaler only for fp16 on CUDA).
        amp: The autocast dtype, or None.
    """

    def __init__(
        self, part: Part, cfg: TrainConfig, steps_per_epoch: int, device: torch.device, amp: torch.dtype | None
    ) -> None:
        self.part = part
        self.optimizer = build_optimizer(part.parameters(), part.optimizer or cfg.optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = build_scheduler(self.optimizer, part.scheduler or cfg.scheduler, steps_per_epoch, cfg.epochs)
        self.scaler = make_grad_scaler(device, amp)
        self.clip = cfg.clip_grad_norm
        self.lean = LeanStep(self.optimizer)

    def backward(self, loss: torch.Tensor, accumulate: int = 1) -> None:
        """Backpropagate ``loss`` (divided by ``accumulate``, the batches of one step)."""
        scaled = loss / accumulate if accumulate > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self) -> None:
        """Clip, update, reset the gradients, advance the LR schedule."""
        self.unscale_and_clip()
        self.update()

    def unscale_and_clip(self) -> torch.Tensor | None:
        """Unscale the gradients (fp16 grad scaler) and clip them (``train.clip_grad_norm``).

        Returns:
            The gradients' total norm (a 0-d tensor on the device) when clipping computed it and
            no grad scaler runs, else None: a scaler skips steps with non-finite gradients
            itself, so an infinite norm there is not a divergence.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip) if self.clip is not None else None
        return norm if self.scaler is None else None

    def update(self) -> None:
        """Update (after :meth:`unscale_and_clip`), reset the gradients, advance the LR schedule."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.lean.step()
        self.zero_grad()
        self.scheduler.step()

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its per-call overhead."""
        for p in self.params:
            p.grad = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], module: nn.Module) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"], module)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.lean.reset()  # the loaded state tensors replace the ones a first step captured
