"""Be Your Own Teacher: self-distillation from a network's deepest classifier to its shallow heads.

Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of
Convolutional Neural Networks via Self Distillation", ICCV 2019 (arXiv:1905.08094), Sec. 3.2.
Auxiliary heads (a bottleneck and a classifier) are attached to the network's stages; the
network's own classifier (the deepest, ``C``) teaches every shallower head ``i``:

    L = (1 - a) * CE(q_C, y)
        + sum_{i < C} [ (1 - a) * CE(q_i, y) + a * T^2 * KL(q_C^T || q_i^T) + l * ||F_i - F_C||^2 ]

``q^T`` are softmaxes at temperature ``T``; ``F_i`` is head ``i``'s bottleneck output and
``F_C`` the network's penultimate feature (the input of ``fc``).

Plan: the network is the view ``student``, each head a view ``headN`` computed from the
network's tapped stage; the network's outputs, detached, teach every head
(:class:`~darkknowledge.teachers.peers.Peer`: only the deepest classifier teaches, and the
distillation terms train the heads and the stages below them, never the deepest classifier).
What each classifier learns is the recipe's ``losses``: the terms that read no teacher apply
to every classifier (``ce: {weight: 1 - a}``, the deepest one included, as in the authors'
code), the terms that read one to the heads. The paper's objective is::

    losses:
      ce: {weight: 0.7}                                      # (1 - a) CE
      kd: {T: 3, alpha: 1.0, weight: 0.3}                    # a T^2 KL(q_C^T || q_i^T)
      feat: {loss: fitnet, regressor: false, relu: false,    # l ||F_i - F_C||^2 (mean squared error)
             student_taps: [fc:input], teacher_taps: [fc:input], weight: 0.03}

(``a = 0.3``, ``l = 0.03``, ``T = 3``: the paper's code). Any other loss works the same way
(DKD, DIST, a relation loss on the heads' penultimate features). A head's module paths are
``bottleneck`` and ``fc`` (``fc:input`` is its feature ``F_i``). The heads are removed at
export; the report shows each head's accuracy (an early-exit view).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import Outputs
from darkknowledge.models import count_params, default_taps
from darkknowledge.schemes.base import MOVED_TO_LOSSES, Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.heads import AuxHead, BottleneckKind, HeadView, make_head
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.taps import probe_shapes, resolve_tap, unwrap
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.peers import Peer

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

log = logging.getLogger(__name__)

PENULTIMATE = "fc:input"
"""The deepest feature ``F_C``: the input of the network's classifier ``fc``."""


def check_stages(net: nn.Module, stages: list[str] | None) -> tuple[list[str], str | None]:
    """The heads' stages (default: every stage of ``feature_taps()`` but the deepest) and the deepest stage."""
    deepest = default_taps(net)
    if stages is None:
        if len(deepest) < 2:
            raise ConfigError(
                f"byot: model {type(net).__name__} lists {len(deepest)} stage(s) in feature_taps(); "
                "set scheme.params.stages to module paths for the heads"
            )
        stages = deepest[:-1]
    if not stages:
        raise ConfigError("byot: scheme.params.stages is empty; give at least one module path for a head")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"byot: scheme.params.stages lists a path twice: {stages}")
    for s in stages:
        resolve_tap(net, s)  # unknown paths: TapError naming the closest valid paths
    resolve_tap(net, PENULTIMATE)
    return list(stages), (deepest[-1] if deepest else None)


def build_heads(
    net: nn.Module,
    stages: list[str],
    deep_stage: str | None,
    sample: torch.Tensor,
    bottleneck: BottleneckKind,
    width: int | None,
) -> list[AuxHead]:
    """One head per stage, sized by a dry run of ``net`` on ``sample``."""
    paths = list(dict.fromkeys([*stages, PENULTIMATE] + ([deep_stage] if deep_stage else [])))
    shapes = probe_shapes(net, sample, paths)
    dim_shape = shapes[PENULTIMATE]
    if len(dim_shape) != 1:
        raise ShapeError(f"byot: the penultimate feature 'fc:input' has shape {dim_shape}; expected (D,)")
    was_training = net.training
    net.eval()
    with torch.no_grad():
        num_classes = int(net(sample[:1]).shape[-1])  # (1, K)
    net.train(was_training)
    map_shape = shapes.get(deep_stage) if deep_stage else None
    return [
        make_head(
            bottleneck,
            shapes[stage],
            map_shape,
            dim_shape[0],
            num_classes,
            width,
            where=f"byot head{i + 1} at {stage!r}",
        )
        for i, stage in enumerate(stages)
    ]


class BYOTFlow(Flow):
    """The network (view ``student``) and its heads (views ``head1``...), run on the network's stages."""

    def __init__(self, net: nn.Module, heads: list[AuxHead], stages: list[str], links: list[Any]) -> None:
        self.stages = list(stages)
        self.head_views = [f"head{i + 1}" for i in range(len(heads))]
        super().__init__(
            {"student": net, **dict(zip(self.head_views, heads))}, links, extra_taps={"student": self.stages}
        )

    def compute_views(self, batch: Batch) -> dict[str, Outputs]:
        net = self.run_view("student", batch.x)
        views = {"student": net}
        for name, stage in zip(self.head_views, self.stages):
            taps = self.taps.get(name)
            if taps is not None:
                taps.active = True
            try:
                _, logits = self.view_model(name)(net.feature(stage))  # (B, D), (B, K)
            finally:
                if taps is not None:
                    taps.active = False
            views[name] = Outputs(logits=logits, features=taps.pop() if taps is not None else {})
        return views


class BYOTParams(SchemeParams):
    """``scheme.params`` of ``byot``."""

    stages: list[str] | None = Field(
        default=None,
        description="module paths of the stages that get a head "
        "(default: every stage of feature_taps() but the deepest)",
    )
    bottleneck: BottleneckKind = Field(
        default="conv", description="conv (strided convs to the deepest stage's map) or mlp"
    )
    width: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="bottleneck width (default: the deepest stage's channels, or D for mlp)"
    )


@register_scheme("byot")
class BYOT(Scheme):
    """Self-distillation: the network's deepest classifier teaches auxiliary heads at its stages."""

    citation = (
        "Zhang et al., Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks "
        "via Self Distillation, ICCV 2019."
    )
    summary = "the network's deepest classifier teaches auxiliary heads at its shallower stages (self-distillation)"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "byot: the 'student' row is the network alone (its own, deepest classifier; heads removed at export); "
            "'headN' rows are early exits (the network up to stage N plus that head); their params column counts "
            "the whole network"
        ),
    )
    example: ClassVar[dict[str, Any]] = {
        "teacher": None,
        "student": {"name": "cnn1d", "params": {"channels": 8}},
        "losses": {"ce": {"weight": 0.7}, "kd": {"T": 3.0, "alpha": 1.0, "weight": 0.3}},
    }
    Params = BYOTParams
    moved = {
        **{k: MOVED_TO_LOSSES[k] for k in ("T", "alpha")},
        "lam": "the feature term is a loss: losses.feat: {loss: fitnet, regressor: false, ...} with its weight",
    }

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (the baseline's init of ``seed``) with heads at ``params.stages``."""
        require_teacher_terms(ctx.objective(), "byot", "kd: {T: 3, alpha: 1, weight: 0.3}")
        return byot_task(
            ctx.student(seed),
            ctx.objective,
            params.stages,
            params.bottleneck,
            params.width,
            torch.zeros(2, *ctx.info.input_shape),
        )


def byot_task(
    net: nn.Module,
    make: Any,
    stages: list[str] | None,
    bottleneck: BottleneckKind,
    width: int | None,
    sample: torch.Tensor,
) -> FlowTask:
    """BYOT's plan for ``net``: heads at ``stages``, each taught by the network through ``make()``."""
    net = unwrap(net)
    if bottleneck not in ("conv", "mlp"):
        raise ConfigError(f"byot: unknown bottleneck {bottleneck!r}; valid: 'conv', 'mlp'")
    stages, deep_stage = check_stages(net, stages)
    heads = build_heads(net, stages, deep_stage, sample, bottleneck, width)
    log.info("byot: %d heads at %s (%d params)", len(heads), stages, sum(count_params(h) for h in heads))
    teacher = Peer("student", net, name="the deepest classifier")
    links: list[Any] = taught("student", make, [], untaught=True)
    if not links:
        raise ConfigError(
            f"scheme 'byot': the network's own classifier learns from the terms that read no teacher "
            f"(the paper's (1 - a) CE), but none of the losses {list(make().terms)} is one; add "
            "ce: {weight: 0.7}"
        )
    for i in range(len(heads)):
        links += taught(f"head{i + 1}", make, [teacher], suffix=f"@head{i + 1}")
    flow = BYOTFlow(net, heads, stages, links)
    evaluate: dict[str, nn.Module] = {"student": net}
    for i, (stage, head) in enumerate(zip(stages, heads)):
        evaluate[f"head{i + 1}"] = HeadView(net, stage, head)
    return FlowTask(flow, evaluate, export=net)
