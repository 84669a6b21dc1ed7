"""A teacher sharded with FSDP2 over two CPU processes (gloo) teaches the same student as one process.

The two-process run shards the frozen teacher with ``fully_shard`` (each decoder layer a unit, then
the root; no optimizer state) and trains the student with DDP; each rank runs the teacher on its
half of every batch, and the student's loss is taken a few tokens at a time (gradients of each
chunk taken in the forward, then reduced by DDP). The one-process run keeps the whole teacher. Both see the same global
batches from the same initialisation, so the students' training losses and final weights agree
up to float summation order (one thread per process in both, ``helpers.ONE_THREAD``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.engine.checkpoint import safe_load
from darkknowledge.engine.fsdp import shard_units
from helpers import ONE_THREAD, dk, torchrun
from lm_fixtures import lm_recipe

pytestmark = pytest.mark.slow


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if r.get("kind") == "train"]


def test_fsdp2_sharded_teacher_gives_the_single_process_student(tmp_path: Path):
    # 4-token chunks: each rank's DDP student takes its chunks' gradients in the forward (token_chunks)
    raw = lm_recipe(
        tmp_path,
        cache={"kind": "none"},
        arms={"fkl": {"losses": {"fkl": {"chunk_size": 4}}}},
        distributed={"teacher": "fsdp"},
        train={"epochs": 2, "optimizer": {"lr": 0.01}},
        eval={"prompts": []},
    )
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**ONE_THREAD, "DK_CACHE": str(tmp_path / "cache")}
    single = dk("run", str(recipe), "--out", "single", "--quiet", cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    two = torchrun("run", str(recipe), "--out", "two", "--quiet", cwd=tmp_path, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("run folder:") == 1  # rank 0 reports
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "two")
    assert len(a) == len(b) == 2
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    wa = safe_load(tmp_path / "single" / "fkl-s0" / "model.pt")["state_dict"]
    wb = safe_load(tmp_path / "two" / "fkl-s0" / "model.pt")["state_dict"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_shard_units_are_the_decoder_layers():
    from lm_fixtures import tiny_lm

    model = tiny_lm(30, layers=3)
    units = shard_units(model)
    assert len(units) == 3 and all(type(u).__name__ == "LlamaDecoderLayer" for u in units)
