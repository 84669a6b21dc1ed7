"""The scheme plumbing shared by every scheme: config, params validation, stages, member rows."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.build import check_config
from darkknowledge.cli import main
from darkknowledge.commands import compare, distill
from darkknowledge.config import load_config
from darkknowledge.errors import ConfigError, RegistryError
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.schemes import SCHEMES, Scheme, register_scheme
from darkknowledge.schemes.context import SchemeContext
from helpers import TINY, results


class _Pair(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, weight: float) -> None:
        super().__init__()
        self.a, self.b, self.weight = a, b, weight

    def forward(self, batch: Any, teacher: Any, epoch_progress: float = 0.0):
        za, zb = self.a(batch.x), self.b(batch.x)  # (B, K) each
        ce = F.cross_entropy(za, batch.y, ignore_index=-1) + F.cross_entropy(zb, batch.y, ignore_index=-1)
        kl = kd_soft_loss(za, zb.detach(), 2.0)
        return ce + self.weight * kl, {"ce": ce.detach(), "kl": kl.detach()}


class PairScheme(Scheme):
    """A two-model test scheme: model a learns from b; both are evaluated."""

    citation = "test"
    summary = "a learns from b"

    def __init__(self, a: nn.Module, b: nn.Module, weight: float) -> None:
        self._module = _Pair(a, b, weight)
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        return self._module

    @classmethod
    def build(cls, ctx: SchemeContext, seed: int, *, weight: Annotated[float, Field(ge=0)] = 1.0) -> PairScheme:
        return cls(ctx.student(seed), ctx.model(None, seed + 100, where="peer"), weight)

    def after_step(self) -> None:
        self.steps += 1

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self._module.a, "partner": self._module.b}

    def describe(self) -> dict[str, Any]:
        return {"losses": ["ce", "kl"], "adapter_params": 0}


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
    made: list[PairScheme] = []
    build = PairScheme.build.__func__

    def spy(cls, ctx, seed, **params):
        made.append(build(cls, ctx, seed, **params))
        return made[-1]

    monkeypatch.setattr(PairScheme, "build", classmethod(spy))
    cfg = tiny(scheme={"name": "test_pair", "params": {"weight": 0.5}}, teacher=None)
    res = compare(cfg, out=tmp_path / "run", progress=False)
    roles = [r["role"] for r in res["rows"]]
    assert roles == ["baseline", "student", "partner"]  # no teacher: this scheme never asked for one
    entries = results(tmp_path / "run")
    assert len(made) == 2  # a dry build checks the recipe before any training, then the real one
    assert made[1].steps == entries["test_pair-s0"]["steps"] == 16  # after_step once per optimizer step (800 / 50)
    assert entries["test_pair-s0:partner"]["member_of"] == "test_pair-s0"
    assert made[1].module.weight == 0.5
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
    def broken(cls, ctx, seed, **params):
        raise ConfigError("scheme.params.stages.0: no module 'blocks.9'")

    monkeypatch.setattr(PairScheme, "build", classmethod(broken))
    with pytest.raises(ConfigError, match="blocks.9"):
        compare(tiny(scheme="test_pair", teacher=None), out=tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").rglob("*.pt"))  # not even the baseline trained


def test_every_scheme_takes_the_transfer_switch(tmp_path, pair_scheme):
    with pytest.raises(ConfigError, match=r"scheme\.params\.transfer: must be true or false \(got 'yes'\)"):
        check_config(tiny(scheme={"name": "test_pair", "params": {"transfer": "yes"}}))
    data = {"params": {"num_samples": 1000, "transfer_samples": 200}}
    off = distill(tiny(scheme="test_pair", teacher=None, data=data), out=tmp_path / "off", progress=False)
    on = distill(tiny(scheme={"name": "test_pair", "params": {"transfer": True}}, teacher=None, data=data),
                 out=tmp_path / "on", progress=False)
    assert not off["student"]["transfer"] and on["student"]["transfer"]  # the scheme's default is off
    assert on["student"]["train_samples"] == off["student"]["train_samples"] + 200
