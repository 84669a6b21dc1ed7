"""Bad inputs and faults a new user meets: one line ``dk: error: ...`` (exit 2) naming the bad
value, before anything is trained or written; damaged caches repaired with a warning.

Each CLI case runs ``darkknowledge.cli.main`` in this process (stderr read with capsys).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge import errors
from darkknowledge.cli import main
from darkknowledge.config import load_config
from darkknowledge.data import DATASETS, DataBundle, DatasetInfo, TensorData, load_dataset
from darkknowledge.engine.checkpoint import atomic_save, export_model, read_export, safe_load
from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.models import create_model
from darkknowledge.runs.session import Session
from darkknowledge.teachers.cache import CacheSpec, load_or_build
from darkknowledge.teachers.frozen import FrozenTeacher
from helpers import write_recipe

QUICK = ["seeds=[0]", "train.epochs=1", "teacher.train.epochs=1", "data.params.num_samples=600"]


def _teachers_cached() -> list[Path]:
    folder = Path(os.environ["DK_CACHE"]) / "teachers"
    return sorted(folder.glob("*.pt")) if folder.is_dir() else []


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *names: str, quiet: bool = True) -> str:
    """Exit code 2 and one line ``dk: error: ...`` naming each of ``names``, the last on stderr
    (with ``quiet``, the only one: commands without ``--quiet`` log their data first)."""
    err = capsys.readouterr().err
    assert code == 2, err
    if quiet:
        assert err.startswith("dk: error: ") and err.count("\n") == 1, err
    lines = err.splitlines()
    assert lines[-1].startswith("dk: error: ") and sum(line.startswith("dk: ") for line in lines) == 1, err
    assert "Traceback" not in err
    err = lines[-1]
    for name in names:
        assert name in err, (name, err)
    return err


def _fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], *names: str) -> str:
    """``dk ARGS --out run`` fails with one line naming ``names``: no run folder, no teacher trained."""
    before = _teachers_cached()
    out = tmp_path / "run"
    err = _one_line_error(capsys, main([*args, "--out", str(out), "--quiet"]), *names)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert _teachers_cached() == before
    return err


def _mlp(input_shape: tuple[int, ...] = (40,), hidden: tuple[int, ...] = (32,), classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mlp", num_classes=classes, input_shape=input_shape, hidden=hidden)


def _export(path: Path, model: torch.nn.Module, data: dict | None = None) -> Path:
    spec = {"name": model.dk_name, "params": model.dk_params}
    return export_model(model, path, spec, {"data": data or {"name": "mnist1d"}, "result": {"last_acc": 50.0}})


# ---------------------------------------------------------------- recipes


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    recipe.write_bytes(recipe.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    _fails_before_training(tmp_path, capsys, ["distill", str(recipe)], "r.yaml", "not UTF-8", "0xe9")


def test_invalid_yaml_is_one_line_with_its_position(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ntrain: {epochs: 3\n")
    _fails_before_training(tmp_path, capsys, ["distill", str(recipe)], "r.yaml", "not valid YAML at line")


# ---------------------------------------------------------------- teacher checkpoints


def _teacher_ckpt_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], ckpt: Path, *names: str) -> str:
    recipe = write_recipe(tmp_path / "r.yaml")
    args = ["distill", str(recipe), *QUICK, "teacher={name: mlp, params: {hidden: [32]}}", f"teacher.checkpoint={ckpt}"]
    return _fails_before_training(tmp_path, capsys, args, "teacher.checkpoint", ckpt.name, *names)


def test_a_pickled_object_is_never_loaded_nor_advised_to_be(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"kind": "model", "spec": Evil()}, path)
    err = _teacher_ckpt_fails(tmp_path, capsys, path, "system)", "none of its code ran")
    assert "weights_only" not in err and "trust" not in err
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_truncated_teacher_checkpoint_says_so(tmp_path, capsys):
    path = _export(tmp_path / "t.pt", _mlp())
    path.write_bytes(path.read_bytes()[:200])
    _teacher_ckpt_fails(tmp_path, capsys, path, "truncated")


def test_a_bare_tensor_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), path)
    _teacher_ckpt_fails(tmp_path, capsys, path, "holds a Tensor")


def test_an_export_without_weights_is_malformed(tmp_path, capsys):
    path = tmp_path / "noweights.pt"
    atomic_save({"format": 1, "kind": "model", "spec": {"name": "mlp", "params": {}}}, path)
    _teacher_ckpt_fails(tmp_path, capsys, path, "malformed", "'state_dict'")


def test_a_spec_that_does_not_match_its_weights(tmp_path, capsys):
    path = _export(tmp_path / "edited.pt", _mlp(hidden=(32,)))
    payload = read_export(path)
    payload["spec"]["params"]["hidden"] = [16]  # someone edited the spec
    atomic_save(payload, path)
    _teacher_ckpt_fails(tmp_path, capsys, path, "do not fit", "mlp")


def test_a_teacher_trained_on_inputs_of_another_shape_is_refused(tmp_path, capsys):
    path = _export(tmp_path / "digits_teacher.pt", _mlp(input_shape=(1, 8, 8)), data={"name": "digits"})
    _teacher_ckpt_fails(tmp_path, capsys, path, "(1, 8, 8)", "'digits'", "'mnist1d'", "(40,)")


def test_a_teacher_trained_for_another_class_count_is_refused(tmp_path, capsys):
    path = _export(tmp_path / "k7.pt", _mlp(classes=7))
    _teacher_ckpt_fails(tmp_path, capsys, path, "7 classes", "has 10")


# ---------------------------------------------------------------- dk eval


def test_dk_eval_on_a_dataset_of_another_shape_is_one_line(tmp_path, capsys):
    path = _export(tmp_path / "student.pt", _mlp(), data={"name": "mnist1d", "params": {"num_samples": 600}})
    _one_line_error(
        capsys, main(["eval", str(path), "data.name=digits"]), "(40,)", "(1, 8, 8)", "'digits'", quiet=False
    )


def test_dk_eval_of_a_model_that_cannot_take_the_inputs_is_one_line(tmp_path, capsys, monkeypatch):
    """A spec without ``input_shape`` (as external models have) is probed on one batch."""
    from darkknowledge.models import MODELS

    def fixed40(num_classes: int = 10, input_shape: tuple = (40,)) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, num_classes))  # ignores input_shape

    monkeypatch.setitem(MODELS._items, "fixed40", fixed40)
    model = create_model("fixed40", num_classes=10)
    path = export_model(
        model,
        tmp_path / "f.pt",
        {"name": "fixed40", "params": {"num_classes": 10}},
        {"data": {"name": "mnist1d", "params": {"num_samples": 600}}},
    )
    assert main(["eval", str(path)]) == 0 and '"model": "fixed40"' in capsys.readouterr().out
    _one_line_error(capsys, main(["eval", str(path), "data.name=digits"]), "f.pt", "'digits'", "(1, 8, 8)", quiet=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.zeros(2), "holds a Tensor"),
        ({"kind": "train", "module": {}}, "not an exported model"),
        ({"kind": "model", "spec": "mlp", "state_dict": {}}, "its spec must be a dict"),
    ],
)
def test_dk_eval_of_a_malformed_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "m.pt"
    torch.save(content, path)
    _one_line_error(capsys, main(["eval", str(path)]), "m.pt", message)


def test_dk_eval_of_a_missing_file_and_of_a_custom_model(tmp_path, capsys):
    _one_line_error(capsys, main(["eval", str(tmp_path / "gone.pt")]), "gone.pt", "does not exist")
    custom = torch.nn.Linear(40, 10)
    export_model(custom, tmp_path / "custom.pt", {"name": "Linear", "params": {}, "custom": True})
    _one_line_error(capsys, main(["eval", str(tmp_path / "custom.pt")]), "custom model (Linear)", "load_exported")


def test_dk_eval_keeps_the_recorded_data_under_an_unrelated_override(tmp_path, capsys):
    """``data.eval_batch_size=64`` changes the batch only, not the dataset the export recorded."""
    params = {"num_samples": 600, "transfer_samples": 0}
    path = _export(tmp_path / "student.pt", _mlp(), data={"name": "mnist1d", "params": params})
    expected = len(load_dataset("mnist1d", **params).test)
    assert expected != len(load_dataset("mnist1d").test)  # the defaults would be another dataset
    assert main(["eval", str(path), "data.eval_batch_size=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "mnist1d" and out["n"] == expected


# ---------------------------------------------------------------- labels


def _bad_labels_builder(label: int):
    def builder(*, root: Path, split_seed: int, n: int = 40) -> DataBundle:
        x, y = torch.randn(n, 6), torch.arange(n) % 3
        y[5] = label
        return DataBundle(TensorData(x[:30], y[:30]), TensorData(x[30:], y[30:]), DatasetInfo("badlabels", 3, (6,)))

    return builder


@pytest.mark.parametrize(("label", "names"), [(12, ["train label 12", "0..2"]), (-3, ["label -3", ">= 0, or -1"])])
def test_labels_outside_the_class_range_stop_dk_before_training(tmp_path, capsys, monkeypatch, label, names):
    monkeypatch.setitem(DATASETS._items, "badlabels", _bad_labels_builder(label))
    recipe = write_recipe(tmp_path / "r.yaml")
    _fails_before_training(
        tmp_path,
        capsys,
        ["distill", str(recipe), "data={name: badlabels, batch_size: 10}", "seeds=[0]", "train.epochs=1"],
        "'badlabels'",
        *names,
    )


def test_a_bundle_with_labels_beyond_its_classes_is_refused_in_the_api():
    x = torch.randn(8, 4)
    with pytest.raises(ConfigError, match=r"dataset 'toy': test label 5 is outside the class range 0\.\.3"):
        DataBundle(TensorData(x, torch.arange(8) % 4), TensorData(x, torch.arange(8) % 6), DatasetInfo("toy", 4, (4,)))
    DataBundle(
        TensorData(x, torch.arange(8) % 4 - (torch.arange(8) == 0).long()),
        TensorData(x, torch.arange(8) % 4),
        DatasetInfo("toy", 4, (4,)),
    )  # -1 (unlabeled) is fine


# ---------------------------------------------------------------- the environment


def test_an_out_below_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    recipe = write_recipe(tmp_path / "r.yaml")
    code = main(["train", str(recipe), *QUICK, "--out", str(blocker / "run"), "--quiet"])
    _one_line_error(capsys, code, "afile")
    assert blocker.read_text() == "x"


def test_a_full_disk_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """A raw ``OSError(ENOSPC)`` from a write that is not atomic (the metrics log) says disk full."""
    from darkknowledge.engine import metrics

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.MetricsLog, "write", full)
    recipe = write_recipe(tmp_path / "r.yaml")
    code = main(["train", str(recipe), *QUICK, "--out", str(tmp_path / "run"), "--quiet"])
    _one_line_error(capsys, code, "disk full", "--resume")


def test_a_file_the_user_may_not_read_is_one_line(capsys, monkeypatch):
    from darkknowledge import commands

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/teacher.pt")

    monkeypatch.setattr(commands, "evaluate_checkpoint", denied)
    _one_line_error(capsys, main(["eval", "/data/teacher.pt"]), "/data/teacher.pt", "permission denied")


def test_a_full_disk_in_an_atomic_write_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    from darkknowledge.engine import checkpoint

    path = tmp_path / "student.pt"
    _export(path, _mlp())
    before = path.read_bytes()

    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(errors.DarkKnowledgeError, match="no space left"):
        _export(path, _mlp(hidden=(8,)))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["student.pt"]


def test_verbose_adds_the_traceback_and_bugs_say_so(tmp_path, capsys, monkeypatch):
    gone = str(tmp_path / "gone.pt")
    assert main(["--verbose", "eval", gone]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("dk: error: ") and "gone.pt" in err
    assert main(["eval", gone, "--verbose"]) == 2 and "Traceback" in capsys.readouterr().err

    from darkknowledge import commands

    def bug(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(commands, "evaluate_checkpoint", bug)
    assert main(["eval", gone]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "bug in darkknowledge" in err


def test_divergence_is_one_line(tmp_path, capsys, monkeypatch):
    from darkknowledge import commands

    def diverge(*args, **kwargs):
        raise errors.DivergenceError("[kd-s0] the loss term 'kd' is nan at step 7")

    monkeypatch.setattr(commands, "distill", diverge)
    recipe = write_recipe(tmp_path / "r.yaml")
    _one_line_error(capsys, main(["distill", str(recipe), "--quiet"]), "'kd'", "step 7")


# ---------------------------------------------------------------- checkpoints (library)


def test_safe_load_names_what_to_delete_for_a_stage_file(tmp_path):
    stage = tmp_path / "run" / "kd-s0"
    stage.mkdir(parents=True)
    (stage / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        safe_load(stage / "last.pt")
    text = str(info.value)
    assert "empty or truncated" in text and f"Delete the folder {str(stage)!r}" in text and "\n" not in text


# ---------------------------------------------------------------- caches repair themselves


def _cache_fixture(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g))
    torch.manual_seed(0)
    teacher = FrozenTeacher(create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=8), ("blocks.1",))
    from darkknowledge.data import BatchLoader

    def build():
        return load_or_build(
            teacher,
            BatchLoader(data, 16, shuffle=True, seed=1),
            CacheSpec(logits=True, taps=("blocks.1",), dtype="fp32"),
            augment=None,
            seed=0,
            memory_limit_mb=100,
            root=tmp_path,
        )

    return build


@pytest.mark.parametrize("damage", ["truncate_logits", "delete_feature", "meta_not_utf8", "meta_a_list"])
def test_a_damaged_teacher_output_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    build = _cache_fixture(tmp_path)
    first = build()
    idx = torch.arange(64)
    want = first.outputs(idx, None, torch.device("cpu"))
    folder = first.path
    del first
    if damage == "truncate_logits":
        raw = (folder / "logits.npy").read_bytes()
        (folder / "logits.npy").write_bytes(raw[: len(raw) // 2])
    elif damage == "delete_feature":
        (folder / "feat.0.npy").unlink()
    elif damage == "meta_not_utf8":
        (folder / "meta.json").write_bytes(b"\xff\xfe{")
    else:
        (folder / "meta.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING, logger="darkknowledge"):
        again = build()
    assert not again.reused and again.path == folder
    assert any("rebuilding" in r.getMessage() for r in caplog.records), caplog.text
    got = again.outputs(idx, None, torch.device("cpu"))
    assert torch.equal(got.logits, want.logits) and torch.equal(got.features["blocks.1"], want.features["blocks.1"])
    assert build().reused  # whole again


def test_a_damaged_trained_teacher_cache_is_retrained_with_a_warning(tmp_path, caplog):
    cfg = load_config(write_recipe(tmp_path / "r.yaml"), QUICK + ["teacher.params.channels=8"])
    session = Session(cfg, None, progress=False)
    cached = Path(os.environ["DK_CACHE"]) / "teachers" / f"cnn1d-{session.teacher_key()}.pt"
    cached.unlink(missing_ok=True)  # another test of this session may have trained the same teacher
    first_model, first = session.teacher()
    assert "reused_from" not in first and cached.is_file()
    cached.write_bytes(cached.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="darkknowledge"):
        model, entry = Session(cfg, None, progress=False).teacher()
    assert any("cached trained teacher" in r.getMessage() and str(cached) in r.getMessage() for r in caplog.records)
    assert "reused_from" not in entry and entry["role"] == "teacher"
    for a, b in zip(model.state_dict().values(), first_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # deterministic: the same teacher again
    assert np.isclose(entry["last_acc"], first["last_acc"])
    _, reused = Session(cfg, None, progress=False).teacher()
    assert reused["reused_from"] == str(cached)  # the rebuilt file reads
