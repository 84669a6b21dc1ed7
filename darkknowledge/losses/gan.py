"""GAN objectives on discriminator scores, shared by the adversarial losses (registers nothing).

The teacher's outputs are the *real* samples, the student's the *fake* ones; a score is the
discriminator's raw output (a logit, no sigmoid). For real scores ``r`` and fake scores ``f``
(each ``(B,)``), batch means:

* ``non_saturating`` — Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville &
  Bengio, "Generative Adversarial Nets", NeurIPS 2014, Eq. 1 for D and the non-saturating
  generator of Sec. 3 (maximise ``log D(G(z))`` instead of minimising ``log(1 - D(G(z)))``)::

      L_D = -log sigma(r) - log(1 - sigma(f)) = softplus(-r) + softplus(f)
      L_G = -log sigma(f)                     = softplus(-f)

* ``hinge`` — Lim & Ye, "Geometric GAN", arXiv:1705.02894, 2017; Miyato, Kataoka, Koyama &
  Yoshida, "Spectral Normalization for Generative Adversarial Networks", ICLR 2018 (hinge loss)::

      L_D = relu(1 - r) + relu(1 + f)
      L_G = -f

* ``least_squares`` — Mao, Li, Xie, Lau, Wang & Smolley, "Least Squares Generative Adversarial
  Networks", ICCV 2017, Eq. 2 with the 0-1 coding ``a = 0`` (fake), ``b = c = 1`` (real)::

      L_D = 1/2 (r - 1)^2 + 1/2 f^2
      L_G = 1/2 (f - 1)^2

Minima: ``non_saturating`` D -> 0 as ``r -> +inf, f -> -inf`` (``2 log 2`` at ``r = f = 0``);
``hinge`` D = 0 once ``r >= 1`` and ``f <= -1``; ``least_squares`` D = 0 at ``r = 1, f = 0``
and G = 0 at ``f = 1``. Scores in fp16/bf16 are computed in float32. An empty batch (an uneven
DDP share) gives 0, not 0/0.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from darkknowledge.config import OptimizerConfig
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.validation import format_validation_error

GanKind = Literal["non_saturating", "hinge", "least_squares"]
GAN_KINDS: tuple[str, ...] = ("non_saturating", "hinge", "least_squares")


def dcgan_adam() -> OptimizerConfig:
    """Adam, lr ``2e-4``, betas ``(0.5, 0.999)``: the discriminator optimizer of Radford, Metz &
    Chintala, "Unsupervised Representation Learning with Deep Convolutional GANs", ICLR 2016, Sec. 4."""
    return OptimizerConfig(name="adam", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0)


def optimizer_config(value: OptimizerConfig | dict | None, where: str) -> OptimizerConfig | None:
    """An :class:`OptimizerConfig` from a config or a mapping (a recipe's ``d_optimizer``)."""
    if value is None or isinstance(value, OptimizerConfig):
        return value.model_copy() if value is not None else None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an optimizer mapping such as {{name: adam, lr: 2.0e-4}}, got {value!r}")
    try:
        return OptimizerConfig.model_validate(value)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def check_kind(kind: str) -> None:
    """Raise ``ConfigError`` unless ``kind`` is one of :data:`GAN_KINDS`."""
    if kind not in GAN_KINDS:
        raise ConfigError(f"gan kind {kind!r} is not one of {', '.join(GAN_KINDS)}")


def _scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    """``(B,)`` or ``(B, 1)`` scores as ``(B,)``, in float32 when half precision."""
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores.squeeze(1)
    if scores.dim() != 1:
        raise ShapeError(f"{name} scores must be (B,) or (B, 1), one per sample; got {tuple(scores.shape)}")
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the batch; 0 (with a gradient path) for an empty batch."""
    return values.sum() / max(1, values.numel())


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss: teacher scores ``r`` are real, student scores ``f`` fake.

    Args:
        real_scores: ``D(teacher)``, ``(B_r,)`` or ``(B_r, 1)``.
        fake_scores: ``D(student)``, ``(B_f,)`` or ``(B_f, 1)``.
        kind: ``non_saturating`` (BCE), ``hinge`` or ``least_squares`` (see module docstring).

    Returns:
        Scalar: the real part's batch mean plus the fake part's batch mean.

    Raises:
        ConfigError: Unknown ``kind``.
        ShapeError: Scores not one per sample.
    """
    check_kind(kind)
    r, f = _scores(real_scores, "real"), _scores(fake_scores, "fake")
    if kind == "non_saturating":  # -log sigma(r) - log(1 - sigma(f))
        return _mean(F.softplus(-r)) + _mean(F.softplus(f))
    if kind == "hinge":
        return _mean(F.relu(1.0 - r)) + _mean(F.relu(1.0 + f))
    return 0.5 * _mean((r - 1.0).pow(2)) + 0.5 * _mean(f.pow(2))  # least_squares


def generator_loss(fake_scores: torch.Tensor, kind: str) -> torch.Tensor:
    """The student's (generator's) loss on the discriminator's scores of its outputs.

    Args:
        fake_scores: ``D(student)``, ``(B,)`` or ``(B, 1)``.
        kind: ``non_saturating`` (``-log sigma(f)``), ``hinge`` (``-f``) or ``least_squares``
            (``1/2 (f - 1)^2``).

    Returns:
        Scalar batch mean.

    Raises:
        ConfigError: Unknown ``kind``.
        ShapeError: Scores not one per sample.
    """
    check_kind(kind)
    f = _scores(fake_scores, "fake")
    if kind == "non_saturating":
        return _mean(F.softplus(-f))
    if kind == "hinge":
        return _mean(-f)
    return 0.5 * _mean((f - 1.0).pow(2))  # least_squares


__all__ = [
    "GAN_KINDS",
    "GanKind",
    "check_kind",
    "dcgan_adam",
    "discriminator_loss",
    "generator_loss",
    "optimizer_config",
]
