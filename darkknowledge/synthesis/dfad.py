"""DFAD: a generator looks for inputs where student and teacher disagree most.

Fang, Song, Shen, Wang, Chen & Song, "Data-Free Adversarial Distillation", arXiv:1912.11006
(2019), Sec. 3. The model discrepancy is the mean absolute error of the logits over the
generated inputs ``x = G(z)``::

    D(T, S) = E_z [ (1/K) || T(G(z)) - S(G(z)) ||_1 ]         (logits (B, K); loss ``logit_l1``)

The imitation stage trains the student to minimise it (the recipe's losses: ``logit_l1``); the
generation stage trains the generator to maximise it, ``L_G = -D``, with gradients through the
teacher and the student. The discrepancy here is a ``losses:`` mapping (default
``{logit_l1: {}}``; :mod:`darkknowledge.synthesis.adversarial`).

As in the authors' code (VainF/Data-Free-Adversarial-Distillation, ``DFAD_cifar.py``,
``DFAD_mnist.py``): five student iterations per generator iteration (``every = 5`` here: one
generator step per five batches, each batch one student step), each student iteration on a fresh
``z`` (``sample`` makes a new ``G(z)``), ``nz = 256`` on CIFAR (100 on MNIST), the generator's
Adam at ``lr_G = 1e-3``, the student's SGD at 0.1 (CIFAR; 0.01 on MNIST, momentum 0.9, weight decay
5e-4 / 1e-4: the stage's ``train.optimizer``), the generator ``GeneratorA`` (DAFL's, batch-norm
``eps`` at torch's default; :mod:`darkknowledge.synthesis.generators`). Their code steps the five
student iterations first, then the generator; here the generator steps first in its batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.config import OptimizerConfig, losses_default
from darkknowledge.data.batch import Batch
from darkknowledge.synthesis.adversarial import (
    AdversarialParams,
    AdversarialSynthesizer,
)
from darkknowledge.synthesis.base import register_synthesizer
from darkknowledge.synthesis.generators import GENERATOR


class DfadParams(AdversarialParams):
    """DFAD's parameters (defaults: the authors' CIFAR code)."""

    latent_dim: int = Field(default=256, ge=1, description="width of the codes z (code: 256 CIFAR, 100 MNIST)")
    every: int = Field(
        default=5, ge=1, description="one generator step per this many batches, i.e. student steps (code: 5)"
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3),
        description="the generator's optimizer (code: Adam, lr 1e-3)",
    )
    discrepancy: dict[str, dict[str, Any] | None] = Field(
        default_factory=losses_default({"logit_l1": {}}),
        description="what the generator maximises: a losses mapping on logits (paper: MAE, logit_l1)",
    )


@register_synthesizer("dfad")
class Dfad(AdversarialSynthesizer):
    """DFAD (Fang et al., 2019): ``G`` maximises the teacher-student logit MAE; the student minimises it."""

    citation = "Fang, Song, Shen, Wang, Chen, Song. Data-Free Adversarial Distillation. arXiv:1912.11006, 2019."
    summary = "adversarial generator maximising the teacher-student logit discrepancy (MAE)"
    Params = DfadParams
    example: ClassVar[dict[str, Any]] = {"latent_dim": 8, "width": 0.125, "every": 2}
    params: DfadParams

    def generator_every(self) -> int:
        return self.params.every

    def part_loss(self, part: str, latent: Batch, student: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generation stage: ``-D`` on ``G(latent.z)``, gradients through teacher and student."""
        if part != GENERATOR:
            return super().part_loss(part, latent, student)
        return self.adversarial_loss(latent, student)

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """A fresh ``G(z)`` of this latent batch, no gradient (a new ``z`` for every student step)."""
        with torch.no_grad():
            return self.generate(latent)
