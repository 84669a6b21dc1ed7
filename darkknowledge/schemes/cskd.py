"""Class-wise self-knowledge distillation (CS-KD): a sample learns from another of its class.

Yun, Park, Lee & Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020 (arXiv:2003.13964), Sec. 3 (the CS-KD objective). For each training sample ``x`` of
class ``y`` a different sample ``x'`` of the same class is drawn; the network's softened
prediction on ``x'`` (a constant: no gradient flows through it) teaches its prediction on ``x``::

    L_CS-KD = L_CE(x, y) + lambda_cls * T^2 * KL( P(y | x'; theta~, T) || P(y | x; theta, T) )

Plan: the network runs once on the concatenated ``[x; x']`` batch (so that under DDP every
parameter is used once per step); its halves are the views ``student`` and ``partner``, and
the partner half, detached, teaches the student half
(:class:`~darkknowledge.teachers.peers.Peer`) through the recipe's ``losses``. The paper's
objective (the official code alinlab/cs-kd: ``T = 4``, ``lambda_cls = 1``, 3 on fine-grained
data) is::

    losses:
      ce: {}
      cls: {loss: kd, T: 4, alpha: 1.0, weight: 1.0}

Partners are drawn by :class:`~darkknowledge.teachers.classwise.ClassPartners` from the
training data the loader serves. Differences from the official code: its partner forward is a
separate ``no_grad`` call (with batch-norm this changes the batch statistics slightly), and
its pair sampler augments ``x'``; a sample without a partner (unlabelled, alone in its class)
is its own partner, which teaches it nothing through a KL term (the official code has none).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.data.tensors import TensorData
from darkknowledge.engine.task import MAIN
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs, SetupInfo, class_logits
from darkknowledge.schemes.base import MOVED_TO_LOSSES, Scheme, register_scheme
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.teachers.classwise import ClassPartners
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.peers import Peer

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

log = logging.getLogger(__name__)


def split(out: Outputs, b: int) -> tuple[Outputs, Outputs]:
    """Outputs of ``[x; x']`` cut into those of ``x`` and of ``x'`` (batch-first tensors)."""
    feats = {k: v.split([b, v.shape[0] - b]) for k, v in out.features.items()}
    logits = class_logits(out, "scheme 'cskd'")
    return (
        Outputs(logits=logits[:b], features={k: v[0] for k, v in feats.items()}),
        Outputs(logits=logits[b:], features={k: v[1] for k, v in feats.items()}),
    )


class CSKDFlow(Flow):
    """The network on ``[x; x']``: the views ``student`` (x) and ``partner`` (x')."""

    def __init__(self, student: nn.Module, links: list[Any], num_classes: int, seed: int) -> None:
        self.num_classes, self.seed = num_classes, seed
        self.partners: ClassPartners | None = None
        self._step_key = 0
        super().__init__({"student": student}, links, tap_models={"partner": student})

    def route_taps(self, wanted: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """The partner half is the same forward pass: its taps are the network's."""
        wanted["student"] = tuple(dict.fromkeys(wanted.get("student", ()) + wanted.pop("partner", ())))
        return wanted

    def attach(self, loader: Any) -> None:
        data = loader.data
        if not isinstance(data, TensorData):
            raise ConfigError(
                f"cskd draws same-class partners from an in-memory tensor dataset, got {type(data).__name__}"
            )
        if getattr(loader, "primary", None) not in (None, getattr(getattr(loader, "views", None), "base", None)):
            raise ConfigError(
                f"cskd draws partners from the stored input, but the student reads view "
                f"{loader.primary!r} of a paired dataset; drop student.input (or use another scheme)"
            )
        if getattr(loader, "augment", None) is not None:
            log.warning("cskd: data.augment is on, but the partners x' are fetched without augmentation")
        self.partners = ClassPartners(
            data.x, data.y, self.num_classes, self.seed, getattr(loader, "_normalize_arg", None)
        ).to(loader.device)

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """The dry run, after checking that the batch addresses the training data partners come from."""
        partners = self.partners
        if partners is not None:
            idx = batch.idx.to(partners.y.device)
            if idx.numel() and (
                int(idx.max()) >= len(partners.y) or not torch.equal(partners.y[idx], batch.y.to(partners.y.device))
            ):
                raise ConfigError(
                    "cskd: the batch's indices and labels do not address the training data given to "
                    "attach(loader); cskd draws the partners from that data"
                )
        super().setup(batch, info)

    def forward(
        self, batch: Batch, epoch_progress: float = 0.0, part: str = MAIN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if part == MAIN:
            self._step_key = round(epoch_progress * 1_000_000)  # the draw of this step (the same on every rank)
        return super().forward(batch, epoch_progress, part)

    def compute_views(self, batch: Batch) -> dict[str, Outputs]:
        if self.partners is None:
            raise RuntimeError("cskd: the partners are drawn from the training data given to attach(loader)")
        partner, _ = self.partners.draw(batch.idx, batch.y, self._step_key)  # (B,)
        both = self.run_view("student", torch.cat([batch.x, self.partners.fetch(partner, batch.x)]))  # (2B, ...)
        student, partner_out = split(both, len(batch))
        return {"student": student, "partner": partner_out}


@register_scheme("cskd")
class CSKD(Scheme):
    """CS-KD: the student's prediction on a same-class sample teaches its prediction on x."""

    citation = "Yun et al., Regularizing Class-wise Predictions via Self-knowledge Distillation, CVPR 2020."
    summary = "the model's own (detached) prediction on another sample of the class teaches it"
    example: ClassVar[dict[str, Any]] = {
        "teacher": None,
        "losses": {"ce": {}, "cls": {"loss": "kd", "T": 4.0, "alpha": 1.0}},
    }
    moved = {
        "T": MOVED_TO_LOSSES["T"],
        "lambda_cls": "the class-wise term is a loss: losses.cls: {loss: kd, T: 4, alpha: 1, weight: lambda_cls}",
    }

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (seed's init), its class-wise partner half as its teacher."""
        require_teacher_terms(ctx.objective(), "cskd", "cls: {loss: kd, T: 4, alpha: 1, weight: 1}")
        student = ctx.student(seed)
        links = taught("student", ctx.objective, [Peer("partner", student, name="same-class partner")])
        flow = CSKDFlow(student, links, ctx.info.num_classes, seed)
        return FlowTask(flow, {"student": flow.view_model("student")})
