"""Every shipped recipe validates, and runs end to end on a small slice of its data."""

import math

import pytest

from darkknowledge import commands
from darkknowledge.config import load_config, recipe_names
from darkknowledge.lm.config import is_lm_recipe
from darkknowledge.losses import list_losses
from darkknowledge.recipes import read_recipe
from darkknowledge.runs.build import check_config

LM_RECIPES = [n for n in recipe_names() if is_lm_recipe(read_recipe(n))]
"""Language-model recipes (``kind: lm``): validated and run by tests/test_lm_run.py."""
CLASSIFICATION_RECIPES = [n for n in recipe_names() if n not in LM_RECIPES]


def _lm_arm_losses() -> set[str]:
    out = set()
    for name in LM_RECIPES:
        for arm in read_recipe(name)["arms"].values():
            out |= {(spec or {}).get("loss", term) for term, spec in arm["losses"].items()}
    return out


# two epochs: the second one runs after an evaluation, which once broke feature losses
SMALL = [
    "data.params.num_samples=1000",
    "data.params.transfer_samples=500",
    "train.epochs=2",
    "teacher.train.epochs=2",
    "seeds=[0]",
]


def test_every_loss_has_a_recipe_named_after_it():
    """A recipe named after each loss, or (token losses) a language-model recipe with an arm using it."""
    missing = sorted(set(list_losses()) - {"ce"} - set(recipe_names()) - _lm_arm_losses())
    assert not missing, f"losses without a shipped recipe: {missing}"


@pytest.mark.parametrize("name", CLASSIFICATION_RECIPES)
def test_recipe_validates(name):
    cfg = load_config(name)
    check_config(cfg)
    assert len(cfg.seeds) >= 3, "recipes report several seeds"


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION_RECIPES)
def test_recipe_runs_end_to_end(name, tmp_path):
    full = load_config(name)
    overrides = SMALL if full.data.name == "mnist1d" else SMALL[2:]
    if full.teacher is None:
        overrides = [o for o in overrides if not o.startswith("teacher.")]
    if full.train.steps is not None:  # a budget in steps (function matching): two epochs instead
        overrides = ["train.steps=null", *overrides]
    if full.scheme.name == "data_free":  # a few synthesised batches (and inversion steps) per epoch
        overrides = [*overrides, "scheme.params.steps_per_epoch=2"]
        if full.scheme.params["synthesizer"]["name"] == "deepinversion":
            overrides.append("scheme.params.synthesizer.params.iterations=3")
    tutoring = 2
    if full.scheme.name == "qkd":  # three phases of one epoch each; the last (tutoring) is the student's stage
        overrides = [*overrides, "train.epochs=3"]
        tutoring = 1
    cfg = load_config(name, overrides)
    out = commands.distill(cfg, out=tmp_path / name, progress=False)
    entry = out["student"]
    assert math.isfinite(entry["last_acc"]) and entry["epochs"] == tutoring
    assert (tmp_path / name / "student.pt").is_file()


@pytest.mark.slow
def test_feature_recipe_over_several_seeds_with_one_teacher(tmp_path):
    """`dk run` reuses one teacher object for every seed's student (this once broke feature losses)."""
    cfg = load_config("at", [*SMALL[:-1], "seeds=[0,1]"])
    out = commands.compare(cfg, out=tmp_path / "at", progress=False)
    assert {r["role"] for r in out["rows"]} == {"teacher", "baseline", "student"}
    assert len(next(r for r in out["rows"] if r["role"] == "student")["seeds"]) == 2
