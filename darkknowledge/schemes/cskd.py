"""Class-wise self-knowledge distillation (CS-KD): a sample learns from another of its class.

Yun, Park, Lee & Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020 (arXiv:2003.13964), Sec. 3 (the CS-KD objective). For each training sample ``x`` of class ``y`` a
different sample ``x'`` of the same class is drawn; the network's softened prediction on
``x'`` (a constant: no gradient flows through it) teaches its prediction on ``x``::

    L_CS-KD = L_CE(x, y) + lambda_cls * T^2 * KL( P(y | x'; theta~, T) || P(y | x; theta, T) )

where ``theta~`` is a copy of the current weights that receives no gradient. Defaults follow
the official code (alinlab/cs-kd): ``T = 4``, ``lambda_cls = 1`` (3 on fine-grained data),
cross-entropy on ``x`` only (not on ``x'``), KL summed over classes and averaged over samples.

Here ``L_CE`` is the recipe's ``losses`` objective (normally ``ce``; it must not need a
teacher). The network runs once on the concatenated ``[x; x']`` batch (so that under DDP every
parameter is used once per step); the partner half is detached. Differences from the official
code: its partner forward is a separate ``no_grad`` call (with batch-norm this changes the batch
statistics slightly), and its pair sampler augments ``x'``; here partners are fetched from the
training tensors as the loader would deliver them, without augmentation.

Pairing is deterministic: the partner of training sample ``i`` at a step is drawn from a
generator seeded by the run seed and the step's position ``epoch_progress`` (no state), so
DDP ranks and resumed runs draw the same partners.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.base import Scheme
from darkknowledge.taps import unwrap

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext

log = logging.getLogger(__name__)


def class_wise_kd_loss(logits: torch.Tensor, partner_logits: torch.Tensor, has_partner: torch.Tensor,
                       T: float) -> torch.Tensor:
    """``T^2 * KL(p_T(x') || p_T(x))`` averaged over the samples that have a partner.

    Args:
        logits: ``(B, K)`` predictions on ``x`` (the gradient flows into them).
        partner_logits: ``(B, K)`` predictions on the partners ``x'`` (detached here).
        has_partner: ``(B,)`` bool; rows without a partner contribute 0.
        T: Temperature > 0.

    Returns:
        Scalar >= 0; 0 when no row has a partner.
    """
    keep = has_partner.to(logits.dtype)[:, None]  # (B, 1)
    # zeroed rows are uniform vs uniform: KL exactly 0 and no gradient, without a host sync
    kl = kd_soft_loss(logits * keep, partner_logits.detach() * keep, T)  # sum over kept rows / B
    return kl * logits.shape[0] / has_partner.sum().clamp(min=1)


class ClassPartners:
    """Draws, for each training sample, another training sample of the same class.

    Args:
        x: Training inputs ``(N, ...)`` (``uint8`` images are scaled to ``[0, 1]`` on fetch).
        y: Training labels ``(N,)``; ``-1`` (unlabelled) samples never get or serve as partners.
        num_classes: K.
        seed: Base seed of the draws.
        normalization: The loader's ``(mean, std)`` per channel, or None.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int,
                 normalization: tuple[Any, Any] | None = None) -> None:
        y = y.long()
        labelled = y != UNLABELED
        if y.numel() and int(y.max()) >= num_classes:
            raise ConfigError(f"cskd: a training label {int(y.max())} is >= the class count {num_classes}")
        self.x, self.y, self.seed = x, y, seed
        key = torch.where(labelled, y, torch.full_like(y, num_classes))  # unlabelled sort last
        self.order = torch.sort(key, stable=True).indices  # (N,) samples grouped by class
        self.count = torch.bincount(y[labelled], minlength=num_classes)  # (K,)
        self.start = torch.cumsum(self.count, 0) - self.count  # (K,)
        group_start = torch.cat([self.start, self.count.sum()[None]])  # (K+1,) the unlabelled group last
        self.rank = torch.empty_like(self.order)  # (N,) position of each sample within its class
        self.rank[self.order] = torch.arange(len(y)) - group_start[key[self.order]]
        self.norm = None if normalization is None else tuple(torch.as_tensor(v, dtype=torch.float32) for v in normalization)

    def to(self, device: torch.device) -> ClassPartners:
        for name in ("x", "y", "order", "count", "start", "rank"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def draw(self, idx: torch.Tensor, y: torch.Tensor, step_key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Partners of the samples ``idx`` (labels ``y``) at the step ``step_key``.

        Returns:
            ``(partner (B,), has_partner (B,))``: a partner is another sample of the same class;
            samples without one (unlabelled, or alone in their class) get themselves and False.
        """
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step_key) % (2**63 - 1))
        u = torch.rand(len(self.y), generator=gen).to(idx.device)[idx]  # (B,) one draw per training sample
        c = y.clamp(min=0)  # (B,)
        count = self.count.to(idx.device)[c]  # (B,)
        others = (count - 1).clamp(min=1)
        r = (u * others).long().clamp(max=others - 1)  # (B,) rank among the class's other samples
        r = r + (r >= self.rank.to(idx.device)[idx]).long()  # skip the sample itself
        partner = self.order.to(idx.device)[(self.start.to(idx.device)[c] + r).clamp(max=len(self.y) - 1)]
        has = (y != UNLABELED) & (count > 1)
        return torch.where(has, partner, idx), has

    def fetch(self, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inputs of samples ``idx`` as the loader delivers them (scaled, normalised) ``(B, ...)``."""
        x = self.x[idx.to(self.x.device)].to(like.device)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.to(like.dtype)
        if self.norm is not None:
            mean, std = (t.to(x.device, x.dtype) for t in self.norm)
            shape = (1, -1) + (1,) * (x.ndim - 2) if mean.numel() > 1 else (1,)
            x = (x - mean.reshape(shape)) / std.reshape(shape)
        return x


def teacher_free_objective(ctx: SchemeContext, scheme: str) -> Objective:
    """The recipe's ``losses`` as the supervised part of a teacher-free scheme (checked)."""
    objective = ctx.objective()
    for name, term in objective.terms.items():
        if term.needs_spec.teacher:
            raise ConfigError(f"scheme {scheme!r} has no teacher, but losses.{name} ({type(term).__name__}) needs "
                              "one; use a teacher-free objective, e.g. losses: {ce: {}}")
    return objective


class CSKDObjective(nn.Module):
    """The trainable module: the student, the supervised objective and the class-wise term."""

    def __init__(self, student: nn.Module, objective: Objective, partners: ClassPartners, T: float,
                 lambda_cls: float) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.partners = partners  # plain attribute: training tensors, not state
        self.T, self.lambda_cls = T, lambda_cls

    def forward(self, batch: Batch, teacher: Outputs | None = None,
                epoch_progress: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = len(batch)
        partner, has = self.partners.draw(batch.idx, batch.y, round(epoch_progress * 1_000_000))
        logits = self.student(torch.cat([batch.x, self.partners.fetch(partner, batch.x)]))  # (2B, K)
        z, z_partner = logits[:b], logits[b:]  # (B, K) each
        loss, terms = self.objective(Outputs(logits=z), None, batch, epoch_progress)
        cls = class_wise_kd_loss(z, z_partner.detach(), has, self.T)
        terms = {**terms, "cls": cls.detach()}
        return loss + self.lambda_cls * cls, terms


@register_scheme("cskd")
class CSKD(Scheme):
    """CS-KD: the student's prediction on a same-class sample teaches its prediction on x.

    Args:
        student: The model to train.
        objective: The supervised objective on ``x`` (no teacher).
        partners: The same-class partner sampler over the training set.
        T: Temperature.
        lambda_cls: Weight of the class-wise term.
    """

    citation = "Yun et al., Regularizing Class-wise Predictions via Self-knowledge Distillation, CVPR 2020."
    summary = "the model's own (detached) prediction on another sample of the class teaches it"

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        *,
        T: Annotated[float, Field(gt=0.0)] = 4.0,
        lambda_cls: Annotated[float, Field(ge=0.0)] = 1.0,
    ) -> CSKD:
        """The recipe's student (seed's init) with CS-KD over the labelled training split.

        Args:
            ctx: The run's context.
            seed: The run seed (also seeds the partner draws).
            T: Temperature of both softmaxes (official code: 4).
            lambda_cls: Weight of the class-wise KL (official: 1 on CIFAR, 3 on fine-grained sets).
        """
        data = ctx.train_data
        if ctx.cfg.data.augment.enabled():
            log.warning("cskd: data.augment is on, but the partners x' are fetched without augmentation")
        partners = ClassPartners(data.x, data.y, ctx.info.num_classes, seed, ctx.info.normalization)
        return cls(ctx.student(seed), teacher_free_objective(ctx, "cskd"), partners, T, lambda_cls)

    def __init__(self, student: nn.Module, objective: Objective, partners: ClassPartners, T: float = 4.0,
                 lambda_cls: float = 1.0) -> None:
        needs = objective.bind(student, None)
        if needs.student_taps:
            raise ConfigError(f"cskd: losses reading student features {list(needs.student_taps)} are not "
                              "supported; use logit losses such as ce")
        self._module = CSKDObjective(unwrap(student), objective, partners, T, lambda_cls)

    @property
    def module(self) -> nn.Module:
        return self._module

    def to(self, device: torch.device) -> CSKD:
        self._module.to(device)
        self._module.partners.to(device)
        return self

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: the labels must be those of the training tensors at ``batch.idx``."""
        module = self._module
        partners = module.partners
        idx = batch.idx.to(partners.y.device)
        if idx.numel() and (int(idx.max()) >= len(partners.y)
                            or not torch.equal(partners.y[idx], batch.y.to(partners.y.device))):
            raise ConfigError("cskd: the batch's indices do not address the labelled training split "
                              "(cskd draws partners from it; do not use a transfer set with cskd)")
        was_training = module.training
        module.eval()
        with torch.no_grad():
            logits = module.student(batch.x)  # (B, K)
        info = info or SetupInfo(num_samples=len(batch), batch_size=len(batch))
        info = SetupInfo(info.num_samples, int(logits.shape[-1]), info.batch_size, info.epochs)
        module.objective.setup(Outputs(logits=logits), None, info)
        module.objective.to(batch.x.device)
        module.train(was_training)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self._module.student}

    def describe(self) -> dict[str, Any]:
        return {"losses": [*self._module.objective.terms, "cls"], "adapter_params": count_params(self._module.objective)}
