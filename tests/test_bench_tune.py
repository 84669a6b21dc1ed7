"""Equal-budget tuning on a validation split: holdout mode, search spaces, `tune`, its records and recipe.

The trainings are tiny (MNIST-1D with a few hundred samples, one epoch, or an 8-dim toy set):
what is checked is the protocol (budgets, which split is read, resume, the written recipe), not
accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import darkknowledge.commands as commands
from darkknowledge.bench.spaces import space_for, suite_space
from darkknowledge.bench.tune import (
    TRIALS_FILE,
    check_space,
    trial_config,
    tune,
    write_tuned_recipe,
)
from darkknowledge.config import load_config
from darkknowledge.data import (
    DATASETS,
    DataBundle,
    DatasetInfo,
    TensorData,
    load_dataset,
)
from darkknowledge.errors import ConfigError, DivergenceError
from darkknowledge.losses import LOSSES
from darkknowledge.losses.objective import parse_term
from darkknowledge.search_space import Range
from darkknowledge.validation import signature_fields

needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None, reason='needs optuna: pip install "darkknowledge[tune]"'
)

TINY = [
    "train.epochs=1",
    "teacher.train.epochs=1",
    "data.params.num_samples=400",
    "data.params.transfer_samples=0",
    "data.use_transfer=false",
    "student.params.hidden=[16]",
    "data.batch_size=64",
]
METHODS = {"kd": "losses={kd: {}}", "dkd": "losses={ce: {}, dkd: {}}"}
TRIALS = 2


def tiny(method: str = "kd", *extra: str):
    return load_config("quickstart", [*TINY, METHODS[method], *extra])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Each method tuned once with the same budget: ``{method: (cfg, out, result)}`` (shared by several tests)."""
    pytest.importorskip("optuna")
    with pytest.MonkeyPatch.context() as mp:  # the module fixture runs outside conftest's function-scoped cache
        mp.setenv("DK_CACHE", str(tmp_path_factory.getbasetemp() / "dk-cache"))
        out = {}
        for method in METHODS:
            cfg = tiny(method)
            folder = tmp_path_factory.mktemp(f"tune-{method}")
            out[method] = (cfg, folder, tune(cfg, space_for(cfg), TRIALS, folder))
    return out


# ------------------------------------------------------------------ (a) the same budget for every method
@needs_optuna
def test_every_method_gets_exactly_the_trial_budget(tuned):
    for method, (cfg, out, result) in tuned.items():
        space = space_for(cfg)
        assert result.n_trials == TRIALS and [t.number for t in result.trials] == list(range(TRIALS)), method
        assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{i:03d}" for i in range(TRIALS)]
        recorded = json.loads((out / TRIALS_FILE).read_text())
        assert [r["state"] for r in recorded["trials"]] == ["complete"] * TRIALS
        assert recorded["test_split_read"] is False
        for trial in result.trials:
            assert set(trial.values) == set(space) and all(space[k].contains(v) for k, v in trial.values.items())
            assert trial.seconds > 0
            run = load_config(str(out / trial.run_dir / "config.yaml"))
            assert run.data.holdout == "val"  # every trial evaluated on the validation split
            for key, value in trial.values.items():
                term, param = key.split(".")[1:]
                assert run.losses[term][param] == value
            entries = json.loads((out / trial.run_dir / "results.json").read_text())["models"]
            student = next(e for e in entries if e["role"] == "student")
            assert trial.score == student["last_acc"]
            teacher = next(e for e in entries if e["role"] == "teacher")
            if trial.number > 0:  # the validation-mode teacher is cached by its data fingerprint and reused
                assert teacher.get("reused_from")
        assert result.best_score == max(t.score for t in result.trials)
        assert result.best_values == next(t.values for t in result.trials if t.score == result.best_score)
    assert len({tuned[m][2].n_trials for m in tuned}) == 1
    assert {tuple(r.values) for r in tuned["dkd"][2].trials} == {("losses.dkd.beta", "losses.dkd.T")}


# ------------------------------------------------------------------ (b) the test split is never read
class PoisonRead(Exception):
    """Raised by a poisoned test split on any access."""


class PoisonedSplit(Dataset):
    """A test split (not in memory) that records and refuses every access: length, samples, attributes."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def _refuse(self, what: str):
        self.reads.append(what)
        raise PoisonRead(f"the test split was read ({what})")

    def __len__(self) -> int:
        return self._refuse("len")

    def __getitem__(self, index):
        return self._refuse(f"item {index!r}")

    def __iter__(self):
        return self._refuse("iter")

    def __getattr__(self, name: str):
        if name == "reads":
            raise AttributeError(name)
        return self._refuse(f"attribute {name}")


class PoisonedTensors(TensorData):
    """An in-memory test split, armed once the builder has built it: then its tensors, length and
    samples refuse every read (what the fingerprint, the label check and the loaders would touch)."""

    def arm(self) -> PoisonedTensors:
        self.reads: list[str] = []
        self._hidden = (self.__dict__.pop("x"), self.__dict__.pop("y"))
        return self

    def _refuse(self, what: str):
        self.reads.append(what)
        raise PoisonRead(f"the test split was read ({what})")

    def __getattr__(self, name: str):
        if name in ("x", "y"):
            return self._refuse(f"tensor {name}")
        raise AttributeError(name)

    def __len__(self) -> int:
        return self._refuse("len") if "_hidden" in self.__dict__ else super().__len__()

    def __getitem__(self, index):
        return self._refuse(f"item {index!r}")


@pytest.fixture(params=["dataset", "tensors"])
def poisoned(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """Register ``poisoned_test``: 8-dim, 4 classes, whose test split refuses to be read."""
    built: list[Dataset] = []

    def builder(*, root: Path, split_seed: int, n: int = 160) -> DataBundle:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(4, 8, generator=g) * 3
        y = torch.arange(n) % 4
        x = centers[y] + torch.randn(n, 8, generator=g)  # (n, 8)
        test = PoisonedSplit() if request.param == "dataset" else PoisonedTensors(x[:40].clone(), y[:40].clone())
        bundle = DataBundle(train=TensorData(x, y), test=test, info=DatasetInfo("poisoned_test", 4, (8,)))
        if isinstance(test, PoisonedTensors):
            test.arm()  # the builder has built its test split; from here on nobody may read it
        built.append(test)
        return bundle

    monkeypatch.setitem(DATASETS._items, "poisoned_test", builder)
    return built


def reads(built: list[Dataset]) -> list[str]:
    return [r for split in built for r in split.reads]


def poisoned_config(*extra: str):
    raw = {
        "name": "poison",
        "data": {"name": "poisoned_test", "val_fraction": 0.25, "batch_size": 32},
        "teacher": {"name": "mlp", "params": {"hidden": [16]}, "train": {"epochs": 1}},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "losses": {"kd": {}},
        "train": {"epochs": 1},
    }
    return load_config(raw, list(extra))


@needs_optuna
def test_tuning_never_reads_the_test_split(poisoned, tmp_path):
    cfg = poisoned_config()
    result = tune(cfg, space_for(cfg), TRIALS, tmp_path / "tune")
    assert result.n_trials == TRIALS and all(t.score is not None for t in result.trials)
    assert len(poisoned) >= TRIALS and reads(poisoned) == []  # built once per trial, never read
    with pytest.raises(PoisonRead):  # the poison works: the same config evaluated on the test split reads it
        commands.distill(cfg, out=tmp_path / "on-test", progress=False)
    assert reads(poisoned)


def test_holdout_val_replaces_the_test_split_with_the_carved_validation_split(poisoned):
    bundle = load_dataset("poisoned_test", val_fraction=0.25, holdout="val")
    assert bundle.val is None and isinstance(bundle.test, TensorData)
    assert (len(bundle.train), len(bundle.test)) == (120, 40) and reads(poisoned) == []


def test_holdout_modes_carve_the_same_split_and_have_different_fingerprints():
    kw = {"num_samples": 200, "val_fraction": 0.1}
    on_test, on_val = load_dataset("mnist1d", **kw), load_dataset("mnist1d", holdout="val", **kw)
    assert torch.equal(on_val.test.x, on_test.val.x) and torch.equal(on_val.train.x, on_test.train.x)
    assert on_val.val is None and len(on_val.test) != len(on_test.test)
    assert on_val.info.fingerprint != on_test.info.fingerprint
    assert load_dataset("mnist1d", holdout="val", **kw).info.fingerprint == on_val.info.fingerprint


# ------------------------------------------------------------------ (c) holdout=val needs a validation split
def test_holdout_val_without_val_fraction_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        tiny("kd", "data.holdout=val", "data.val_fraction=0")
    text = str(exc.value)
    assert "\n" not in text and "data.holdout" in text and "data.val_fraction" in text
    with pytest.raises(ConfigError, match=r"data\.holdout.*data\.val_fraction"):
        load_dataset("mnist1d", num_samples=200, holdout="val")
    with pytest.raises(ConfigError, match="data.val_fraction"):
        tune(tiny("kd", "data.val_fraction=0"), {"losses.kd.T": Range(low=1.0, high=8.0)}, 1, tmp_path)
    assert not (tmp_path / TRIALS_FILE).exists()


# ------------------------------------------------------------------ (d) resume
@needs_optuna
def test_a_second_call_replays_the_recorded_trials_and_runs_none(tuned, monkeypatch):
    cfg, out, first = tuned["kd"]
    before = (out / TRIALS_FILE).read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded trial was run again")

    monkeypatch.setattr(commands, "distill", no_training)
    again = tune(cfg, space_for(cfg), TRIALS, out)
    assert again.trials == first.trials and again.best_values == first.best_values
    assert (out / TRIALS_FILE).read_text() == before
    with pytest.raises(ConfigError, match="budget"):  # fewer trials than recorded: not the same budget
        tune(cfg, space_for(cfg), TRIALS - 1, out)
    with pytest.raises(ConfigError, match="another search"):
        tune(cfg, {"losses.kd.T": Range(low=1.0, high=4.0)}, TRIALS, out)


@needs_optuna
def test_an_interrupted_search_continues_where_it_stopped(tuned, tmp_path, monkeypatch):
    cfg, _, uninterrupted = tuned["kd"]
    real, calls = commands.distill, []

    def interrupted(run_cfg, out, **kwargs):
        calls.append(Path(out).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped during the second trial
        return real(run_cfg, out=out, **kwargs)

    monkeypatch.setattr(commands, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, space_for(cfg), TRIALS, tmp_path)
    recorded = json.loads((tmp_path / TRIALS_FILE).read_text())["trials"]
    assert [r["state"] for r in recorded] == ["complete", "running"]
    calls.clear()
    resumed = tune(cfg, space_for(cfg), TRIALS, tmp_path)
    assert calls == ["trial-001"]  # only the cut-off trial ran, with the values it was given
    assert [t.values for t in resumed.trials] == [t.values for t in uninterrupted.trials]
    assert resumed.trials[1].values == recorded[1]["values"]
    calls.clear()
    more = tune(cfg, space_for(cfg), TRIALS + 1, tmp_path)  # a larger budget adds trials, re-runs none
    assert calls == [f"trial-{TRIALS:03d}"] and more.n_trials == TRIALS + 1


@needs_optuna
def test_a_diverged_trial_is_recorded_without_a_score_and_replayed(tmp_path, monkeypatch):
    cfg = tiny("kd")
    space = {"losses.kd.T": Range(low=1.0, high=8.0, log=True)}

    def fake(run_cfg, out, **kwargs):  # no training: the protocol around the runs is what is checked
        if Path(out).name == "trial-000":
            raise DivergenceError("loss became NaN at step 3")
        return {"student": {"last_acc": 50.0 + run_cfg.losses["kd"]["T"]}}

    monkeypatch.setattr(commands, "distill", fake)
    result = tune(cfg, space, 3, tmp_path)
    assert [t.state for t in result.trials] == ["diverged", "complete", "complete"] and result.trials[0].score is None
    assert result.best_score == max(t.score for t in result.trials[1:])
    best = max(result.trials[1:], key=lambda t: t.score)
    assert result.best_values == best.values and best.score == 50.0 + best.values["losses.kd.T"]
    monkeypatch.setattr(commands, "distill", lambda *a, **k: pytest.fail("a recorded trial was run again"))
    assert tune(cfg, space, 3, tmp_path).trials == result.trials
    text = write_tuned_recipe(tmp_path / "tuned.yaml", cfg, result).read_text()
    assert "trial 0: diverged" in text
    with pytest.raises(ConfigError, match="diverged"):
        write_tuned_recipe(tmp_path / "none.yaml", cfg, type(result)({}, None, result.trials[:1], 1, space))


@needs_optuna
def test_an_unreadable_trials_file_is_one_config_error(tmp_path):
    cfg = tiny("kd")
    (tmp_path / TRIALS_FILE).write_text('{"trials": "none"}')
    with pytest.raises(ConfigError, match="cannot be read"):
        tune(cfg, space_for(cfg), 2, tmp_path)


# ------------------------------------------------------------------ (e) the tuned recipe
@needs_optuna
def test_the_written_recipe_loads_with_the_best_values(tuned, tmp_path):
    cfg, _, result = tuned["dkd"]
    path = write_tuned_recipe(tmp_path / "dkd-tuned.yaml", cfg, result)
    loaded = load_config(str(path))
    assert loaded.losses["dkd"]["beta"] == result.best_values["losses.dkd.beta"]
    assert loaded.losses["dkd"]["T"] == result.best_values["losses.dkd.T"]
    expected = cfg.model_dump(mode="json")
    expected["losses"]["dkd"] = {"beta": result.best_values["losses.dkd.beta"], "T": result.best_values["losses.dkd.T"]}
    assert loaded.model_dump(mode="json") == expected  # cfg itself, the chosen values set; holdout as in cfg
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert f"best of {TRIALS} trials" in text and "test split was not read" in text
    for t in result.trials:
        assert f"trial {t.number}: validation accuracy {t.score:.2f}" in text
        assert f"losses.dkd.beta={t.values['losses.dkd.beta']:.6g}" in text


# ------------------------------------------------------------------ (f) the losses' search spaces
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_declares_a_valid_search_space(name):
    cls = LOSSES.get(name)
    assert "search_space" in vars(cls), f"loss {name!r} declares no search_space of its own"
    assert bool(cls.search_space) == (name != "ce"), "every loss but ce has something to tune"
    params = signature_fields(cls)
    for key, rng in cls.search_space.items():
        assert isinstance(rng, Range)
        assert key == "weight" or key in params, f"{name}.search_space[{key!r}] names no parameter of {cls.__name__}"
        for bound in rng.bounds():  # the loss is built (and its schedule validated) at each extreme
            loss, schedule = parse_term(name, {key: bound})
            if key == "weight":
                assert schedule.weight == bound
            elif hasattr(loss, key):  # most losses keep a parameter under its name (irg keeps a tuple)
                assert getattr(loss, key) == bound


def test_space_for_is_the_union_of_the_terms_spaces_as_config_paths():
    cfg = tiny("kd", "losses={ce: {}, soft: {loss: kd, T: 2}, dkd: {}}")
    assert set(space_for(cfg)) == {"losses.soft.T", "losses.soft.alpha", "losses.dkd.beta", "losses.dkd.T"}
    assert space_for(cfg)["losses.dkd.beta"] == LOSSES.get("dkd").search_space["beta"]


def test_suite_space_reads_ranges_and_names_bad_ones():
    space = suite_space(
        {"losses.kd.T": {"low": 1, "high": 8, "log": True}, "train.optimizer.name": {"choices": ["sgd", "adamw"]}}
    )
    assert space["losses.kd.T"] == Range(kind="float", low=1.0, high=8.0, log=True)
    assert space["train.optimizer.name"].kind == "choice"
    for bad, match in [
        ({"losses.kd.T": {"low": 8, "high": 1}}, r"losses\.kd\.T: .*below"),
        ({"losses.kd.T": {"low": 1, "hgih": 8}}, r"losses\.kd\.T\.hgih: .*'high'"),
        ({"losses.kd.T": {"low": 0, "high": 8, "log": True}}, r"losses\.kd\.T: .*low > 0"),
        ({"losses.kd.T": [1, 8]}, r"losses\.kd\.T: expected a range mapping"),
        ({"losses..T": {"low": 1, "high": 2}}, "not a dotted config path"),
        ([1, 2], "expected a mapping"),
    ]:
        with pytest.raises(ConfigError, match=match):
            suite_space(bad, where="space")


def test_a_space_is_checked_against_the_config_before_anything_trains(tmp_path):
    cfg = tiny("kd")
    with pytest.raises(ConfigError, match=r"'losses\.kdd\.T'.*no 'losses\.kdd'.*'kd'"):
        check_space(cfg, {"losses.kdd.T": Range(low=1.0, high=2.0)})
    with pytest.raises(ConfigError, match=r"losses\.kd\.alpha.*at 2\.0"):  # alpha <= 1
        check_space(cfg, {"losses.kd.alpha": Range(low=0.5, high=2.0)})
    with pytest.raises(ConfigError, match="data.holdout"):
        check_space(cfg, {"data.holdout": Range(choices=("test", "val"))})
    with pytest.raises(ConfigError, match="empty"):
        tune(cfg, {}, 2, tmp_path)
    with pytest.raises(ConfigError, match="trials"):
        tune(cfg, space_for(cfg), 0, tmp_path)
    run = trial_config(cfg, {"losses.kd.T": 2.5}, seed=3)
    assert (run.losses["kd"]["T"], run.seed, run.data.holdout) == (2.5, 3, "val")
    assert not any(tmp_path.iterdir())


def test_tuning_without_optuna_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    cfg = tiny("kd")
    with pytest.raises(ConfigError, match=r'pip install "darkknowledge\[tune\]"'):
        tune(cfg, space_for(cfg), 1, tmp_path)
