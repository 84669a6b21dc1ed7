"""The ``Scheme`` interface: a scheme owns the topology (who teaches whom).

The engine is the same for every scheme. A scheme provides:

* ``module``: one ``nn.Module`` holding everything trainable (students, peers, adapters,
  heads). The optimizer, DDP and checkpoints see exactly this module. Its ``forward(batch,
  teacher_out, epoch_progress)`` returns ``(loss, {term: value})`` so that, under DDP, every
  trainable parameter is used inside the wrapped forward.
* ``setup(batch, info)``: a dry run on one batch before the optimizer exists (shapes,
  adapters, early errors such as a class-count mismatch).
* ``prepare(loader)``: optional pre-training stages of the losses (not run on resume).
* ``teacher_outputs(batch)``: the frozen side of a step (``None`` when nothing needs it).
* ``eval_models()``: the models whose accuracy is reported; ``primary`` names the headline.
* ``teacher_hash()``: identity of the frozen teachers, stored in checkpoints so a resume
  with a different teacher is refused.

A scheme needing two optimizers (adversarial, data-free) overrides ``training_step`` only;
one that updates weights outside the gradient (an EMA teacher) overrides ``after_step``.

How a scheme is *run* from a recipe is a class method: ``build(ctx, seed, **params)``
makes the instance of one stage from a :class:`~darkknowledge.schemes.context.SchemeContext`
(models, teachers, objective, data); ``run(ctx, seed, **params)`` trains it as one stage and
returns the results entries. Multi-stage schemes (born-again generations, teacher-assistant
chains, pipelines) override ``run`` and call ``ctx.train`` once per stage; each stage is
resumable on its own. The user's ``scheme.params`` are the keyword arguments of ``run``
when it is overridden, else of ``build``; they are validated before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.losses.base import SetupInfo
from darkknowledge.errors import ConfigError
from darkknowledge.registry import Registry
from darkknowledge.validation import validate_kwargs

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext

SCHEMES: Registry[type[Scheme]] = Registry("scheme")
TRANSFER = "transfer"
"""``scheme.params.transfer``: a parameter of every scheme (feed the transfer set or not)."""


def resolve_scheme(name: str, params: dict[str, Any]) -> tuple[type[Scheme], dict[str, Any], bool | None]:
    """The scheme class, its validated params, and the recipe's ``transfer`` choice (None: the
    scheme's default). Raises ``ConfigError`` naming the bad key and the valid ones."""
    cls = SCHEMES.get(name)
    params = dict(params)
    transfer = params.pop(TRANSFER, None)
    if transfer is not None and not isinstance(transfer, bool):
        raise ConfigError(f"scheme.params.transfer: must be true or false (got {transfer!r})")
    checked = validate_kwargs(cls.params_fn(), params, "scheme.params", exclude=("ctx", "seed"))
    return cls, checked, transfer


class Scheme:
    """Base class of distillation schemes (see module docstring)."""

    registry_name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    """Paper(s), shown by ``dk list schemes``."""
    summary: ClassVar[str] = ""
    """One line: how knowledge flows."""
    primary: str = "student"
    default_transfer: ClassVar[bool] = False
    """Whether the scheme's students also read the unlabeled transfer set unless the recipe
    says otherwise (``scheme.params.transfer``)."""

    # ------------------------------------------------------------ from a recipe
    @classmethod
    def build(cls, ctx: SchemeContext, seed: int, **params: Any) -> Scheme:
        """Make this scheme's one stage for ``seed`` from the run's context."""
        raise NotImplementedError(f"scheme {cls.__name__} does not implement build()")

    @classmethod
    def run(cls, ctx: SchemeContext, seed: int, **params: Any) -> list[dict[str, Any]]:
        """Train the scheme for one seed; returns the results entries (primary first)."""
        scheme = cls.build(ctx, seed, **params)
        return ctx.train(ctx.stage_name(seed), scheme, seed, with_transfer=ctx.uses_transfer(cls))

    @classmethod
    def check(cls, ctx: SchemeContext, seed: int, **params: Any) -> None:
        """Fail before any training when the scheme cannot be built from this recipe.

        ``dk run`` calls it before the first baseline. The default builds (and discards) the
        stage of a single-stage scheme; multi-stage schemes validate in ``run`` before their
        first stage, and may override this to check earlier.
        """
        if cls.run.__func__ is Scheme.run.__func__:  # type: ignore[attr-defined]
            cls.build(ctx, seed, **params)

    @classmethod
    def params_fn(cls) -> Any:
        """The function whose keyword arguments are this scheme's ``scheme.params``."""
        return cls.run if cls.run.__func__ is not Scheme.run.__func__ else cls.build  # type: ignore[attr-defined]

    # ------------------------------------------------------------ one stage

    @property
    def module(self) -> nn.Module:
        """Everything trainable, in one module."""
        raise NotImplementedError

    def attach(self, loader: Any, dist: Any = None) -> None:
        """Called with the training loader at the start of every fit, resumed or not (e.g. to
        load or build a teacher-output cache and let the loader replay its views)."""

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """The epoch's training batches as the steps will see them (default: ``stream``).
        A scheme may look ahead, e.g. to run a live teacher on several batches at once."""
        return stream

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run on one batch: probe shapes, build adapters, fail early on misfits."""

    def prepare(self, loader: Iterable[Batch]) -> None:
        """Pre-training stages before the first epoch (skipped when resuming)."""

    def to(self, device: torch.device) -> Scheme:
        """Move the trainable module and any frozen parts to ``device``."""
        self.module.to(device)
        return self

    def teacher_outputs(self, batch: Batch) -> Any:
        """Frozen teachers' outputs for this batch, or None."""
        return None

    def training_step(self, model: nn.Module, batch: Batch, epoch_progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one step. ``model`` is ``module``, possibly DDP-wrapped."""
        return model(batch, self.teacher_outputs(batch), epoch_progress)

    def compile(self) -> None:
        """``torch.compile`` the evaluated models in place (``train.compile: true``); state-dict
        keys, hooks and checkpoints are unchanged."""
        for model in {id(m): m for m in self.eval_models().values()}.values():
            model.compile()

    def channels_last(self) -> None:
        """Use the ``channels_last`` memory format for every model (``train.channels_last``)."""
        self.module.to(memory_format=torch.channels_last)

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to update an EMA teacher)."""

    def eval_models(self) -> dict[str, nn.Module]:
        """Models to evaluate each epoch, by name; must contain ``primary``.

        Names other than ``primary`` become extra rows of the report (peers, heads, ensembles).
        """
        raise NotImplementedError

    def export_model(self) -> nn.Module:
        """The deployable model written to ``model.pt`` (default: the primary evaluated model).

        Must be rebuildable from its zoo spec (``dk_name``/``dk_params``) for ``dk eval``.
        """
        return self.eval_models()[self.primary]

    def teacher_hash(self) -> str | None:
        """Hash of the frozen teachers' weights (None when there is none)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for reports: ``losses`` (term names) and ``adapter_params`` (trainable
        parameters beyond the exported model: adapters, heads, peers)."""
        return {}
