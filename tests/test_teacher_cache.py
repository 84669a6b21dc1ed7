"""The teacher-output cache: what it stores, when it is invalid, augmentation views, and
cached KD agreeing with live KD."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import darkknowledge as dk
from darkknowledge.data import Augment, BatchLoader, TensorData
from darkknowledge.errors import ConfigError
from darkknowledge.models import create_model
from darkknowledge.teachers.cache import CacheSpec, load_or_build, topk_compress, topk_expand
from darkknowledge.teachers.frozen import FrozenTeacher


def data(n: int = 96, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))


def teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=8)


def loader(d: TensorData, augment: Augment | None = None, **kw) -> BatchLoader:
    return BatchLoader(d, 32, shuffle=True, augment=augment, **{"seed": 3, **kw})


def test_cached_outputs_equal_the_live_teacher(tmp_path):
    t, d = FrozenTeacher(teacher(), ("blocks.1",)), data()
    cache = load_or_build(
        t,
        loader(d),
        CacheSpec(logits=True, taps=("blocks.1",), dtype="fp32"),
        augment=None,
        seed=0,
        memory_limit_mb=100,
        root=tmp_path,
    )
    batch = next(iter(loader(d)))
    live, cached = t(batch.x), cache.outputs(batch.idx, None, batch.x.device)
    assert torch.allclose(live.logits, cached.logits, atol=1e-6)
    assert torch.allclose(live.features["blocks.1"], cached.features["blocks.1"], atol=1e-6)
    assert not cache.reused and cache.spec.views == 1


def test_fp16_bf16_and_memory_mapped_storage(tmp_path):
    t, d = FrozenTeacher(teacher()), data()
    batch = next(iter(loader(d)))
    live = t(batch.x).logits
    for dtype, tol in (("fp16", 1e-2), ("bf16", 5e-2)):
        cache = load_or_build(
            t, loader(d), CacheSpec(logits=True, dtype=dtype), augment=None, seed=0, memory_limit_mb=0, root=tmp_path
        )  # limit 0: memory-mapped from disk
        assert cache.mapped
        assert torch.allclose(cache.outputs(batch.idx, None, batch.x.device).logits, live, atol=tol, rtol=tol)
        elem = 2 * 10 * len(d)  # 2 bytes per logit
        assert elem <= cache.nbytes < elem + 1024  # the .npy header only beyond the payload


def test_reused_across_calls_and_invalidated_by_teacher_weights_or_transforms(tmp_path):
    d, spec = data(), CacheSpec(logits=True)
    model = teacher()
    first = load_or_build(FrozenTeacher(model), loader(d), spec, augment=None, seed=0, memory_limit_mb=9, root=tmp_path)
    again = load_or_build(
        FrozenTeacher(model), loader(d, seed=9), spec, augment=None, seed=0, memory_limit_mb=9, root=tmp_path
    )  # another student seed: same teacher on same data, computed once
    assert again.reused and again.path == first.path
    with torch.no_grad():
        model.fc.bias[0] += 1e-3  # one changed teacher weight
    changed = load_or_build(
        FrozenTeacher(model), loader(d), spec, augment=None, seed=0, memory_limit_mb=9, root=tmp_path
    )
    assert not changed.reused and changed.path != first.path
    norm = load_or_build(
        FrozenTeacher(model),
        loader(d, normalize=([0.5], [2.0])),
        spec,
        augment=None,
        seed=0,
        memory_limit_mb=9,
        root=tmp_path,
    )  # a changed transform
    assert not norm.reused and norm.path != changed.path
    other_data = load_or_build(
        FrozenTeacher(model), loader(data(seed=1)), spec, augment=None, seed=0, memory_limit_mb=9, root=tmp_path
    )
    assert not other_data.reused and other_data.path not in (changed.path, norm.path)


def test_a_stale_cache_is_rebuilt_not_read(tmp_path, caplog):
    d, spec, model = data(), CacheSpec(logits=True), teacher()
    cache = load_or_build(FrozenTeacher(model), loader(d), spec, augment=None, seed=0, memory_limit_mb=9, root=tmp_path)
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["ingredients"]["teacher"] = "someone-else"
    (cache.path / "meta.json").write_text(json.dumps(meta))
    rebuilt = load_or_build(
        FrozenTeacher(model), loader(d), spec, augment=None, seed=0, memory_limit_mb=9, root=tmp_path
    )
    assert not rebuilt.reused and "rebuilding" in caplog.text


def test_topk_keeps_the_top_probabilities_and_the_rest_mass():
    logits = torch.randn(5, 20)
    values, index, rest = topk_compress(logits, 4)
    full = topk_expand(values, index, rest, 20)
    p, q = logits.softmax(-1), full.softmax(-1)
    top = p.topk(4, -1)
    assert torch.allclose(q.gather(-1, top.indices), top.values, atol=1e-6)
    assert torch.allclose(q.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(rest, 1 - top.values.sum(-1), atol=1e-6)


def test_augmented_views_pair_the_student_view_with_the_teacher_view(tmp_path):
    d, aug = data(), Augment(shift=4, noise=0.1)
    t = FrozenTeacher(teacher())
    train = loader(d, augment=aug)
    cache = load_or_build(
        t, train, CacheSpec(logits=True, views=3, dtype="fp32"), augment=aug, seed=1, memory_limit_mb=9, root=tmp_path
    )
    train.replay = cache.replay(train.seed)
    seen_views = set()
    for epoch in range(2):
        train.set_epoch(epoch)
        for batch in train:
            assert batch.view is not None
            seen_views |= set(batch.view.tolist())
            # the student's input is exactly the stored view of each sample ...
            raw = d.x[batch.idx]
            assert torch.allclose(batch.x, aug.apply(raw, cache.view_params(batch.idx, batch.view)))
            # ... and the cached outputs are the teacher's on that very view
            assert torch.allclose(
                cache.outputs(batch.idx, batch.view, batch.x.device).logits, t(batch.x).logits, atol=1e-5
            )
    assert seen_views == {0, 1, 2}
    train.set_epoch(0)
    order0 = [b.view.clone() for b in train]
    train.set_epoch(0)
    assert all(torch.equal(a, b.view) for a, b in zip(order0, train))  # the choice is a function of (seed, epoch)


def _distill(d, test, cache, tmp_path, **extra):
    cfg = {"cache": cache, "train": {"device": "cpu", "deterministic": True}, "data": {"batch_size": 32}, **extra}
    return dk.distill("mlp", teacher(), (d, test), losses={"kd": {"T": 4.0, "alpha": 0.9}}, epochs=2, config=cfg)


def test_cached_kd_trains_the_same_student_as_live_kd(tmp_path, monkeypatch):
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    d, test = data(128), data(64, seed=5)
    live = _distill((d.x, d.y), (test.x, test.y), False, tmp_path)
    cached = _distill((d.x, d.y), (test.x, test.y), {"enabled": True, "dtype": "fp32"}, tmp_path)
    assert "teacher_cache" not in live.entry and cached.entry["teacher_cache"]["size_mb"] > 0
    for a, b in zip(live.model.state_dict().values(), cached.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert live.accuracy == cached.accuracy


def test_a_cache_without_a_needed_tap_fails_early(tmp_path, monkeypatch):
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    d, test = data(64), data(32, seed=5)
    with pytest.raises(
        ConfigError, match=r"need teacher taps \['blocks.0', 'blocks.2'\] but the cache holds only \['blocks.1'\]"
    ):
        dk.distill(
            "cnn1d",
            teacher(),
            ((d.x, d.y), (test.x, test.y)),
            losses={"at": {}},
            epochs=1,
            config={
                "cache": {"enabled": True, "taps": ["blocks.1"]},
                "student": {"params": {"channels": 4}},
                "train": {"device": "cpu"},
            },
        )
    assert not (tmp_path / "teacher_outputs").exists()  # failed before computing anything


def test_views_zero_with_augmentation_runs_the_teacher_live(tmp_path, monkeypatch):
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    d, test = data(64), data(32, seed=5)
    out = _distill(
        (d.x, d.y),
        (test.x, test.y),
        {"enabled": True, "views": 0},
        tmp_path,
        **{"data": {"batch_size": 32, "augment": {"shift": 2}}},
    )
    assert "teacher_cache" not in out.entry
    assert not (tmp_path / "teacher_outputs").exists()


def test_a_memory_mapped_cache_reads_with_the_batch_host_indices(tmp_path):
    """On a GPU run ``batch.idx`` lives on the device; a mapped cache reads the host copy the
    loader keeps (``Batch.host_idx``), so a lookup makes no device sync."""
    t, d = FrozenTeacher(teacher()), data()
    cache = load_or_build(
        t, loader(d), CacheSpec(logits=True, dtype="fp32"), augment=None, seed=0, memory_limit_mb=0, root=tmp_path
    )
    batch = next(iter(loader(d)))
    assert cache.mapped and batch.host_idx is not None and torch.equal(batch.host_idx, batch.idx)
    expected = cache.outputs(batch.idx, None, batch.x.device).logits
    assert torch.equal(cache.lookup(batch).logits, expected)
    moved = dataclasses.replace(batch, idx=torch.zeros_like(batch.idx))  # stands in for a device copy
    assert torch.equal(cache.lookup(moved).logits, expected)  # read with host_idx, not idx
    in_memory = load_or_build(
        t, loader(d), CacheSpec(logits=True, dtype="fp32"), augment=None, seed=0, memory_limit_mb=100, root=tmp_path
    )
    assert torch.equal(in_memory.lookup(batch).logits, expected)
