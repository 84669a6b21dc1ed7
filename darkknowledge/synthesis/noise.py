"""The floor of data-free distillation: Gaussian noise in the models' normalised input space.

Inputs ``x ~ N(0, std^2 I)`` of shape ``(B, *input_shape)``: no generator, no training, no parts;
what a student learns from a teacher's answers on noise is the baseline every synthesiser must
beat. Data in the models' input space is standardised (zero mean, unit variance per channel),
so ``std = 1`` matches its scale.

The noise is the latent batch itself: ``latent_dim = prod(input_shape)`` and ``x = std * z``
reshaped, so the same ``(seed, epoch, batch)`` key draws the same inputs (a resumed run sees the
same batches; :func:`darkknowledge.synthesis.base.draw_latent`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.synthesis.base import (
    Synthesizer,
    SynthesizerParams,
    register_synthesizer,
)


def gaussian_inputs(z: torch.Tensor, input_shape: tuple[int, ...], std: float) -> torch.Tensor:
    """``std * z`` reshaped to inputs.

    Args:
        z: Standard normal codes ``(B, prod(input_shape))``.
        input_shape: One input's shape.
        std: Standard deviation of the inputs.

    Returns:
        ``(B, *input_shape)``.
    """
    return (z * std).reshape(z.shape[0], *input_shape)  # (B, *input_shape)


class NoiseParams(SynthesizerParams):
    """Parameters of the noise floor."""

    std: float = Field(
        default=1.0,
        gt=0.0,
        description="standard deviation of the inputs in the normalised "
        "input space (1: the scale of standardised data)",
    )


@register_synthesizer("noise")
class Noise(Synthesizer):
    """Inputs drawn from ``N(0, std^2 I)``: the floor every synthesiser must beat (nothing is trained)."""

    citation = "Baseline (no paper): Gaussian noise in the normalised input space."
    summary = "Gaussian noise inputs, nothing trained: the floor of data-free distillation"
    Params = NoiseParams
    example: ClassVar[dict[str, Any]] = {"std": 1.0}
    params: NoiseParams

    def __init__(self, params: NoiseParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self.latent_dim = math.prod(self.input_shape)

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """``std * z`` of this latent batch, as inputs ``(B, *input_shape)``."""
        z = latent.x  # (B, prod(input_shape))
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ShapeError(
                f"synthesizer 'noise': latent codes of shape {tuple(z.shape)}; expected "
                f"(B, {self.latent_dim}) = (B, prod(input_shape {self.input_shape}))"
            )
        return gaussian_inputs(z.detach(), self.input_shape, self.params.std)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "std": self.params.std}
