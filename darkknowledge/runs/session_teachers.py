"""Where a run's teachers come from: a checkpoint, the cache of teachers trained before, or training now.

:class:`TeacherSource` is the teacher side of :class:`~darkknowledge.runs.session.Session` (a mixin:
it reads the session's attributes below). A trained teacher is cached under a key of everything that
shaped it (model, data, training, augmentation without mixing, world size) and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.config import RunConfig, TeacherConfig, TrainConfig
from darkknowledge.data import DataBundle, DatasetInfo, cache_dir
from darkknowledge.engine.checkpoint import check_export_fits, export_model, load_weights, read_export, state_hash
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.eta import RunClock
from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.models import count_params
from darkknowledge.runs.build import build_model, model_spec, seed_everything
from darkknowledge.runs.measures import teacher_measures
from darkknowledge.runs.profiling import Profiler
from darkknowledge.runs.rundir import RunDir

log = logging.getLogger(__name__)


class TeacherSource:
    """The teachers of a session (see the module docstring)."""

    cfg: RunConfig
    bundle: DataBundle
    dist: DistContext
    device: torch.device
    run: RunDir
    clock: RunClock
    profiler: Profiler
    reference: nn.Module | None

    def train_alone(
        self, stage: str, role: str, model: nn.Module, seed: int, train_cfg: TrainConfig | None = None
    ) -> dict[str, Any]:
        raise NotImplementedError  # the session's

    def teacher_key(self, spec: TeacherConfig | None = None, where: str = "teacher") -> str:
        """Identity of a teacher trained by this config: model, data, training, seed."""
        cfg = self.cfg
        spec = spec if spec is not None else cfg.teacher
        assert spec is not None  # asked for a recipe with a teacher
        ident = {
            # `input`, `width`, ... only when set: teachers keep the keys they had before those fields existed
            "teacher": spec.model_dump(
                mode="json",
                exclude={"checkpoint", "reuse"}
                | {f for f in _LATER_FIELDS if getattr(spec, f) == TeacherConfig.model_fields[f].default},
            ),
            # only what differs from the defaults: a new engine option keeps existing teachers valid
            "train": cfg.teacher_train(spec, where).model_dump(mode="json", exclude_defaults=True),
            "data": {
                "fingerprint": self.bundle.info.fingerprint,
                "batch_size": cfg.data.batch_size,
                # a teacher trains without mixing (no label describes a mixed input); the fields added
                # later count only when set, so teachers cached before they existed stay valid
                "augment": cfg.data.augment.model_dump(
                    mode="json",
                    exclude={"mixup", "cutmix", "mix_prob"} | ({"scale"} if not cfg.data.augment.scale else set()),
                ),
                "val_fraction": cfg.data.val_fraction,
            },
            "world_size": self.dist.world_size,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def teacher_is_cached(self, where: str) -> bool:
        """Whether the teacher at config path ``where`` (``teacher``, ``teachers.0``) will be reused from the
        cache of trained teachers instead of trained (the run's ETA leaves it out of the plan)."""
        spec: TeacherConfig | None = None
        if where == "teacher":
            spec = self.cfg.teacher
        elif where.startswith("teachers.") and where.removeprefix("teachers.").isdigit():
            index = int(where.removeprefix("teachers."))
            spec = self.cfg.teachers[index] if index < len(self.cfg.teachers) else None
        if spec is None or spec.checkpoint or not spec.reuse:
            return False
        return (cache_dir() / "teachers" / f"{spec.name}-{self.teacher_key(spec, where)}.pt").is_file()

    def teacher(self, spec: TeacherConfig | None = None, where: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
        """A teacher (default ``cfg.teacher``): loaded from its checkpoint, reused from the cache,
        or trained now. ``where`` is its config path (``teacher``, ``teachers.0``) and stage name.

        A checkpoint is checked before it is used: readable, a well-formed export, trained on
        inputs of this run's shape and classes (else ``CheckpointError`` naming both). A cached
        trained teacher that cannot be read is deleted with a warning and trained again.
        """
        cfg = self.cfg
        spec = spec if spec is not None else cfg.teacher
        if spec is None:
            raise ConfigError(
                f"this run has no {where}: add a `{where}:` section (a model name, or a checkpoint) to the recipe"
            )
        info = self.bundle.info
        if spec.checkpoint:
            hint = f"Point {where}.checkpoint at an exported model (student.pt, model.pt), or drop it to train one."
            try:
                payload = read_export(spec.checkpoint, hint=hint)
                shape = info.input_shape_of(spec.input, f"{where}.input")
                check_export_fits(
                    payload, spec.checkpoint, info.name, shape, info.num_classes, where=f"{where}.checkpoint"
                )
            except CheckpointError as exc:
                text = str(exc)
                raise CheckpointError(text if text.startswith(where) else f"{where}.checkpoint: {text}") from None
            model = build_model(spec, info, where)
            entry = {
                "name": where,
                "role": "teacher",
                "model": spec.name,
                "seed": None,
                "params": count_params(model),
                "source": spec.checkpoint,
                "train_seconds": 0.0,
            }
            recorded = payload.get("result")
            recorded = recorded if isinstance(recorded, dict) else {}
            entry.update({k: recorded[k] for k in ("last_acc", "best_acc") if k in recorded})
            entry.update(teacher_measures(self, model, self.cfg.seed, train_split=False))
            self._profile_teacher(entry, model)
            self.run.add_result(entry, cfg.name)
            return self._as_reference(model, where), entry
        cached = cache_dir() / "teachers" / f"{spec.name}-{self.teacher_key(spec, where)}.pt"
        if spec.reuse and cached.is_file():
            reused = _reuse_teacher(cached, spec, info, where)
            if reused is not None:
                model, payload = reused
                entry = {**payload["result"], "name": where, "reused_from": str(cached), "train_seconds": 0.0}
                log.info("reusing the teacher trained earlier: %s (hash %s)", cached, state_hash(model))
                self.clock.skip(where, spec.seed)
                if "ece" not in entry:  # cached before entries recorded it
                    entry.update(teacher_measures(self, model, spec.seed, train_split=False))
                self._profile_teacher(entry, model)
                self.run.add_result(entry, cfg.name)
                return self._as_reference(model, where), entry
        seed_everything(spec.seed)
        model = build_model(spec, info, where)
        entry = self.train_alone(where, "teacher", model, spec.seed, train_cfg=cfg.teacher_train(spec, where))
        if self.dist.is_main and spec.reuse:
            export_model(model, cached, model_spec(model), {"result": entry})
        return self._as_reference(model, where), entry

    def _as_reference(self, model: nn.Module, where: str) -> nn.Module:
        """``model``, kept as :attr:`reference` when it is the run's one teacher."""
        if where == "teacher" and len(self.cfg.all_teachers()) == 1:
            self.reference = model
        return model

    def _profile_teacher(self, entry: dict[str, Any], model: nn.Module) -> None:
        """A teacher not trained here is profiled on this machine (a cached entry's latency is another run's)."""
        entry.pop("profile", None)
        if self.dist.is_main and (found := self.profiler(model, model_spec(model))) is not None:
            entry["profile"] = found


_LATER_FIELDS = ("input", "width", "depth", "ops", "quantize")
"""Model-spec fields added after teachers were first cached: in a teacher's key only when set."""


def _reuse_teacher(
    cached: Path, spec: TeacherConfig, info: DatasetInfo, where: str
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The trained teacher in the cache file ``cached``, or None (with a warning, the file
    deleted) when it cannot be read or does not fit: the caller then trains it again."""
    try:
        payload = read_export(cached)
        if not isinstance(payload.get("result"), dict):
            raise CheckpointError(f"{str(cached)!r} lacks the teacher's recorded result")
        model = build_model(spec, info, where)
        load_weights(model, payload["state_dict"], cached, where="cached teacher")
    except (CheckpointError, ConfigError) as exc:
        log.warning(
            "the cached trained teacher %s is unreadable (%s); deleting it and training the teacher again", cached, exc
        )
        cached.unlink(missing_ok=True)
        return None
    return model, payload
