"""Equal-budget hyper-parameter search on a validation split carved from the training data.

Every method gets the same number of trials. A trial is one ``dk distill`` of the config with
the sampled values and ``data.holdout=val``: the run trains on the training split minus
``data.val_fraction`` and evaluates on that held-out part; the dataset's test split is dropped
unread when the data loads (``darkknowledge.data.catalog.load_dataset``). A trial's score is
the student's top-1 accuracy (%) at the last epoch on the validation split.

The search is optuna's TPE sampler, seeded per trial from ``sampler_seed`` and the trial's
number, so a search that was interrupted and resumed proposes what an uninterrupted one would.
``<out>/trials.json`` records every trial (values, score, seconds) as soon as it ends, written
atomically; a later call with the same ``out`` replays the recorded trials into the study and
runs only the missing ones (a trial cut off mid-run is continued in its run folder).

Layout of ``out``::

    trials.json       the space, the base config, every trial (values, score, seconds, state)
    trial-000/ ...    each trial's run folder (config.yaml, results.json, checkpoints)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from darkknowledge.atomic import atomic_write
from darkknowledge.bench.spaces import space_for, space_to_dict, suite_space
from darkknowledge.bench.trials_file import read_trials
from darkknowledge.config import RunConfig, apply_overrides, validate_config
from darkknowledge.errors import ConfigError, DivergenceError, did_you_mean
from darkknowledge.runs.build import check_config
from darkknowledge.runs.lock import RunLock
from darkknowledge.search_space import Range

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.json"
FORMAT = 1
INSTALL_HINT = 'pip install "darkknowledge[tune]"'
FINISHED = ("complete", "diverged")
FIXED_KEYS = ("data.holdout", "data.val_fraction", "data.split_seed", "data.name", "seed")
"""Config paths a space may not tune: they choose the validation data or the trial's seed."""


@dataclass(frozen=True)
class Trial:
    """One finished trial.

    Attributes:
        number: 0, 1, ... in the order they ran.
        values: ``{config path: value}`` it trained with.
        score: Validation top-1 accuracy (%) at the last epoch; None when training diverged.
        seconds: Wall time of its run in the process that finished it.
        state: ``complete`` or ``diverged``.
        run_dir: Its run folder, relative to the tuning folder.
    """

    number: int
    values: dict[str, Any]
    score: float | None
    seconds: float
    state: str = "complete"
    run_dir: str = ""


@dataclass(frozen=True)
class TuneResult:
    """What a search found.

    Attributes:
        best_values: The values of the best trial (highest score; the earliest on a tie);
            empty when every trial diverged.
        best_score: Its validation accuracy (%), or None.
        trials: Every trial, in order.
        n_trials: The trial budget (``len(trials)``).
        space: The searched space.
    """

    best_values: dict[str, Any]
    best_score: float | None
    trials: list[Trial]
    n_trials: int
    space: dict[str, Range]

    @property
    def best(self) -> dict[str, Any]:
        """Alias of ``best_values``."""
        return self.best_values

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON): the best values and score, every trial, the budget and the space."""
        return {
            "best_values": dict(self.best_values),
            "best_score": self.best_score,
            "trials": [vars(t).copy() for t in self.trials],
            "n_trials": self.n_trials,
            "space": space_to_dict(self.space),
        }


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"tuning needs optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna


@contextmanager
def _quiet(optuna: Any) -> Any:
    """Optuna's own per-trial log lines off (ours say the same, with the config paths)."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def trial_config(cfg: RunConfig, values: Mapping[str, Any], seed: int, holdout: str = "val") -> RunConfig:
    """``cfg`` with ``values`` set at their dotted paths, ``seed`` and ``data.holdout``.

    Raises:
        ConfigError: A value the config does not accept (naming its path).
    """
    overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()]  # JSON is YAML: exact values
    overrides += [f"data.holdout={holdout}", f"seed={int(seed)}"]
    return validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides))


def _check_key(raw: Mapping[str, Any], key: str) -> None:
    """``key``'s parent must exist in the config (``losses.kd.T`` needs a ``kd`` term)."""
    if any(key == f or key.startswith(f + ".") for f in FIXED_KEYS):
        raise ConfigError(
            f"search space key {key!r}: it sets the validation data or the trial seed, which every "
            f"trial must share; tunable keys are anything but {', '.join(FIXED_KEYS)}"
        )
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, Mapping) or part not in node:
            here = ".".join(parts[: i + 1])
            known = sorted(node) if isinstance(node, Mapping) else []
            raise ConfigError(
                f"search space key {key!r}: the config has no {here!r}.{did_you_mean(part, known)}"
                + (f" Keys there: {', '.join(known)}." if known else "")
            )
        node = node[part] if node[part] is not None else {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"search space key {key!r}: {'.'.join(parts[:-1])} is not a mapping")


def check_space(cfg: RunConfig, space: Mapping[str, Any], seed: int = 0) -> dict[str, Range]:
    """Validate a space against ``cfg`` before anything trains: every key names a settable
    config path and the config accepts each range's extreme values.

    Returns:
        ``{path: Range}`` (mappings read with :meth:`Range.from_mapping`).

    Raises:
        ConfigError: An empty space, a bad key, or a bound the config refuses (naming both).
    """
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            f"tune: the search space is empty, nothing to tune for {cfg.name!r} (its losses "
            f"{', '.join(cfg.losses) or '-'} declare no search_space); give ranges, e.g. "
            "{'losses.kd.T': {'low': 1, 'high': 8, 'log': True}}"
        )
    ranges = {str(k): Range.from_mapping(v, where=str(k)) for k, v in space.items()}
    raw = cfg.model_dump(mode="json")
    for key, rng in ranges.items():
        _check_key(raw, key)
        for bound in rng.bounds():
            try:
                check_config(trial_config(cfg, {key: bound}, seed))
            except ConfigError as exc:
                raise ConfigError(f"search space {key!r} at {bound!r}: {exc}") from None
    return ranges


def _distribution(optuna: Any, rng: Range) -> Any:
    d = optuna.distributions
    if rng.kind == "choice":
        return d.CategoricalDistribution(list(rng.choices))
    assert rng.low is not None and rng.high is not None  # a float or int range has both
    if rng.kind == "int":
        return d.IntDistribution(int(rng.low), int(rng.high), log=rng.log)
    return d.FloatDistribution(float(rng.low), float(rng.high), log=rng.log)


def _suggest(trial: Any, key: str, rng: Range) -> Any:
    if rng.kind == "choice":
        return trial.suggest_categorical(key, list(rng.choices))
    assert rng.low is not None and rng.high is not None  # a float or int range has both
    if rng.kind == "int":
        return trial.suggest_int(key, int(rng.low), int(rng.high), log=rng.log)
    return trial.suggest_float(key, float(rng.low), float(rng.high), log=rng.log)


def _trial_seed(sampler_seed: int, number: int) -> int:
    """The sampler's seed for trial ``number``: one stream per (sampler_seed, number)."""
    return int(np.random.SeedSequence([int(sampler_seed), int(number)]).generate_state(1)[0])


def _header(cfg: RunConfig, space: Mapping[str, Range], seed: int, sampler_seed: int) -> dict[str, Any]:
    """What every recorded trial depends on; a resume must match it."""
    header = {
        "format": FORMAT,
        "space": space_to_dict(space),
        "config": cfg.model_dump(mode="json"),
        "seed": int(seed),
        "sampler_seed": int(sampler_seed),
    }
    return json.loads(json.dumps(header))  # as trials.json holds it (tuples as lists)


def _load_records(path: Path, header: Mapping[str, Any], budget: int, space: Mapping[str, Range]) -> list[dict]:
    """The trials recorded in ``path`` (none when it does not exist), checked against ``header``.

    Raises:
        ConfigError: Unreadable, recorded for another space/config/seed, or more trials than ``budget``.
    """
    records = read_trials(path, header, "tune into another folder")
    for r in records:
        if not _well_formed(r, space):
            raise ConfigError(
                f"{str(path)!r}: a malformed trial record ({r!r:.200}: number, state, values inside "
                "the search space and, once complete, a score); tune into another folder"
            )
    records = sorted(records, key=lambda r: r["number"])
    finished = [r for r in records if r["state"] in FINISHED]
    running = [r for r in records if r["state"] == "running"]
    if [r["number"] for r in finished] != list(range(len(finished))) or [r["number"] for r in running] not in (
        [],
        [len(finished)],
    ):
        raise ConfigError(
            f"{str(path)!r}: the recorded trial numbers {[r['number'] for r in records]} are not "
            "0, 1, ... in order; tune into another folder"
        )
    if len(finished) > budget:
        raise ConfigError(
            f"{str(path)!r} holds {len(finished)} finished trials, more than trials={budget}: every "
            "method gets the same budget; use the recorded budget or another folder"
        )
    return records


def _well_formed(r: Any, space: Mapping[str, Range]) -> bool:
    """A record has an int number, a known state, values inside ``space``, and a score once complete."""
    if not isinstance(r, dict) or isinstance(r.get("number"), bool) or not isinstance(r.get("number"), int):
        return False
    values, score = r.get("values"), r.get("score")
    if r.get("state") not in (*FINISHED, "running") or not isinstance(values, dict) or set(values) != set(space):
        return False
    if r["state"] == "complete" and (isinstance(score, bool) or not isinstance(score, (int, float))):
        return False
    return all(space[k].contains(v) for k, v in values.items())


def _save_records(path: Path, header: Mapping[str, Any], budget: int, records: list[dict]) -> None:
    data = {**header, "budget": budget, "test_split_read": False, "trials": records}
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda f: f.write(text + "\n"), binary=False)


def _as_trial(r: Mapping[str, Any]) -> Trial:
    score = r.get("score")
    return Trial(
        number=int(r["number"]),
        values=dict(r["values"]),
        score=None if score is None else float(score),
        seconds=float(r.get("seconds", 0.0)),
        state=str(r["state"]),
        run_dir=str(r.get("run_dir", "")),
    )


def _show(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in values.items())


def tune(
    cfg: RunConfig,
    space: Mapping[str, Range],
    trials: int,
    out: str | Path,
    seed: int = 0,
    sampler_seed: int = 0,
    progress: bool = False,
) -> TuneResult:
    """Search ``space`` with exactly ``trials`` trials of ``cfg`` scored on the validation split.

    Args:
        cfg: The run config (its ``data.val_fraction`` must be > 0: the validation split).
        space: ``{dotted config path: Range}``, e.g. :func:`darkknowledge.bench.spaces.space_for`.
        trials: The trial budget; recorded trials in ``out`` count towards it.
        out: The tuning folder (``trials.json`` and one run folder per trial).
        seed: The training seed of every trial (``seed``).
        sampler_seed: Seed of the TPE sampler.
        progress: Log each trial at INFO (else DEBUG).

    Returns:
        The best values and score, and every trial.

    Raises:
        ConfigError: A bad budget or space, ``val_fraction`` 0, optuna missing, or an ``out``
            that records another search.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials: expected a whole number >= 1, got {trials!r}")
    if cfg.data.val_fraction <= 0:
        raise ConfigError(
            "tune: data.val_fraction is 0, so there is no validation split to score trials on "
            "(data.holdout=val needs one); set data.val_fraction, e.g. 0.1"
        )
    ranges = check_space(cfg, space, seed)
    optuna = _optuna()
    out = Path(out)
    say = log.info if progress else log.debug
    header = _header(cfg, ranges, seed, sampler_seed)
    with RunLock(out, f"dk tune ({cfg.name})"):
        path = out / TRIALS_FILE
        records = _load_records(path, header, trials, ranges)
        dists = {k: _distribution(optuna, r) for k, r in ranges.items()}
        with _quiet(optuna):
            study = optuna.create_study(direction="maximize")
            for r in records:
                if r["state"] in FINISHED:
                    ok = r["state"] == "complete"
                    study.add_trial(
                        optuna.trial.create_trial(
                            params=r["values"],
                            distributions=dists,
                            value=r["score"] if ok else None,
                            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
                        )
                    )
            finished = [r for r in records if r["state"] in FINISHED]
            if finished:
                say("tune %s: %d of %d trials recorded in %s, replayed", cfg.name, len(finished), trials, path)
            for number in range(len(finished), trials):
                records = _run_trial(
                    optuna, study, cfg, ranges, number, trials, seed, sampler_seed, out, records, header, say
                )
    done = [_as_trial(r) for r in records if r["state"] in FINISHED]
    scored = [t for t in done if t.score is not None]
    best = max(scored, key=lambda t: (t.score, -t.number)) if scored else None
    return TuneResult(
        best_values=dict(best.values) if best else {},
        best_score=best.score if best else None,
        trials=done,
        n_trials=len(done),
        space=ranges,
    )


def _run_trial(
    optuna: Any,
    study: Any,
    cfg: RunConfig,
    ranges: Mapping[str, Range],
    number: int,
    budget: int,
    seed: int,
    sampler_seed: int,
    out: Path,
    records: list[dict],
    header: Mapping[str, Any],
    say: Any,
) -> list[dict]:
    """Ask for trial ``number`` (the recorded values of one cut off mid-run), run it, record it."""
    from darkknowledge.commands import distill

    pending = next((r for r in records if r["number"] == number and r["state"] == "running"), None)
    if pending is not None:
        study.enqueue_trial(pending["values"])
    study.sampler = optuna.samplers.TPESampler(seed=_trial_seed(sampler_seed, number))
    asked = study.ask()
    values = {k: _suggest(asked, k, r) for k, r in ranges.items()}
    record: dict[str, Any] = {"number": number, "values": values, "state": "running", "run_dir": f"trial-{number:03d}"}
    records = [r for r in records if r["number"] != number] + [record]
    _save_records(out / TRIALS_FILE, header, budget, records)
    run_dir = out / record["run_dir"]
    resume = pending is not None and (run_dir / "config.yaml").is_file()
    say("tune %s: trial %d/%d%s: %s", cfg.name, number + 1, budget, " (continued)" if resume else "", _show(values))
    start = time.perf_counter()
    try:
        result = distill(trial_config(cfg, values, seed), out=run_dir, resume=resume, progress=False)
        record.update(score=float(result["student"]["last_acc"]), state="complete")
    except DivergenceError as exc:
        log.warning("tune %s: trial %d diverged (%s); recorded without a score", cfg.name, number, exc)
        record.update(score=None, state="diverged")
    record["seconds"] = round(time.perf_counter() - start, 3)
    _save_records(out / TRIALS_FILE, header, budget, records)
    ok = record["state"] == "complete"
    study.tell(
        asked,
        record["score"] if ok else None,
        state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
    )
    if ok:
        say(
            "tune %s: trial %d/%d: validation accuracy %.2f (%.1f s)",
            cfg.name,
            number + 1,
            budget,
            record["score"],
            record["seconds"],
        )
    return records


def write_tuned_recipe(path: str | Path, cfg: RunConfig, result: TuneResult) -> Path:
    """Write ``cfg`` with the best values set as a recipe ``load_config`` reads (atomically).

    The comment header lists every trial's values and validation score, the budget, and that
    the test split was not read. ``data.holdout`` stays as in ``cfg``.

    Raises:
        ConfigError: No trial finished with a score (every one diverged).
    """
    if result.best_score is None:
        raise ConfigError(
            f"tune {cfg.name!r}: none of the {result.n_trials} trials finished with a score (every one "
            "diverged), so there is no tuned recipe to write"
        )
    overrides = [f"{key}={json.dumps(value)}" for key, value in result.best_values.items()]
    tuned = validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides))
    best = next(t for t in result.trials if t.values == result.best_values and t.score == result.best_score)
    space = "; ".join(
        f"{k} {r.kind} "
        + (json.dumps(list(r.choices)) if r.kind == "choice" else f"[{r.low:g}, {r.high:g}]{' log' if r.log else ''}")
        for k, r in result.space.items()
    )
    name = " ".join(str(cfg.name).split())  # one comment line, whatever the name holds
    lines = [
        f"Tuned recipe: {name}, the best of {result.n_trials} trials (the trial budget), written by "
        "darkknowledge.bench.tune.",
        f"Each trial trained on the training split minus data.val_fraction={cfg.data.val_fraction:g} and was "
        "scored by top-1 accuracy (%) at the last epoch on that held-out validation split (data.holdout=val).",
        "The test split was not read during tuning.",
        f"Search space: {space}",
        *[
            f"trial {t.number}: "
            + (f"validation accuracy {t.score:.2f}" if t.score is not None else t.state)
            + f" ({t.seconds:.1f} s): {_show(t.values)}"
            for t in result.trials
        ],
        f"Chosen: trial {best.number}, validation accuracy {best.score:.2f}: {_show(best.values)}",
    ]
    text = "".join(f"# {line}\n" for line in lines) + yaml.safe_dump(tuned.model_dump(mode="json"), sort_keys=False)
    return atomic_write(Path(path), lambda f: f.write(text), binary=False)


__all__ = [
    "Trial",
    "TuneResult",
    "check_space",
    "space_for",
    "suite_space",
    "trial_config",
    "tune",
    "write_tuned_recipe",
]
