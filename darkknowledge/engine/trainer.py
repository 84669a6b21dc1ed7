"""The one training loop that serves every scheme.

Per step: the scheme computes the loss (teacher outputs under inference mode, then the
trainable module's forward), the engine does autocast, backward, gradient accumulation
(``no_sync`` under DDP), clipping, the optimizer and the per-step LR schedule. Per epoch:
evaluation of every model the scheme names, ``metrics.jsonl``, ``last.pt`` and ``best.pt``.
Loss values stay on the device until logged (no per-step host syncs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.config import TrainConfig
from darkknowledge.engine.checkpoint import atomic_save, capture_rng, restore_rng, safe_load
from darkknowledge.engine.device import amp_dtype, autocast, make_grad_scaler
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.host_memory import retain_freed_host_memory
from darkknowledge.engine.lean_step import LeanStep
from darkknowledge.engine.metrics import MetricsLog, evaluate
from darkknowledge.engine.optim import build_optimizer, build_scheduler, load_optimizer_state
from darkknowledge.engine.progress import Progress
from darkknowledge.errors import CheckpointError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.schemes.base import Scheme

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """Outcome of one training stage.

    Attributes:
        stage: Stage name (run-folder subdirectory).
        last: Final evaluation per evaluated model, e.g. ``{"student": {"top1": 91.2, ...}}``.
        best: Best epoch of the primary model: ``{"epoch", "top1", "selected_on"}``.
        history: One record per evaluation.
        train_seconds: Wall time spent training (evaluation excluded), across resumes.
    """

    stage: str
    last: dict[str, dict[str, float]] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    """Training wall time of each epoch run by this call (evaluation excluded)."""


class Trainer:
    """Trains a :class:`Scheme`.

    Args:
        scheme: Owns the trainable module and the frozen teachers.
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
        progress: Show a progress bar on terminals.
    """

    def __init__(
        self,
        scheme: Scheme,
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
    ) -> None:
        self.scheme, self.cfg, self.device, self.stage = scheme, cfg, device, stage
        self.train_loader, self.eval_loader, self.val_loader = train_loader, eval_loader, val_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = dist or DistContext()
        self.metrics = metrics or MetricsLog(None)
        self.config = config or {}
        self.amp = amp_dtype(cfg.amp, device)
        self.progress = Progress(progress and self.dist.is_main, stage)

    # ---------------------------------------------------------------- checkpoints
    def _ckpt(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir is not None else None

    def _save(self, name: str, payload: dict[str, Any]) -> None:
        path = self._ckpt(name)
        if path is not None and self.dist.is_main:
            atomic_save(payload, path)

    def _state(self, epoch: int, batch: int, step: int, result: StageResult, opt, sched, scaler) -> dict[str, Any]:
        return {
            "format": 1,
            "kind": "train",
            "stage": self.stage,
            "module": self.scheme.module.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "rng": capture_rng(),
            "config": self.config,
            "teacher_hash": self.scheme.teacher_hash(),
            "history": result.history,
            "best": result.best,
            "last": result.last,
            "train_seconds": result.train_seconds,
        }

    def _resume(self, opt, sched, scaler, result: StageResult) -> tuple[int, int, int]:
        path = self._ckpt("last.pt")
        if path is None or not path.is_file():
            log.info("[%s] no checkpoint to resume from; starting fresh", self.stage)
            return 0, 0, 0
        state = safe_load(path, map_location=self.device)
        ours, theirs = self.scheme.teacher_hash(), state.get("teacher_hash")
        if ours != theirs:
            raise CheckpointError(
                f"refusing to resume {str(path)!r}: it was trained with teacher weights {theirs}, "
                f"but this run's teacher has {ours}. Resuming would mix two teachers' knowledge; "
                "use the original teacher, or start a new run folder with --out."
            )
        self.scheme.module.load_state_dict(state["module"])
        load_optimizer_state(opt, state["optimizer"], self.scheme.module)
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        result.history, result.best = list(state["history"]), dict(state["best"])
        result.last, result.train_seconds = dict(state["last"]), float(state["train_seconds"])
        log.info("[%s] resumed from epoch %d, batch %d", self.stage, state["epoch"], state["batch"])
        return int(state["epoch"]), int(state["batch"]), int(state["step"])

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, result: StageResult, epoch: int, step: int) -> None:
        models = self.scheme.eval_models()
        test = {name: evaluate(m, self.eval_loader, self.dist, self.amp) for name, m in models.items()}
        val = (
            {name: evaluate(m, self.val_loader, self.dist, self.amp) for name, m in models.items()}
            if self.val_loader is not None
            else None
        )
        primary = self.scheme.primary
        record = {"stage": self.stage, "epoch": epoch + 1, "step": step, "test": test}
        if val is not None:
            record["val"] = val
        result.history.append(record)
        result.last = test
        selected_on = "val" if val is not None else "test"
        score = (val or test)[primary]["top1"]
        if not result.best or score > result.best["score"]:
            result.best = {"epoch": epoch + 1, "score": score, "top1": test[primary]["top1"], "selected_on": selected_on}
            self._save("best.pt", {"format": 1, "kind": "best", "module": self.scheme.module.state_dict(), "best": result.best})
        self.metrics.write({**record, "kind": "eval"})

    def _epoch_means(self, logged: dict[str, list[torch.Tensor]], n_batches: int) -> dict[str, float]:
        """Mean of each logged term over the epoch's batches, averaged over ranks."""
        if not logged:
            return {}
        keys = sorted(logged)
        stacked = torch.stack([torch.stack(logged[k]).float().sum() for k in keys]) / max(1, n_batches)
        stacked = self.dist.all_reduce_sum(stacked) / self.dist.world_size
        return dict(zip(keys, stacked.tolist()))

    # ---------------------------------------------------------------- training
    def fit(self, resume: bool = False) -> StageResult:
        """Train for ``cfg.epochs`` (continuing from ``last.pt`` when ``resume``)."""
        cfg, device, loader = self.cfg, self.device, self.train_loader
        if device.type == "cpu" and cfg.keep_host_memory:
            retain_freed_host_memory()  # no page faults for each step's re-allocated activations
        self.scheme.to(device)
        self.scheme.attach(loader, self.dist)  # e.g. a teacher-output cache; before the first batch is drawn
        loader.set_epoch(0)
        first = next(iter(loader))
        info = SetupInfo(num_samples=len(loader.data), batch_size=len(first), epochs=cfg.epochs)
        self.scheme.setup(first, info)  # dry run: shapes, adapters, early errors
        ckpt = self._ckpt("last.pt")
        if not (resume and ckpt is not None and ckpt.is_file()):
            self.scheme.prepare(loader)  # losses' pre-training stages; a resumed run has them in last.pt
            loader.set_epoch(0)
        if cfg.channels_last:
            self.scheme.channels_last()
            loader.channels_last = True
        if cfg.compile:
            self.scheme.compile()
        module = self.scheme.module
        model: nn.Module = module
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        opt = build_optimizer(module, cfg.optimizer)
        trained = [p for group in opt.param_groups for p in group["params"]]
        for p in trained:  # no gradient left over from setup; later reset after every step
            p.grad = None
        steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
        sched = build_scheduler(opt, cfg.scheduler, steps_per_epoch, cfg.epochs)
        scaler = make_grad_scaler(device, self.amp)
        result = StageResult(self.stage)
        start_epoch, start_batch, step = self._resume(opt, sched, scaler, result) if resume else (0, 0, 0)
        stepper = LeanStep(opt)  # after the resume: it keeps the optimizer's (loaded) state tensors

        for epoch in range(start_epoch, cfg.epochs):
            loader.set_epoch(epoch)
            module.train()
            t0 = epoch_start = time.perf_counter()
            logged: dict[str, list[torch.Tensor]] = {}  # per-step values, summed once per epoch (no per-step ops)
            n_batches = len(loader)
            batches = self.scheme.batches(loader.iter_from(start_batch) if start_batch else iter(loader))
            first_batch = start_batch
            for b, batch in enumerate(self.progress.epoch(batches, epoch, cfg.epochs, n_batches, start_batch), start_batch):
                boundary = (b + 1) % cfg.grad_accum == 0 or b + 1 == n_batches
                sync = boundary or not self.dist.enabled
                with model.no_sync() if not sync else contextlib.nullcontext():
                    with autocast(device, self.amp):
                        loss, terms = self.scheme.training_step(model, batch, epoch + b / n_batches)
                    scaled = loss / cfg.grad_accum if cfg.grad_accum > 1 else loss
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                for k, v in (("loss", loss.detach()), *terms.items()):
                    logged.setdefault(k, []).append(v)
                if self.progress.enabled and (b - start_batch) % 25 == 0:  # a host sync only for the display
                    self.progress.show({k: float(torch.stack(v).float().mean()) for k, v in logged.items()})
                if not boundary:
                    continue
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad_norm)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    stepper.step()
                for p in trained:  # opt.zero_grad(set_to_none=True) without its per-call overhead
                    p.grad = None
                sched.step()
                self.scheme.after_step()
                step += 1
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and b + 1 < n_batches:
                    result.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self._save("last.pt", self._state(epoch, b + 1, step, result, opt, sched, scaler))
            start_batch = 0
            means = self._epoch_means(logged, n_batches - first_batch)  # one host sync per epoch (waits for the device)
            result.train_seconds += time.perf_counter() - t0
            result.epoch_seconds.append(time.perf_counter() - epoch_start)
            if not math.isfinite(means.get("loss", 0.0)):
                raise FloatingPointError(
                    f"[{self.stage}] the loss became {means['loss']} in epoch {epoch + 1}; "
                    "lower the learning rate, enable train.clip_grad_norm, or check the loss weights"
                )
            self.metrics.write({"kind": "train", "stage": self.stage, "epoch": epoch + 1, "step": step,
                                "lr": opt.param_groups[0]["lr"], **{f"train/{k}": v for k, v in means.items()}})
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                self._evaluate(result, epoch, step)
            shown = {**means, "acc": result.last.get(self.scheme.primary, {}).get("top1", float("nan"))}
            done = epoch + 1 - start_epoch
            eta = result.train_seconds / max(1, epoch + 1) * (cfg.epochs - epoch - 1) if done else 0.0
            self.progress.epoch_done(epoch, cfg.epochs, shown, eta)
            self._save("last.pt", self._state(epoch + 1, 0, step, result, opt, sched, scaler))
        result.steps = step
        return result

