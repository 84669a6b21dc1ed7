"""The scheme plumbing shared by every scheme: config, params validation, stages, member rows."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import Field

from darkknowledge.cli import main
from darkknowledge.commands import compare, distill
from darkknowledge.config import load_config
from darkknowledge.errors import ConfigError, RegistryError
from darkknowledge.runs.build import check_config
from darkknowledge.schemes import SCHEMES, Context, Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.peers import Peer
from helpers import TINY, results


class PairTask(FlowTask):
    """The pair's task; counts the optimizer steps the engine reports."""

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow, {"student": flow.student, "partner": flow.partner})
        self.steps = 0

    def after_step(self, part: str = "main") -> None:
        super().after_step(part)
        self.steps += 1


class PairParams(SchemeParams):
    weight: Annotated[float, Field(ge=0)] = Field(default=1.0, description="weight of the student's kd term")


class PairScheme(Scheme):
    """A two-model test scheme: the student learns from the partner (a peer, detached); both are evaluated."""

    citation = "test"
    summary = "a learns from b"
    Params = PairParams

    @classmethod
    def task(cls, ctx: Context, seed: int, params: PairParams) -> PairTask:
        student, partner = ctx.student(seed), ctx.model(None, seed + 100, where="peer")
        taught = ctx.objective({"ce": {}, "kd": {"T": 2.0, "alpha": 1.0, "weight": params.weight}})
        links = [
            Link("student", taught, Peer("partner", partner)),
            Link("partner", ctx.objective({"ce": {}}), suffix="@partner"),
        ]
        return PairTask(Flow({"student": student, "partner": partner}, links))


@pytest.fixture
def pair_scheme():
    register_scheme("test_pair")(PairScheme)
    yield PairScheme
    SCHEMES._items.pop("test_pair", None)


def tiny(**changes: Any):
    from darkknowledge.config import deep_merge

    raw = deep_merge(TINY, {"seeds": [0], "train": {"epochs": 1}, **changes})
    return load_config(raw)


def test_scheme_accepts_a_name_or_a_mapping():
    assert load_config(dict(TINY, scheme="offline")).scheme.name == "offline"
    cfg = load_config(dict(TINY, scheme={"name": "offline", "params": {}}))
    assert cfg.scheme.name == "offline" and cfg.scheme.params == {}


def test_unknown_scheme_and_bad_params_fail_before_running(pair_scheme):
    with pytest.raises(RegistryError, match=r"unknown scheme 'ofline'.*offline"):
        check_config(tiny(scheme="ofline"))
    with pytest.raises(ConfigError, match=r"scheme\.params\.wieght: unknown parameter.*weight"):
        check_config(tiny(scheme={"name": "test_pair", "params": {"wieght": 1}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.weight.*greater than or equal to 0"):
        check_config(tiny(scheme={"name": "test_pair", "params": {"weight": -1}}))
    with pytest.raises(ConfigError, match=r"teachers\.0\.params\.chanels: unknown parameter"):
        check_config(tiny(teachers=[{"name": "cnn1d", "params": {"chanels": 8}}]))


def test_a_scheme_runs_as_a_stage_with_a_row_per_evaluated_model(tmp_path, pair_scheme, monkeypatch):
    made: list[PairTask] = []
    task = PairScheme.task.__func__

    def spy(cls, ctx, seed, params):
        made.append(task(cls, ctx, seed, params))
        return made[-1]

    monkeypatch.setattr(PairScheme, "task", classmethod(spy))
    cfg = tiny(scheme={"name": "test_pair", "params": {"weight": 0.5}}, teacher=None)
    res = compare(cfg, out=tmp_path / "run", progress=False)
    roles = [r["role"] for r in res["rows"]]
    assert roles == ["baseline", "student", "partner"]  # no teacher: this scheme never asked for one
    entries = results(tmp_path / "run")
    assert len(made) == 2  # a dry build checks the recipe before any training, then the real one
    assert made[1].steps == entries["test_pair-s0"]["steps"] == 16  # after_step once per optimizer step (800 / 50)
    assert entries["test_pair-s0:partner"]["member_of"] == "test_pair-s0"
    assert made[1].flow.objective.schedules["kd"].weight == 0.5
    assert entries["test_pair-s0"]["losses"] == ["ce", "ce@partner", "kd"]  # the partner's terms are suffixed
    assert "| mlp | partner | test_pair |" in res["report"].read_text()
    student = next(r for r in res["rows"] if r["role"] == "student")
    assert student["method"] == "test_pair"

    again = compare(cfg, out=tmp_path / "run", resume=True, progress=False)  # finished stages are reused
    assert len(made) == 4 and made[3].steps == 0
    assert [r["last_mean"] for r in again["rows"]] == [r["last_mean"] for r in res["rows"]]


def test_distill_exports_the_primary_model_and_lists_members(tmp_path, pair_scheme):
    cfg = tiny(scheme="test_pair", teacher=None)
    res = distill(cfg, out=tmp_path / "d", progress=False)
    assert res["teacher"] is None
    assert [e["role"] for e in res["entries"]] == ["student", "partner"]
    assert (tmp_path / "d" / "student.pt").is_file()
    assert res["model"] is not None and res["model"].fc.out_features == 10


def test_list_and_explain_schemes(capsys, pair_scheme):
    assert main(["list", "schemes"]) == 0
    out = capsys.readouterr().out
    assert "offline" in out and "Hinton et al. 2015" in out and "test_pair" in out
    assert main(["explain", "test_pair"]) == 0
    out = capsys.readouterr().out
    assert "weight" in out and "1.0" in out and "a learns from b" in out
    assert main(["explain", "test_pairr"]) == 2
    assert "test_pair" in capsys.readouterr().err


def test_a_scheme_that_cannot_be_built_fails_before_any_training(tmp_path, pair_scheme, monkeypatch):
    def broken(cls, ctx, seed, params):
        raise ConfigError("scheme.params.stages.0: no module 'blocks.9'")

    monkeypatch.setattr(PairScheme, "task", classmethod(broken))
    with pytest.raises(ConfigError, match="blocks.9"):
        compare(tiny(scheme="test_pair", teacher=None), out=tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").rglob("*.pt"))  # not even the baseline trained


def test_the_transfer_switch_is_true_or_false(pair_scheme):
    with pytest.raises(ConfigError, match=r"scheme\.params\.transfer: .*(true or false|boolean).*\(got 'yes'\)"):
        check_config(tiny(scheme={"name": "test_pair", "params": {"transfer": "yes"}}))


def test_every_scheme_takes_the_transfer_switch(tmp_path, pair_scheme):
    data = {"params": {"num_samples": 1000, "transfer_samples": 200}}
    off = distill(tiny(scheme="test_pair", teacher=None, data=data), out=tmp_path / "off", progress=False)
    on = distill(
        tiny(scheme={"name": "test_pair", "params": {"transfer": True}}, teacher=None, data=data),
        out=tmp_path / "on",
        progress=False,
    )
    assert not off["student"]["transfer"] and on["student"]["transfer"]  # the scheme's default is off
    assert on["student"]["train_samples"] == off["student"]["train_samples"] + 200
