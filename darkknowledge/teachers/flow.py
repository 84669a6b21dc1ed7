"""One flow of knowledge: trainable views, the teachers that feed them, the objectives they learn by.

A :class:`Flow` is the trainable module of a stage. It holds

* **views**: the trainable models whose outputs (logits and tapped features) a step computes:
  the student; a cohort's peers; a network's early-exit heads; a gated ensemble;
* **links**: "this teacher teaches this view through this objective" (:class:`Link`); a view
  with no teacher learns its objective alone (e.g. cross-entropy);
* **groups** of links that feed one view from several teachers: summed, averaged (mutual
  learning's peers, one loss per teacher), or one drawn per step (a random teacher).

Each step computes every view once (``compute_views``), asks each link's teacher for its outputs
(online teachers are made from the step's views, detached) and sums the objectives. A term
that brings an adversary (a discriminator, :class:`~darkknowledge.losses.base.Adversary`) makes
the flow a task of several parts: the student's step keeps its view's and its teacher's outputs,
detached, and the adversary's own step (``forward(..., part=name)``) learns from them. Losses own
the math, teachers provide outputs; which views exist and who teaches whom is the scheme's
plan, and a scheme whose views are not plain forward passes (heads on tapped stages, a gated
ensemble, a model run on two halves of a batch) overrides ``compute_views`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
from torch import nn

from darkknowledge.data.batch import Batch, model_input
from darkknowledge.engine.task import MAIN
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import Adversary, Needs, Outputs, SetupInfo, run_model
from darkknowledge.losses.objective import Objective
from darkknowledge.taps import FeatureTaps, unwrap, validate_taps
from darkknowledge.teachers.base import Teacher, detached
from darkknowledge.teachers.mix import draw_teacher

Mode = Literal["sum", "mean", "draw"]


def tapped_outputs(model: nn.Module, taps: FeatureTaps | None, x: Any) -> Outputs:
    """``model(x)`` as :class:`Outputs`, with the features of ``taps`` recorded during this call
    only (taps stay inactive otherwise, so evaluating the model records nothing). A mapping
    ``x`` is passed as keyword arguments (e.g. a tokenizer's output)."""
    if taps is not None:
        taps.active = True
    try:
        logits = run_model(model, x)  # (B, K)
    finally:
        if taps is not None:
            taps.active = False
    return Outputs(logits=logits, features=taps.pop() if taps is not None else {})


class Link:
    """``teacher`` teaches the view ``view`` through ``objective`` (no teacher: the view learns alone).

    Args:
        view: The taught view's name.
        objective: What the view learns (only terms this teacher can feed).
        teacher: The teacher, or None.
        suffix: Appended to the objective's term names in metrics (e.g. ``@peer1``, ``@t0``).
        where: Config path of the objective, for messages.
    """

    def __init__(
        self, view: str, objective: Objective, teacher: Teacher | None = None, suffix: str = "", where: str = "losses"
    ) -> None:
        self.view, self.objective, self.teacher, self.suffix, self.where = view, objective, teacher, suffix, where
        self.needs: Needs | None = None

    def bind(self, student: nn.Module) -> Needs:
        """Resolve the objective's taps on ``student`` and the teacher; check the teacher can feed it.

        Raises:
            ConfigError: A term needs a teacher and there is none, reads what this teacher does not
                give (features of a teacher without any), or pre-trains on a teacher that changes.
        """
        teacher, reading = self.teacher, self.objective.teacher_terms()
        if reading and teacher is None:
            raise ConfigError(
                f"{self.where}: losses {reading} need a teacher, but view {self.view!r} has none here; "
                "give it a teacher, or use losses that read none (e.g. ce)"
            )
        for name in reading:
            assert teacher is not None  # terms that read a teacher and no teacher: refused above
            if self.objective.terms[name].has_pretrain() and not teacher.standalone:
                raise ConfigError(
                    f"{self.where}.{name}: this loss pre-trains on a fixed teacher's outputs before "
                    f"training, but its teacher here is {teacher.kind}, which changes every step; "
                    "use it with a frozen teacher"
                )
        try:
            needs = self.objective.bind(student, teacher.model if teacher is not None else None)
        except ConfigError as exc:
            if teacher is not None and teacher.model is None:
                raise ConfigError(
                    f"{self.where}: {teacher.kind} has no features, so it cannot feed these losses "
                    f"({exc}); {teacher.without_features}"
                ) from None
            raise
        validate_taps(
            student, needs.student_taps, "the student" if self.view == "student" else f"the model {self.view!r}"
        )
        if needs.teacher and teacher is None:  # a term whose bind() asks for a teacher its class did not declare
            raise ConfigError(
                f"{self.where}: losses {list(self.objective.terms)} need a teacher, but view "
                f"{self.view!r} has none here"
            )
        if teacher is not None and needs.teacher:
            teacher.request(needs.teacher_logits, needs.teacher_taps)
        self.needs = needs
        return needs

    def __call__(
        self, views: Mapping[str, Outputs], batch: Batch, epoch_progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher = self.teacher(batch, views) if self.teacher is not None else None
        return self.objective(views[self.view], teacher, batch, epoch_progress)


@dataclass
class Group:
    """Links that are combined: ``sum``, ``mean`` (e.g. one view taught by several teachers), or
    ``draw`` (one link per step, drawn from ``(seed, step)``; the others' adapters get a zero
    gradient so DDP sees every parameter)."""

    links: list[Link]
    mode: Mode = "sum"
    seed: int = 0
    scale: float = field(init=False, default=1.0)

    def __post_init__(self) -> None:
        if not self.links:
            raise ConfigError("a group of links needs at least one link")
        self.scale = 1.0 / len(self.links) if self.mode == "mean" else 1.0


def _unique_teachers(links: Iterable[Link]) -> list[Teacher]:
    seen: dict[int, Teacher] = {}

    def visit(t: Teacher) -> None:
        if id(t) not in seen:
            seen[id(t)] = t
            for m in t.members():
                visit(m)

    for link in links:
        if link.teacher is not None:
            visit(link.teacher)
    return list(seen.values())


class Flow(nn.Module):
    """The trainable module of a stage: views, links, and one step's loss (see module docstring).

    Args:
        views: The trainable models by view name (registered as submodules under these names).
            By default a step runs each on the batch's input.
        links: Links, or groups of links.
        tap_models: The module a view's taps resolve on, where it is not the view's model.
        extra_taps: Taps a view must record for the plan itself (e.g. the stages heads read).
        extra: Further trainable modules (registered as submodules under these names).
    """

    draws: torch.Tensor  # a buffer

    def __init__(
        self,
        views: Mapping[str, nn.Module],
        links: Sequence[Link | Group],
        *,
        tap_models: Mapping[str, nn.Module] | None = None,
        extra_taps: Mapping[str, Sequence[str]] | None = None,
        extra: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.view_names = list(views)
        for name, model in {**views, **(extra or {})}.items():
            self.add_module(name, unwrap(model))
        self._tap_models = {n: unwrap(m) for n, m in (tap_models or {}).items()}
        self.groups = [g if isinstance(g, Group) else Group([g]) for g in links]
        self.links = [link for g in self.groups for link in g.links]
        for i, link in enumerate(self.links):  # flow.objective: the first (a one-link flow's only) objective
            self.add_module("objective" if i == 0 else f"objective_{i}", link.objective)
        self.teachers = _unique_teachers(self.links)
        for t in self.teachers:
            for name, module in t.state().items():
                self.add_module(name, module)
        self.register_buffer("draws", torch.zeros(len(self.groups), dtype=torch.long))  # steps drawn per group
        self._draws = [0] * len(self.groups)
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._reload_draws())
        wanted: dict[str, tuple[str, ...]] = {v: tuple(p) for v, p in (extra_taps or {}).items()}
        for link in self.links:
            needs = link.bind(self.tap_model(link.view))
            wanted[link.view] = tuple(dict.fromkeys(wanted.get(link.view, ()) + needs.student_taps))
        for t in self.teachers:
            for view, paths in t.view_taps().items():
                wanted[view] = tuple(dict.fromkeys(wanted.get(view, ()) + paths))
        wanted = self.route_taps(wanted)
        self.taps: dict[str, FeatureTaps] = {}
        for view, paths in wanted.items():
            if paths:
                self.taps[view] = FeatureTaps(self.tap_model(view), list(paths))
                self.taps[view].active = False  # record only inside a training step, not when evaluating
        one = self.groups[0] if len(self.groups) == 1 else None
        self._one = one.links[0] if one is not None and len(one.links) == 1 and not one.links[0].suffix else None
        self._adversaries: dict[str, tuple[int, Adversary]] | None = None  # known after setup
        self._kept: dict[int, tuple[Outputs, Outputs | None, Batch]] = {}  # the last step's outputs, detached

    def tap_model(self, view: str) -> nn.Module:
        """The module whose paths the view's taps name."""
        if view in self._tap_models:
            return self._tap_models[view]
        model = self._modules.get(view)
        if model is None:
            raise ConfigError(f"view {view!r} is not one of this task's views {self.view_names}")
        return model

    def route_taps(self, wanted: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """Where each view's wanted taps are recorded (a view computed from others may route its
        taps to them); default: on the view itself."""
        return wanted

    def view_model(self, view: str) -> nn.Module:
        """The model registered under the name ``view`` (a view's, or an extra module)."""
        model = self._modules[view]
        assert model is not None  # registered by __init__
        return model

    # ------------------------------------------------------------ a step
    def run_view(self, view: str, x: Any) -> Outputs:
        """The view's model on ``x``, with the view's taps recorded."""
        return tapped_outputs(self.view_model(view), self.taps.get(view), x)

    def compute_views(self, batch: Batch) -> dict[str, Outputs]:
        """This step's outputs of every view (default: each view's model on its input: ``batch.x``,
        or on a paired dataset the data view the model reads)."""
        return {name: self.run_view(name, model_input(batch, self._modules[name])) for name in self.view_names}

    def adversaries(self) -> dict[str, tuple[int, Adversary]]:
        """The adversaries the terms bring (after ``setup``), by part name ``d_<term><suffix>``,
        each with the index of its link."""
        if self._adversaries:
            return self._adversaries
        found = {}
        for i, link in enumerate(self.links):
            for name, term in link.objective.terms.items():
                adversary = term.adversary()  # None before the term's setup built it
                if adversary is not None:
                    found[f"d_{name}{link.suffix}"] = (i, adversary)
        self._adversaries = found or None  # kept once found; asked again while none is
        return found

    def _keep(self, views: Mapping[str, Outputs], batch: Batch) -> None:
        """Keep, detached, what the adversaries learn from: each adversarial link's view and teacher outputs."""
        for i in {i for i, _ in self.adversaries().values()}:
            link = self.links[i]
            out = views[link.view]
            teacher = link.teacher(batch, views) if link.teacher is not None else None
            self._kept[i] = (
                detached(out, True, tuple(out.features)),
                None if teacher is None else detached(teacher, teacher.logits is not None, tuple(teacher.features)),
                batch,
            )

    def adversary_step(self, part: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of adversary ``part`` on the outputs the last student step kept."""
        i, adversary = self.adversaries()[part]
        if i not in self._kept:
            raise RuntimeError(f"part {part!r} steps after the student's step of the same batch; none ran yet")
        student, teacher, batch = self._kept[i]
        return adversary.loss(student, teacher, batch), {}

    def forward(
        self, batch: Batch, epoch_progress: float = 0.0, part: str = MAIN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, {term: value})`` of one step of ``part`` (the student's, or an adversary's);
        values stay on the device."""
        if part != MAIN:
            return self.adversary_step(part)
        views = self.compute_views(batch)
        if self._adversaries:
            self._keep(views, batch)
        if self._one is not None:
            return self._one(views, batch, epoch_progress)
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for g, group in enumerate(self.groups):
            active = group.links
            if group.mode == "draw":
                which = self._next_draw(g, group)
                active = [group.links[which]]
                for i, idle in enumerate(group.links):
                    params = list(idle.objective.parameters()) if i != which else []
                    if params:  # DDP without find_unused_parameters: a zero gradient for idle adapters
                        zero = cast(torch.Tensor, 0.0 * sum(p.sum() for p in params))  # params: not empty
                        total = zero if total is None else total + zero
            per_key: dict[str, list[torch.Tensor]] = {}
            for link in active:
                loss, terms = link(views, batch, epoch_progress)
                loss = loss if group.scale == 1.0 else group.scale * loss
                total = loss if total is None else total + loss
                for k, v in terms.items():
                    per_key.setdefault(k + link.suffix, []).append(v)
            for k, vs in per_key.items():
                v = vs[0] if len(vs) == 1 else torch.stack(vs).sum() * group.scale
                values[k] = values[k] + v if k in values else v
        assert total is not None
        return total, values

    def _next_draw(self, g: int, group: Group) -> int:
        which = draw_teacher(group.seed, self._draws[g], len(group.links))
        self._draws[g] += 1
        self.draws[g] += 1  # checkpointed: a resumed run continues the same sequence
        return which

    def _reload_draws(self) -> None:
        self._draws = [int(v) for v in self.draws]

    # ------------------------------------------------------------ before training
    def attach(self, loader: Any) -> None:
        """The training loader (a plan that samples from the training data takes it here)."""

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: every view on one batch (eval mode, no grad), then each objective reads the
        shapes of its view's and its teacher's outputs and builds its adapters."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                views = self.compute_views(batch)
        finally:
            self.train(was_training)
        shapes = {v: tuple(o.logits.shape) for v, o in views.items() if o.logits is not None}
        if len({s[-1] for s in shapes.values()}) > 1:
            listed = ", ".join(f"{v} ({type(unwrap(self.tap_model(v))).__name__}): {s}" for v, s in shapes.items())
            raise ShapeError(
                f"the views' logits differ in shape ({listed}); every view must predict the dataset's classes"
            )
        k = next(iter(shapes.values()))[-1] if shapes else 0
        info = replace(info or SetupInfo(num_samples=len(batch), batch_size=len(batch)), num_classes=int(k))
        device = next((o.logits.device for o in views.values() if o.logits is not None), None)
        for link in self.links:
            if link.view not in views:
                raise ConfigError(f"{link.where}: view {link.view!r} is not computed by this task ({sorted(views)})")
            with torch.no_grad():
                self._check_classes(link, batch, views)
                teacher = link.teacher(batch, views) if link.teacher is not None else None
            link.objective.setup(views[link.view], teacher, info)
            if device is not None:
                link.objective.to(device)

    def _check_classes(self, link: Link, batch: Batch, views: Mapping[str, Outputs]) -> None:
        """Every teacher whose logits the link reads (members of a mixture included) predicts the
        view's classes; the error names the teacher."""
        student = views[link.view].logits
        if link.teacher is None or student is None or not (link.needs and link.needs.teacher_logits):
            return
        for teacher in reversed(_unique_teachers([Link(link.view, link.objective, link.teacher)])):  # members first
            if not teacher.logits or not teacher.need_logits:
                continue
            logits = teacher(batch, views).logits
            if logits is not None and logits.shape[-1] != student.shape[-1]:
                raise ShapeError(
                    f"{teacher.name} predicts {logits.shape[-1]} classes but the {link.view} predicts "
                    f"{student.shape[-1]}; every teacher must predict the student's classes"
                )

    def prepare(self, batches: Iterable[Batch]) -> None:
        """Pre-training stages of the losses (e.g. FT's paraphraser), on their teacher's outputs."""
        for link in self.links:
            if link.teacher is not None and any(t.has_pretrain() for t in link.objective.terms.values()):

                def outputs(teacher: Callable[[Batch], Outputs] = link.teacher) -> Iterator[Outputs]:
                    return (teacher(b) for b in batches)

                link.objective.pretrain(outputs)

    def release(self) -> None:
        """Remove the flow's hooks from its models (a flow that was only built to check a recipe)."""
        for taps in self.taps.values():
            taps.remove()
        self.taps = {}

    def term_names(self) -> list[str]:
        """The names of the terms a step reports, in order."""
        return list(dict.fromkeys(f"{name}{link.suffix}" for link in self.links for name in link.objective.terms))
