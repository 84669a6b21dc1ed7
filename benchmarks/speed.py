"""How close darkknowledge's training loop sits to the limit: plain student training.

Runs, in one process and interleaved (round-robin, one repetition of every variant after
another), on the same data and models:

* ``hand_plain``   a minimal hand-written PyTorch loop training the student with CE (the limit);
* ``dk_plain``     darkknowledge training the same student with CE;
* ``teacher_fwd``  the teacher's forward pass alone over the epoch (inference mode);
* ``dk_kd_live``   darkknowledge KD with the live teacher;
* ``dk_kd_cached`` darkknowledge KD reading the teacher-output cache (the cache's one-time
  build is timed and reported separately);
* ``dk_kd_cached_textbook`` (on (b)) the same with the KD loss's fused fast path switched off
  (``losses/fused.py`` against the textbook ``losses/kd.py``): what the fast path buys;
* ``hand_kd_live`` / ``hand_kd_cached`` (references, where the student step is cheap) the
  hand loop plus the KD loss, with the teacher in the loop or its logits precomputed:
  ``hand_kd_cached / hand_plain`` is what the KD loss itself costs,
  ``hand_kd_live / (hand_plain + teacher_fwd)`` what interleaving two networks costs on this
  machine, and ``dk_kd_* / hand_kd_*`` what darkknowledge adds on top; ``dk_kd_cached / dk_plain``
  is what KD costs over darkknowledge's own plain step (which can be cheaper than the hand loop's).

After one untimed warm-up round, each of ``--reps`` rounds (9 for (a), (c) and (d), whose epochs
of a ResNet on a shared 2-core machine still move by +-5% between rounds; 31 for (b), whose epochs
last tens of milliseconds, so a median of 3 would move by +-20% with the machine's noise) runs one
epoch of every variant in a shuffled order; the table shows the median over
the rounds of seconds per epoch, and the ratios (each computed within a round, then the
median over rounds: variants of one round run back to back, so a slow phase of the machine
mostly cancels out)

    dk_plain / hand_plain,  dk_kd_live / (hand_plain + teacher_fwd),  dk_kd_cached / hand_plain

with the process's peak RSS (and peak GPU memory on CUDA). Settings: (a) synthetic
CIFAR-shaped data (5,000 x 3x32x32, 100 classes), resnet56 -> resnet20, batch 128;
(b) MNIST-1D, 1-D CNN teacher -> MLP student; (c) FitNet on (a), live vs cached; (d) scaling:
cached KD on (b)-shaped data with 1x and 10x the samples, the 10x cache memory-mapped from
disk beyond a memory threshold. ``--json`` also prints one JSON object per setting.

    python benchmarks/speed.py                  # all settings (about 70 minutes on 2 CPU cores, 2 on an H200)
    python benchmarks/speed.py --settings b d   # some of them
    python benchmarks/speed.py --quick          # tiny sizes: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from darkknowledge.config import CacheConfig, TrainConfig
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.engine.host_memory import retain_freed_host_memory
from darkknowledge.engine.trainer import Trainer
from darkknowledge.losses import fused
from darkknowledge.models import create_model
from darkknowledge.runs.build import build_objective
from darkknowledge.schemes.offline import offline_task


@dataclass
class Setting:
    name: str
    title: str
    num_samples: int
    input_shape: tuple[int, ...]
    num_classes: int
    teacher: tuple[str, dict[str, Any]]
    student: tuple[str, dict[str, Any]]
    losses: dict[str, Any] = field(default_factory=lambda: {"kd": {"T": 4.0, "alpha": 0.9}})
    batch_size: int = 128
    variants: tuple[str, ...] = (
        "hand_plain",
        "dk_plain",
        "teacher_fwd",
        "dk_kd_live",
        "dk_kd_cached",
        "hand_kd_live",
        "hand_kd_cached",
    )
    memory_limit_mb: float = 1024.0
    reps: int = 3
    """Timed rounds by default: cheap settings take more, so that their median is stable."""


def settings(quick: bool) -> dict[str, Setting]:
    n_img, n_1d = (256, 512) if quick else (5000, 4000)
    img_t, img_s = (("resnet8", {}), ("resnet8", {})) if quick else (("resnet56", {}), ("resnet20", {}))
    return {
        "a": Setting(
            "a",
            "synthetic CIFAR-100-shaped, resnet56 -> resnet20",
            n_img,
            (3, 32, 32),
            100,
            img_t,
            img_s,
            variants=("hand_plain", "dk_plain", "teacher_fwd", "dk_kd_live", "dk_kd_cached"),
            reps=9,
        ),
        "b": Setting(
            "b",
            "MNIST-1D-shaped, cnn1d -> mlp",
            n_1d,
            (40,),
            10,
            ("cnn1d", {}),
            ("mlp", {"hidden": [100, 100]}),
            variants=(
                "hand_plain",
                "dk_plain",
                "teacher_fwd",
                "dk_kd_live",
                "dk_kd_cached",
                "dk_kd_cached_textbook",
                "hand_kd_live",
                "hand_kd_cached",
            ),
            reps=31,
        ),
        "c": Setting(
            "c",
            "FitNet (+KD) on (a), live vs cached",
            n_img,
            (3, 32, 32),
            100,
            img_t,
            img_s,
            losses={"fitnet": {"weight": 100.0}, "kd": {"T": 4.0, "alpha": 0.9}},
            variants=("hand_plain", "dk_plain", "teacher_fwd", "dk_kd_live", "dk_kd_cached"),
            reps=9,
        ),
    }


def make_data(s: Setting, n: int, seed: int = 0) -> tuple[TensorData, TensorData]:
    """Random inputs with learnable labels (a fixed random linear rule), train and a small test split."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 256, *s.input_shape, generator=g)
    rule = torch.randn(x[0].numel(), s.num_classes, generator=g)
    y = (x.flatten(1) @ rule).argmax(1)
    return TensorData(x[:n], y[:n]), TensorData(x[n:], y[n:])


def model(spec: tuple[str, dict[str, Any]], s: Setting, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, params = spec
    return create_model(name, num_classes=s.num_classes, input_shape=s.input_shape, **params).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the variants
def hand_plain(s: Setting, data: TensorData, device: torch.device, epochs: int) -> list[float]:
    """The reference: the plainest correct PyTorch loop (same optimizer, batch and data on device)."""
    net = model(s.student, s, device, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = data.x.to(device), data.y.to(device)
    times = []
    for epoch in range(epochs):
        net.train()
        sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(0, len(y), s.batch_size):
            idx = order[i : i + s.batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def hand_kd(s: Setting, data: TensorData, device: torch.device, epochs: int, live: bool) -> list[float]:
    """A hand-written KD loop: the same loop as ``hand_plain`` plus the KD loss, with the teacher
    run in the loop (``live``) or its logits precomputed (not timed). References that separate
    the KD loss's own cost, and the cost of interleaving two networks, from dk's overhead."""
    net = model(s.student, s, device, 1)
    teacher = model(s.teacher, s, device, 0).eval()
    x, y = data.x.to(device), data.y.to(device)
    with torch.inference_mode():
        logits = torch.cat([teacher(x[i : i + s.batch_size]) for i in range(0, len(x), s.batch_size)])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    T, alpha = 4.0, 0.9
    times = []
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(0, len(y), s.batch_size):
            idx = order[i : i + s.batch_size]
            if live:
                with torch.inference_mode():
                    target = teacher(x[idx]).clone()
            else:
                target = logits[idx]
            z = net(x[idx])
            soft = (
                F.kl_div(
                    F.log_softmax(z / T, -1), F.log_softmax(target / T, -1), reduction="batchmean", log_target=True
                )
                * T
                * T
            )
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(z, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def teacher_fwd(s: Setting, data: TensorData, device: torch.device, epochs: int) -> list[float]:
    """The teacher's forward pass alone over one epoch of batches (eval, inference mode)."""
    net = model(s.teacher, s, device, 0).eval()
    x = data.x.to(device)
    times = []
    for _ in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), s.batch_size):
                net(x[i : i + s.batch_size])
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def dk_run(
    s: Setting,
    data: TensorData,
    test: TensorData,
    device: torch.device,
    epochs: int,
    kind: str,
    extra: dict[str, float],
) -> list[float]:
    """darkknowledge's Trainer: plain CE, KD with the live teacher, or KD from the cache
    (``cached_textbook``: the cache with the KD loss's fused fast path switched off)."""
    student = model(s.student, s, device, 1)
    if kind == "plain":
        task = offline_task(student, build_objective({"ce": {}}))
    else:
        cache = CacheConfig(enabled=kind.startswith("cached"), memory_limit_mb=s.memory_limit_mb)
        task = offline_task(student, build_objective(s.losses), model(s.teacher, s, device, 0), cache=cache)
    train = BatchLoader(data, s.batch_size, shuffle=True, seed=0, device=device)
    evals = BatchLoader(test, 1024, shuffle=False, device=device)
    cfg = TrainConfig(
        epochs=epochs, device=device.type, optimizer={"name": "sgd", "lr": 0.05}, scheduler={"name": "constant"}
    )
    trainer = Trainer(task, train, evals, cfg, device, stage=kind, progress=False)
    fused.ENABLED = kind != "cached_textbook"
    try:
        result = trainer.fit()
    finally:
        fused.ENABLED = True
    cache_of = task.teachers[0].cache if task.teachers else None
    if cache_of is not None:
        facts = cache_of.describe()
        extra["cache_mb"] = facts["size_mb"]
        extra["cache_mapped"] = facts["mapped"]
        if not facts["reused"]:
            extra["cache_build_s"] = facts["build_seconds"]
    return result.epoch_seconds


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``ru_maxrss``: bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_setting(s: Setting, device: torch.device, reps: int | None = None) -> dict[str, Any]:
    """One untimed warm-up round of every variant, then ``reps`` (default ``s.reps``) timed
    rounds: one epoch of each variant per round, in an order shuffled every round, so machine
    noise (and any effect of the variant run just before) hits all variants alike; medians."""
    reps = reps or s.reps
    data, test = make_data(s, s.num_samples)
    runners: dict[str, Callable[[dict[str, Any]], list[float]]] = {
        "hand_plain": lambda extra: hand_plain(s, data, device, 1),
        "teacher_fwd": lambda extra: teacher_fwd(s, data, device, 1),
        "hand_kd_cached": lambda extra: hand_kd(s, data, device, 1, live=False),
        "hand_kd_live": lambda extra: hand_kd(s, data, device, 1, live=True),
        "dk_plain": lambda extra: dk_run(s, data, test, device, 1, "plain", extra),
        "dk_kd_live": lambda extra: dk_run(s, data, test, device, 1, "live", extra),
        "dk_kd_cached": lambda extra: dk_run(s, data, test, device, 1, "cached", extra),
        "dk_kd_cached_textbook": lambda extra: dk_run(s, data, test, device, 1, "cached_textbook", extra),
    }
    times: dict[str, list[float]] = {v: [] for v in s.variants}
    extra: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    order, shuffler = list(s.variants), random.Random(0)
    for round_ in range(reps + 1):
        shuffler.shuffle(order)
        for v in order:
            epoch = runners[v](extra)[-1]
            if round_:  # round 0 warms up (and builds the cache, timed on its own)
                times[v].append(epoch)
    med = {v: statistics.median(t) for v, t in times.items()}
    out: dict[str, Any] = {
        "setting": s.name,
        "title": s.title,
        "samples": len(data),
        "reps": reps,
        "seconds_per_epoch": {v: round(t, 4) for v, t in med.items()},
        "spread": {v: round(max(t) - min(t), 4) for v, t in times.items()},
    }
    out.update(paired_ratios(times))
    out.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


RATIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (numerator variants, denominator variants), each side summed
    "dk_plain/hand_plain": (("dk_plain",), ("hand_plain",)),
    "dk_kd_live/(hand_plain + teacher_fwd)": (("dk_kd_live",), ("hand_plain", "teacher_fwd")),
    "dk_kd_cached/hand_plain": (("dk_kd_cached",), ("hand_plain",)),
    # informative: what KD costs on top of dk's own plain step (dk's step can be cheaper than the
    # minimal hand loop's), the KD loss's own cost, interleaving's cost, dk's overhead over the same loops
    "dk_kd_cached/dk_plain": (("dk_kd_cached",), ("dk_plain",)),
    "dk_kd_live/(dk_plain + teacher_fwd)": (("dk_kd_live",), ("dk_plain", "teacher_fwd")),
    "hand_kd_cached/hand_plain": (("hand_kd_cached",), ("hand_plain",)),
    "dk_kd_cached/hand_kd_cached": (("dk_kd_cached",), ("hand_kd_cached",)),
    "hand_kd_live/(hand_plain + teacher_fwd)": (("hand_kd_live",), ("hand_plain", "teacher_fwd")),
    "dk_kd_live/hand_kd_live": (("dk_kd_live",), ("hand_kd_live",)),
    # the KD loss's fused fast path (losses/fused.py) against its textbook form (losses/kd.py)
    "dk_kd_cached_textbook/dk_kd_cached": (("dk_kd_cached_textbook",), ("dk_kd_cached",)),
}


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Each ratio computed within every round (the variants of one round ran back to back, so a
    slow phase of the machine hits numerator and denominator alike), then the median over rounds."""
    out = {}
    for name, (num, den) in RATIOS.items():
        if all(v in times for v in num + den):
            per_round = [
                sum(times[v][i] for v in num) / sum(times[v][i] for v in den) for i in range(len(times[num[0]]))
            ]
            out[name] = round(statistics.median(per_round), 3)
    return out


def scaling(quick: bool, device: torch.device, reps: int | None) -> dict[str, Any]:
    """Cached KD over 1x and 10x the data: time ~10x, cache memory-mapped beyond the limit."""
    base = settings(quick)["b"]
    n = 400 if quick else 4000
    limit = 3 * n * base.num_classes * 2 / 2**20  # three times the 1x cache (fp16 logits): the 10x one is beyond it
    small = Setting(
        "d",
        "scaling: cached KD, 1x vs 10x data",
        n,
        base.input_shape,
        base.num_classes,
        base.teacher,
        base.student,
        variants=("hand_plain", "dk_kd_cached"),
        memory_limit_mb=limit,
        reps=9,
    )
    r1 = run_setting(small, device, reps)
    large = Setting(**{**small.__dict__, "num_samples": 10 * n})
    r10 = run_setting(large, device, reps)
    t1, t10 = r1["seconds_per_epoch"]["dk_kd_cached"], r10["seconds_per_epoch"]["dk_kd_cached"]
    return {
        "setting": "d",
        "title": small.title,
        "samples": [r1["samples"], r10["samples"]],
        "seconds_per_epoch": {"dk_kd_cached@1x": t1, "dk_kd_cached@10x": t10},
        "time_10x/1x": round(t10 / t1, 2),
        # the hand loop's own growth over the same two runs: what the machine did meanwhile
        "hand_plain time_10x/1x": round(
            r10["seconds_per_epoch"]["hand_plain"] / r1["seconds_per_epoch"]["hand_plain"], 2
        ),
        "dk_kd_cached/hand_plain": [r1["dk_kd_cached/hand_plain"], r10["dk_kd_cached/hand_plain"]],
        "cache_mb": [r1.get("cache_mb"), r10.get("cache_mb")],
        "cache_mapped": [r1.get("cache_mapped"), r10.get("cache_mapped")],
        "memory_limit_mb": round(limit, 3),
        "peak_rss_mb": r10["peak_rss_mb"],
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\n({r['setting']}) {r['title']}  [{r['samples']} samples]")
    for v, t in r["seconds_per_epoch"].items():
        spread = r.get("spread", {}).get(v)
        print(f"  {v:<22} {t:9.3f} s/epoch" + (f"   (max-min {spread:.3f})" if spread is not None else ""))
    for key, value in r.items():
        if "/" in key or key in (
            "cache_build_s",
            "cache_mb",
            "cache_mapped",
            "peak_rss_mb",
            "peak_gpu_mb",
            "memory_limit_mb",
        ):
            print(f"  {key:<40} {value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="*", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed rounds per setting (median reported; default 9, 31 for the cheap (b))",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--json", action="store_true", help="also print one JSON object per setting")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    # what dk's trainer does on CPU, done first so that every variant (the hand loops too) runs
    # under the same allocator settings whatever the order
    kept = device.type == "cpu" and retain_freed_host_memory()
    os.environ.setdefault("DK_CACHE", tempfile.mkdtemp(prefix="dk-speed-"))  # a fresh cache: its build is timed
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
        + (", freed host memory kept (glibc mallopt)" if kept else "")
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    all_settings = settings(args.quick)
    for name in args.settings:
        r = (
            scaling(args.quick, device, args.reps)
            if name == "d"
            else run_setting(all_settings[name], device, args.reps)
        )
        print_table(r)
        if args.json:
            print(json.dumps(r))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
