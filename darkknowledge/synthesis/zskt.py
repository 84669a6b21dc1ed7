"""ZSKT: adversarial belief matching, a generator maximising KL(teacher || student).

Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS
2019 (arXiv:1905.09768), Sec. 3 and Algorithm 1. For pseudo inputs ``x_p = g(z; phi)``::

    L_G = -D_KL( T(x_p) || S(x_p) )                                  (generator, ascends the KL)
    L_S =  D_KL( T(x_p) || S(x_p) ) + beta * sum_l L_AT^(l)          (student; beta = 250)

with the KL at temperature 1. The student's side is the recipe's losses (``kd`` with ``T: 1,
alpha: 1`` and ``at`` with weight 250); the generator's is ``-discrepancy`` (default
``{kd: {T: 1, alpha: 1}}``; :mod:`darkknowledge.synthesis.adversarial`).

As in the authors' code (polo5/ZeroShotKnowledgeTransfer, ``solver.py``, ``utils/loaders.py``,
``scripts/ZeroShot/main0.sh``): one code batch ``z`` serves ``n_g = 1`` generator step and then
``n_s = 10`` student steps (CIFAR-10; ``main.py``'s default is 7), after which a new ``z`` is
drawn; ``z_dim = 100``, batch 128, Adam at 1e-3 for the generator (2e-3 for the student), both
on a cosine schedule (the stage's default), gradients clipped at norm 5 (the stage's
``train.clip_grad_norm``, which covers every part).

* Here the generator steps on every ``student_steps``-th batch; that batch and the
  ``student_steps - 1`` after it train the student on one stashed batch made from the
  generator step's ``z``. Their loader recomputes ``g(z)`` with the *updated* generator for
  every student iteration (the same ``z``, the same output each time): the stash is ``g(z)``
  made once, right after the generator's step, with no gradient.
* The authors' KL is ``F.kl_div(..., reduction='mean')``, an average over batch *and* classes
  (the batch-mean KL divided by ``K``); ``kd`` here averages over the batch only. The generator's
  Adam step barely depends on that constant; the student's weights (``at: 250``) were tuned
  against the authors' scale.
* Their generator (:mod:`darkknowledge.synthesis.generators`) has no Tanh and grows
  10 -> 16 -> 32 (upsampling by 1.6, then 2); this one has no Tanh and grows 8 -> 16 -> 32.
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


class ZsktParams(AdversarialParams):
    """ZSKT's parameters (defaults: the authors' CIFAR-10 script)."""

    latent_dim: int = Field(default=100, ge=1, description="width of the codes z (code: 100)")
    student_steps: int = Field(
        default=10,
        ge=1,
        description="student steps per generator step, all on the batch that step made (code: n_s = 10 on CIFAR-10)",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3),
        description="the generator's optimizer (code: Adam, lr 1e-3)",
    )
    discrepancy: dict[str, dict[str, Any] | None] = Field(
        default_factory=losses_default({"kd": {"T": 1.0, "alpha": 1.0}}),
        description="what the generator maximises: a losses mapping on logits (paper: KL(T||S) at T=1)",
    )


@register_synthesizer("zskt")
class Zskt(AdversarialSynthesizer):
    """ZSKT (Micaelli & Storkey, 2019): ``G`` maximises ``KL(T || S)``; ``student_steps`` student steps
    follow each generator step on one batch made from that step's codes."""

    citation = (
        "Micaelli, Storkey. Zero-shot Knowledge Transfer via Adversarial Belief Matching. "
        "NeurIPS 2019 (arXiv:1905.09768)."
    )
    summary = "adversarial generator maximising KL(teacher || student); several student steps per generated batch"
    Params = ZsktParams
    example: ClassVar[dict[str, Any]] = {"latent_dim": 8, "width": 0.125, "student_steps": 2}
    tanh = False
    stash: torch.Tensor  # a buffer
    params: ZsktParams

    def __init__(self, params: ZsktParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self._z: torch.Tensor | None = None  # (B, latent_dim): the codes of the last generator step
        # (B, *input_shape): G(_z) after that step, made on first use; a buffer, so a resumed run
        # trains on the very batch the interrupted one had (its shape is known at the first step)
        self.register_buffer("stash", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "stash")
        if saved is not None and saved.shape != self.stash.shape:
            self.stash = torch.empty_like(saved, device=self.stash.device)  # then filled by the default loader
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def generator_every(self) -> int:
        return self.params.student_steps

    def part_loss(self, part: str, latent: Batch, student: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``-KL(T || S)`` on ``G(latent.z)``; the batch's codes are kept for the next student steps."""
        if part != GENERATOR:
            return super().part_loss(part, latent, student)
        loss, terms = self.adversarial_loss(latent, student)
        self._z, self.stash = latent.x.detach(), self.stash.new_zeros(0)  # remade after this step's update
        return loss, terms

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """``G(z)`` of the last generator step's codes, made once after its update and reused until the
        next generator step; before any generator step (e.g. right after a resume) this latent
        batch's codes start the stash."""
        if self.stash.numel() and self.stash.shape[0] == len(latent) and self.stash.device == latent.x.device:
            return self.stash
        if self._z is None or self._z.shape[0] != len(latent) or self._z.device != latent.x.device:
            self._z = self.codes(latent).detach()
        with torch.no_grad():
            self.stash = self.generator(self._z)  # (B, *input_shape)
        return self.stash

    def describe(self) -> dict[str, Any]:
        p: ZsktParams = self.params
        return {**super().describe(), "student_steps": p.student_steps}
