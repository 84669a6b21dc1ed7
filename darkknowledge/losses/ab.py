"""Activation boundaries (AB): transfer which hidden neurons are on or off, with a margin.

Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed
by Hidden Neurons", AAAI 2019 (arXiv:1811.03233), Eq. 6 (the "alternative loss")::

    L(s, t) = sum_elements  (r(s) + m)^2 * 1[ r(s) > -m  and  t <= 0 ]
                          + (r(s) - m)^2 * 1[ r(s) <= m  and  t > 0 ]

``s``: the student's pre-ReLU feature, ``r``: a connector (1x1 conv + BatchNorm, built from the
probed shapes by :func:`darkknowledge.losses.adapters.build_adapter`; a Linear for vectors;
resize when the spatial sizes differ), ``t``: the teacher's pre-ReLU feature (constant), ``m``:
the margin (paper and authors' code: 1.0). A student neuron is pushed past ``+m`` where the
teacher's neuron is active and below ``-m`` where it is not; the squared hinge is 0 once it
is on the right side with the margin.

As in the authors' code (bhheo/AB_distillation, HobbitLong/RepDistiller
``distiller_zoo/AB.py``): the sum is over all elements divided by the batch size, and with
``n`` tapped pairs (shallow to deep) pair ``i`` is weighted ``2^(i - n + 1)`` (deepest 1, then
1/2, 1/4, ...). The authors' code further multiplies by ``3 / 1000``: put that in the term's
weight (``weight: 0.003`` reproduces it).

**Pre-ReLU taps.** Without explicit taps the loss uses every stage output, resolved to the
value before the stage's final ReLU where it can be found: zoo CIFAR ResNet stages ->
``<last block>.relu_out:input``; ``nn.Sequential`` stages ending in ``nn.ReLU`` (``cnn1d``
blocks) -> ``<stage>.<relu>:input``. Otherwise (e.g. ``cnn2d`` blocks, which max-pool after
the ReLU) the stage output itself is used. For other models give explicit
``student_taps``/``teacher_taps`` naming pre-activation values (``"<relu module>:input"``).

**Initialization stage.** The paper trains AB alone first (initialization of the student),
then the student is trained with KD (RepDistiller: CE + KD). Express it with term windows::

    losses:
      ab: {stop_epoch: N, weight: 0.003}
      ce: {start_epoch: N}
      kd: {alpha: 1.0, start_epoch: N}
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.adapters import CROSS_RANK_PAIRS, build_adapter
from darkknowledge.losses.base import Needs, Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss, pre_activation_tap
from darkknowledge.search_space import Range


def ab_loss(connected: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary hinge loss, summed over elements and averaged over the batch.

    Args:
        connected: ``r(s)``, the student's pre-ReLU feature after the connector ``(B, *T)``.
        target: The teacher's pre-ReLU feature ``(B, *T)`` (constant).
        margin: ``m`` > 0.

    Returns:
        Scalar ``sum(...) / B`` >= 0.
    """
    if connected.shape != target.shape:
        raise ShapeError(f"ab: connected student feature {tuple(connected.shape)} != teacher {tuple(target.shape)}")
    dtype = torch.promote_types(connected.dtype, torch.float32)  # fp16/bf16 -> fp32
    s, t = connected.to(dtype), target.to(dtype)  # (B, *T)
    off = ((s > -margin) & (t <= 0)).to(dtype)  # (B, *T) teacher off, student not below -m
    on = ((s <= margin) & (t > 0)).to(dtype)  # (B, *T) teacher on, student not above +m
    loss = (s + margin).pow(2) * off + (s - margin).pow(2) * on  # (B, *T)
    return loss.sum() / s.shape[0]


@register_loss("ab")
class AB(FeatureLoss):
    """Activation-boundary transfer: ``sum_i 2^(i-n+1) * ab_loss(r_i(s_i), t_i, m)``.

    Shapes: each pair ``(B, C_s, *S_s) -> (B, C_t, *S_t)`` (same rank, or a sequence against a
    map either way) or ``(B, D_s) -> (B, D_t)``; a connector (1x1 conv + BN or Linear) per pair
    is built in :meth:`setup` and trained with the student. Default taps: every stage, resolved
    to pre-ReLU values where possible (see module docstring). The paper uses AB as an
    initialization stage: ``stop_epoch: N`` on this term, ``start_epoch: N`` on ``ce``/``kd``.

    Args:
        margin: Margin ``m`` of the activation boundary (paper: 1.0).
        student_taps: Student module paths (pre-activation values; default: stages, pre-ReLU).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = (
        "Heo, Lee, Yun, Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by "
        "Hidden Neurons. AAAI 2019."
    )
    default_taps = "stages"
    search_space = {
        "weight": Range(low=3e-4, high=3e-2, log=True),  # authors' code: 3 / 1000
        "margin": Range(low=0.5, high=2.0, log=True),  # paper: 1
    }

    def __init__(
        self,
        margin: Annotated[float, Field(gt=0.0)] = 1.0,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.margin = margin
        self.connectors = nn.ModuleList()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        needs = super().bind(student, teacher)
        if self.student_taps and self.teacher_taps:
            return needs
        assert teacher is not None  # FeatureLoss.bind refuses a teacher without features
        self.pairs = [
            (
                s if self.student_taps else pre_activation_tap(student, s),
                t if self.teacher_taps else pre_activation_tap(teacher, t),
            )
            for s, t in self.pairs
        ]
        return Needs(
            teacher=True,
            student_taps=tuple(dict.fromkeys(s for s, _ in self.pairs)),
            teacher_taps=tuple(dict.fromkeys(t for _, t in self.pairs)),
        )

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        connectors = []
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            s_shape, t_shape = tuple(f_s.shape[1:]), tuple(f_t.shape[1:])
            if len(s_shape) != len(t_shape) and (len(s_shape), len(t_shape)) not in CROSS_RANK_PAIRS:
                raise ShapeError(
                    f"losses.ab: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
                    "differ in rank; pair a feature map or sequence with a feature map or sequence "
                    "((B, C, L) <-> (B, C, H, W) is adapted), or a vector with a vector"
                )
            connectors.append(build_adapter(s_shape, t_shape, batch_norm=True, identity_if_equal=False))
        self.connectors = nn.ModuleList(connectors)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        n = len(self.pairs)
        losses = [
            2.0 ** (i - n + 1) * ab_loss(conn(s), t, self.margin)
            for i, (conn, s, t) in enumerate(
                zip(self.connectors, self.student_features(student), self.teacher_features(teacher))
            )
        ]
        return torch.stack(losses).sum()
