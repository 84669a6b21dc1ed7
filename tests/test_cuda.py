"""The CUDA paths: fused updates, the cache on the device, the live teacher's look-ahead,
mixed precision, channels_last and compile, and no host sync inside the training steps.

Skipped without a GPU (CI has none); run them on one with ``python -m pytest -m cuda``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from darkknowledge.config import CacheConfig, TrainConfig
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.data.batch import Batch
from darkknowledge.engine.lean_step import LeanStep
from darkknowledge.engine.trainer import Trainer
from darkknowledge.models import create_model
from darkknowledge.runs.build import build_objective
from darkknowledge.schemes.offline import offline_task
from darkknowledge.schemes.task import FlowTask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def _data(n: int, shape: tuple[int, ...], seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model(name: str, seed: int, shape: tuple[int, ...], **params) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, input_shape=shape, **params)


def _fit(
    scheme: FlowTask,
    data: TensorData,
    epochs: int = 2,
    device_data_mb: float = 2048,
    augment: dict | None = None,
    **train,
) -> tuple[Trainer, object]:
    cfg = TrainConfig(
        **{"epochs": epochs, "device": "cuda", "deterministic": True, "optimizer": {"name": "sgd", "lr": 0.05}, **train}
    )
    train_loader = BatchLoader(data, 32, seed=0, device=CUDA, device_data_mb=device_data_mb, augment=augment)
    trainer = Trainer(
        scheme, train_loader, BatchLoader(data, 64, shuffle=False, device=CUDA), cfg, CUDA, progress=False
    )
    return trainer, trainer.fit()


def _weights(scheme: FlowTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in scheme.module.student.state_dict().items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=atol, atol=atol, msg=k)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_lean_step_calls_the_cuda_kernel_directly_with_the_same_update(make):
    nets = [_model("mlp", 0, (12,), hidden=[16]).to(CUDA) for _ in range(2)]
    opts = [make(n.parameters()) for n in nets]
    stepper = LeanStep(opts[1])
    for step in range(5):
        for net in nets:
            g = torch.Generator().manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(CUDA)
        opts[0].step()
        stepper.step()
    assert stepper.lean_steps == 4  # the first step creates the state through optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_cached_kd_on_the_gpu_trains_the_same_student_as_live_kd(tmp_path, monkeypatch):
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    data = _data(160, (40,))
    weights = {}
    for mode, cache in (("live", CacheConfig()), ("cached", CacheConfig(enabled=True, dtype="fp32"))):
        objective = build_objective({"kd": {"T": 4.0, "alpha": 0.9}})
        scheme = offline_task(
            _model("mlp", 1, (40,), hidden=[32]), objective, _model("cnn1d", 0, (40,), channels=8), cache=cache
        )
        _fit(scheme, data)
        weights[mode] = _weights(scheme)
        if mode == "cached":
            store = scheme.teachers[0].cache
            assert store is not None and not store.mapped
            assert all(v.device.type == "cuda" for v in store.arrays.values())  # looked up on the GPU
    _assert_close(weights["live"], weights["cached"], atol=1e-5)


def test_the_live_teacher_run_ahead_on_the_gpu_changes_nothing():
    data = _data(160, (40,))
    weights = {}
    for n in (1, 3):
        scheme = offline_task(
            _model("mlp", 1, (40,), hidden=[32]),
            build_objective({"kd": {}}),
            _model("cnn1d", 0, (40,), channels=8),
            cache=CacheConfig(live_batches=n),
        )
        _fit(scheme, data)
        assert (scheme.teachers[0].ahead is None) == (n == 1)
        weights[n] = _weights(scheme)
    _assert_close(weights[1], weights[3], atol=1e-5)


def _no_sync_after_the_first(stream: Iterator[Batch]) -> Iterator[Batch]:
    """Yield the batches; from the second on, any host sync in the step raises."""
    try:
        for i, batch in enumerate(stream):
            if i == 1:  # the first step creates the optimizer state (and LeanStep's view of it)
                torch.cuda.set_sync_debug_mode("error")
            yield batch
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize(
    "losses,cache,device_data_mb,augment",
    [
        ({"ce": {}}, None, 2048, None),
        ({"ce": {}}, None, 0, {"shift": 2}),
        ({"kd": {"T": 4.0, "alpha": 0.9}}, CacheConfig(enabled=True), 2048, None),
        ({"kd": {"T": 4.0, "alpha": 0.9}}, CacheConfig(enabled=True, views=2), 2048, {"shift": 2}),
        ({"kd": {"alpha": 1.0}, "fitnet": {}}, CacheConfig(enabled=True), 0, None),
        ({"kd": {}}, CacheConfig(enabled=True, memory_limit_mb=0, views=2), 2048, {"shift": 2}),
        ({"kd": {"alpha": 0.5}}, CacheConfig(live_batches=2), 2048, None),
    ],
    ids=[
        "plain",
        "plain-host-data-augmented",
        "kd-cached",
        "kd-cached-views",
        "fitnet-cached-host-data",
        "kd-mapped-cache-views",
        "kd-live-ahead",
    ],
)
def test_training_steps_make_no_host_sync(tmp_path, monkeypatch, losses, cache, device_data_mb, augment):
    """Loader (pinned copies), cache lookup, loss, backward, LeanStep and the LR schedule run
    without one host sync per step (``torch.cuda.set_sync_debug_mode('error')``)."""
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    data = _data(160, (40,))
    scheme = offline_task(
        _model("cnn1d", 1, (40,), channels=4),
        build_objective(losses),
        _model("cnn1d", 0, (40,), channels=8),
        cache=cache,
    )
    batches = scheme.batches
    monkeypatch.setattr(scheme, "batches", lambda stream: _no_sync_after_the_first(batches(stream)))
    _, result = _fit(
        scheme, data, device_data_mb=device_data_mb, augment=augment, optimizer={"name": "adamw", "lr": 1e-3}
    )
    assert result.steps == 10


@pytest.mark.parametrize(
    "augment",
    [None, {"hflip": True, "crop_padding": 2}, {"mixup": 1.0, "cutmix": 1.0, "mix_prob": 0.5, "crop_padding": 2}],
)
def test_data_on_the_gpu_gives_the_same_batches_as_copies_from_the_host(augment):
    g = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randint(0, 256, (100, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 10, (100,), generator=g)
    )
    loaders = [
        BatchLoader(
            data,
            32,
            seed=1,
            augment=augment,
            device=CUDA,
            device_data_mb=mb,
            normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        )
        for mb in (0, 2048)
    ]
    assert [loader.data_on_device() for loader in loaders] == [False, True]
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        for a, b in zip(*loaders, strict=True):
            assert a.x.device.type == b.x.device.type == b.idx.device.type == "cuda"
            torch.testing.assert_close(a.x, b.x)
            assert torch.equal(a.y, b.y) and torch.equal(a.idx, b.idx) and a.labeled == b.labeled


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_kd_trains(tmp_path, monkeypatch, amp):
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    data = _data(256, (3, 16, 16))
    scheme = offline_task(
        _model("resnet8", 1, (3, 16, 16)),
        build_objective({"kd": {}, "at": {}}),
        _model("resnet8", 0, (3, 16, 16)),
        cache=CacheConfig(enabled=True),
    )
    before = _weights(scheme)
    trainer, result = _fit(scheme, data, epochs=3, amp=amp, deterministic=False)
    assert result.steps == 3 * 8
    after = _weights(scheme)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # fp16: the grad scaler let steps through


def test_channels_last_on_the_gpu_trains_the_same_model():
    data = _data(64, (3, 16, 16))
    weights = []
    for channels_last in (False, True):
        scheme = offline_task(
            _model("resnet8", 1, (3, 16, 16)), build_objective({"kd": {}, "at": {}}), _model("resnet8", 0, (3, 16, 16))
        )
        _fit(scheme, data, epochs=1, channels_last=channels_last)
        weights.append(_weights(scheme))
    _assert_close(weights[0], weights[1], atol=1e-3)


def test_compiled_student_and_teacher_train_like_eager():
    data = _data(128, (40,))
    weights = []
    for compiled in (False, True):
        scheme = offline_task(
            _model("mlp", 1, (40,), hidden=[32]), build_objective({"kd": {}}), _model("cnn1d", 0, (40,), channels=8)
        )
        _fit(scheme, data, compile=compiled)
        weights.append(_weights(scheme))
    _assert_close(weights[0], weights[1], atol=1e-4)
