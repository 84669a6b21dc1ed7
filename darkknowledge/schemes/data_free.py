"""Data-free distillation: the student learns from inputs synthesised out of the teacher alone.

The survey's data-free setting (Gou et al., IJCV 2021, Sec. 5.4): the teacher's training data is
unavailable, so transfer data is made from the teacher itself, by a generator (DAFL, DFAD, ZSKT)
or by inputs optimised until the teacher's batch-norm statistics match (DeepInversion). The
synthesiser is a registered unit (``dk list synthesizers``, :mod:`darkknowledge.synthesis`); the
student learns the recipe's ``losses`` from the frozen teacher on its inputs, never reading the
training split (a test replaces it by a sentinel that raises when read).

Besides the data-free student, each seed trains the references a data-free result is judged by
(``references``): ``kd_real``, the same student and objective on the real training data (the
data-trained reference), and ``noise``, the same on Gaussian-noise inputs (the floor). The run's
baseline is the student trained alone on the real data. The synthesiser's latest samples are
written to ``<stage>/samples.pt`` at each checkpoint, for the report.

The survey's adversarial case (a), a generator adding synthetic samples to the real transfer set,
is the scheme ``synthetic_transfer``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from darkknowledge.engine.task import Task
from darkknowledge.errors import ConfigError
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.context import Context
from darkknowledge.schemes.offline import offline_task
from darkknowledge.schemes.synthetic import SyntheticTask
from darkknowledge.synthesis import Synthesizer, resolve_synthesizer
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.frozen import Frozen

NOISE: Literal["noise"] = "noise"
REFERENCES: tuple[Literal["kd_real", "noise"], ...] = ("kd_real", NOISE)


class SynthesizerSpec(BaseModel):
    """A registered synthesiser and its parameters (``dk explain`` lists them)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="registry name, see `dk list synthesizers`")
    params: dict[str, Any] = Field(default_factory=dict, description="the synthesiser's parameters")


class DataFreeParams(SchemeParams):
    """``scheme.params`` of ``data_free``."""

    synthesizer: SynthesizerSpec = Field(description="how inputs are made from the teacher")
    steps_per_epoch: int = Field(default=50, ge=1, description="student steps per epoch (latent batches)")
    batch_size: int | None = Field(
        default=None, ge=1, description="synthesised samples per step (default: data.batch_size)"
    )
    references: list[Literal["kd_real", "noise"]] = Field(
        default_factory=lambda: list(REFERENCES),
        description="reference students per seed: kd_real (same objective on the real training data), "
        "noise (same objective on Gaussian-noise inputs, the floor)",
    )
    samples: int = Field(default=64, ge=0, description="synthesised samples kept for the report (samples.pt)")


def build_synthesizer(
    ctx: Context, spec: SynthesizerSpec, teacher: Frozen, where: str = "scheme.params.synthesizer"
) -> Synthesizer:
    """The synthesiser ``spec`` built on the teacher's model and the data's shapes."""
    cls, params = resolve_synthesizer(spec.name, spec.params, where)
    assert teacher.model is not None
    return cls(params, teacher.model, tuple(ctx.info.input_shape), ctx.info.num_classes)


def synthetic_task(
    ctx: Context, seed: int, spec: SynthesizerSpec, stage: str, batch_size: int, steps: int, real: bool, samples: int
) -> SyntheticTask:
    """The student of ``seed`` taught the recipe's objective by the frozen teacher on ``spec``'s inputs."""
    teacher = Frozen(ctx.teacher(), "teacher")  # live: synthesised inputs change every step
    synth = build_synthesizer(ctx, spec, teacher)
    folder = ctx.stage_dir(stage)
    synth.use_directory(folder / "pool" if folder is not None else None)
    objective = ctx.objective()
    if not objective.teacher_terms():
        raise ConfigError(
            f"losses {list(objective.terms)}: a student taught on synthesised inputs needs a term "
            "that reads the teacher (e.g. kd: {T: 1, alpha: 1})"
        )
    flow = Flow({"student": ctx.student(seed)}, [Link("student", objective, teacher)])
    keep = (lambda payload: ctx.write_file(stage, "samples.pt", payload)) if samples else None
    return SyntheticTask(flow, teacher, synth, seed, batch_size, steps, real=real, keep_samples=keep, samples=samples)


@register_scheme("data_free")
class DataFree(Scheme):
    """A synthesiser makes every input the student learns from; the training split is never read."""

    pretrained_teacher = True

    citation = (
        "Gou et al., Knowledge Distillation: A Survey, IJCV 2021 (Sec. 5.4, data-free distillation); "
        "the synthesisers cite their papers (dk list synthesizers)."
    )
    summary = "the frozen teacher teaches the student on inputs synthesised from the teacher alone"
    report_notes = (
        "The data-free student never reads the training split; the reference rows `... (real data)` "
        "learn the same objective on the real training data, `... (noise inputs)` on Gaussian noise "
        "(the floor).",
    )
    Params = DataFreeParams
    example: ClassVar[dict[str, Any]] = {
        "losses": {"kd": {"T": 1.0, "alpha": 1.0}},
        "scheme": {
            "params": {
                "synthesizer": {"name": "dafl", "params": {"latent_dim": 8}},
                "steps_per_epoch": 3,
                "references": [],
            }
        },
    }

    @classmethod
    def label(cls, ctx: Context, params: Any) -> str:
        return f"{params.synthesizer.name} (data-free)"

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> SyntheticTask:
        if params.transfer:
            raise ConfigError(
                "scheme.params.transfer: a data-free student reads no real data; the transfer set "
                "is read by the kd_real reference only (drop transfer, or set it false)"
            )
        batch = params.batch_size or ctx.cfg.data.batch_size
        return synthetic_task(
            ctx,
            seed,
            params.synthesizer,
            ctx.stage_name(seed),
            batch,
            params.steps_per_epoch,
            real=False,
            samples=params.samples,
        )

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        entries = ctx.train(ctx.stage_name(seed), cls.task(ctx, seed, params), seed, label=cls.label(ctx, params))
        batch = params.batch_size or ctx.cfg.data.batch_size
        losses = "+".join(ctx.cfg.losses)
        task: Task
        for ref in params.references:
            if ref == "kd_real":
                stage = ctx.stage_name(seed, "real")
                task = offline_task(ctx.student(seed), ctx.objective(), ctx.frozen(ctx.teacher()))
                entries += ctx.train(
                    stage,
                    task,
                    seed,
                    role="reference",
                    label=f"{losses} (real data)",
                    with_transfer=params.transfer is not False,
                )
            else:
                stage = ctx.stage_name(seed, NOISE)
                task = synthetic_task(
                    ctx,
                    seed,
                    SynthesizerSpec(name=NOISE),
                    stage,
                    batch,
                    params.steps_per_epoch,
                    real=False,
                    samples=params.samples,
                )
                entries += ctx.train(stage, task, seed, role="reference", label=f"{losses} (noise inputs)")
        return entries
