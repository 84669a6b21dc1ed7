"""The mean teacher: an exponential moving average (EMA) of the student's own weights.

Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency
targets improve semi-supervised deep learning results", NeurIPS 2017 (arXiv:1703.01780),
Sec. 2. After every optimizer step ``t`` the teacher's weights follow the student's:

    theta'_t = d_t * theta'_{t-1} + (1 - d_t) * theta_t,     d_t = min(decay, 1 - 1 / (t + 1))

(the ``1 - 1/(t+1)`` ramp is the authors' code: the teacher starts as a plain average; with
``warmup=False`` it is a constant ``d_t = decay``). The teacher sees its own noisy copy of the
input (``noise``: Gaussian input noise, its std; the paper's ``eta'``).

Floating-point buffers (BatchNorm running statistics) are averaged like the weights, integer
buffers are copied (as timm's ``ModelEmaV2``). The EMA copy is checkpointed with the task
(``state()``) with ``requires_grad=False``: never optimised, but a resume continues it exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs
from darkknowledge.taps import FeatureTaps, unwrap
from darkknowledge.teachers.base import Teacher, Views


def effective_decay(decay: float, step: int, warmup: bool = True) -> float:
    """The EMA decay ``d_t`` of update ``step`` (1-based): ``min(decay, 1 - 1/(step + 1))``, or
    ``decay`` without warm-up."""
    return min(decay, 1.0 - 1.0 / (step + 1)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * model`` for every floating-point parameter
    and buffer (same architecture); integer buffers (e.g. ``num_batches_tracked``) are copied.

    Args:
        ema: The averaged copy (updated in place).
        model: The trained model.
        decay: In ``[0, 1]`` (a float or a 0-d tensor on the models' device); 0 copies ``model``,
            1 keeps ``ema``.
    """
    ours, theirs = ema.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    if ours.keys() != theirs.keys():
        raise ShapeError("ema_update: the EMA copy and the model have different state_dict keys")
    for key, e in ours.items():
        v = theirs[key].detach()
        if e.is_floating_point():
            e.data.mul_(decay).add_(v.to(e.dtype) * (1.0 - decay))
        else:
            e.data.copy_(v)


def add_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """``x + std * N(0, 1)`` (``x`` itself when ``std`` is 0)."""
    return x + std * torch.randn_like(x) if std > 0 else x


class EMAState(nn.Module):
    """The averaged copy and its update count (both checkpointed)."""

    updates: torch.Tensor  # a buffer

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))


class EMA(Teacher):
    """An exponential moving average of ``student`` as its teacher.

    Args:
        student: The trained model (copied now: build this teacher before hooks are attached
            to the student).
        decay: EMA decay (paper: 0.99 during ramp-up, 0.999 after).
        warmup: Use ``min(decay, 1 - 1/(t+1))`` (the authors' code) instead of a constant decay.
        noise: Std of the Gaussian noise on the teacher's input.
    """

    model: nn.Module  # the averaged copy

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True, noise: float = 0.0) -> None:
        super().__init__()
        self.student = unwrap(student)
        copied = copy.deepcopy(self.student)
        copied.requires_grad_(False)
        self.ema = EMAState(copied)
        self.model = copied
        self.decay, self.warmup, self.noise = decay, warmup, noise
        self.name = "ema"
        self._taps: FeatureTaps | None = None

    @property
    def kind(self) -> str:
        return "the mean teacher (EMA of the student's weights)"

    def request(self, logits: bool, taps: tuple[str, ...]) -> None:
        super().request(logits, taps)
        if self._taps is not None:
            self._taps.remove()
        self._taps = FeatureTaps(self.model, list(self.taps), detach=True, owner=self.kind) if self.taps else None
        if self._taps is not None:
            self._taps.active = False

    @torch.no_grad()
    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        """The EMA model's outputs (eval mode, no gradient) on its own noisy copy of the input."""
        was_training = self.model.training
        self.model.eval()
        if self._taps is not None:
            self._taps.active = True
        try:
            logits = self.model(add_noise(batch.x, self.noise))  # (B, K)
        finally:
            if self._taps is not None:
                self._taps.active = False
            self.model.train(was_training)
        feats = self._taps.pop() if self._taps is not None else {}
        return Outputs(logits=logits.detach() if self.need_logits else None, features=feats)

    def after_step(self) -> None:
        """``ema <- d_t * ema + (1 - d_t) * student`` (identical on every rank)."""
        self.ema.updates += 1
        d: torch.Tensor | float
        if self.warmup:  # min(decay, 1 - 1/(t+1)) as a tensor: no host sync per step
            d = (1.0 - 1.0 / (self.ema.updates.double() + 1.0)).clamp(max=self.decay).float()
        else:
            d = self.decay
        ema_update(self.model, self.student, d)

    def state(self) -> dict[str, nn.Module]:
        return {"ema": self.ema}
