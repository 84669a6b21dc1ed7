"""Factor transfer (FT): a paraphraser compresses the teacher's feature into factors; a
translator maps the student's feature onto them.

Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018 (arXiv:1802.04977), Sec. 3.

1. Paraphraser ``P`` (conv autoencoder, factor rate ``k``) on the teacher feature ``x``
   ``(B, C_t, *S)``, trained first and alone (paper Sec. 3)::

       L_rec = || x - P(x) ||^2            (mean squared error over all elements)

   then frozen; the teacher factor is its encoder output ``F_T = E(x)`` ``(B, k C_t, *S)``.
2. Translator ``T`` (3 convs) on the student feature: ``F_S = T(s)`` ``(B, k C_t, *S)``.
3. Transfer loss (paper Eq. 4, ``p = 1``), with ``vec`` flattening channels and positions::

       L_FT = mean_b || F_T/||F_T||_2 - F_S/||F_S||_2 ||_p^p / D        (D = k C_t prod(S))

   The ``1/D`` is the element mean of the authors' code (``nn.L1Loss()`` in
   Jangho-Kim/Factor-Transfer-pytorch; ``.abs().mean()`` in RepDistiller), which the paper's
   ``beta`` values are tuned for. Set ``beta`` as the term's ``weight``: 500 in the authors'
   CIFAR-10 code, 200 in RepDistiller's CIFAR-100 benchmark.

Architecture (RepDistiller ``models/util.py``, same layers as the authors' ``FeatureProjection``):
paraphraser encoder ``conv3x3(C_t, C_t), conv3x3(C_t, kC_t), conv3x3(kC_t, kC_t)``, decoder of
three stride-1 transposed 3x3 convs back to ``C_t``, LeakyReLU(0.1) after each, no BN;
translator ``conv3x3(C_s, C_s), conv3x3(C_s, kC_t), conv3x3(kC_t, kC_t)`` each with BN and
LeakyReLU(0.1) (RepDistiller ``use_bn=True``; the authors' translator has no BN). ``k = 0.5``.

Paraphraser training (``pretrain``, one pass per epoch over the training set's teacher
outputs): SGD momentum 0.9, weight decay 5e-4, lr 0.01, MSE, ``paraphraser_epochs = 30`` —
RepDistiller's ``init`` stage (``--init_epochs 30``, lr 0.01 for CIFAR ResNet students). The
authors' script uses L1 reconstruction, lr 0.1 and ``--epoch 5`` (6 passes); the paper's
reconstruction loss is the squared L2 used here (``rec_loss: l1`` selects the authors' form). After pretraining
the paraphraser has ``requires_grad=False`` and stays in ``eval()``; it is frozen from
``setup`` on, so the main optimizer never holds it (also on resume, where its trained weights
come from the checkpoint). It sits on the teacher side but is trained only by its own
optimizer in ``pretrain``.

Default tap: the last stage (RepDistiller ``feat[-2]``). Several pairs are allowed (one
paraphraser/translator each; the losses are summed). 1-D maps use ``Conv1d``, 2-D maps
``Conv2d``; a vector ``(B, D)`` is a map of length 1. Different spatial sizes: the larger
factor map is adaptive-average-pooled to the smaller (RepDistiller).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Annotated, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.losses.vid import as_map, paired_maps, pool_to
from darkknowledge.search_space import Range

log = logging.getLogger(__name__)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_DECONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p: int = 1) -> torch.Tensor:
    """``mean_{b,i} |F_S/||F_S|| - F_T/||F_T|| |^p`` over flattened factors.

    Args:
        factor_s: Student factor ``(B, *)``.
        factor_t: Teacher factor ``(B, *)``, same number of elements per sample.
        p: 1 (paper) or 2.

    Returns:
        Scalar >= 0; 0 when the factors are equal up to a positive per-sample scale.
    """
    f_s = F.normalize(factor_s.flatten(1), p=2.0, dim=1)  # (B, D)
    f_t = F.normalize(factor_t.flatten(1), p=2.0, dim=1)  # (B, D)
    return (f_s - f_t).abs().pow(p).mean()


def _conv_stack(conv: type[nn.Module], widths: list[int], bn: type[nn.Module] | None) -> nn.Sequential:
    """3x3 (transposed) convs ``widths[i] -> widths[i+1]``, stride 1, padding 1, each + BN? + LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in pairwise(widths):
        layers.append(conv(c_in, c_out, kernel_size=3, stride=1, padding=1))
        if bn is not None:
            layers.append(bn(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Conv autoencoder ``C -> C -> kC -> kC`` (encoder) ``-> kC -> C -> C`` (decoder).

    Args:
        dims: 1 (``(B, C, L)`` maps) or 2 (``(B, C, H, W)``).
        channels: ``C``, the teacher feature's channels.
        factor_channels: ``kC``.
    """

    def __init__(self, dims: int, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _conv_stack(_CONV[dims], [channels, channels, factor_channels, factor_channels], None)
        self.decoder = _conv_stack(_DECONV[dims], [factor_channels, factor_channels, channels, channels], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``P(x)``: ``(B, C, *S)`` -> ``(B, C, *S)``."""
        return self.decoder(self.encoder(x))


@register_loss("ft")
class FT(FeatureLoss):
    """Factor transfer: ``mean |T(s)/||T(s)|| - E(t)/||E(t)|| |^p`` with a pre-trained, frozen paraphraser.

    Shapes: feature maps ``(B, C, L)`` / ``(B, C, H, W)`` or vectors ``(B, D)`` (as length-1
    maps); channels and spatial sizes may differ. Default tap: the last stage. Use the
    paper's ``beta`` as the term's ``weight`` (RepDistiller: 200; authors: 500).

    Args:
        k: Paraphrase (factor) rate: factor channels ``round(k * C_t)`` (paper: 0.5).
        p: Norm of the factor difference (paper: 1).
        paraphraser_epochs: Passes over the training set to train the paraphraser before
            distillation (RepDistiller: 30; authors: 5). 0 keeps it at its random init.
        paraphraser_lr: SGD learning rate of the paraphraser (RepDistiller: 0.01; authors: 0.1).
        paraphraser_clip: Gradient-norm clip of the paraphraser's SGD steps (not in the paper or
            RepDistiller: added because teacher features of large magnitude, e.g. an untrained
            resnet32x4's last stage (|x| ~ 160), made plain SGD diverge to NaN; None = off).
        rec_loss: Reconstruction loss ``l2`` (paper, RepDistiller MSE) or ``l1`` (authors' code).
        student_taps: Student module paths (default: last stage).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = "Kim, Park, Kwak. Paraphrasing Complex Network: Network Compression via Factor Transfer. NeurIPS 2018."
    default_taps = "last_stage"
    search_space = {
        "weight": Range(low=10.0, high=1000.0, log=True),  # RepDistiller: 200; authors: 500
    }

    def __init__(
        self,
        k: Annotated[float, Field(gt=0.0)] = 0.5,
        p: Literal[1, 2] = 1,
        paraphraser_epochs: Annotated[int, Field(ge=0)] = 30,
        paraphraser_lr: Annotated[float, Field(gt=0.0)] = 0.01,
        paraphraser_clip: Annotated[float, Field(gt=0.0)] | None = 5.0,
        rec_loss: Literal["l2", "l1"] = "l2",
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.k = k
        self.p = p
        self.paraphraser_epochs = paraphraser_epochs
        self.paraphraser_lr = paraphraser_lr
        self.paraphraser_clip = paraphraser_clip
        self.rec_loss = rec_loss
        self.paraphrasers = nn.ModuleList()
        self.translators = nn.ModuleList()

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        self.paraphrasers, self.translators = nn.ModuleList(), nn.ModuleList()
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            f_s, f_t = paired_maps(f_s, f_t, sp, tp, "ft")
            dims, c_s, c_t = f_s.dim() - 2, int(f_s.shape[1]), int(f_t.shape[1])
            c_f = max(1, round(self.k * c_t))
            self.paraphrasers.append(Paraphraser(dims, c_t, c_f))
            self.translators.append(_conv_stack(_CONV[dims], [c_s, c_s, c_f, c_f], _BN[dims]))
        self.paraphrasers.requires_grad_(False)  # frozen unless inside pretrain(): never in the main optimizer
        self.paraphrasers.eval()

    def train(self, mode: bool = True) -> FT:
        """Set the translators' mode; the frozen paraphrasers always stay in ``eval()``."""
        super().train(mode)
        self.paraphrasers.eval()
        return self

    def _rec(self, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(rec, x) if self.rec_loss == "l2" else F.l1_loss(rec, x)

    @torch.no_grad()
    def reconstruction_error(self, teacher_batches: Callable[[], Iterator[Outputs]]) -> float:
        """Mean reconstruction loss of the paraphrasers over one pass (summed over pairs)."""
        total, n = 0.0, 0
        for out in teacher_batches():
            for (_, tp), para in zip(self.pairs, self.paraphrasers):
                x = as_map(out.feature(tp), tp).float()  # (B, C_t, *S)
                total += float(self._rec(para(x), x))
            n += 1
        return total / max(n, 1)

    def pretrain(self, teacher_batches: Callable[[], Iterator[Outputs]]) -> None:
        """Train the paraphrasers to reconstruct the teacher features, then freeze them."""
        if self.paraphraser_epochs == 0 or not len(self.paraphrasers):
            return
        para = self.paraphrasers
        para.requires_grad_(True)
        para.train()
        opt = torch.optim.SGD(para.parameters(), lr=self.paraphraser_lr, momentum=0.9, weight_decay=5e-4)
        first = last = float("nan")
        try:
            with torch.enable_grad():
                for epoch in range(self.paraphraser_epochs):
                    running: torch.Tensor | float = 0.0
                    n = 0
                    for out in teacher_batches():
                        loss: torch.Tensor | float = 0.0
                        for (_, tp), p in zip(self.pairs, para):
                            x = as_map(out.feature(tp), tp).float()  # (B, C_t, *S), constant
                            loss = loss + self._rec(p(x), x)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()  # type: ignore[union-attr]  # a tensor: at least one pair
                        if self.paraphraser_clip is not None:
                            torch.nn.utils.clip_grad_norm_(para.parameters(), self.paraphraser_clip)
                        opt.step()
                        # a tensor: at least one pair:
                        running, n = running + loss.detach(), n + 1  # type: ignore[union-attr]
                    last = float(running) / max(n, 1)  # one host sync per epoch
                    if not math.isfinite(last):
                        raise FloatingPointError(
                            f"ft: the paraphraser's reconstruction loss became {last} in pre-training epoch "
                            f"{epoch + 1}; lower losses.<term>.paraphraser_lr or paraphraser_clip"
                        )
                    first = last if epoch == 0 else first
        finally:
            opt.zero_grad(set_to_none=True)  # no stale grads (clip_grad_norm walks every parameter)
            para.requires_grad_(False)
            para.eval()
        log.info(
            "ft: paraphraser reconstruction loss %.4g (epoch 1) -> %.4g (epoch %d)",
            first,
            last,
            self.paraphraser_epochs,
        )

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        feats = zip(self.student_features(student), self.teacher_features(teacher), self.translators, self.paraphrasers)
        for f_s, f_t, trans, para in feats:
            with torch.no_grad():
                factor_t = cast(Paraphraser, para).encoder(as_map(f_t, "teacher"))  # (B, kC_t, *S_t)
            factor_s = trans(as_map(f_s, "student"))  # (B, kC_t, *S_s)
            dtype = torch.promote_types(factor_s.dtype, torch.float32)  # fp16/bf16 -> fp32 for the loss
            size = tuple(min(a, b) for a, b in zip(factor_s.shape[2:], factor_t.shape[2:]))
            factor_s, factor_t = pool_to(factor_s.to(dtype), size), pool_to(factor_t.to(dtype), size)
            total = total + ft_loss(factor_s, factor_t, self.p)  # factors: (B, kC_t, *size)
        return total  # type: ignore[return-value]  # a tensor: at least one pair
