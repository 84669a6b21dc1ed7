"""FitNets hints: a regressor maps the student's guided layer onto the teacher's hint layer.

Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets",
ICLR 2015 (arXiv:1412.6550), Eq. 3::

    L_HT(W_Guided, W_r) = 1/2 || u_h(x; W_Hint) - r(v_g(x; W_Guided); W_r) ||^2

``u_h``: the teacher up to its hint layer (constant); ``v_g``: the student up to its guided
layer; ``r``: a regressor with the same non-linearity as ``u_h``. Implemented as in
HobbitLong/RepDistiller (``distiller_zoo/FitNet.py`` + ``ConvReg``): ``r`` = 1x1 convolution
+ BatchNorm (+ ReLU, ``relu=True``, for post-ReLU hints) built by
:func:`darkknowledge.losses.adapters.build_adapter` (a Linear for ``(B, D)`` taps; linear /
bilinear resize when the spatial sizes differ), and the squared error is **averaged** over
all elements (``MSELoss``) instead of the paper's half sum; the scale goes into the term's
weight (RepDistiller CIFAR-100: 100).

Shapes: student tap ``(B, C_s, *S_s)`` or ``(B, D_s)``; teacher tap ``(B, C_t, *S_t)`` or
``(B, D_t)`` of the same rank, or a sequence ``(B, C_s, L_s)`` against a map
``(B, C_t, H_t, W_t)`` either way (cross-modal; see :mod:`darkknowledge.losses.adapters`).
Default taps: FitNets uses one (guided, hint) pair in the middle of the networks
(RepDistiller: ``hint_layer=2`` of 5 features = the middle stage), so without explicit taps
only the middle pair of the depth-aligned stages is kept (the shallower one for an even count).
Explicit ``student_taps``/``teacher_taps`` keep every pair (summed).

**Hint pre-stage** (paper Sec. 2.3, Algorithm 1): stage 1 trains the student up to the
guided layer and the regressor on the hint loss alone; stage 2 trains the whole student with
KD. Express it with the objective's term windows (``N`` epochs of stage 1)::

    losses:
      fitnet: {stop_epoch: N}
      ce: {start_epoch: N}
      kd: {alpha: 1.0, start_epoch: N}

During stage 1 the terms ``ce``/``kd`` count with weight 0, so only the layers up to the
guided layer and the regressor receive (non-zero) gradients. One difference from the paper:
one optimizer and LR schedule run across both stages (the paper restarts training in stage 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.adapters import CROSS_RANK_PAIRS, build_adapter
from darkknowledge.losses.base import Needs, Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def hint_loss(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student feature and the teacher's hint.

    Args:
        regressed: ``r(v_g(x))``, the student's guided feature after the regressor ``(B, *T)``.
        hint: The teacher's hint ``(B, *T)`` (constant).

    Returns:
        Scalar ``mean (regressed - hint)^2``; ``L_HT = 1/2 * numel/B * this`` per sample.
    """
    if regressed.shape != hint.shape:
        raise ShapeError(f"fitnet: regressed student feature {tuple(regressed.shape)} != hint {tuple(hint.shape)}")
    dtype = torch.promote_types(regressed.dtype, torch.float32)  # fp16/bf16 -> fp32
    return F.mse_loss(regressed.to(dtype), hint.to(dtype))  # mean over (B, *T)


def middle_index(n: int) -> int:
    """Index of the middle of ``n`` items (the shallower middle when ``n`` is even)."""
    return (n - 1) // 2


@register_loss("fitnet")
class FitNet(FeatureLoss):
    """FitNets hint loss: ``mean (r(u_s) - u_t)^2`` with a learned 1x1 conv + BN (+ ReLU) regressor.

    Shapes: each pair is ``(B, C_s, *S_s) -> (B, C_t, *S_t)`` (maps) or ``(B, D_s) -> (B, D_t)``
    (vectors). The regressor is built in :meth:`setup` from the probed shapes and trained with
    the student. Default taps: the middle depth-aligned stage pair. For the paper's hint
    pre-stage, give the term ``stop_epoch: N`` and the ``ce``/``kd`` terms ``start_epoch: N``.

    Args:
        relu: End the regressor with a ReLU, matching post-ReLU hints (paper: same non-linearity
            as the hint layer; RepDistiller ``ConvReg(use_relu=True)``). Set False when the
            teacher tap is pre-activation.
        regressor: Build the regressor (default). False matches the guided feature to the hint
            directly (same shapes required): for students whose own layers already map to the
            teacher's feature (BYOT's head bottlenecks, a residual connector).
        student_taps: Student (guided) module paths (default: the middle stage).
        teacher_taps: Teacher (hint) module paths, one per student path.
    """

    knowledge = "feature"
    citation = "Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep Nets. ICLR 2015."
    default_taps = "stages"
    search_space = {
        "weight": Range(low=0.1, high=100.0, log=True),  # RepDistiller: 100 (mean, not the paper's sum)
    }

    def __init__(
        self,
        relu: bool = True,
        regressor: bool = True,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.relu = relu
        self.regressor = regressor
        self.regressors = nn.ModuleList()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        needs = super().bind(student, teacher)
        if self.student_taps or self.teacher_taps or len(self.pairs) <= 1:
            return needs
        self.pairs = [self.pairs[middle_index(len(self.pairs))]]  # FitNets: one guided/hint pair
        s, t = self.pairs[0]
        return Needs(teacher=True, student_taps=(s,), teacher_taps=(t,))

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        regressors: list[nn.Module] = []
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            s_shape, t_shape = tuple(f_s.shape[1:]), tuple(f_t.shape[1:])
            if len(s_shape) != len(t_shape) and (len(s_shape), len(t_shape)) not in CROSS_RANK_PAIRS:
                raise ShapeError(
                    f"losses.fitnet: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
                    "differ in rank; pair a feature map or sequence with a feature map or sequence "
                    "((B, C, L) <-> (B, C, H, W) is adapted), or a vector with a vector"
                )
            if not self.regressor:
                if s_shape != t_shape:
                    raise ShapeError(
                        f"losses.fitnet: regressor: false needs equal shapes, but student tap {sp!r} "
                        f"is {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)}"
                    )
                regressors.append(nn.Identity())
                continue
            reg = build_adapter(s_shape, t_shape, batch_norm=True, identity_if_equal=False)
            regressors.append(nn.Sequential(reg, nn.ReLU()) if self.relu else reg)
        self.regressors = nn.ModuleList(regressors)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        losses = [
            hint_loss(reg(s), t)
            for reg, s, t in zip(self.regressors, self.student_features(student), self.teacher_features(teacher))
        ]
        return torch.stack(losses).sum()
