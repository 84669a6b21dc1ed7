"""Adversarial feature-map distillation (AFD): a discriminator tells the teacher's map from the student's.

Chung, Park, Kim & Kwak, "Feature-map-level Online Adversarial Knowledge Distillation", ICML
2020 (arXiv:2002.01775), Sec. 3. Network 1 (here: the student) has a discriminator ``D_1`` that
learns to score the other network's feature map as real and its own as fake; network 1 learns
to fool it, so it learns the *distribution* of the other network's maps rather than aligning
each map point by point (the paper's argument against L1 alignment online). A transfer layer
``T`` maps a network's map to the other's channel count when they differ. The paper's
objectives are least squares (LSGAN)::

    L_D1 = [1 - D_1(T_2(G_2(x)))]^2 + [D_1(T_1(G_1(x)))]^2
    L_G1 = [1 - D_1(T_1(G_1(x)))]^2

``G_i(x)``: network ``i``'s feature map. Here ``G_2(x)`` is the teacher's tap (real, constant),
``G_1(x)`` the student's tap after its adapter ``T_1`` (fake), and the objectives are those of
:mod:`darkknowledge.losses.gan` with ``gan = least_squares`` (the default), which are **half**
of the paper's (Mao et al.'s ``1/2`` factors): the factor 2 of the student's term goes into the
term's weight, and Adam (the default ``d_optimizer``) is invariant to the scale of ``L_D``.

* The **student's term** (``forward``): ``sum_j generator_loss(D_j(T_j(f_s^j)))``.
* The **discriminator's step** (:meth:`AFD.adversary`, its own optimizer, after each student
  step, on that step's detached maps): ``sum_j discriminator_loss(D_j(f_t^j), D_j(T_j(f_s^j)))``.
  ``T_j`` runs without gradient there (it belongs to the student, trained by the student's side).

Online and offline alike: the loss reads only ``teacher.feature(path)``, so the teacher may be a
frozen model (offline) or a peer whose detached outputs the mutual scheme hands over (online,
the paper's setting: each peer gets its own ``afd`` term and discriminator; the paper's cyclic
scheme for more than two networks is the scheme's plan, not the loss's).

Discriminator ``D_j`` (built in ``setup`` from the probed teacher map ``(C_t, *S)``; 1-D maps use
the 1-D layers, vectors ``(D,)`` Linear layers)::

    [Conv(k=3, stride 2, pad 1) -> (BatchNorm, except the first block) -> LeakyReLU(0.2)] x layers
    -> global average pool -> Linear(hidden, 1)

with ``hidden`` channels per block (default 64) and ``layers = 2``; a block keeps stride 1 along a
dim of 2 positions or fewer, so a map is never pooled down to one position (BatchNorm in training
needs more than one value per channel: a batch of one then still has 2+ positions). Defaults:
taps = the last stage of each network (the last feature map before pooling: the layer the paper
is recalled to distil, not checked against its text);
adapter ``T_1`` = 1x1 conv + BatchNorm (+ resize) from :func:`~darkknowledge.losses.adapters.build_adapter`
when the shapes differ; ``d_optimizer`` Adam ``lr 2e-4, betas (0.5, 0.999)`` (DCGAN's). The
discriminator's exact layout and optimizer settings are this implementation's choices in the
style of DCGAN (stride-2 conv, BN, LeakyReLU): the paper's appendix could not be consulted
while writing this file. The paper optimises the adversarial losses with their own (slower)
optimizer for the networks too; here the student's side is part of the student's objective
(scale it with the term's weight).

Shapes: student tap ``(B, C_s, *S_s)``, teacher tap ``(B, C_t, *S_t)`` of the same rank
(``(B, C, L)``, ``(B, C, H, W)``, or vectors ``(B, D)``), or a sequence against a map either
way (cross-modal; see :mod:`darkknowledge.losses.adapters`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.config import OptimizerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.adapters import CROSS_RANK_PAIRS, build_adapter
from darkknowledge.losses.base import Adversary, Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.losses.gan import (
    GanKind,
    check_kind,
    dcgan_adam,
    discriminator_loss,
    generator_loss,
    optimizer_config,
)
from darkknowledge.search_space import Range

_CONV: dict[int, Callable[..., nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}  # stride: an int or a tuple
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


class FeatureDiscriminator(nn.Module):
    """Scores feature maps ``(B, C, *S)`` (or vectors ``(B, D)``) with one real/fake logit each: ``(B,)``.

    Args:
        shape: Per-sample input shape ``(C, *S)`` with ``len(S)`` in 0 (a vector), 1 or 2.
        hidden: Channels (units, for vectors) of each block.
        layers: Number of blocks (stride-2 conv + BN + LeakyReLU; Linear + LeakyReLU for vectors).
    """

    def __init__(self, shape: tuple[int, ...], hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        dims = len(shape) - 1
        if dims not in (0, 1, 2):
            raise ShapeError(
                f"afd: no discriminator for features of per-sample shape {shape}; "
                "tap a vector (B, D) or a feature map (B, C, L) / (B, C, H, W)"
            )
        blocks: list[nn.Module] = []
        width, size = shape[0], list(shape[1:])
        for i in range(layers):
            if dims == 0:
                blocks += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            else:
                stride = tuple(2 if s > 2 else 1 for s in size)
                size = [(s - 1) // st + 1 for s, st in zip(size, stride)]  # k=3, pad=1
                blocks.append(_CONV[dims](width, hidden, kernel_size=3, stride=stride, padding=1, bias=i == 0))
                if i > 0:  # DCGAN: no BatchNorm on the discriminator's input block
                    blocks.append(_NORM[dims](hidden))
                blocks.append(nn.LeakyReLU(0.2))
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *S) or (B, D) -> (B,)
        h = self.body(x.to(self.head.weight.dtype))  # (B, hidden, *S') or (B, hidden); a cached fp16 map too
        if h.dim() > 2:
            h = h.flatten(2).mean(-1)  # global average pool: (B, hidden)
        return self.head(h).squeeze(-1)  # (B,)


@register_loss("afd")
class AFD(FeatureLoss):
    """Chung et al. 2020: per tap pair, a discriminator scores teacher maps real and adapted student maps fake.

    The student's term is ``sum_j generator_loss(D_j(T_j(f_s^j)))``; each ``D_j`` is trained by its
    own optimizer after the student's step (see the module docstring). Works with a frozen
    teacher and between online peers (it reads only the teacher's tapped features).

    Args:
        gan: ``least_squares`` (the paper's), ``non_saturating`` or ``hinge``.
        hidden: Channels of each discriminator block.
        layers: Discriminator blocks (stride-2 conv + BatchNorm + LeakyReLU).
        d_optimizer: The discriminators' optimizer (null: the stage's ``train.optimizer``).
        d_every: The discriminators step on every ``d_every``-th batch.
        student_taps: Student module paths (default: the last stage).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = "Chung, Park, Kim, Kwak. Feature-map-level Online Adversarial Knowledge Distillation. ICML 2020."
    default_taps = "last_stage"
    search_space = {
        "weight": Range(low=0.01, high=10.0, log=True),  # the adversarial term's weight next to ce/kd
        "d_every": Range(kind="int", low=1, high=4),  # discriminator steps per student steps
    }

    def __init__(
        self,
        gan: GanKind = "least_squares",
        hidden: Annotated[int, Field(gt=0)] = 64,
        layers: Annotated[int, Field(ge=1)] = 2,
        d_optimizer: OptimizerConfig | None = dcgan_adam(),  # noqa: B008 - a fresh copy is kept
        d_every: Annotated[int, Field(ge=1)] = 1,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        check_kind(gan)
        for name, value in (("hidden", hidden), ("layers", layers), ("d_every", d_every)):
            if int(value) < 1:
                raise ConfigError(f"losses.afd.{name}: must be >= 1, got {value}")
        self.gan = gan
        self.hidden = int(hidden)
        self.layers = int(layers)
        self.d_optimizer = optimizer_config(d_optimizer, "losses.afd.d_optimizer")
        self.d_every = int(d_every)
        self.adapters = nn.ModuleList()
        self.discriminators: nn.ModuleList | None = None

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        """Build each pair's adapter (student -> teacher shape) and discriminator (on the teacher's shape)."""
        adapters, discriminators = [], []
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            s_shape, t_shape = tuple(f_s.shape[1:]), tuple(f_t.shape[1:])
            cross = (len(s_shape), len(t_shape)) in CROSS_RANK_PAIRS
            if (len(s_shape) != len(t_shape) and not cross) or len(t_shape) not in (1, 2, 3):
                raise ShapeError(
                    f"losses.afd: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} "
                    f"{tuple(f_t.shape)}: pair feature maps (B, C, L) / (B, C, H, W) (of the same rank, "
                    "or a sequence with a map), or vectors (B, D)"
                )
            adapters.append(build_adapter(s_shape, t_shape, batch_norm=True, identity_if_equal=True))
            discriminators.append(FeatureDiscriminator(t_shape, self.hidden, self.layers))
        self.adapters = nn.ModuleList(adapters)
        self.discriminators = nn.ModuleList(discriminators)

    def _built(self) -> nn.ModuleList:
        """The discriminators (``setup`` builds them, and the adapters)."""
        if self.discriminators is None:
            raise RuntimeError("losses.afd: setup() builds the adapters and discriminators; run it before the loss")
        return self.discriminators

    def _fake(self, student: Outputs) -> list[torch.Tensor]:
        """The adapted student maps ``T_j(f_s^j)``, each ``(B, *teacher shape)``."""
        self._built()
        return [adapter(f_s) for adapter, f_s in zip(self.adapters, self.student_features(student))]

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        losses = [generator_loss(d(fake), self.gan) for d, fake in zip(self._built(), self._fake(student))]
        return torch.stack(losses).sum()

    def discriminator_step(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        """The discriminators' loss on a step's detached maps: teacher real, adapted student fake."""
        with torch.no_grad():  # the adapters belong to the student: no gradient from the discriminators' loss
            fakes = self._fake(student)
        losses = [
            discriminator_loss(d(f_t.detach()), d(fake), self.gan)
            for d, f_t, fake in zip(self._built(), self.teacher_features(teacher), fakes)
        ]
        return torch.stack(losses).sum()

    def adversary(self) -> Adversary | None:
        """All pairs' discriminators, their optimizer and step ratio (None before ``setup``)."""
        if self.discriminators is None:
            return None
        return Adversary(
            module=self.discriminators, loss=self.discriminator_step, optimizer=self.d_optimizer, every=self.d_every
        )
