"""A mixture of frozen teachers: their softened probabilities mixed into one teacher of logits.

``rule`` chooses the per-teacher weights ``w_i`` (see :mod:`darkknowledge.teachers.mix` for the
math and the papers): ``mean`` (Hinton et al. 2015: an ensemble's soft targets are the
arithmetic mean of its members' distributions), ``weighted`` (fixed weights, normalised), or
``confidence`` (per sample: ``ce`` = CA-MKD, ``entropy`` = EBKD, ``correct``). The mixed
teacher's logits are ``z_mix = T * log(sum_i w_i softmax(z_i / T))``, so every response loss
that softens the teacher at ``T`` reads exactly the mixture. It has no features: feature
losses need one objective per teacher (``multi_teacher``'s ``per_teacher`` or ``random``).

Each member is a :class:`~darkknowledge.teachers.frozen.Frozen` teacher (listed by
``members()``), so caching and running ahead work per member as for any frozen teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs, class_logits
from darkknowledge.teachers.base import Teacher, Views
from darkknowledge.teachers.frozen import Frozen
from darkknowledge.teachers.mix import confidence_weights, fixed_weights, mixture_logits, stack_logits

Rule = Literal["mean", "weighted", "confidence"]
RULES = ("mean", "weighted", "confidence")


class Mixture(Teacher):
    """Several frozen teachers as one teacher of mixed soft labels.

    Args:
        members: ``N >= 2`` frozen teachers predicting the same classes.
        rule: ``mean``, ``weighted`` or ``confidence``.
        weights: ``weighted``: one weight >= 0 per member (normalised).
        confidence: ``confidence``: ``ce`` (CA-MKD), ``entropy`` (EBKD) or ``correct``.
        T: The temperature at which the probabilities are mixed (set it to the temperature of
            the losses the mixture feeds; ``None`` until then).
    """

    standalone = True
    without_features = (
        "give each teacher its own loss and adapters: multi_teacher aggregation 'per_teacher' "
        "(one loss per teacher, averaged) or 'random' (one teacher per step)"
    )

    def __init__(
        self,
        members: Sequence[Frozen],
        rule: Rule = "mean",
        weights: Sequence[float] | None = None,
        confidence: str = "ce",
        T: float | None = None,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ConfigError(f"mixture rule {rule!r} is unknown; valid: {', '.join(RULES)}")
        self.teachers = list(members)
        n = len(self.teachers)
        self.name = "+".join(m.name for m in self.teachers)
        self.rule, self.confidence, self.T = rule, confidence, T
        self.fixed = fixed_weights(weights or (), n) if rule == "weighted" else torch.full((n,), 1.0 / n)  # (N,)

    @property
    def kind(self) -> str:
        return f"the {self.rule} mixture of the teachers {[m.name for m in self.teachers]}"

    def request(self, logits: bool, taps: tuple[str, ...]) -> None:
        if taps:
            raise ConfigError(
                f"{self.kind} mixes their soft labels into one teacher of logits only, but a loss reads "
                f"teacher features {list(taps)}; {self.without_features}"
            )
        super().request(logits, ())
        for m in self.teachers:
            m.request(True, ())

    def weights(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-teacher weights, ``(N,)`` or per sample ``(N, B)``."""
        if self.rule == "confidence":
            return confidence_weights(logits, labels, self.confidence)
        return self.fixed.to(logits.device)

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        if self.T is None:
            raise RuntimeError("Mixture.T is not set: the temperature at which the teachers are mixed")
        logits = stack_logits(
            [class_logits(m(batch, views), "a mixture of teachers") for m in self.teachers]
        )  # (N, B, K)
        return Outputs(logits=mixture_logits(logits, self.weights(logits, batch.y), self.T))  # (B, K)

    def members(self) -> list[Teacher]:
        return list(self.teachers)
