"""Every mistake that needs no training is caught before anything trains or is written.

The commands' preflight plays the scheme's whole plan with stages that are dry runs on one
batch (runs/preflight.py); YAML's ``1e-3`` is a number everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from darkknowledge.cli import main
from darkknowledge.config import load_config, parse_override, read_recipe
from darkknowledge.yamlio import load_yaml
from helpers import TINY, results, write_recipe

QUICK = ["seeds=[0]", "train.epochs=1", "teacher.train.epochs=1", "data.params.num_samples=400"]


def _teachers_cached() -> list[Path]:
    folder = Path(os.environ["DK_CACHE"]) / "teachers"
    return sorted(folder.glob("*.pt")) if folder.is_dir() else []


def _fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """``dk ARGS`` exits 2 with one line naming ``message``: no run folder, no teacher trained."""
    before = _teachers_cached()
    out = tmp_path / "run"
    code = main([*args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert err.startswith("dk: error: ") and err.count("\n") == 1, err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert _teachers_cached() == before  # the teacher was not trained either


@pytest.mark.parametrize(
    ("scheme", "losses", "message"),
    [
        # a feature loss's tap that the teacher does not have: found by probing, before the teacher trains
        (
            "offline",
            '{"kd": {}, "hint": {"loss": "fitnet", "student_taps": ["blocks.0"], "teacher_taps": ["blocks.9"]}}',
            "'blocks.9'",
        ),
        # a multi-stage scheme: the bad tap of generation 1's term surfaces before generation 0 trains
        (
            "born_again",
            '{"ce": {}, "hint": {"loss": "fitnet", "student_taps": ["blocks.7"], "teacher_taps": ["blocks.0"]}}',
            "'blocks.7'",
        ),
        # an online scheme with a student tap that does not exist
        ("mutual", '{"ce": {}, "rkd": {"student_taps": ["nowhere"]}}', "'nowhere'"),
    ],
)
def test_bad_taps_stop_dk_run_before_anything_trains(tmp_path, capsys, scheme, losses, message):
    recipe = write_recipe(tmp_path / "r.yaml")
    _fails_before_training(
        tmp_path, capsys, ["run", str(recipe), *QUICK, f"scheme={scheme}", f"losses={losses}"], message
    )


def test_a_loss_that_needs_a_teacher_without_one_stops_before_the_baseline(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    _fails_before_training(tmp_path, capsys, ["run", str(recipe), *QUICK, "teacher=null"], "teacher")


def test_a_missing_teacher_checkpoint_stops_dk_distill_before_anything_is_written(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    missing = tmp_path / "nope.pt"
    _fails_before_training(
        tmp_path, capsys, ["distill", str(recipe), *QUICK, f"teacher.checkpoint={missing}"], "nope.pt"
    )


def test_the_cache_lacking_a_tap_a_loss_reads_stops_before_the_teacher_trains(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    losses = '{"kd": {}, "hint": {"loss": "fitnet", "student_taps": ["blocks.0"], "teacher_taps": ["blocks.0"]}}'
    _fails_before_training(
        tmp_path,
        capsys,
        ["run", str(recipe), *QUICK, f"losses={losses}", "cache={enabled: true, taps: []}"],
        "blocks.0",
    )


@pytest.mark.slow
def test_the_preflight_does_not_change_what_trains(tmp_path, monkeypatch):
    """Same accuracies with and without the dry runs: every real stage rebuilds its models from its seed."""
    from darkknowledge import commands

    cfg = load_config(
        TINY,
        [
            "seeds=[0]",
            "train.epochs=2",
            "teacher.train.epochs=2",
            "scheme={name: born_again, params: {generations: 1}}",
            "losses={ce: {}, kd: {T: 4.0, alpha: 0.9}}",
            "data.params.num_samples=600",
        ],
    )
    with_preflight = commands.compare(cfg, tmp_path / "a", progress=False)
    monkeypatch.setattr(commands, "preflight", lambda *a, **k: None)  # the session loads its own data
    without = commands.compare(cfg, tmp_path / "b", progress=False)
    a, b = results(with_preflight["run_dir"]), results(without["run_dir"])
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].get("last_acc") == b[name].get("last_acc"), name


# ---------------------------------------------------------------- YAML numbers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 1e-3),
        ("5E4", 5e4),
        ("-2e+4", -2e4),
        ("1.5e3", 1500.0),
        ("3", 3),
        ("0.5", 0.5),
        ("1e", "1e"),
        ("e3", "e3"),
        ('"1e-3"', "1e-3"),
    ],
)
def test_scientific_notation_is_a_number(text, value):
    parsed = load_yaml(text)
    assert parsed == value and type(parsed) is type(value)


def test_scientific_notation_in_recipes_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  optimizer: {lr: 1e-3, weight_decay: 5e-4}\nlosses:\n  kd: {T: 4e0, alpha: 0.9}\n")
    raw = read_recipe(str(path))
    assert raw["train"]["optimizer"] == {"lr": 1e-3, "weight_decay": 5e-4}
    assert raw["losses"]["kd"]["T"] == 4.0
    assert parse_override("train.optimizer.lr=2e-4") == (["train", "optimizer", "lr"], 2e-4)
    cfg = load_config(str(path), ["scheme={name: mutual, params: {n: 2}}", "losses.kd.T=3e0"])
    assert cfg.train.optimizer.lr == 1e-3 and cfg.losses["kd"]["T"] == 3.0


@pytest.mark.parametrize(
    "line", ["when: 2001-13-45", "n: !!int x", "flag: !!bool x", "deep: " + "[" * 3000 + "]" * 3000]
)
def test_a_recipe_value_pyyaml_cannot_build_is_one_config_error(tmp_path, line):
    from darkknowledge.errors import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\n{line}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(str(path))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_number_is_refused(value):
    from darkknowledge.errors import ConfigError

    with pytest.raises(ConfigError, match="train.optimizer.lr: Input should be a finite number"):
        load_config("quickstart", [f"train.optimizer.lr={value}"])
