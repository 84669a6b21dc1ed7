"""DAFL: a generator trained against the frozen teacher as a fixed discriminator.

Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu & Tian, "Data-Free Learning of Student Networks",
ICCV 2019 (arXiv:1904.01186), Sec. 3. For generated inputs ``x_i = G(z_i)``, the teacher's
logits ``y_T^i`` ``(B, K)`` and its features ``f_T^i`` (before the fully connected layers):

    L_oh = (1/n) sum_i H_cross(y_T^i, t^i),  t^i = argmax_k y_T^i[k]          Eq. (3)
    L_a  = -(1/n) sum_i ||f_T^i||_1                                             Eq. (4)
    L_ie = -H_info( (1/n) sum_i softmax(y_T^i) )                                Eq. (5)
    L_G  = L_oh + alpha * L_a + beta * L_ie                                     Eq. (6)

(one-hot: the teacher should be sure of its class; activation: its features should fire
strongly; information entropy: the classes should be balanced over the batch). The student then
learns from the teacher on the same generated batch (the recipe's losses: KD at ``T = 1``,
Eq. (7)).

As in the authors' code (huawei-noah/Efficient-Computing, ``Data-Efficient-Model-Compression/
DAFL/DAFL_train.py``):

* ``L_a = -mean |f_T|`` over batch *and* feature elements (the paper sums over the feature, the
  code averages; ``a = 0.1`` is set for the mean). ``f_T`` is what the teacher's
  ``forward(out_feature=True)`` returns: the flattened last conv output of LeNet-5 (the input of
  its fully connected layers), the average-pooled last stage of the ResNets (the input of the
  last ``linear``). Here it is a tap (:mod:`darkknowledge.taps`): by default the last entry of the
  teacher's ``feature_taps()`` (the zoo's deepest stage output; after a ReLU, the mean of
  ``|map|`` equals the mean of ``|average-pooled map|``), else ``feature_tap`` (e.g.
  ``"fc:input"``).
* ``L_ie = sum_k p_k log10 p_k`` of the batch-mean probability ``p``: base-10 logarithms
  (``ie = 5`` is set for them); its minimum is ``-log10(K)`` at balanced classes.
* Defaults are the code's (its MNIST setting): ``--oh 1 --ie 5 --a 0.1``, ``--lr_G 0.2`` (Adam,
  never decayed), ``--latent_dim 100``; its CIFAR-10 README line: ``--lr_G 0.02 --latent_dim 1000
  --oh 0.05 --ie 5 --a 0.01`` (CIFAR-100: ``--oh 0.5 --ie 20 --a 0.1``). Generator and student
  step on every batch, the student on the generator's own batch (``sample`` reuses it).
* The generator's two inner batch norms have ``eps = 0.8`` (``nn.BatchNorm2d(128, 0.8)`` in the
  code; see :mod:`darkknowledge.synthesis.generators`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import run_model
from darkknowledge.synthesis.base import register_synthesizer
from darkknowledge.synthesis.generators import (
    GENERATOR,
    GeneratorParams,
    GeneratorSynthesizer,
)
from darkknowledge.taps import FeatureTaps, unwrap, validate_taps

_TINY = 1e-12
"""Floor of a class's batch-mean probability inside the log (0 * log 0 counts as 0)."""


def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """``L_oh``: cross-entropy of the teacher's logits against its own argmax, batch mean (Eq. 3).

    Args:
        logits: Teacher logits ``(B, K)``.

    Returns:
        Scalar >= 0; near 0 when every row is confidently one class.
    """
    logits = logits.float()  # (B, K)
    target = logits.detach().argmax(dim=-1)  # (B,)
    return F.cross_entropy(logits, target)


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """``L_a = -mean |f|`` over every element of the teacher's features (Eq. 4, the code's mean).

    Args:
        features: Teacher features ``(B, ...)`` (a vector ``(B, D)`` or a map ``(B, C, *S)``).

    Returns:
        Scalar <= 0; more negative for stronger activations.
    """
    return -features.float().abs().mean()


def information_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """``L_ie = sum_k p_k log10 p_k`` with ``p = mean_i softmax(y_i)``: minus the entropy of the
    batch's mean prediction, in base 10 (Eq. 5, the code's log10).

    Args:
        logits: Teacher logits ``(B, K)``.

    Returns:
        Scalar in ``[-log10 K, 0]``: ``-log10 K`` when the batch predicts every class equally
        often, 0 when it predicts one class only.
    """
    p = F.softmax(logits.float(), dim=-1).mean(dim=0)  # (K,)
    return (p * torch.log10(p.clamp_min(_TINY))).sum()


def dafl_generator_loss(
    logits: torch.Tensor, features: torch.Tensor | None, oh: float, a: float, ie: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_G = oh * L_oh + a * L_a + ie * L_ie`` (Eq. 6; the paper's ``alpha``, ``beta`` are ``a``, ``ie``).

    Args:
        logits: Teacher logits ``(B, K)`` on generated inputs.
        features: Teacher features ``(B, ...)``, or None when ``a == 0``.
        oh: Weight of the one-hot loss.
        a: Weight of the activation loss.
        ie: Weight of the information-entropy loss.

    Returns:
        ``(total, {"one_hot", "activation", "info_entropy": unweighted values, detached})``.
    """
    l_oh = one_hot_loss(logits)
    l_ie = information_entropy_loss(logits)
    total = oh * l_oh + ie * l_ie
    terms = {"one_hot": l_oh.detach(), "info_entropy": l_ie.detach()}
    if features is not None:
        l_a = activation_loss(features)
        total = total + a * l_a
        terms["activation"] = l_a.detach()
    return total, terms


class DaflParams(GeneratorParams):
    """DAFL's parameters (defaults: the authors' code, MNIST)."""

    latent_dim: int = Field(default=100, ge=1, description="width of the codes z (code: 100; CIFAR README: 1000)")
    oh: float = Field(default=1.0, ge=0.0, description="weight of the one-hot loss L_oh (code: 1)")
    a: float = Field(default=0.1, ge=0.0, description="weight alpha of the activation loss L_a (code: 0.1)")
    ie: float = Field(
        default=5.0, ge=0.0, description="weight beta of the information-entropy loss L_ie, base-10 (code: 5)"
    )
    feature_tap: str | None = Field(
        default=None,
        description="the teacher's feature for L_a, a tap path such as "
        "'fc:input' (None: the last of the teacher's feature_taps())",
    )
    every: int = Field(default=1, ge=1, description="the generator steps on every this-many-th batch (code: 1)")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=0.2),
        description="the generator's optimizer (code: Adam, lr 0.2; CIFAR: 0.02)",
    )
    scheduler: SchedulerConfig | None = Field(
        default_factory=lambda: SchedulerConfig(name="constant"),
        description="the generator's LR schedule (code: constant; None: the stage's train.scheduler)",
    )


@register_synthesizer("dafl")
class Dafl(GeneratorSynthesizer):
    """DAFL (Chen et al., ICCV 2019): ``G`` minimises ``oh L_oh + a L_a + ie L_ie`` on the teacher.

    The student's step trains on the batch the generator's last step made (detached), when it
    is the same latent batch; on any other batch on a fresh ``G(z)``.
    """

    citation = (
        "Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian. Data-Free Learning of Student Networks. "
        "ICCV 2019 (arXiv:1904.01186)."
    )
    summary = "generator trained so the teacher is confident, strongly activated and class-balanced on its samples"
    Params = DaflParams
    example: ClassVar[dict[str, Any]] = {"latent_dim": 8, "width": 0.125, "optimizer": {"lr": 0.01}}
    bn_eps = 0.8  # nn.BatchNorm2d(c, 0.8) in the authors' generator
    params: DaflParams

    def __init__(self, params: DaflParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__(params, teacher, input_shape, num_classes)
        self.feature_tap = self._resolve_tap(params, teacher) if params.a > 0 else None
        if self.feature_tap is not None:
            validate_taps(teacher, [self.feature_tap])  # fail now, naming the closest valid paths
        self._made: tuple[Batch, torch.Tensor] | None = None

    @staticmethod
    def _resolve_tap(params: DaflParams, teacher: nn.Module) -> str:
        if params.feature_tap is not None:
            return params.feature_tap
        model = unwrap(teacher)
        feature_taps = getattr(model, "feature_taps", None)
        taps = list(feature_taps()) if callable(feature_taps) else []
        if not taps:
            raise ConfigError(
                f"synthesizer 'dafl'.params.feature_tap: the teacher ({type(model).__name__}) has no feature_taps(), "
                "so name the feature of the activation loss: the input of its classifier, e.g. 'fc:input', or its "
                "last conv stage (or set a: 0 to drop the activation loss)"
            )
        return taps[-1]

    def generator_every(self) -> int:
        return self.params.every

    def part_loss(self, part: str, latent: Batch, student: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One generator step's loss, Eq. (6), on ``G(latent.z)``; keeps the batch for the student."""
        if part != GENERATOR:
            return super().part_loss(part, latent, student)
        self.to_device_of(latent)
        p: DaflParams = self.params
        x = self.generate(latent)  # (B, *input_shape)
        features = None
        if self.feature_tap is None:
            logits = run_model(self.teacher, x)  # (B, K), gradients flow to x
        else:  # hooks for this forward only: the teacher may be shared (references, other seeds)
            with FeatureTaps(self.teacher, [self.feature_tap], detach=False) as taps:
                logits = run_model(self.teacher, x)  # (B, K)
                features = taps.pop()[self.feature_tap]  # (B, ...), gradients flow to x
        self._made = (latent, x.detach())
        return dafl_generator_loss(logits, features, p.oh, p.a, p.ie)

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """The generator's own batch when ``latent`` is the one its last step used, else a fresh ``G(z)``."""
        if self._made is not None and self._made[0] is latent:
            return self._made[1]
        with torch.no_grad():
            return self.generate(latent)

    def describe(self) -> dict[str, Any]:
        p: DaflParams = self.params
        return {**super().describe(), "oh": p.oh, "a": p.a, "ie": p.ie, "feature_tap": self.feature_tap}
