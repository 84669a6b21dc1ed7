"""Paired data for cross-modal distillation: stored and derived views, each model reads only its
own view (teacher, student, caches, evaluation, export), and bad views fail before training."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.commands import distill, evaluate_checkpoint
from darkknowledge.config import validate_config
from darkknowledge.data import BatchLoader, DataBundle, DatasetInfo, TensorData
from darkknowledge.data.batch import model_input
from darkknowledge.data.paired import concat, plan_views
from darkknowledge.engine.distributed import init_distributed
from darkknowledge.errors import ConfigError
from darkknowledge.models import MODELS, register_model
from darkknowledge.runs.build import make_loaders, with_views
from darkknowledge.teachers.cache import CacheSpec, load_or_build
from darkknowledge.teachers.frozen import FrozenTeacher

SEEN: dict[str, list[tuple[int, ...]]] = defaultdict(list)
"""Per probe tag, the per-sample input shapes its forwards saw."""


class ViewProbe(nn.Module):
    """Flatten + linear, recording the shapes of its inputs under its tag."""

    def __init__(self, tag: str, features: int, num_classes: int) -> None:
        super().__init__()
        self.tag = tag
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN[self.tag].append(tuple(x.shape[1:]))
        return self.fc(x.flatten(1))


@pytest.fixture(autouse=True)
def view_probe():
    @register_model("view_probe")
    def view_probe_model(num_classes: int = 10, input_shape: tuple[int, ...] = (4,), tag: str = "x") -> nn.Module:
        return ViewProbe(tag, int(torch.tensor(input_shape).prod()), num_classes)

    SEEN.clear()
    yield
    MODELS._items.pop("view_probe", None)


def paired_bundle(n: int = 96, test_views: bool = True) -> DataBundle:
    """Images (1, 8, 8) plus a stored 1-D view (2, 5) of the same samples; labels from the image."""
    gen = torch.Generator().manual_seed(0)

    def split(m: int, views: bool) -> TensorData:
        x = torch.randn(m, 1, 8, 8, generator=gen)
        y = (x.mean((1, 2, 3)) > 0).long()
        return TensorData(x, y, {"depth": torch.randn(m, 2, 5, generator=gen)} if views else None)

    info = DatasetInfo("paired", 2, (1, 8, 8), view="image", fingerprint="p0")
    return DataBundle(train=split(n, True), test=split(n // 2, test_views), info=info)


DERIVED = {
    "small": {"source": "image", "transform": "downsample", "params": {"size": 4}},
    "prof": {"source": "small", "transform": "profile", "params": {}},
}


def test_stored_and_derived_views_are_planned_with_their_shapes() -> None:
    bundle = plan_views(paired_bundle(), DERIVED)
    plan = bundle.info.views
    assert plan.names == ("image", "depth", "small", "prof")
    assert plan.shapes == {"image": (1, 8, 8), "depth": (2, 5), "small": (1, 4, 4), "prof": (1, 8)}
    assert bundle.info.input_shape_of("prof") == (1, 8) and bundle.info.input_shape_of(None) == (1, 8, 8)
    assert bundle.info.fingerprint != "p0"  # the derived views are part of the data's identity
    assert plan.identity("prof")["derived"][0]["transform"] == "downsample"
    with pytest.raises(ConfigError, match="no view 'depht'.*image, depth, small, prof"):
        bundle.info.input_shape_of("depht", "student.input")
    with pytest.raises(ConfigError, match="'nowhere' is not a view"):
        plan_views(paired_bundle(), {"a": {"source": "nowhere", "transform": "flatten"}})
    with pytest.raises(ConfigError, match="already has a view called 'depth'"):
        plan_views(paired_bundle(), {"depth": {"source": "image", "transform": "flatten"}})
    with pytest.raises(ConfigError, match="data.views.a"):
        plan_views(paired_bundle(), {"a": {"source": "image", "transform": "no_such_transform"}})


def test_loader_delivers_paired_views_of_the_same_samples_under_augmentation() -> None:
    bundle = plan_views(paired_bundle(), DERIVED)
    data = bundle.train
    loader = BatchLoader(
        data,
        32,
        seed=3,
        augment={"shift": 2, "noise": 0.1},
        views=bundle.info.views,
        inputs=("image", "depth", "prof"),
        primary="prof",
    )
    for batch in loader:
        image = batch.inputs["image"]  # (B, 1, 8, 8), augmented
        assert torch.equal(batch.x, batch.inputs["prof"]) and batch.x.shape[1:] == (1, 8)
        small = F.adaptive_avg_pool2d(image, 4)  # the derived view follows the augmented source
        expected = torch.cat([small.mean(3), small.mean(2)], dim=-1)  # rows then columns
        assert torch.allclose(batch.inputs["prof"], expected, atol=1e-6)
        assert torch.equal(batch.inputs["depth"], data.views["depth"][batch.idx])  # stored: as stored, same rows
        assert "small" not in batch.inputs  # computed on the way, not delivered
    shards = [
        BatchLoader(data, 32, seed=3, views=bundle.info.views, inputs=("depth",), rank=r, world_size=2)
        for r in range(2)
    ]
    for a, b in zip(*shards):  # two ranks' shares are the single-process batch, views included
        assert torch.equal(
            torch.cat([a.inputs["depth"], b.inputs["depth"]]), data.views["depth"][torch.cat([a.idx, b.idx])]
        )


def test_views_travel_with_subsets_and_transfer_sets() -> None:
    data = paired_bundle().train
    sub = data.subset(torch.tensor([5, 1]))
    assert torch.equal(sub.views["depth"], data.views["depth"][[5, 1]])
    both = concat(data, sub)
    assert len(both) == len(data) + 2 and torch.equal(both.views["depth"][-2:], sub.views["depth"])
    with pytest.raises(ConfigError, match="views"):
        concat(data, TensorData(sub.x, sub.y))
    with pytest.raises(ConfigError, match="view 'depth'.*N=3"):
        TensorData(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), {"depth": torch.zeros(4, 2)})


def cross_modal_cfg(tmp: Path, **over) -> dict:
    cfg = {
        "name": "xmodal",
        "seeds": [0],
        "data": {"name": "synthetic", "batch_size": 16, "views": DERIVED},
        "teacher": {"name": "view_probe", "params": {"tag": "teacher"}, "input": "image", "train": {"epochs": 1}},
        "student": {"name": "view_probe", "params": {"tag": "student"}, "input": "prof"},
        "losses": {"ce": {"weight": 0.5}, "kd": {"T": 4.0, "weight": 0.5}},
        "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.01}},
    }
    cfg.update(over)
    return cfg


def run_cross_modal(tmp: Path, monkeypatch: pytest.MonkeyPatch, **over) -> dict:
    monkeypatch.setattr("darkknowledge.runs.build.load_dataset", lambda *a, **k: paired_bundle())
    return distill(validate_config(cross_modal_cfg(tmp, **over)), tmp / "run", progress=False)


@pytest.mark.parametrize("cache", [False, True])
def test_teacher_and_student_each_see_only_their_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: bool
) -> None:
    res = run_cross_modal(tmp_path, monkeypatch, cache={"enabled": cache})
    assert set(SEEN["teacher"]) == {(1, 8, 8)}  # trained, cached and taught on images only
    assert set(SEEN["student"]) == {(1, 8)}  # trained and evaluated on its profile only
    student = res["entries"][0]
    assert student["last_acc"] is not None and student["params"] == 8 * 2 + 2
    assert res["exported"] is not None
    SEEN.clear()
    out = evaluate_checkpoint(res["exported"])  # the export knows its view
    assert set(SEEN["student"]) == {(1, 8)} and out["top1"] == pytest.approx(student["last_acc"])


def test_a_cache_is_keyed_by_the_teachers_view(tmp_path: Path) -> None:
    bundle = plan_views(paired_bundle(), DERIVED)
    loader = BatchLoader(bundle.train, 32, views=bundle.info.views, inputs=("image", "small"))
    folders = []
    for view, shape in (("image", (1, 8, 8)), ("small", (1, 4, 4))):
        model = ViewProbe("t", int(torch.tensor(shape).prod()), 2)
        model.fc = nn.Linear(int(torch.tensor(shape).prod()), 2)
        model.dk_input = view
        teacher = FrozenTeacher(model)
        teacher.hash = "same-hash"  # same weights identity: only the view differs
        cache = load_or_build(
            teacher,
            loader,
            CacheSpec(logits=True, taps=(), views=1),
            augment=None,
            seed=0,
            memory_limit_mb=64,
            root=tmp_path,
        )
        folders.append(cache.path)
        batch = next(iter(loader))
        live = teacher(model_input(batch, teacher)).logits
        assert torch.allclose(cache.lookup(batch).logits, live, atol=2e-3)  # stored as fp16
    assert folders[0] != folders[1]


def test_student_view_missing_from_the_test_split_fails_before_training(tmp_path: Path) -> None:
    cfg = validate_config(cross_modal_cfg(tmp_path, student={"name": "view_probe", "input": "depth"}))
    with pytest.raises(ConfigError, match="student.input='depth'.*test split.*lacks the stored view 'depth'"):
        with_views(cfg, paired_bundle(test_views=False))
    trains_on_depth = cfg.model_copy(update={"student": cfg.teacher, "teacher": cfg.student})
    with pytest.raises(ConfigError, match="teacher.input='depth'.*teacher.checkpoint"):
        with_views(trains_on_depth, paired_bundle(test_views=False))  # a teacher trained here is evaluated too
    given = cfg.student.model_copy(update={"checkpoint": "trained-elsewhere.pt"})  # a teacher that comes trained
    ok = with_views(cfg.model_copy(update={"student": cfg.teacher, "teacher": given}), paired_bundle(test_views=False))
    _, test_loader, _ = make_loaders(
        cfg, ok, 0, torch.device("cpu"), init_distributed("cpu"), train=False, primary="depth"
    )  # the teacher's modality may be missing at test time
    assert next(iter(test_loader)).inputs.keys() == {"image"}


def test_unknown_view_in_a_recipe_names_the_views(tmp_path: Path) -> None:
    cfg = validate_config(cross_modal_cfg(tmp_path, student={"name": "view_probe", "input": "colour"}))
    with pytest.raises(ConfigError, match="student.input: the data has no view 'colour'"):
        with_views(cfg, paired_bundle())
    plain = DataBundle(paired_bundle().train.subset(torch.arange(4)), paired_bundle().test, paired_bundle().info)
    plain = DataBundle(TensorData(plain.train.x, plain.train.y), TensorData(plain.test.x, plain.test.y), plain.info)
    assert (
        with_views(
            validate_config(
                {**cross_modal_cfg(tmp_path), "data": {"name": "synthetic"}, "student": {"name": "view_probe"}}
            ),
            plain,
        ).info.views
        is None
    )
    with pytest.raises(ConfigError, match="has one view, 'image'"):
        with_views(cfg.model_copy(update={"data": cfg.data.model_copy(update={"views": {}})}), plain)


def test_python_api_feeds_given_modules_their_views(tmp_path: Path) -> None:
    import darkknowledge as dk

    teacher, student = ViewProbe("teacher", 64, 2), ViewProbe("student", 10, 2)
    out = dk.distill(
        student,
        teacher,
        paired_bundle(),
        epochs=1,
        batch_size=16,
        config={"teacher": {"input": "image"}, "student": {"input": "depth"}},
        out=tmp_path / "api",
    )
    assert out.model is student
    assert set(SEEN["teacher"]) == {(1, 8, 8)} and set(SEEN["student"]) == {(2, 5)}


def test_planning_twice_keeps_the_plan_and_fingerprint() -> None:
    once = plan_views(paired_bundle(), DERIVED)
    again = plan_views(once, DERIVED)  # the preflight's bundle handed to the run
    assert again is once and again.info.fingerprint == once.info.fingerprint
    with pytest.raises(ConfigError, match="already has derived views"):
        plan_views(once, {"small": DERIVED["small"]})
