"""Born-again networks: fresh generations, each taught by the previous one, and the BANE row."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from darkknowledge.commands import compare, distill
from darkknowledge.config import deep_merge, load_config
from darkknowledge.engine.checkpoint import load_exported, state_hash
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import ConfigError
from darkknowledge.models.ensemble import ProbabilityEnsemble
from darkknowledge.runs.build import build_data, build_model, check_config, make_loaders
from darkknowledge.schemes.born_again import generation_seed
from helpers import TINY, dk, results, torchrun


def tiny(**changes: Any):
    base = {k: v for k, v in TINY.items() if k != "teacher"}  # born_again needs no pre-trained teacher
    raw = deep_merge(
        base,
        {
            "seeds": [0],
            "train": {"epochs": 1},
            "scheme": {"name": "born_again", "params": {"generations": 2}},
            **changes,
        },
    )
    return load_config(raw)


@pytest.fixture
def spy_train(monkeypatch):
    """Record, per stage, the student's initial weights and the teacher hash before training."""
    seen: dict[str, dict[str, Any]] = {}
    original = Trainer.fit

    def fit(self, resume=False):
        task = self.task
        seen[self.stage] = {"init": state_hash(task.eval_models()["student"]), "teacher": task.fingerprint()}
        return original(self, resume)

    monkeypatch.setattr(Trainer, "fit", fit)
    return seen


def test_generation_k_starts_fresh_and_is_taught_by_generation_k_minus_1(tmp_path, spy_train):
    res = distill(tiny(), out=tmp_path / "d", progress=False)  # no baseline: generation 0 is its own stage
    stages = ["born_again-gen0-s0", "born_again-gen1-s0", "born_again-gen2-s0"]
    assert list(spy_train) == stages
    inits = [spy_train[s]["init"] for s in stages]
    assert len(set(inits)) == 3  # every generation has its own initialisation
    assert generation_seed(0, 1) != generation_seed(0, 2) != 0
    assert spy_train[stages[0]]["teacher"] is None  # generation 0 learns from labels only
    for prev, cur in zip(stages, stages[1:]):
        _, trained = load_exported(tmp_path / "d" / prev / "model.pt")
        assert spy_train[cur]["teacher"] == state_hash(trained)  # exactly the previous generation's weights
        assert spy_train[cur]["init"] != state_hash(trained)
    assert [e["role"] for e in res["entries"]] == ["student", "gen1", "ensemble"]
    assert res["student"]["name"] == "born_again-gen2-s0"
    _, exported = load_exported(tmp_path / "d" / "student.pt")
    assert state_hash(exported) == state_hash(res["model"])  # the last generation is the deployed model
    assert results(tmp_path / "d")["born_again-gen0-s0"]["role"] == "gen0"


def test_generation_zero_is_the_baseline_of_dk_run(tmp_path, spy_train):
    res = compare(tiny(), out=tmp_path / "r", progress=False)
    assert list(spy_train) == ["baseline-s0", "born_again-gen1-s0", "born_again-gen2-s0"]  # gen0 not trained twice
    _, baseline = load_exported(tmp_path / "r" / "baseline-s0" / "model.pt")
    assert spy_train["born_again-gen1-s0"]["teacher"] == state_hash(baseline)
    assert spy_train["born_again-gen1-s0"]["init"] != spy_train["baseline-s0"]["init"]
    assert [r["role"] for r in res["rows"]] == ["baseline", "student", "gen1", "ensemble"]


def test_the_ensemble_row_averages_every_generation_softmax(tmp_path):
    cfg = tiny()
    res = compare(cfg, out=tmp_path / "r", progress=False)
    entries = results(tmp_path / "r")
    ens = entries["born_again-gen2-s0:ensemble"]
    assert ens["role"] == "ensemble" and ens["member_of"] == "born_again-gen2-s0"
    bundle = build_data(cfg)
    models = []
    for stage in ("baseline-s0", "born_again-gen1-s0", "born_again-gen2-s0"):  # generations 0, 1, 2
        net = build_model(cfg.student, bundle.info)
        net.load_state_dict(load_exported(tmp_path / "r" / stage / "model.pt")[1])
        models.append(net.eval())
    _, test_loader, _ = make_loaders(cfg, bundle, 0, torch.device("cpu"), DistContext())
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            probs = torch.stack([F.softmax(m(batch.x), -1) for m in models]).mean(0)  # (B, K)
            correct += int((probs.argmax(-1) == batch.y).sum())
            total += len(batch)
    assert ens["last_acc"] == pytest.approx(100.0 * correct / total)
    assert ens["params"] == 3 * entries["baseline-s0"]["params"]
    assert "| ensemble |" in res["report"].read_text()


def test_the_generation_ensemble_is_the_log_of_the_mean_softmax():
    torch.manual_seed(0)
    lin = [torch.nn.Linear(4, 3) for _ in range(3)]
    view = ProbabilityEnsemble(lin)
    assert sum(p.numel() for p in view.parameters()) == 3 * 15  # a view over the members, no new weights
    x = torch.randn(5, 4)
    expected = torch.stack([F.softmax(m(x), -1) for m in lin]).mean(0).log()
    assert torch.allclose(view(x), expected, atol=1e-6)


def test_resume_skips_finished_generations(tmp_path, spy_train):
    cfg = tiny()
    compare(cfg, out=tmp_path / "r", progress=False)
    first = results(tmp_path / "r")
    spy_train.clear()
    compare(cfg, out=tmp_path / "r", resume=True, progress=False)
    assert spy_train == {}  # nothing retrained
    assert results(tmp_path / "r")["born_again-gen2-s0"]["last_acc"] == first["born_again-gen2-s0"]["last_acc"]

    path = tmp_path / "r" / "results.json"  # forget the last generation: only it trains again
    data = json.loads(path.read_text())
    data["models"] = [m for m in data["models"] if not m["name"].startswith("born_again-gen2-s0")]
    path.write_text(json.dumps(data))
    compare(cfg, out=tmp_path / "r", resume=True, progress=False)
    assert list(spy_train) == ["born_again-gen2-s0"]
    assert spy_train["born_again-gen2-s0"]["teacher"] == state_hash(
        load_exported(tmp_path / "r" / "born_again-gen1-s0" / "model.pt")[1]
    )


def test_no_ensemble_row_when_disabled_and_one_generation(tmp_path):
    res = distill(
        tiny(scheme={"name": "born_again", "params": {"generations": 1, "ensemble": False}}),
        out=tmp_path / "d",
        progress=False,
    )
    assert [e["role"] for e in res["entries"]] == ["student"]  # Tf-KD_self: one generation


def test_transfer_set_only_for_the_born_again_generations(tmp_path):
    cfg = tiny(
        scheme={"name": "born_again", "params": {"generations": 1, "transfer": True}},
        data={"params": {"transfer_samples": 200}},
    )
    distill(cfg, out=tmp_path / "d", progress=False)
    entries = results(tmp_path / "d")
    gen0, gen1 = entries["born_again-gen0-s0"], entries["born_again-gen1-s0"]
    assert not gen0["transfer"] and gen1["transfer"]  # generation 0 is trained like the baseline
    assert gen1["train_samples"] == gen0["train_samples"] + 200


def test_bad_params_fail_before_running():
    with pytest.raises(ConfigError, match=r"scheme\.params\.generations.*greater than or equal to 1"):
        check_config(tiny(scheme={"name": "born_again", "params": {"generations": 0}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.generation: unknown parameter.*generations"):
        check_config(tiny(scheme={"name": "born_again", "params": {"generation": 2}}))


@pytest.mark.slow
def test_born_again_recipe_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = dk(
        "run",
        "born_again",
        "seeds=[0]",
        "train.epochs=2",
        "data.params.num_samples=1000",
        "scheme.params.generations=2",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    entries = results(out)
    assert {"baseline-s0", "born_again-gen1-s0", "born_again-gen2-s0", "born_again-gen2-s0:ensemble"} <= set(entries)
    assert entries["born_again-gen2-s0"]["role"] == "student"
    assert "born_again-gen0-s0" not in entries
    proc = dk(
        "distill",
        "born_again",
        "train.epochs=1",
        "data.params.num_samples=1000",
        "--out",
        str(tmp_path / "d"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "student.pt").is_file()


@pytest.mark.slow
def test_born_again_under_two_process_ddp(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny().model_dump(mode="json")))
    ddp = torchrun("run", str(recipe), "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    entries = results(tmp_path / "ddp")
    assert "born_again-gen0-s0" not in entries  # both ranks reused the baseline as generation 0
    assert {"born_again-gen1-s0", "born_again-gen2-s0", "born_again-gen2-s0:ensemble"} <= set(entries)
