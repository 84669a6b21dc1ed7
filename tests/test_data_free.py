"""Data-free and generator-fed students on the one engine: the training split is never read, the
parts step in order, the references and the report's samples are written."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from darkknowledge import commands
from darkknowledge.config import load_config
from darkknowledge.errors import ConfigError
from darkknowledge.runs import build
from darkknowledge.synthesis import SYNTHESIZERS
from darkknowledge.synthesis.base import draw_latent
from darkknowledge.synthesis.latents import LatentLoader

DATA = {"name": "mnist1d", "params": {"num_samples": 400}, "batch_size": 50}
TEACHER = {
    "name": "cnn1d",
    "params": {"channels": 8, "batch_norm": True},
    "train": {"epochs": 2, "optimizer": {"lr": 0.01}},
}


def config(tmp_path, synthesizer: dict[str, Any], **extra: Any):
    raw = {
        "name": "df",
        "seeds": [0],
        "data": DATA,
        "teacher": TEACHER,
        "student": {"name": "mlp", "params": {"hidden": [16]}},
        "losses": {"kd": {"T": 1.0, "alpha": 1.0}},
        "scheme": {
            "name": "data_free",
            "params": {
                "synthesizer": synthesizer,
                "steps_per_epoch": 3,
                "batch_size": 16,
                "references": [],
                "samples": 8,
            },
        },
        "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.01}, "device": "cpu"},
    }
    raw.update(extra)
    return load_config(raw)


class Sentinel(Dataset):
    """A training split that must never be read."""

    def __getitem__(self, i):
        raise AssertionError("the data-free student read the training split")

    def __len__(self):
        raise AssertionError("the data-free student read the training split's length")

    def __getattr__(self, name):
        raise AssertionError(f"the data-free student read the training split's {name!r}")


@pytest.fixture
def teacher_ckpt(tmp_path):
    cfg = config(tmp_path, {"name": "noise"})
    out = commands.train(cfg, out=tmp_path / "teacher", progress=False, which="teacher")
    return str(out["exported"])


@pytest.mark.parametrize("synth", ["dafl", "deepinversion"])
def test_data_free_student_never_reads_the_training_split(tmp_path, monkeypatch, teacher_ckpt, synth):
    real_load = build.load_dataset

    def no_train_split(*args, **kwargs):
        bundle = real_load(*args, **kwargs)
        object.__setattr__(bundle, "train", Sentinel())  # a frozen dataclass: swapped behind its back
        return bundle

    monkeypatch.setattr(build, "load_dataset", no_train_split)
    params = SYNTHESIZERS.get(synth).example
    cfg = config(
        tmp_path,
        {"name": synth, "params": params},
        teacher={"name": "cnn1d", "params": {"channels": 8, "batch_norm": True}, "checkpoint": teacher_ckpt},
    )
    out = commands.distill(cfg, out=tmp_path / "run", progress=False)  # preflight, training, export
    entry = out["student"]
    assert entry["synthesizer"] == synth and entry["train_samples"] == 3 * 16 and entry["transfer"] is False
    assert 0.0 <= entry["last_acc"] <= 100.0
    samples = torch.load(tmp_path / "run" / entry["name"] / "samples.pt")
    assert samples["x"].shape == (8, 40) and torch.isfinite(samples["x"]).all()


def test_latent_loader_is_a_function_of_seed_epoch_and_batch():
    a = LatentLoader(3, 8, 4, 5, 10)
    a.set_epoch(2)
    batches = list(a)
    resumed = list(a.iter_from(2))
    assert len(batches) == 4 and all(torch.equal(x.x, y.x) for x, y in zip(batches[2:], resumed))
    assert torch.equal(batches[1].x, draw_latent(3, (2, 1), 8, 5, 10).x)
    a.set_epoch(3)
    assert not torch.equal(next(iter(a)).x, batches[0].x)
    shares = [next(iter(LatentLoader(3, 8, 4, 5, 10, rank=r, world_size=2))) for r in (0, 1)]
    a.set_epoch(0)
    assert torch.equal(torch.cat([s.x for s in shares]), next(iter(a)).x)  # the ranks' shares make the batch


def test_a_data_free_student_cannot_read_labels(tmp_path, teacher_ckpt):
    cfg = config(
        tmp_path,
        {"name": "noise"},
        losses={"ce": {}, "kd": {"T": 1.0, "alpha": 1.0}},
        teacher={"name": "cnn1d", "params": {"channels": 8, "batch_norm": True}, "checkpoint": teacher_ckpt},
    )
    with pytest.raises(ConfigError, match=r"read labels, but a data-free student has none"):
        commands.distill(cfg, out=tmp_path / "run", progress=False)


def test_unknown_synthesizer_parameter_is_refused_before_training(tmp_path, teacher_ckpt):
    cfg = config(
        tmp_path,
        {"name": "dafl", "params": {"latnet_dim": 8}},
        teacher={"name": "cnn1d", "params": {"channels": 8, "batch_norm": True}, "checkpoint": teacher_ckpt},
    )
    with pytest.raises(ConfigError, match=r"latnet_dim.*Did you mean 'latent_dim'"):
        commands.distill(cfg, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dk_run_trains_the_references_and_reports_samples_and_losses(tmp_path):
    cfg = config(tmp_path, {"name": "dafl", "params": SYNTHESIZERS.get("dafl").example})
    raw = cfg.model_dump(mode="json")
    raw["scheme"]["params"]["references"] = ["kd_real", "noise"]
    out = commands.compare(load_config(raw), out=tmp_path / "run", progress=False)
    roles = {(r["role"], r["method"]) for r in out["rows"]}
    assert ("reference", "kd (real data)") in roles and ("reference", "kd (noise inputs)") in roles
    assert ("student", "dafl (data-free)") in roles and ("baseline", "ce") in roles
    report = (tmp_path / "run" / "report.md").read_text()
    assert "generator/loss" in report and "student/loss" in report  # the parts' losses per epoch
    assert "![synthetic samples of df-s0]" in report or "data_free-s0/samples.png" in report
    models = json.loads((tmp_path / "run" / "results.json").read_text())["models"]
    assert {m["name"] for m in models} >= {"baseline-s0", "data_free-s0", "data_free-real-s0", "data_free-noise-s0"}


def _interrupted_and_resumed(tmp_path, monkeypatch, cfg, task_cls) -> tuple[dict, dict]:
    """The last stage's full module state (student, generator, discriminators, pool count) of an
    uninterrupted run and of one killed in its second epoch then resumed."""
    from darkknowledge.engine.checkpoint import safe_load

    ref = commands.distill(cfg, out=tmp_path / "ref", progress=False)
    original, calls = task_cls.training_step, {"n": 0}

    def interrupt(self, model, batch, progress, part="main"):
        calls["n"] += 1
        if progress >= 1.4:  # the second epoch, after the first checkpoint
            raise KeyboardInterrupt
        return original(self, model, batch, progress, part)

    monkeypatch.setattr(task_cls, "training_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        commands.distill(cfg, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(task_cls, "training_step", original)
    commands.distill(cfg, out=tmp_path / "cut", resume=True, progress=False)
    stage = ref["student"]["name"]
    a = safe_load(tmp_path / "ref" / stage / "last.pt", map_location="cpu")["module"]
    b = safe_load(tmp_path / "cut" / stage / "last.pt", map_location="cpu")["module"]
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("synth", [n for n in SYNTHESIZERS.names() if n != "replay"])  # replay: below
def test_a_killed_data_free_run_resumes_to_the_same_student_and_synthesiser(tmp_path, monkeypatch, teacher_ckpt, synth):
    from darkknowledge.schemes.synthetic import SyntheticTask

    cfg = config(
        tmp_path,
        {"name": synth, "params": SYNTHESIZERS.get(synth).example},
        teacher={"name": "cnn1d", "params": {"channels": 8, "batch_norm": True}, "checkpoint": teacher_ckpt},
    )
    raw = cfg.model_dump(mode="json")
    raw["scheme"]["params"]["steps_per_epoch"] = 5
    a, b = _interrupted_and_resumed(tmp_path, monkeypatch, load_config(raw), SyntheticTask)
    assert a.keys() == b.keys()
    if synth != "noise":  # the synthesiser's state (generator, pool count, stash) is compared too
        assert any(k.startswith("synth.") for k in a), sorted(a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["adversarial_kd", "afd"])
def test_a_killed_run_with_a_discriminator_resumes_to_the_same_weights(tmp_path, monkeypatch, loss):
    from darkknowledge.schemes.task import FlowTask

    extra = {"student_taps": ["blocks.1"], "teacher_taps": ["blocks.1"]} if loss == "afd" else {}
    cfg = config(
        tmp_path,
        {"name": "noise"},
        losses={"ce": {}, "kd": {"T": 4.0, "alpha": 1.0}, loss: extra},
        scheme={"name": "offline"},
        student={"name": "cnn1d", "params": {"channels": 4}},
    )
    a, b = _interrupted_and_resumed(tmp_path, monkeypatch, cfg, FlowTask)
    assert any("discriminator" in k for k in a), sorted(a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_data_free_suite_cells_are_valid_and_compare_with_kd_on_real_data_and_noise(tmp_path):
    from darkknowledge.bench.cells import student_config
    from darkknowledge.bench.runner import Bench
    from darkknowledge.bench.suite import load_suite
    from darkknowledge.config import validate_config

    suite = load_suite("data-free")
    bench = Bench(suite, tmp_path)  # builds and validates every cell's config
    digits = {c.method for c in bench.cells if c.pair == "digits-lenet5" and c.seed == 0}
    assert digits == {
        "ce",
        "kd",
        "noise",
        "dafl",
        "dfad",
        "zskt",
        "deepinversion",
        "kd_t4",
        "adversarial_kd",
        "afd",
        "synthetic_transfer",
    }
    kd = validate_config(student_config(suite, "digits-lenet5", "kd", 0, "t.pt"))
    dafl = validate_config(student_config(suite, "digits-lenet5", "dafl", 0, "t.pt"))
    noise = validate_config(student_config(suite, "digits-lenet5", "noise", 0, "t.pt"))
    # the data-trained reference and the floor learn exactly the data-free students' objective
    assert kd.losses == dafl.losses == noise.losses == {"kd": {"T": 1.0, "alpha": 1.0}}
    assert kd.scheme.name == "offline" and dafl.scheme.name == noise.scheme.name == "data_free"
    assert noise.scheme.params["synthesizer"] == {"name": "noise"} and dafl.scheme.params["references"] == []
    assert kd.train == dafl.train == noise.train  # one budget


def test_data_free_cifar10_suite_for_gpu_users_is_valid(tmp_path):
    from darkknowledge.bench.runner import Bench
    from darkknowledge.bench.suite import load_suite

    suite = load_suite("data-free-cifar10")
    bench = Bench(suite, tmp_path)  # every cell's config validated (CIFAR-10 itself is not read)
    assert {c.method for c in bench.cells if c.seed == 0} == {"ce", "kd", "noise", "dafl", "dfad"}
    assert [c.pair for c in bench.cells if c.kind == "teacher"] == ["resnet34-resnet18"]
    published = suite.pairs["resnet34-resnet18"].published
    assert (published["kd"].value, published["dafl"].value, published["dfad"].value) == (94.34, 92.22, 93.3)


def test_an_earlier_runs_pool_is_replayed_by_another_student(tmp_path, teacher_ckpt):
    teacher = {"name": "cnn1d", "params": {"channels": 8, "batch_norm": True}, "checkpoint": teacher_ckpt}
    first = commands.distill(
        config(
            tmp_path, {"name": "deepinversion", "params": SYNTHESIZERS.get("deepinversion").example}, teacher=teacher
        ),
        out=tmp_path / "first",
        progress=False,
    )
    pool = tmp_path / "first" / first["student"]["name"] / "pool"
    assert (pool / "pool.json").is_file() and list(pool.glob("chunk-*.pt"))
    cfg = config(
        tmp_path,
        {"name": "replay", "params": {"path": str(pool)}},
        teacher=teacher,
        student={"name": "mlp", "params": {"hidden": [8]}},
    )
    out = commands.distill(cfg, out=tmp_path / "second", progress=False)
    assert out["student"]["synthesizer"] == "replay" and 0.0 <= out["student"]["last_acc"] <= 100.0
    stored = torch.cat([torch.load(f)["x"] for f in sorted(pool.glob("chunk-*.pt"))])  # (n, 40)
    shown = torch.load(tmp_path / "second" / out["student"]["name"] / "samples.pt")["x"]  # (8, 40)
    assert all((stored == row).all(dim=1).any() for row in shown)  # every replayed sample is a stored one
    other = {**teacher, "checkpoint": None, "train": {"epochs": 1}}  # another teacher: refused
    with pytest.raises(ConfigError, match="new directory|teacher"):
        commands.distill(
            config(tmp_path, {"name": "replay", "params": {"path": str(pool)}}, teacher=other),
            out=tmp_path / "third",
            progress=False,
        )
