"""Adversarial KD on logits: a discriminator learns to tell the teacher's logits from the student's.

Xu, Hsu & Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks", ICLR 2018 Workshop (arXiv:1709.00513;
v2: "Learning Loss for Knowledge Distillation with Conditional Adversarial Networks"). The
student is the generator, its logits ``s = S(x)`` the fake samples; the teacher's logits
``t = T(x)`` are the real ones; a small MLP ``D`` on the logits learns the loss that pulls the
student's output distribution towards the teacher's (the adversarial loss, Sec. 3)::

    min_S max_D  E_x[ log D(t) ] + E_x[ log(1 - D(s)) ]

What is implemented (``gan`` picks the objective of :mod:`darkknowledge.losses.gan`; the
default ``non_saturating`` is the paper's log loss with the usual non-saturating generator):

* the **discriminator's step** (:meth:`AdversarialKD.adversary`, its own optimizer, after each
  student step on that step's detached logits)::

      L_D = discriminator_loss(D(t)[0], D(s)[0]) + aux_weight * ( CE(D(t)[1:], y) + CE(D(s)[1:], y) )

* the **student's term** (this loss's ``forward``)::

      L_S = generator_loss(D(s)[0]) + aux_weight * CE(D(s)[1:], y) + l1 * mean_b || s - t ||_1

``D(.)[0]`` is the real/fake score and ``D(.)[1:]`` the ``K`` class logits of the label head
(``aux_weight > 0``): the discriminator also classifies the logits it sees, as in the
auxiliary-classifier GAN (Odena, Olah & Shlens, ICML 2017), so the student is pushed towards
logits that are both teacher-like and of the right class (the paper's category-level term).
``l1`` is the paper's sample-level term, which ties each student sample to its own teacher
sample (a GAN alone matches distributions only); it is off by default, as a ``kd`` term next
to this one already does that. ``conditional`` concatenates the label's one-hot to ``D``'s input
(a conditional discriminator, Mirza & Osindero, arXiv:1411.1784, 2014); unlabelled samples
(``y = -1``) get a zero vector and are left out of the label head's cross-entropies.

Discriminator (built in ``setup`` from the logit width ``K``): ``Linear(K [+K], h_1) ->
LeakyReLU(0.2) -> ... -> Linear(h_n, 1 [+K])``, defaults ``hidden = (256, 256)``; optimizer Adam
``lr = 2e-4``, ``betas = (0.5, 0.999)`` (DCGAN's). These defaults, the label head's form and
``l1``'s default are this implementation's choices: the paper's text could not be consulted
while writing this file, so the architecture and settings are not claimed to be the paper's.

Shapes: student and teacher logits ``(B, K)``; labels ``(B,)`` (``-1`` = unlabelled). The
term's schedule (weight, windows) applies to the student's term; the discriminator steps
every ``d_every``-th batch for the whole stage.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.config import OptimizerConfig
from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import (
    Adversary,
    DistillLoss,
    Needs,
    Outputs,
    SetupInfo,
    check_logits_match,
    class_logits,
    logits_pair,
)
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.gan import (
    GanKind,
    check_kind,
    dcgan_adam,
    discriminator_loss,
    generator_loss,
    optimizer_config,
)
from darkknowledge.search_space import Range


class LogitDiscriminator(nn.Module):
    """An MLP over (label-conditioned) logits: ``(B, D_in) -> (B, 1 + C)``.

    Column 0 is the real/fake score (a logit, no sigmoid); the other ``C`` columns are the label
    head's class logits (``C = 0``: no head).

    Args:
        in_features: ``K``, or ``2K`` when the label's one-hot is concatenated.
        hidden: Widths of the hidden layers (each Linear + LeakyReLU(0.2)); empty: a linear D.
        classes: Width of the label head (0: none).
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], classes: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        layers.append(nn.Linear(width, 1 + classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D_in) -> (B, 1 + C)
        return self.net(x)


def discriminator_input(logits: torch.Tensor, labels: torch.Tensor, conditional: bool) -> torch.Tensor:
    """``D``'s input: the logits, with the label's one-hot appended when ``conditional``.

    Args:
        logits: ``(B, K)``.
        labels: ``(B,)``; ``-1`` (unlabelled) gives an all-zero one-hot.
        conditional: Append the one-hot.

    Returns:
        ``(B, K)``, or ``(B, 2K)`` when conditional.
    """
    if not conditional:
        return logits
    k = logits.shape[-1]
    known = (labels != UNLABELED).unsqueeze(-1).to(logits.dtype)  # (B, 1)
    onehot = F.one_hot(labels.clamp(min=0), k).to(logits.dtype) * known  # (B, K)
    return torch.cat([logits, onehot], dim=-1)  # (B, 2K)


def label_head_loss(out: torch.Tensor, labels: torch.Tensor, all_labeled: bool = False) -> torch.Tensor:
    """Cross-entropy of the label head ``out[:, 1:]`` over labelled samples (0 without a head).

    Args:
        out: ``D``'s output ``(B, 1 + C)``.
        labels: ``(B,)``; ``-1`` samples are ignored.
        all_labeled: No label is ``-1`` (``Batch.labeled``).
    """
    if out.shape[-1] == 1:
        return out.new_zeros(())
    return cross_entropy(out[:, 1:].float(), labels, all_labeled=all_labeled)


def logit_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The sample-level term ``mean_b || s_b - t_b ||_1``: ``(B, K), (B, K)`` -> scalar (0 if empty)."""
    per_sample = (student_logits.float() - teacher_logits.float()).abs().sum(-1)  # (B,)
    return per_sample.sum() / max(1, per_sample.numel())


def student_side(
    fake_out: torch.Tensor, labels: torch.Tensor, kind: str, aux_weight: float, all_labeled: bool = False
) -> torch.Tensor:
    """The generator's adversarial loss: ``generator_loss(D(s)[0]) + aux_weight * CE(D(s)[1:], y)``.

    Args:
        fake_out: ``D(s)``, ``(B, 1 + C)``.
        labels: ``(B,)``.
        kind: GAN objective (see :mod:`darkknowledge.losses.gan`).
        aux_weight: Weight of the label head's cross-entropy.
        all_labeled: No label is ``-1``.
    """
    loss = generator_loss(fake_out[:, 0], kind)
    if aux_weight > 0:
        loss = loss + aux_weight * label_head_loss(fake_out, labels, all_labeled)
    return loss


def discriminator_side(
    real_out: torch.Tensor,
    fake_out: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    aux_weight: float,
    all_labeled: bool = False,
) -> torch.Tensor:
    """The discriminator's loss: real/fake on column 0, plus the label head on both (ACGAN).

    Args:
        real_out: ``D(t)``, ``(B, 1 + C)``.
        fake_out: ``D(s)`` on detached student logits, ``(B, 1 + C)``.
        labels: ``(B,)``.
        kind: GAN objective.
        aux_weight: Weight of the label head's cross-entropies.
        all_labeled: No label is ``-1``.
    """
    loss = discriminator_loss(real_out[:, 0], fake_out[:, 0], kind)
    if aux_weight > 0:
        loss = loss + aux_weight * (
            label_head_loss(real_out, labels, all_labeled) + label_head_loss(fake_out, labels, all_labeled)
        )
    return loss


@register_loss("adversarial_kd")
class AdversarialKD(DistillLoss):
    """Xu et al. 2018: a discriminator on logits (teacher real, student fake); the student fools it.

    The student's term is ``generator_loss(D(s)) [+ aux_weight * CE(D_cls(s), y)] [+ l1 * |s - t|_1]``;
    the discriminator is trained by its own optimizer after each student step (see the module
    docstring). Shapes: logits ``(B, K)``, labels ``(B,)`` (``-1`` = unlabelled). Use it next to
    ``ce`` (and ``kd``), e.g. ``losses: {ce: {}, kd: {alpha: 1}, adversarial_kd: {}}``.

    Args:
        gan: ``non_saturating`` (the paper's log loss), ``hinge`` or ``least_squares``.
        hidden: Hidden widths of the discriminator MLP.
        conditional: Concatenate the label's one-hot to the discriminator's input.
        aux_weight: Weight of the discriminator's label head (class logits of what it sees);
            0 removes the head.
        l1: Weight of the sample-level ``mean_b |s_b - t_b|_1`` term (0: off).
        d_optimizer: The discriminator's optimizer (null: the stage's ``train.optimizer``).
        d_every: The discriminator steps on every ``d_every``-th batch.
    """

    knowledge = "response"
    citation = (
        "Xu, Hsu, Huang. Training Shallow and Thin Networks for Acceleration via Knowledge Distillation "
        "with Conditional Adversarial Networks. ICLR 2018 Workshop (arXiv:1709.00513)."
    )
    needs_spec = Needs(teacher=True, teacher_logits=True, labels=True)  # labels: conditional or aux_weight > 0 (bind)
    search_space = {
        "weight": Range(low=0.01, high=10.0, log=True),  # the adversarial term's weight next to ce/kd
        "aux_weight": Range(low=0.0, high=2.0),  # 0: no label head
    }

    def __init__(
        self,
        gan: GanKind = "non_saturating",
        hidden: tuple[Annotated[int, Field(gt=0)], ...] = (256, 256),
        conditional: bool = False,
        aux_weight: Annotated[float, Field(ge=0.0)] = 1.0,
        l1: Annotated[float, Field(ge=0.0)] = 0.0,
        d_optimizer: OptimizerConfig | None = dcgan_adam(),  # noqa: B008 - a fresh copy is kept
        d_every: Annotated[int, Field(ge=1)] = 1,
    ) -> None:
        super().__init__()
        check_kind(gan)
        if any(int(h) < 1 for h in hidden):
            raise ConfigError(f"losses.adversarial_kd.hidden: widths must be >= 1, got {list(hidden)}")
        if int(d_every) < 1:
            raise ConfigError(f"losses.adversarial_kd.d_every: must be >= 1, got {d_every}")
        self.gan = gan
        self.hidden = tuple(int(h) for h in hidden)
        self.conditional = conditional
        self.aux_weight = float(aux_weight)
        self.l1 = float(l1)
        self.d_optimizer = optimizer_config(d_optimizer, "losses.adversarial_kd.d_optimizer")
        self.d_every = int(d_every)
        self.discriminator: LogitDiscriminator | None = None

    @property
    def reads_labels(self) -> bool:
        """Labels feed the discriminator's input (conditional) or its label head."""
        return self.conditional or self.aux_weight > 0

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        return Needs(teacher=True, teacher_logits=True, labels=self.reads_labels)

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        """Build the discriminator from the logit width ``K``."""
        check_logits_match(student, teacher, "adversarial_kd")
        logits = class_logits(student, "loss 'adversarial_kd'")
        k = int(logits.shape[-1])
        in_features = 2 * k if self.conditional else k
        self.discriminator = LogitDiscriminator(in_features, self.hidden, k if self.aux_weight > 0 else 0)
        self.discriminator.to(logits.device)

    def _judge(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``D`` on the logits (conditioned on the labels when asked): ``(B, K) -> (B, 1 [+K])``."""
        if self.discriminator is None:
            raise RuntimeError("losses.adversarial_kd: setup() builds the discriminator; it must run before the loss")
        first = self.discriminator.net[0]
        assert isinstance(first, nn.Linear)
        return self.discriminator(discriminator_input(logits.to(first.weight.dtype), batch.y, self.conditional))

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        logits = class_logits(student, "loss 'adversarial_kd'")
        loss = student_side(self._judge(logits, batch), batch.y, self.gan, self.aux_weight, batch.labeled)
        if self.l1 > 0:
            loss = loss + self.l1 * logit_l1(*logits_pair(student, teacher, "adversarial_kd"))
        return loss

    def discriminator_step(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        """The discriminator's loss on a step's outputs (teacher real, student fake), both detached."""
        s, t = logits_pair(student, teacher, "adversarial_kd")
        real = self._judge(t.detach(), batch)  # (B, 1 [+K])
        fake = self._judge(s.detach(), batch)  # (B, 1 [+K])
        return discriminator_side(real, fake, batch.y, self.gan, self.aux_weight, batch.labeled)

    def adversary(self) -> Adversary | None:
        """The discriminator with its optimizer and step ratio (None before ``setup``)."""
        if self.discriminator is None:
            return None
        return Adversary(
            module=self.discriminator, loss=self.discriminator_step, optimizer=self.d_optimizer, every=self.d_every
        )
