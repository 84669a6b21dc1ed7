"""Opening a run folder: one writer, and a resume that checks what it resumes.

A new run may use a folder that holds no trained stage yet; a folder that does is refused
(continue it with ``--resume``, or choose another ``--out``), so two runs never mix in one
report. ``--resume`` refuses a folder that does not exist, one written by another command
(``run.json``), and a resolved config that differs from its ``config.yaml`` in anything but
the keys of :data:`SAFE_TO_CHANGE`; the error lists every difference. Teachers are compared
by their weights' hash where stages are resumed (see ``Session.train_stage``), so a teacher
file that only moved resumes, and another teacher is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from darkknowledge.config import RunConfig, TrainConfig
from darkknowledge.engine.checkpoint import load_exported, load_weights, safe_load
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.task import Task
from darkknowledge.errors import CheckpointError, ConfigError, DarkKnowledgeError
from darkknowledge.runs.lock import RunLock
from darkknowledge.runs.rundir import (
    describe_identity,
    read_identity,
    same_identity,
    trained_stages,
)
from darkknowledge.yamlio import load_yaml

log = logging.getLogger(__name__)

#: Keys a resumed run may change, and why each is safe. Everything else must match
#: ``config.yaml``: a changed optimizer, schedule, loss, model or data would continue the
#: recorded run under settings it was not trained with, while ``config.yaml`` claimed the new ones.
SAFE_TO_CHANGE: dict[str, str] = {
    "train.epochs": "may grow, to extend a run: finished stages continue from their last.pt for the extra epochs "
    "(shortening is refused)",
    "train.optimizer.lr": "may be lowered, to get past a divergence: unfinished stages continue from their last "
    "good last.pt with the lower rate (on the same schedule); finished stages are kept",
    "description": "free text",
    "train.device": "where the run continues; checkpoints are loaded onto the new device",
    "train.checkpoint_every_steps": "only how often last.pt is written inside an epoch",
    "train.keep_host_memory": "how the process keeps freed host memory; the numbers do not change",
    "cache.memory_limit_mb": "whether the teacher-output cache is held in memory or memory-mapped; same values",
    "log.tensorboard": "where a copy of the metrics goes; a logger switched on is sent the run's earlier records",
    "log.mlflow": "where a copy of the metrics goes; a logger switched on is sent the run's earlier records",
    "log.experiment": "the MLflow experiment of a new MLflow run (a continued one keeps its own)",
}
#: A teacher's checkpoint path may change (a moved file): its weights are compared by hash instead.
_TEACHER_PATH = re.compile(r"^(teacher|teachers\.\d+)\.checkpoint$")
_UNSET = object()


def safe_keys_text() -> str:
    """The safe keys, for error messages."""
    return ", ".join(
        [
            "train.epochs (to extend, not shorten)",
            "train.optimizer.lr (to lower it)",
            *list(SAFE_TO_CHANGE)[2:],
            "teacher checkpoint paths (the weights are compared by hash)",
        ]
    )


def open_run_folder(path: Path, config: Mapping[str, Any], identity: Mapping[str, Any], resume: bool) -> RunLock:
    """Lock ``path`` for this process and check that it may be written (and resumed).

    Args:
        path: The run folder.
        config: The resolved config (``RunConfig.model_dump(mode="json")``).
        identity: What writes it: ``{"command", "model", "name"}``.
        resume: Continue the run recorded there.

    Returns:
        The held lock (release it when the run ends; the OS does on exit).

    Raises:
        ConfigError: The path is not a usable folder, it holds a run and ``resume`` is off, or
            the config differs from the recorded one in keys that are not safe to change.
        CheckpointError: The folder was written by another command, or its config is unreadable.
        RunFolderBusyError: Another process is writing it.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run folder {str(path)!r} is a file, not a folder; choose another --out")
    if resume and not path.is_dir():
        raise ConfigError(
            f"--resume: run folder {str(path)!r} does not exist, so there is nothing to resume; "
            "check the path given to --out, or drop --resume to start a new run there"
        )
    try:
        lock = RunLock(path, describe_identity(identity)).acquire()
    except OSError as exc:
        raise ConfigError(
            f"run folder {str(path)!r} cannot be created or written ({exc.strerror or exc}); "
            "choose a folder you can write with --out"
        ) from None
    try:
        if resume:
            check_resume(path, config, identity)
        else:
            check_fresh(path)
    except BaseException:
        lock.release()
        raise
    return lock


def open_on_ranks(
    dist: DistContext, run_dir: Path | None, config: Mapping[str, Any], identity: Mapping[str, Any], resume: bool
) -> tuple[Path | None, RunLock | None]:
    """:func:`open_run_folder` on rank 0 only: rank 0's folder holds on every rank, and an error is
    raised on every rank. Returns the folder and rank 0's lock (None elsewhere, or without a folder)."""
    path = Path(run_dir) if run_dir is not None else None
    if path is None:
        return None, None
    if dist.enabled:
        path = dist.broadcast_object(path)
    lock, error = None, None
    if dist.is_main:
        try:
            lock = open_run_folder(path, config, identity, resume)
        except DarkKnowledgeError as exc:
            error = exc
    if dist.enabled:
        error = dist.broadcast_object(error)
    if error is not None:
        raise error
    return path, lock


def check_fresh(path: Path) -> None:
    """A new run may not write into a folder that holds trained stages of another run."""
    stages = trained_stages(path)
    if stages:
        shown = ", ".join(stages[:6]) + (", ..." if len(stages) > 6 else "")
        raise ConfigError(
            f"run folder {str(path)!r} already holds a run (trained: {shown}); continue it with "
            "--resume, or choose another --out (nothing was overwritten)"
        )


def check_resume(path: Path, config: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse to resume ``path`` with another command or a changed config (see :data:`SAFE_TO_CHANGE`)."""
    recorded_file = path / "config.yaml"
    if not recorded_file.is_file():
        raise CheckpointError(
            f"refusing to resume {str(path)!r}: it holds no config.yaml, so no run to continue; "
            "drop --resume to start a new run there"
        )
    found = read_identity(path)
    if found is None:
        log.warning(
            "%s has no run.json (written by an older darkknowledge): the command that wrote it is not checked", path
        )
    elif not same_identity(found, identity):
        raise CheckpointError(
            f"refusing to resume {str(path)!r}: it holds a run of {describe_identity(found)}, not of "
            f"{describe_identity(identity)}; resuming would mix its models into this command's results. Resume it "
            "with the command that wrote it, or give this run another --out"
        )
    try:
        recorded = load_yaml(recorded_file.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(
            f"cannot read {str(recorded_file)!r} ({exc}), so the resumed config cannot be "
            "checked against it; start a new run folder with --out"
        ) from None
    refused, allowed = config_changes(recorded, config, identity)
    if refused:
        raise ConfigError(
            f"refusing to resume {str(path)!r}: config differs: {'; '.join(refused)}. Safe to change on resume: "
            f"{safe_keys_text()}. To train with the new config, start a new run folder (another --out, or drop "
            "--resume)"
        )
    for change in allowed:
        log.info("resuming %s with %s", path, change)


def config_changes(
    recorded: Mapping[str, Any], current: Mapping[str, Any], identity: Mapping[str, Any] | None = None
) -> tuple[list[str], list[str]]:
    """The differences between a recorded and a new resolved config: ``(refused, allowed)``.

    Each is ``"key old -> new"``. A key missing from the recorded config whose new value is
    the default (a setting added by a newer darkknowledge) is no difference.
    """
    old = _flatten(recorded)
    new = _flatten(load_yaml(yaml.safe_dump(dict(current), sort_keys=False)))  # compared as config.yaml holds it
    defaults = _flatten(load_yaml(yaml.safe_dump(RunConfig().model_dump(mode="json"), sort_keys=False)))
    epochs_keys, lr_keys = {"train.epochs"}, {"train.optimizer.lr"}
    if identity is not None and identity.get("command") == "train" and identity.get("model") == "teacher":
        epochs_keys.add("teacher.train.epochs")  # `dk train --model teacher`: the trained model's epochs
        lr_keys.add("teacher.train.optimizer.lr")
        old.setdefault("teacher.train.epochs", old.get("train.epochs"))
        new.setdefault("teacher.train.epochs", new.get("train.epochs"))
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys(), key=_order(old, new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a == b or (a is _UNSET and key in defaults and defaults[key] == b):
            continue
        if a in ({}, _UNSET) and b in ({}, _UNSET) and any(k.startswith(key + ".") for k in (*old, *new)):
            continue  # an empty mapping on one side: the keys under it are compared one by one
        change = f"{key} {_show(a)} -> {_show(b)}"
        if key in epochs_keys and isinstance(a, int) and isinstance(b, int):
            if b < a:
                refused.append(change + " (a run can be extended, not shortened)")
                continue
            pinned = _teachers_following_epochs(old, new, identity)
            if pinned:
                refused.append(
                    change + f" (it also sets the epochs of {', '.join(pinned)}, trained in this run: "
                    "extending would change that teacher under the students distilled from it; keep "
                    f"it with {pinned[0]}.train.epochs={a})"
                )
                continue
            allowed.append(change)
        elif key in lr_keys and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            (allowed if b < a else refused).append(change if b < a else change + " (it may be lowered, not raised)")
        elif key in SAFE_TO_CHANGE or _TEACHER_PATH.match(key):
            allowed.append(change)
        else:
            refused.append(change)
    return refused, allowed


def _teachers_following_epochs(
    old: Mapping[str, Any], new: Mapping[str, Any], identity: Mapping[str, Any] | None
) -> list[str]:
    """Teachers trained in the run (no checkpoint) whose epochs come from ``train.epochs``.

    A teacher the Python API was given as a module (``identity["given"]`` lists it) is not trained.
    """
    if identity is not None and identity.get("command") == "train":
        return []  # `dk train` trains one model; a teacher in the recipe is not part of the run
    given = set(identity.get("given") or ()) if identity is not None else set()
    teachers = sorted({k.rsplit(".", 1)[0] for k in new if re.match(r"^(teacher|teachers\.\d+)\.name$", k)})
    return [
        where
        for where in teachers
        if where not in given
        and new.get(f"{where}.checkpoint") in (None, _UNSET)
        and f"{where}.train.epochs" not in new
        and f"{where}.name" in old
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings (and of lists of mappings, by index) to leaf values."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = value
    return out


def _order(old: Mapping[str, Any], new: Mapping[str, Any]) -> Any:
    keys = list(old) + [k for k in new if k not in old]
    rank = {k: i for i, k in enumerate(keys)}
    return lambda k: rank[k]


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, default=str)


class FinishedStage:
    """A stage that ``results.json`` lists as finished, met again by a resumed run.

    Args:
        run_path: The run folder.
        stage: The stage's name.
        entry: Its recorded results entry.
        stage_dir: Its folder (``last.pt``, ``model.pt``).
    """

    def __init__(self, run_path: Path | None, stage: str, entry: Mapping[str, Any], stage_dir: Path) -> None:
        self.run_path, self.stage, self.entry, self.stage_dir = run_path, stage, entry, stage_dir
        self.extended_from: int | None = None

    def reusable(self, task: Task, export: nn.Module, epochs: int, scheduler: str) -> bool:
        """Load the stage's ``model.pt`` into ``export`` and return True; or False when the stage
        must go through the trainer: its folder is gone (train it again), it is extended to
        ``epochs`` (continue from ``last.pt``), or its ``model.pt`` is unreadable (rebuilt from
        ``last.pt``, which holds the same final weights).

        Raises:
            CheckpointError: Its teacher changed, or a needed ``last.pt`` is missing.
            ConfigError: ``epochs`` is fewer than the stage ran.
        """
        model_pt, last_pt = self.stage_dir / "model.pt", self.stage_dir / "last.pt"
        if not model_pt.is_file() and not last_pt.is_file():
            log.warning(
                "[%s] results.json lists it as finished, but %s holds no checkpoint: training it again from the start",
                self.stage,
                self.stage_dir,
            )
            return False
        self._check_teacher(task, last_pt)
        recorded = self.entry.get("epochs")
        if isinstance(recorded, int) and recorded != epochs:
            self._extend(recorded, epochs, scheduler, last_pt)
            return False
        try:
            _, state = load_exported(model_pt)
            load_weights(export, state, model_pt, where=f"stage {self.stage!r}'s model")
        except CheckpointError as exc:
            if not last_pt.is_file():
                raise
            log.warning(
                "[%s] %s; rebuilding its model.pt from the stage's last.pt (its final weights)",
                self.stage,
                str(exc).split(". Delete")[0],
            )
            return False
        log.info("[%s] finished earlier; reusing it", self.stage)
        return True

    def _check_teacher(self, task: Task, last_pt: Path) -> None:
        if "teacher_hash" in self.entry:
            recorded = self.entry["teacher_hash"]
        else:  # an entry of an older darkknowledge: the stage's last.pt records it too
            try:
                recorded = safe_load(last_pt).get("teacher_hash", _UNSET) if last_pt.is_file() else _UNSET
            except CheckpointError:
                recorded = _UNSET
        current = task.fingerprint()
        if recorded is _UNSET or recorded == current:
            return
        raise CheckpointError(
            f"refusing to resume {str(self.run_path)!r}: stage {self.stage!r} finished with teacher weights "
            f"{recorded}, but its teacher now has {current}; the run would mix two teachers' knowledge. Use the "
            f"original teacher, delete {str(self.stage_dir)!r} to train that stage again against the new one, or "
            "start a new run folder with --out"
        )

    def _extend(self, recorded: int, epochs: int, scheduler: str, last_pt: Path) -> None:
        if epochs < recorded:
            raise ConfigError(
                f"refusing to resume {str(self.run_path)!r}: stage {self.stage!r} ran {recorded} epochs "
                f"and train.epochs={epochs} would shorten it (a run can be extended, not shortened); "
                "start a new run folder with --out"
            )
        if not last_pt.is_file():
            raise CheckpointError(
                f"cannot extend stage {self.stage!r} from {recorded} to {epochs} epochs: "
                f"{str(last_pt)!r} is missing (the extra epochs continue from its optimizer state). "
                f"Delete {str(self.stage_dir)!r} to train the stage again from the start, or keep "
                f"{recorded} epochs"
            )
        self.extended_from = recorded
        if scheduler == "cosine":
            log.warning(
                "[%s] extending from %d to %d epochs: the cosine LR schedule now spans %d epochs, so the rate "
                "goes back up to its value at epoch %d of the longer cosine and decays to its floor again",
                self.stage,
                recorded,
                epochs,
                epochs,
                recorded,
            )
        else:
            log.info(
                "[%s] extending from %d to %d epochs (the %s LR schedule continues)",
                self.stage,
                recorded,
                epochs,
                scheduler,
            )


def asked_budget(train_cfg: TrainConfig) -> dict[str, int | None]:
    """A stage's budget as the config states it."""
    return {"epochs": train_cfg.epochs, "steps": train_cfg.steps, "min_steps": train_cfg.min_steps}


def stage_budget(done: dict[str, Any], train_cfg: TrainConfig) -> int:
    """The epochs a finished stage must have run for ``train_cfg``: ``train.epochs`` for a budget
    in epochs (more extends the stage), or the epochs it recorded when its budget in steps
    (``train.steps``, ``train.min_steps``) is unchanged.

    Raises:
        ConfigError: A budget in steps changed (a stage is extended by epochs only).
    """
    recorded = done.get("budget") or {"epochs": done.get("epochs"), "steps": None, "min_steps": None}
    asked = asked_budget(train_cfg)
    if (
        recorded["steps"] is None
        and recorded["min_steps"] is None
        and asked["steps"] is None
        and asked["min_steps"] is None
    ):
        return train_cfg.epochs
    if recorded == asked:
        return int(done["epochs"])
    raise ConfigError(
        f"stage {done['name']!r} trained with the budget {recorded}, this run asks for {asked}: a budget in "
        "steps (train.steps, train.min_steps) cannot be extended; only a stage trained by epochs extends. "
        "Start a new run folder for another budget"
    )
