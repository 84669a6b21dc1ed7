"""Be Your Own Teacher: self-distillation from a network's deepest classifier to its shallow heads.

Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of
Convolutional Neural Networks via Self Distillation", ICCV 2019 (arXiv:1905.08094), Sec. 3.2.
Auxiliary heads (a bottleneck and a classifier) are attached to the network's stages; the
network's own classifier (the deepest, ``C``) teaches every shallower head ``i``:

    L = (1 - a) * CE(q_C, y)
        + sum_{i < C} [ (1 - a) * CE(q_i, y) + a * T^2 * KL(q_C^T || q_i^T) + l * ||F_i - F_C||^2 ]

``q^T`` are softmaxes at temperature ``T``; ``F_i`` is head ``i``'s bottleneck output and
``F_C`` the network's penultimate feature (the input of ``fc``). Only the deepest classifier
teaches: ``q_C`` and ``F_C`` are detached in the KL and feature terms, so the distillation
terms train the heads and the shallow stages below them, never the deepest classifier. As in
the authors' code the ``(1 - a)`` factor applies to every cross-entropy, the deepest one
included. ``||F_i - F_C||^2`` is averaged over the feature's elements (a mean squared error)
so that ``l`` does not depend on the feature width. Defaults follow the paper's code
(``a = 0.3``, ``l = 0.03``, ``T = 3``). The heads are removed at export; the report shows
each head's accuracy (an early-exit view).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import count_params, default_taps
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.base import Scheme
from darkknowledge.schemes.heads import AuxHead, BottleneckKind, HeadView, make_head
from darkknowledge.taps import FeatureTaps, probe_shapes, resolve_tap, unwrap

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext

log = logging.getLogger(__name__)

PENULTIMATE = "fc:input"
"""The deepest feature ``F_C``: the input of the network's classifier ``fc``."""


def byot_loss(
    deep_logits: torch.Tensor,
    deep_feat: torch.Tensor,
    head_logits: list[torch.Tensor],
    head_feats: list[torch.Tensor],
    y: torch.Tensor,
    alpha: float,
    lam: float,
    T: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BYOT objective (module docstring): the deepest classifier teaches every head.

    Args:
        deep_logits: The network's own logits ``q_C`` ``(B, K)``.
        deep_feat: The network's penultimate feature ``F_C`` ``(B, D)``.
        head_logits: Each shallow head's logits ``(B, K)``.
        head_feats: Each shallow head's bottleneck output ``(B, D)``.
        y: Labels ``(B,)``; ``-1`` (unlabelled) is ignored by the cross-entropies.
        alpha: Weight ``a`` of the KL term against the cross-entropies, in ``[0, 1]``.
        lam: Weight ``l`` of the feature term.
        T: Temperature of the KL term.

    Returns:
        ``(total, terms)`` with unweighted, detached ``ce`` (deepest), ``ce_heads``, ``kl`` and
        ``feat`` (the last three summed over heads).
    """
    teacher_logits, teacher_feat = deep_logits.detach(), deep_feat.detach()  # only the deepest teaches
    ce = cross_entropy(deep_logits, y)
    zero = deep_logits.new_zeros(())
    ce_heads, kl, feat = zero, zero, zero
    for logits, f in zip(head_logits, head_feats):
        ce_heads = ce_heads + cross_entropy(logits, y)
        kl = kl + kd_soft_loss(logits, teacher_logits, T)  # T^2 KL(q_C^T || q_i^T)
        feat = feat + F.mse_loss(f.float(), teacher_feat.float())  # mean over (B, D)
    total = (1.0 - alpha) * (ce + ce_heads) + alpha * kl + lam * feat
    return total, {"ce": ce.detach(), "ce_heads": ce_heads.detach(), "kl": kl.detach(), "feat": feat.detach()}


class BYOTModule(nn.Module):
    """The network plus its auxiliary heads (built in :meth:`build_heads`), trained together.

    ``forward`` runs the network once with taps on the head stages and on ``fc:input``, applies
    every head and returns the BYOT loss, so under DDP every parameter is used in the forward.
    """

    def __init__(self, net: nn.Module, stages: list[str], alpha: float, lam: float, T: float) -> None:
        super().__init__()
        self.net = net
        self.stages = list(stages)
        self.alpha, self.lam, self.T = alpha, lam, T
        self.heads = nn.ModuleList()
        self.taps = FeatureTaps(net, [*self.stages, PENULTIMATE])
        self.taps.active = False  # record only inside the training forward, not when evaluating

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(deep logits (B, K), F_C (B, D), head logits [(B, K)], head features [(B, D)])``."""
        self.taps.active = True
        try:
            logits = self.net(x)  # (B, K)
        finally:
            self.taps.active = False
        feats = self.taps.pop()
        deep = feats[PENULTIMATE].flatten(1)  # (B, D)
        outs = [head(feats[s]) for s, head in zip(self.stages, self.heads)]
        return logits, deep, [o[1] for o in outs], [o[0] for o in outs]

    def forward(self, batch: Batch, teacher: Any = None, epoch_progress: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(self.heads) != len(self.stages):
            raise RuntimeError("BYOT heads are not built yet: call BYOT.setup(batch) first")
        logits, deep, head_logits, head_feats = self.outputs(batch.x)
        return byot_loss(logits, deep, head_logits, head_feats, batch.y, self.alpha, self.lam, self.T)


@register_scheme("byot")
class BYOT(Scheme):
    """Self-distillation: the network's deepest classifier teaches auxiliary heads at its stages.

    Args:
        net: The network (a zoo model with a classifier ``fc``).
        stages: Module paths of the stages that get a head (default: every stage of
            ``feature_taps()`` but the deepest).
        alpha: KL weight ``a`` (cross-entropies get ``1 - a``).
        lam: Feature-term weight ``l``.
        T: KL temperature.
        bottleneck: ``conv`` (strided convs to the deepest stage's map) or ``mlp``.
        width: Bottleneck width (default: the deepest stage's channels, or ``D`` for ``mlp``).
    """

    citation = ("Zhang et al., Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks "
                "via Self Distillation, ICCV 2019.")
    summary = "the network's deepest classifier teaches auxiliary heads at its shallower stages (self-distillation)"
    report_notes: ClassVar[tuple[str, ...]] = (
        ("byot: the 'student' row is the network alone (its own, deepest classifier; heads removed at export); "
         "'headN' rows are early exits (the network up to stage N plus that head); their params column counts "
         "the whole network"),
    )

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        stages: list[str] | None = None,
        alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3,
        lam: Annotated[float, Field(ge=0.0)] = 0.03,
        T: Annotated[float, Field(gt=0.0)] = 3.0,
        bottleneck: BottleneckKind = "conv",
        width: Annotated[int, Field(ge=1)] | None = None,
    ) -> BYOT:
        """The recipe's student (the baseline's init of ``seed``) with heads at ``stages``."""
        return cls(ctx.student(seed), stages, alpha=alpha, lam=lam, T=T, bottleneck=bottleneck, width=width)

    def __init__(self, net: nn.Module, stages: list[str] | None = None, alpha: float = 0.3, lam: float = 0.03,
                 T: float = 3.0, bottleneck: BottleneckKind = "conv", width: int | None = None) -> None:
        net = unwrap(net)
        deepest = default_taps(net)
        if stages is None:
            if len(deepest) < 2:
                raise ConfigError(f"byot: model {type(net).__name__} lists {len(deepest)} stage(s) in feature_taps(); "
                                  "set scheme.params.stages to module paths for the heads")
            stages = deepest[:-1]
        if not stages:
            raise ConfigError("byot: scheme.params.stages is empty; give at least one module path for a head")
        if len(set(stages)) != len(stages):
            raise ConfigError(f"byot: scheme.params.stages lists a path twice: {stages}")
        for s in stages:
            resolve_tap(net, s)  # unknown paths: TapError naming the closest valid paths
        resolve_tap(net, PENULTIMATE)
        self.deep_stage = deepest[-1] if deepest else None
        self.bottleneck, self.width = bottleneck, width
        if bottleneck not in ("conv", "mlp"):
            raise ConfigError(f"byot: unknown bottleneck {bottleneck!r}; valid: 'conv', 'mlp'")
        self._module = BYOTModule(net, list(stages), alpha, lam, T)
        self._views: dict[str, HeadView] = {}

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def net(self) -> nn.Module:
        return self._module.net

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Probe the stage shapes on one batch and build one head per stage (once)."""
        m = self._module
        if len(m.heads) == len(m.stages):
            return
        paths = [*m.stages, PENULTIMATE] + ([self.deep_stage] if self.deep_stage else [])
        shapes = probe_shapes(m.net, batch.x, list(dict.fromkeys(paths)))
        dim_shape = shapes[PENULTIMATE]
        if len(dim_shape) != 1:
            raise ShapeError(f"byot: the penultimate feature 'fc:input' has shape {dim_shape}; expected (D,)")
        was_training = m.net.training
        m.net.eval()
        with torch.no_grad():
            num_classes = int(m.net(batch.x[:1]).shape[-1])  # (1, K)
        m.net.train(was_training)
        map_shape = shapes.get(self.deep_stage) if self.deep_stage else None
        for i, stage in enumerate(m.stages):
            head = make_head(self.bottleneck, shapes[stage], map_shape, dim_shape[0], num_classes,
                             self.width, where=f"byot head{i + 1} at {stage!r}")
            m.heads.append(head.to(batch.x.device))
        log.info("byot: %d heads at %s (%d params)", len(m.heads), m.stages, count_params(m.heads))

    def eval_models(self) -> dict[str, nn.Module]:
        """``student`` (the network alone) and ``head1``... (early exits), once the heads exist."""
        m = self._module
        models: dict[str, nn.Module] = {"student": m.net}
        for i, (stage, head) in enumerate(zip(m.stages, m.heads)):
            view = self._views.get(stage)
            if view is None or view.head is not head:
                view = self._views[stage] = HeadView(m.net, stage, head)
            models[f"head{i + 1}"] = view
        return models

    def export_model(self) -> nn.Module:
        """The bare network (no heads): rebuildable from its zoo spec."""
        return self._module.net

    def heads(self) -> list[AuxHead]:
        """The auxiliary heads, shallow to deep (empty before :meth:`setup`)."""
        return list(self._module.heads)

    def describe(self) -> dict[str, Any]:
        return {"losses": ["ce", "ce_heads", "kl", "feat"], "adapter_params": count_params(self._module.heads)}
