"""A frozen teacher: ``eval()``, no gradients, run under ``torch.inference_mode()``."""

from __future__ import annotations

import torch
from torch import nn

from darkknowledge.engine.checkpoint import state_hash
from darkknowledge.losses.base import Outputs
from darkknowledge.taps import FeatureTaps, unwrap


class FrozenTeacher:
    """Wraps a trained model so it can only teach.

    The model is put in ``eval()`` mode, its parameters get ``requires_grad=False``, and
    every forward runs under ``torch.inference_mode()``. It is deliberately *not* an
    ``nn.Module`` attribute of the trainable module, so the optimizer, DDP and the student's
    checkpoint never see it. Only the taps the losses need are hooked.

    Args:
        model: The trained teacher.
        taps: Module paths whose features the losses read.
        need_logits: Whether any loss reads the teacher's logits.
    """

    def __init__(self, model: nn.Module, taps: tuple[str, ...] = (), need_logits: bool = True) -> None:
        self.model = unwrap(model)
        self.model.eval()
        self.model.requires_grad_(False)
        self.need_logits = need_logits
        self.taps = FeatureTaps(self.model, list(taps), detach=True) if taps else None
        if self.taps is not None:
            self.taps.active = False  # record only inside __call__: other uses of the model stay untouched
        self.hash = state_hash(self.model)

    def to(self, device: torch.device) -> FrozenTeacher:
        self.model.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> Outputs:
        """Teacher outputs for inputs ``x`` ``(B, ...)``: logits ``(B, K)`` and tapped features.

        Tensors made under inference mode cannot be saved for backward; the outputs are
        cloned once outside it so losses may use them freely (a copy of logits and the
        tapped features only).
        """
        if self.model.training:  # someone called .train() on it: a teacher stays in eval
            self.model.eval()
        with torch.inference_mode():
            if self.taps is not None:
                self.taps.active = True
            try:
                logits = self.model(x)
            finally:
                if self.taps is not None:
                    self.taps.active = False
            feats = self.taps.pop() if self.taps is not None else {}
        return Outputs(
            logits=logits.clone() if self.need_logits else None,
            features={k: v.clone() for k, v in feats.items()},
        )
