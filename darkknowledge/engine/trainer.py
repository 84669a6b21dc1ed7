"""The one training loop that serves every task.

Per batch, for each trainable part due at that batch: the task computes the loss (its
``training_step``), the engine does autocast, backward, gradient accumulation (``no_sync``
under DDP), clipping, the part's optimizer and its per-step LR schedule. Per epoch: evaluation
of every model the task names, ``metrics.jsonl``, ``last.pt`` and ``best.pt``. Loss values stay
on the device until the epoch's one host sync, except for the divergence check
(:mod:`~darkknowledge.engine.divergence`: every step on the CPU, batched on accelerators, and
always before a checkpoint is written, so none holds a NaN). The engine knows tasks only through
:class:`~darkknowledge.engine.task.Task`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from darkknowledge.config import TrainConfig
from darkknowledge.engine.device import amp_dtype, autocast
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.divergence import DivergenceWatch, named_state
from darkknowledge.engine.eta import RunClock, StageClock
from darkknowledge.engine.host_memory import retain_freed_host_memory
from darkknowledge.engine.metrics import MetricsLog, evaluate
from darkknowledge.engine.optim import lr_factor, step_budget
from darkknowledge.engine.progress import Progress
from darkknowledge.engine.stepper import PartStepper
from darkknowledge.engine.task import Part, Task
from darkknowledge.engine.trainer_state import STEP_BUDGET_SAVE_EVERY, StageCheckpoints, StageResult
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import SetupInfo

log = logging.getLogger(__name__)


def check_parts(parts: list[Part], module: nn.Module) -> None:
    """Part names unique, parameters of each part inside ``module`` and in one part only."""
    names = [p.name for p in parts]
    if not parts or len(set(names)) != len(names):
        raise ConfigError(f"a task needs parts with distinct names, got {names}")
    owned = {id(p) for p in module.parameters()}
    seen: dict[int, str] = {}
    for part in parts:
        for p in part.parameters():
            if id(p) not in owned:
                raise ConfigError(f"part {part.name!r} holds parameters outside the task's module")
            if id(p) in seen:
                raise ConfigError(
                    f"parts {seen[id(p)]!r} and {part.name!r} share a parameter; give each parameter to one part"
                )
            seen[id(p)] = part.name


class Trainer(StageCheckpoints):
    """Trains a :class:`~darkknowledge.engine.task.Task`.

    Args:
        task: Owns the trainable module (and whatever teaches it).
        train_loader: A ``BatchLoader`` of training batches (``set_epoch``/``iter_from``).
        eval_loader: Test batches (the reported accuracy).
        cfg: Optimisation and engine settings.
        device: Where to train.
        stage: Name of this stage; its files go to ``run_dir``.
        run_dir: Folder for checkpoints (None: nothing is written).
        val_loader: Optional validation batches; when given, ``best`` selects on them.
        dist: Distributed context (rank 0 writes).
        metrics: The run's ``metrics.jsonl``.
        config: The resolved run config, stored in checkpoints.
        progress: Show progress: a bar on a terminal, a line per epoch elsewhere.
        clock: Times the epochs for the ETA (the session's, which knows the rest of the run);
            default: a clock of this stage alone.
        restore_best: End with the weights of the epoch best on the validation split (model
            selection, e.g. of a teacher), their test metrics as ``last``; needs ``val_loader``.
    """

    def __init__(
        self,
        task: Task,
        train_loader: Any,
        eval_loader: Any,
        cfg: TrainConfig,
        device: torch.device,
        *,
        stage: str = "train",
        run_dir: Path | None = None,
        val_loader: Any = None,
        dist: DistContext | None = None,
        metrics: MetricsLog | None = None,
        config: dict[str, Any] | None = None,
        progress: bool = True,
        clock: StageClock | None = None,
        restore_best: bool = False,
    ) -> None:
        self.task, self.cfg, self.device, self.stage = task, cfg, device, stage
        self.train_loader, self.eval_loader, self.val_loader = train_loader, eval_loader, val_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = dist or DistContext()
        self.metrics = metrics or MetricsLog(None)
        self.config = config or {}
        self.amp = amp_dtype(cfg.amp, device)
        self.progress = Progress(progress and self.dist.is_main, stage)
        self.clock = clock if clock is not None else RunClock().begin(stage, None)
        self.restore_best = restore_best and val_loader is not None
        self._saved_at = 0  # the step of the last last.pt
        self._best: tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]] | None = None  # weights, test metrics
        self._epochs, self._last_step = cfg.epochs, cfg.steps  # set from the loader's length by _start

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, result: StageResult, epoch: int, step: int) -> None:
        models = self.task.eval_models()
        test = {name: evaluate(m, self.eval_loader, self.dist, self.amp) for name, m in models.items()}
        val = (
            {name: evaluate(m, self.val_loader, self.dist, self.amp) for name, m in models.items()}
            if self.val_loader is not None
            else None
        )
        primary = self.task.primary
        record = {"stage": self.stage, "epoch": epoch + 1, "step": step, "test": test}
        if val is not None:
            record["val"] = val
        result.history.append(record)
        result.last = test
        selected_on = "val" if val is not None else "test"
        score = (val or test)[primary]["top1"]
        if not result.best or score > result.best["score"]:
            result.best = {
                "epoch": epoch + 1,
                "score": score,
                "top1": test[primary]["top1"],
                "selected_on": selected_on,
            }
            self._save(
                "best.pt", {"format": 2, "kind": "best", "module": self.task.module.state_dict(), "best": result.best}
            )
            if self.restore_best:  # kept in memory: a run without a folder selects too
                weights = {k: v.detach().to("cpu", copy=True) for k, v in self.task.module.state_dict().items()}
                self._best = (weights, test)
        self.metrics.write({**record, "kind": "eval"})

    def _epoch_means(self, logged: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Mean of each logged term over the epoch's steps that logged it, averaged over ranks."""
        if not logged:
            return {}
        keys = sorted(logged)
        stacked = torch.stack([torch.stack(logged[k]).float().sum() / len(logged[k]) for k in keys])
        stacked = self.dist.all_reduce_sum(stacked) / self.dist.world_size
        return dict(zip(keys, stacked.tolist()))

    # ---------------------------------------------------------------- training
    def _start(self, resume: bool) -> None:
        """Device, data, dry run, pre-training stages, memory format, compilation."""
        cfg, task, loader = self.cfg, self.task, self.train_loader
        if self.device.type == "cpu" and cfg.keep_host_memory:
            retain_freed_host_memory()  # no page faults for each step's re-allocated activations
        task.to(self.device)
        task.attach(loader, self.dist)  # e.g. a teacher-output cache; before the first batch is drawn
        loader.set_epoch(0)
        self._epochs, self._last_step = step_budget(cfg, len(loader))
        if self._last_step is not None:
            log.info("[%s] %d steps: %d epochs, the last one cut short", self.stage, self._last_step, self._epochs)
        first = next(iter(loader))
        task.setup(first, SetupInfo(num_samples=len(loader.data), batch_size=len(first), epochs=self._epochs))
        ckpt = self._ckpt("last.pt")
        if not (resume and ckpt is not None and ckpt.is_file()):
            task.prepare(loader)  # losses' pre-training stages; a resumed run has them in last.pt
            loader.set_epoch(0)
        if cfg.channels_last:
            task.channels_last()
            loader.channels_last = True
        if cfg.compile:
            task.compile()

    def fit(self, resume: bool = False) -> StageResult:
        """Train for ``cfg.epochs``, or exactly ``cfg.steps`` steps (continuing from ``last.pt`` when ``resume``)."""
        cfg, device, loader, task = self.cfg, self.device, self.train_loader, self.task
        self._start(resume)
        module = task.module
        parts = task.parts()
        check_parts(parts, module)
        several = len(parts) > 1
        if several and cfg.grad_accum > 1:
            raise ConfigError(
                f"train.grad_accum={cfg.grad_accum}: a task with several optimizers "
                f"({', '.join(p.name for p in parts)}) steps every part on whole batches; "
                "set grad_accum to 1"
            )
        model: nn.Module = module
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            # several parts: each step's loss uses only some parameters
            model = nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=several)
        n_batches = len(loader)
        steppers = {
            p.name: PartStepper(
                p, cfg, math.ceil(n_batches / (p.every if several else cfg.grad_accum)), device, self.amp
            )
            for p in parts
        }
        if self._last_step is not None:  # the schedules span the step budget, not whole epochs
            self._span_steps(steppers, n_batches, several)
        trained = [p for s in steppers.values() for p in s.params]
        for p in trained:  # no gradient left over from setup
            p.grad = None
        result = StageResult(self.stage)
        start_epoch, start_batch, step = self._resume(steppers, result) if resume else (0, 0, 0)
        self._watch = DivergenceWatch(
            self.stage,
            device,
            lambda: named_state(module, {n: s.optimizer for n, s in steppers.items()}),
            self.dist,
            can_resume=self.run_dir is not None,
            lr=lambda part: (steppers[part] if part else next(iter(steppers.values()))).lr,
        )
        ckpt = self._ckpt("last.pt")
        self._watch.start(step, saved=resume and ckpt is not None and ckpt.is_file())
        run_epoch = self._epoch_of_parts if several else self._epoch_of_one
        epochs, last_step = self._epochs, self._last_step
        self.clock.start(epochs, start_epoch, n_batches)
        self._saved_at = step

        for epoch in range(start_epoch, epochs):
            if last_step is not None and step >= last_step:
                break
            loader.set_epoch(epoch)
            module.train()
            t0 = time.perf_counter()
            stream = task.batches(loader.iter_from(start_batch) if start_batch else iter(loader))
            logged: dict[str, list[torch.Tensor]] = {}  # per-step values, summed once per epoch (no per-step ops)
            timer = {"t0": t0}
            step = run_epoch(model, steppers, stream, epoch, start_batch, n_batches, step, logged, result, timer)
            self._watch.check(step)  # every loss of the epoch and the state after it, before best.pt/last.pt
            means = self._epoch_means(logged)  # one host sync per epoch (waits for the device)
            start_batch = 0
            result.train_seconds += time.perf_counter() - timer["t0"]
            result.epoch_seconds.append(time.perf_counter() - t0)
            lrs = {f"lr/{n}": s.lr for n, s in steppers.items()} if several else {}
            self.metrics.write(
                {
                    "kind": "train",
                    "stage": self.stage,
                    "epoch": epoch + 1,
                    "step": step,
                    "lr": next(iter(steppers.values())).lr,
                    **lrs,
                    **{f"train/{k}": v for k, v in means.items()},
                }
            )
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
                self._evaluate(result, epoch, step)
            top1 = result.last.get(task.primary, {}).get("top1")
            shown = {**means, **({"acc": top1} if top1 is not None else {})}  # no acc before the first evaluation
            self.progress.epoch_done(epoch, epochs, shown, self.clock.epoch_done(), self.clock.whole)
            final = epoch + 1 == epochs or (last_step is not None and step >= last_step)
            if final or last_step is None or step - self._saved_at >= STEP_BUDGET_SAVE_EVERY:
                self._save_last(self._state(epoch + 1, 0, step, result, steppers), step)
        result.steps, result.epochs = step, epochs
        if self.restore_best:
            self._select_best(result)
        return result

    def _span_steps(self, steppers: dict[str, PartStepper], n_batches: int, several: bool) -> None:
        """Make each part's LR schedule span the stage's step budget (``train.steps``, or
        ``train.min_steps`` when the epochs fall short): ``steps / (stage steps per epoch)`` epochs
        of the part's own steps per epoch (warm-up, step sizes and milestones stay in epochs)."""
        cfg, steps = self.cfg, self._last_step
        assert steps is not None  # only with a step budget
        per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
        span = steps / per_epoch  # fractional epochs
        for stepper in steppers.values():
            sched = stepper.part.scheduler or cfg.scheduler
            own = max(1, math.ceil(n_batches / (stepper.part.every if several else cfg.grad_accum)))
            stepper.scheduler.set_factor(functools.partial(lr_factor, sched, steps_per_epoch=own, epochs=span))

    def _log(self, logged: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor], b: int, start: int) -> None:
        for k, v in values.items():
            logged.setdefault(k, []).append(v)
        if self.progress.enabled and (b - start) % 25 == 0:  # a host sync only for the display
            self.progress.show({k: float(torch.stack(v).float().mean()) for k, v in logged.items()})

    def _checkpoint_within(
        self,
        epoch: int,
        b: int,
        n_batches: int,
        step: int,
        result: StageResult,
        steppers: dict[str, PartStepper],
        timer: dict[str, float],
    ) -> None:
        every = self.cfg.checkpoint_every_steps
        if every and step % every == 0 and b + 1 < n_batches:
            self._watch.check(step)  # never a non-finite checkpoint
            now = time.perf_counter()
            result.train_seconds += now - timer["t0"]
            timer["t0"] = now
            self._save_last(self._state(epoch, b + 1, step, result, steppers), step)

    def _epoch_of_one(
        self,
        model: nn.Module,
        steppers: dict[str, PartStepper],
        stream: Any,
        epoch: int,
        start: int,
        n_batches: int,
        step: int,
        logged: dict[str, list[torch.Tensor]],
        result: StageResult,
        timer: dict[str, float],
    ) -> int:
        """One epoch of a one-part task, with gradient accumulation."""
        cfg, task, watch = self.cfg, self.task, self._watch
        (stepper,) = steppers.values()
        ddp = cast(nn.parallel.DistributedDataParallel, model)  # when distributed: wrapped in DDP
        for b, batch in enumerate(self.progress.epoch(stream, epoch, self._epochs, n_batches, start), start):
            boundary = (b + 1) % cfg.grad_accum == 0 or b + 1 == n_batches
            with ddp.no_sync() if self.dist.enabled and not boundary else contextlib.nullcontext():
                with autocast(self.device, self.amp):
                    loss, terms = task.training_step(model, batch, epoch + b / n_batches)
                stepper.backward(loss, cfg.grad_accum)
            watch.observe(epoch, step + 1, loss, terms)
            self._log(logged, {"loss": loss.detach(), **terms}, b, start)
            if not boundary:
                continue
            watch.before_update(stepper.unscale_and_clip())  # on the CPU: raises before a non-finite update
            stepper.update()
            task.after_step()
            step += 1
            watch.after_update(step)
            if step == self._last_step:  # the step budget is spent: the epoch ends here
                break
            self._checkpoint_within(epoch, b, n_batches, step, result, steppers, timer)
        return step

    def _epoch_of_parts(
        self,
        model: nn.Module,
        steppers: dict[str, PartStepper],
        stream: Any,
        epoch: int,
        start: int,
        n_batches: int,
        step: int,
        logged: dict[str, list[torch.Tensor]],
        result: StageResult,
        timer: dict[str, float],
    ) -> int:
        """One epoch of a task with several parts: each due part steps on the batch in turn.

        ``step`` counts batches; a part due at batch ``n`` of the stage steps there (``Part.every``).
        Before each part's loss every gradient is reset, so a part's step sees only its own loss
        (the losses of other parts may also reach its parameters; those gradients are dropped).
        """
        task, watch = self.task, self._watch
        for b, batch in enumerate(self.progress.epoch(stream, epoch, self._epochs, n_batches, start), start):
            values: dict[str, torch.Tensor] = {}
            for stepper in steppers.values():
                part = stepper.part
                if not part.due(epoch * n_batches + b):
                    continue
                for other in steppers.values():
                    other.zero_grad()
                with autocast(self.device, self.amp):
                    loss, terms = task.training_step(model, batch, epoch + b / n_batches, part.name)
                stepper.backward(loss)
                watch.observe(epoch, step + 1, loss, terms, part.name)
                watch.before_update(stepper.unscale_and_clip())
                stepper.update()
                task.after_step(part.name)
                values.update({f"{part.name}/loss": loss.detach(), **{f"{part.name}/{k}": v for k, v in terms.items()}})
            self._log(logged, values, b, start)
            step += 1
            watch.after_update(step)
            if step == self._last_step:  # the step budget is spent: the epoch ends here
                break
            self._checkpoint_within(epoch, b, n_batches, step, result, steppers, timer)
        return step
