"""The engine task of a student taught on synthesised inputs: a synthesiser, a flow, a frozen teacher.

Per batch the parts step in this order: the synthesiser's (a generator, ``every`` batches), the
student's (the recipe's objective, taught by the frozen teacher on the synthesised inputs), then
the adversaries its losses bring (discriminators). Two data settings:

* **data-free** (``real=False``): the task brings its own training data, latent batches
  (:class:`~darkknowledge.synthesis.latents.LatentLoader`); the training split is never read,
  the student sees synthesised inputs only, without labels.
* **with real data** (``real=True``, the survey's adversarial case (a): a generator makes transfer
  data): each real batch is extended with a synthesised one (unlabelled), whose latent codes are
  drawn from the seed and the step.

The synthesiser lives in the trainable module (its generator and state are checkpointed with the
student); the teacher is run live (its inputs change every step, there is nothing to cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.engine.task import MAIN, Part, Task
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.models import count_params
from darkknowledge.synthesis.base import Synthesizer, draw_latent
from darkknowledge.synthesis.latents import LatentLoader
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.frozen import Frozen

STUDENT = "student"
"""Part name of the student's step."""


class SyntheticModule(nn.Module):
    """The trainable module: the flow (student, adapters, discriminators) and the synthesiser.

    ``forward(batch, epoch_progress, part)`` is one step's loss of ``part``: a synthesiser part,
    the student (``student``), or an adversary of the flow.
    """

    def __init__(self, flow: Flow, synth: Synthesizer, real: bool, seed: int, synthetic_batch: int) -> None:
        super().__init__()
        self.flow, self.synth = flow, synth
        self.real, self.seed, self.synthetic_batch = real, seed, synthetic_batch
        self._synth_parts: set[str] = set()
        self._latent: tuple[int, Batch] | None = None

    @property
    def student(self) -> nn.Module:
        return self.flow.view_model("student")

    def latent(self, batch: Batch, epoch_progress: float) -> Batch:
        """The step's latent batch: the batch itself (data-free), or drawn from the seed and the step
        (with real data; the same object for every part of one step)."""
        if not self.real:
            return batch
        key = round(epoch_progress * 1_000_000)  # the same on every part of the step and on every rank
        if self._latent is None or self._latent[0] != key:
            latent = draw_latent(
                self.seed, (key, 0), self.synthetic_batch, self.synth.latent_dim, self.synth.num_classes, batch.y.device
            )
            self._latent = (key, latent)
        return self._latent[1]

    def student_batch(self, batch: Batch, epoch_progress: float) -> Batch:
        """What the student trains on: synthesised inputs (unlabelled), after the real batch if any."""
        latent = self.latent(batch, epoch_progress)
        self.synth.to_device_of(latent)
        x = self.synth.sample(latent, self.student).detach()  # (b, *input_shape)
        none = torch.full((x.shape[0],), UNLABELED, dtype=torch.long, device=x.device)
        if not self.real:
            return Batch(x, none, none)
        return Batch(
            torch.cat([batch.x, x.to(batch.x.dtype)]), torch.cat([batch.y, none]), torch.cat([batch.idx, none])
        )

    def forward(
        self, batch: Batch, epoch_progress: float = 0.0, part: str = STUDENT
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if part in self._synth_parts:
            latent = self.latent(batch, epoch_progress)
            self.synth.to_device_of(latent)
            return self.synth.part_loss(part, latent, self.student)
        if part == STUDENT:
            return self.flow(self.student_batch(batch, epoch_progress), epoch_progress)
        return self.flow(batch, epoch_progress, part)


class SyntheticTask(Task):
    """Trains a student on a synthesiser's inputs (see the module docstring).

    Args:
        flow: The student's view and its link to the frozen teacher.
        teacher: The frozen teacher (run live).
        synth: The synthesiser (built on the teacher's model).
        seed: The stage's seed (latent draws).
        batch_size: Synthesised samples per step.
        steps: Steps per epoch (data-free; with real data the real loader decides).
        real: Extend real batches (True) or train on synthesised inputs only (False).
        keep_samples: Called after each checkpoint with ``{"x": (samples, *input_shape), ...}``, the
            synthesiser's current samples (the report shows them); None: not kept.
        samples: How many samples are kept.
    """

    def __init__(
        self,
        flow: Flow,
        teacher: Frozen,
        synth: Synthesizer,
        seed: int,
        batch_size: int,
        steps: int,
        real: bool = False,
        keep_samples: Callable[[dict[str, Any]], Any] | None = None,
        samples: int = 64,
    ) -> None:
        self._module = SyntheticModule(flow, synth, real, seed, batch_size)
        self.teacher, self.synth, self.flow = teacher, synth, flow
        self.seed, self.batch_size, self.steps, self.real = seed, batch_size, steps, real
        self.keep_samples, self.samples = keep_samples, samples
        teacher.lookahead = False  # its inputs are made step by step: nothing to run ahead on
        self._check_objective()

    def _check_objective(self) -> None:
        needs = self.flow.links[0].needs
        if needs is not None and needs.indices:
            raise ConfigError(
                "losses that read dataset indices (memory banks, e.g. crd) cannot learn from "
                "synthesised inputs: they are samples of no dataset"
            )
        if not self.real and needs is not None and needs.labels:
            terms = [n for n, t in self.flow.links[0].objective.terms.items() if t.needs_spec.labels]
            raise ConfigError(
                f"losses {terms} read labels, but a data-free student has none (it never sees the "
                "training data); use losses that read only the teacher (e.g. kd: {T: 1, alpha: 1})"
            )

    @property
    def module(self) -> nn.Module:
        return self._module

    def parts(self) -> list[Part]:
        synth_parts = self.synth.parts()
        self._module._synth_parts = {p.name for p in synth_parts}
        adversaries = self.flow.adversaries()
        names = [p.name for p in synth_parts] + [STUDENT] + list(adversaries)
        if len(set(names)) != len(names):
            raise ConfigError(f"part names collide: {names}")
        student = Part(STUDENT, self.flow, exclude=tuple(a.module for _, a in adversaries.values()))
        return [
            *synth_parts,
            student,
            *(Part(name, a.module, a.optimizer, every=a.every) for name, (_, a) in adversaries.items()),
        ]

    def training_data(self, seed: int, device: torch.device, dist: Any = None) -> LatentLoader | None:
        if self.real:
            return None
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        return LatentLoader(
            self.seed, self.batch_size, self.steps, self.synth.latent_dim, self.synth.num_classes, device, rank, world
        )

    def attach(self, loader: Any, dist: Any = None) -> None:
        self.teacher.attach(loader, dist)  # a live teacher: nothing to build

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """The synthesiser's first inputs (no training) set the student's losses up."""
        self.parts()
        was = self._module.training
        self._module.eval()
        try:
            with torch.no_grad():
                first = self._module.student_batch(batch, 0.0)
        finally:
            self._module.train(was)
        self._module._latent = None
        self.flow.setup(first, info)
        self.teacher.setup(first)

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        return stream

    def training_step(
        self, model: nn.Module, batch: Batch, epoch_progress: float, part: str = MAIN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(batch, epoch_progress, STUDENT if part == MAIN else part)  # MAIN: the only part

    def saved(self, step: int) -> None:
        """The synthesiser's pool drops what no resume needs; its current samples are kept for the report."""
        self.synth.saved()
        if self.keep_samples is not None and self.samples:
            self.keep_samples(
                {
                    "x": self.synth.preview(self.samples, self.seed),
                    "step": step,
                    "synthesizer": self.synth.registry_name,
                    "input_shape": list(self.synth.input_shape),
                }
            )

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.flow.view_model("student")}

    def fingerprint(self) -> str | None:
        return self.teacher.fingerprint()

    def to(self, device: torch.device) -> SyntheticTask:
        self._module.to(device)
        self.teacher.to(device)
        return self

    def release(self) -> None:
        self.flow.release()

    def describe(self) -> dict[str, Any]:
        student = count_params(self.flow.view_model("student"), trainable_only=True)
        adapters = count_params(self.flow, trainable_only=True) - student
        return {
            "losses": self.flow.term_names(),
            "adapter_params": adapters,
            "generator_params": count_params(self.synth, trainable_only=True),
            **self.synth.describe(),
        }
