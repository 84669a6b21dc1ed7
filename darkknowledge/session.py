"""A session: one invocation's device, distributed context, data, run folder and stages.

A *stage* trains one model (a teacher, a baseline, a distilled student) with the one
engine and records one entry in ``results.json``. On ``--resume`` a finished stage is
skipped (its model is reloaded) and an unfinished one continues from its ``last.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.build import build_data, build_model, build_objective, make_loaders, model_spec, seed_everything
from darkknowledge.config import RunConfig, TrainConfig
from darkknowledge.data import DataBundle, cache_dir
from darkknowledge.engine.checkpoint import export_model, load_exported, read_export, state_hash
from darkknowledge.engine.device import select_device, set_deterministic
from darkknowledge.engine.distributed import init_distributed
from darkknowledge.engine.metrics import MetricsLog
from darkknowledge.engine.trainer import Trainer
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params
from darkknowledge.rundir import RunDir
from darkknowledge.schemes.offline import Offline

log = logging.getLogger(__name__)


class Session:
    """Shared state of one run.

    Args:
        cfg: The validated config.
        run_dir: The run folder (None: write nothing).
        resume: Continue the run in ``run_dir``.
        progress: Show progress bars on a terminal.
        bundle: Data already loaded (the Python API passes its own); else built from ``cfg``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path | None,
        resume: bool = False,
        progress: bool = True,
        bundle: DataBundle | None = None,
    ) -> None:
        self.cfg, self.resume, self.progress = cfg, resume, progress
        wants_cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if wants_cuda else "cpu")
        self.device = select_device(cfg.train.device, self.dist.local_rank if self.dist.enabled else None)
        set_deterministic(cfg.train.deterministic)
        self.bundle = bundle if bundle is not None else build_data(cfg)
        self.run = RunDir(run_dir, writer=self.dist.is_main)
        self.metrics = MetricsLog(self.run.metrics_path)
        self.run.write_config(cfg.model_dump(mode="json"))

    # ------------------------------------------------------------------ stages
    def train_stage(
        self,
        stage: str,
        role: str,
        model: nn.Module,
        objective: Objective,
        seed: int,
        teacher: nn.Module | None = None,
        train_cfg: TrainConfig | None = None,
        with_transfer: bool = False,
    ) -> dict[str, Any]:
        """Train ``model`` (in place) as one stage and return its results entry."""
        done = self.run.result(stage) if self.resume else None
        stage_dir = self.run.stage_dir(stage)
        if done is not None and stage_dir is not None and (stage_dir / "model.pt").is_file():
            _, state = load_exported(stage_dir / "model.pt")
            model.load_state_dict(state)
            log.info("[%s] finished earlier; reusing it", stage)
            return done
        train_cfg = train_cfg or self.cfg.train
        seed_everything(seed)
        scheme = Offline(model, objective, teacher)
        train_loader, test_loader, val_loader = make_loaders(
            self.cfg, self.bundle, seed, self.device, self.dist, with_transfer=with_transfer
        )
        trainer = Trainer(
            scheme, train_loader, test_loader, train_cfg, self.device, stage=stage,
            run_dir=stage_dir, val_loader=val_loader, dist=self.dist, metrics=self.metrics,
            config=self.cfg.model_dump(mode="json"), progress=self.progress,
        )
        result = trainer.fit(resume=self.resume)
        model.to("cpu")
        log.info("[%s] done: test acc %.2f (best-epoch %.2f), %.1fs", stage, result.last[scheme.primary]["top1"],
                 result.best["top1"], result.train_seconds)
        last = result.last[scheme.primary]
        entry = {
            "name": stage,
            "role": role,
            "model": model_spec(model)["name"],
            "seed": seed,
            "params": count_params(model),
            "extra_params": scheme.describe().get("adapter_params", 0),
            "last_acc": last["top1"],
            "last_top5": last.get("top5"),
            "best_acc": result.best["top1"],
            "best_epoch": result.best["epoch"],
            "best_selected_on": result.best["selected_on"],
            "epochs": train_cfg.epochs,
            "steps": result.steps,
            "train_seconds": round(result.train_seconds, 3),
            "losses": sorted(objective.terms),
            "train_samples": len(train_loader.data) if hasattr(train_loader, "data") else None,
        }
        if stage_dir is not None and self.dist.is_main:
            export_model(model, stage_dir / "model.pt", model_spec(model), {"data": self.cfg.data.model_dump(mode="json"), "result": entry})
        self.run.add_result(entry, self.cfg.name)
        return entry

    # ------------------------------------------------------------------ teacher
    def teacher_key(self) -> str:
        """Identity of a teacher trained by this config: model, data, training, seed."""
        cfg = self.cfg
        ident = {
            "teacher": cfg.teacher.model_dump(mode="json", exclude={"checkpoint", "reuse"}),
            "train": cfg.teacher_train().model_dump(mode="json"),
            "data": {"fingerprint": self.bundle.info.fingerprint, "batch_size": cfg.data.batch_size,
                     "augment": cfg.data.augment.model_dump(mode="json"), "val_fraction": cfg.data.val_fraction},
            "world_size": self.dist.world_size,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def teacher(self) -> tuple[nn.Module, dict[str, Any]]:
        """The teacher: loaded from ``teacher.checkpoint``, reused from the cache, or trained now."""
        cfg = self.cfg
        if cfg.teacher is None:
            raise ValueError("this run has no teacher: add a `teacher:` section to the recipe")
        info = self.bundle.info
        if cfg.teacher.checkpoint:
            model = build_model(cfg.teacher, info, "teacher")
            entry = {"name": "teacher", "role": "teacher", "model": cfg.teacher.name, "seed": None,
                     "params": count_params(model), "source": cfg.teacher.checkpoint, "train_seconds": 0.0}
            recorded = read_export(cfg.teacher.checkpoint).get("result") or {}
            entry.update({k: recorded[k] for k in ("last_acc", "best_acc") if k in recorded})
            self.run.add_result(entry, cfg.name)
            return model, entry
        cached = cache_dir() / "teachers" / f"{cfg.teacher.name}-{self.teacher_key()}.pt"
        if cfg.teacher.reuse and cached.is_file():
            payload = read_export(cached)
            model = build_model(cfg.teacher, info, "teacher")
            model.load_state_dict(payload["state_dict"])
            entry = {**payload["result"], "reused_from": str(cached), "train_seconds": 0.0}
            log.info("reusing the teacher trained earlier: %s (hash %s)", cached, state_hash(model))
            self.run.add_result(entry, cfg.name)
            return model, entry
        seed_everything(cfg.teacher.seed)
        model = build_model(cfg.teacher, info, "teacher")
        entry = self.train_stage("teacher", "teacher", model, build_objective({"ce": {}}), cfg.teacher.seed,
                                 train_cfg=cfg.teacher_train())
        if self.dist.is_main and cfg.teacher.reuse:
            export_model(model, cached, model_spec(model), {"result": entry})
        return model, entry

