"""The adversarial game of DFAD and ZSKT: a generator maximises a teacher-student discrepancy.

Both papers train the generator on ``L_G = -D(T(G(z)), S(G(z)))`` while the student minimises
``D`` (plus the recipe's other terms) on generated inputs:

* DFAD (Fang et al., arXiv:1912.11006, 2019): ``D`` = the mean absolute error of the logits
  (the registered loss ``logit_l1``);
* ZSKT (Micaelli & Storkey, NeurIPS 2019): ``D`` = ``KL(p_T || p_S)`` at ``T = 1`` (``kd`` with
  ``alpha = 1``).

The discrepancy is a ``losses:`` mapping like a recipe's (the math lives in registered losses),
evaluated on logits only: ``Outputs(logits=S(x))`` and ``Outputs(logits=T(x))``, both with
gradients to ``x`` (the generator's gradient runs through the teacher *and* the student; the
student stays in train mode, as in both authors' code, so its batch norms see the generator's
batch; the engine drops the gradient its parameters get from this step). Terms
that read features, labels or sample indices, or that bring trainable adapters, are refused, and
so are schedules other than a constant ``weight`` (a generator's step has no epoch progress).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from darkknowledge.config import losses_default
from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError, RegistryError
from darkknowledge.losses.base import Outputs, SetupInfo, run_model
from darkknowledge.losses.objective import Objective, TermSchedule
from darkknowledge.synthesis.generators import GeneratorParams, GeneratorSynthesizer

WHERE = "synthesizer.params.discrepancy"


def build_discrepancy(losses: Mapping[str, Mapping[str, Any] | None], where: str = "discrepancy") -> Objective:
    """The discrepancy objective of a ``losses:``-style mapping, its terms checked.

    Args:
        losses: ``{term: {param: value, weight: w}}``, e.g. ``{"logit_l1": {}}``.
        where: Config path for error messages.

    Raises:
        ConfigError: An unknown loss or parameter, a loss that does not read the teacher's logits,
            or a schedule key other than ``weight``.
    """
    if not isinstance(losses, Mapping) or not losses:
        raise ConfigError(
            f"{where}: give at least one loss term, e.g. {{logit_l1: {{}}}} or "
            f"{{kd: {{T: 1, alpha: 1}}}} (got {losses!r})"
        )
    try:
        objective = Objective.from_config(losses, where=where)
    except RegistryError as exc:  # a KeyError: give it the config path and make it a ConfigError
        raise ConfigError(f"{where}: {exc}") from None
    for name, term in objective.terms.items():
        spec = term.needs_spec
        if not spec.teacher_logits:
            raise ConfigError(
                f"{where}.{name}: loss {type(term).registry_name!r} does not compare the teacher's "
                "logits with the student's; a discrepancy needs one that does, e.g. logit_l1 or kd"
            )
        schedule = objective.schedules[name]
        if schedule != TermSchedule(weight=schedule.weight):
            raise ConfigError(
                f"{where}.{name}: a discrepancy term takes a constant weight only; drop "
                "warmup_epochs, warmup_shape, start_epoch and stop_epoch"
            )
    return objective


class Discrepancy(nn.Module):
    """A checked discrepancy objective, bound to the models on its first use.

    Args:
        objective: From :func:`build_discrepancy`.
        where: Config path for error messages.
    """

    def __init__(self, objective: Objective, where: str = "discrepancy") -> None:
        super().__init__()
        self.objective = objective
        self.where = where
        self._ready = False

    def _prepare(self, student: nn.Module, teacher: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
        """Bind and set up once: refuse terms that read more than logits or bring adapters."""
        for name, term in self.objective.terms.items():
            needs = term.bind(student, teacher)
            extra = [
                what
                for what, on in (
                    ("features", bool(needs.student_taps or needs.teacher_taps)),
                    ("labels", needs.labels),
                    ("sample indices", needs.indices),
                )
                if on
            ]
            if extra:
                raise ConfigError(
                    f"{self.where}.{name}: the discrepancy sees logits only, but loss "
                    f"{type(term).registry_name!r} reads {' and '.join(extra)}; use a logit loss "
                    "such as logit_l1 or kd (alpha: 1)"
                )
        info = SetupInfo(num_classes=int(t.shape[-1]), batch_size=int(t.shape[0]))
        self.objective.setup(Outputs(s.detach()), Outputs(t.detach()), info)
        if any(True for _ in self.objective.parameters()):
            raise ConfigError(
                f"{self.where}: a discrepancy term built trainable parameters (an adapter); "
                "the generator's step does not train them: use a loss without adapters"
            )
        self._ready = True

    def forward(
        self, x: torch.Tensor, student: nn.Module, teacher: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(D, {term: value})`` on inputs ``x`` ``(B, *input_shape)``, gradients to ``x`` through both models."""
        s = run_model(student, x)  # (B, K)
        t = run_model(teacher, x)  # (B, K), not detached: the generator's gradient runs through the teacher
        if not self._ready:
            self._prepare(student, teacher, s, t)
        n = x.shape[0]
        none = torch.full((n,), UNLABELED, dtype=torch.long, device=x.device)
        batch = Batch(x, none, none)  # no labels: latent target classes are not the samples' labels
        return self.objective(Outputs(s), Outputs(t), batch)


def generator_adversarial_loss(discrepancy: torch.Tensor) -> torch.Tensor:
    """``L_G = -D``: the generator ascends the discrepancy the student descends."""
    return -discrepancy


class AdversarialParams(GeneratorParams):
    """Parameters of a generator trained against the student (each method sets its default discrepancy)."""

    discrepancy: dict[str, dict[str, Any] | None] = Field(
        default_factory=losses_default({"logit_l1": {}}),
        description="what the generator maximises: a losses mapping on logits",
    )

    @field_validator("discrepancy")
    @classmethod
    def _check_discrepancy(cls, value: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any] | None]:
        build_discrepancy(value, where="discrepancy")
        return value


class AdversarialSynthesizer(GeneratorSynthesizer):
    """A generator that maximises its ``discrepancy`` between teacher and student (DFAD, ZSKT)."""

    params: AdversarialParams

    def __init__(
        self, params: AdversarialParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self.discrepancy = Discrepancy(build_discrepancy(params.discrepancy, where=WHERE), where=WHERE)

    def adversarial_loss(self, latent: Batch, student: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(-D, {term: value})`` on ``G(latent.z)``, gradients through teacher and student."""
        self.to_device_of(latent)
        x = self.generate(latent)  # (B, *input_shape)
        d, terms = self.discrepancy(x, student, self.teacher)
        return generator_adversarial_loss(d), terms

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "discrepancy": self.params.discrepancy}
