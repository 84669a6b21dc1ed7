"""The typed config of a language-model distillation run (a recipe with ``kind: lm``).

A recipe::

    kind: lm
    name: lm
    seeds: [0, 1, 2]
    data: {source: builtin, block_len: 128, train_blocks: 512, batch_size: 16}
    teacher: {source: smollm2}
    student: {source: config, family: llama, hidden_size: 128, layers: 4, heads: 4, kv_heads: 2}
    cache: {kind: dense}                       # the teacher runs once; students read its outputs
    arms:                                      # the students compared, each from the same initialisation
      ce: {losses: {ce: {}}}
      fkl: {losses: {fkl: {}}}
    variants: {of: best, caches: [topk, sampled]}
    train: {epochs: 4, optimizer: {lr: 0.003}}

Unknown keys are errors (with a "did you mean"), like every other recipe.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from darkknowledge.config import LogConfig, TrainConfig, _with_hints
from darkknowledge.errors import ConfigError
from darkknowledge.validation import key_hint

CacheKind = Literal["none", "dense", "topk", "sampled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LMModelConfig(_Strict):
    """A causal LM: ``smollm2`` (offline GGUF), ``pretrained`` (a folder or hub id) or ``config`` (built new)."""

    source: Literal["smollm2", "pretrained", "config"] = "config"
    path: str | None = Field(default=None, description="pretrained: a local folder or a hub id")
    gguf_file: str | None = Field(default=None, description="pretrained: a GGUF file inside path")
    family: str = Field(default="llama", description="config: a transformers model type (llama, qwen2, mistral...)")
    hidden_size: int = Field(default=128, gt=0)
    layers: int = Field(default=4, gt=0)
    heads: int = Field(default=4, gt=0)
    kv_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    max_positions: int = Field(default=2048, gt=0)
    tie_embeddings: bool = True
    extra: dict[str, Any] = Field(default_factory=dict, description="config: further fields of the family's config")

    @model_validator(mode="after")
    def _source_fields(self) -> LMModelConfig:
        if self.source == "pretrained" and not self.path:
            raise ValueError("source 'pretrained' needs path (a local folder or a hub id)")
        return self


class LMDataConfig(_Strict):
    """Text, tokenised once with the teacher's tokenizer and cached."""

    source: Literal["builtin", "text", "instructions", "datasets"] = "builtin"
    path: str | None = Field(default=None, description="text: .txt/.jsonl/folder; instructions: JSONL; datasets: name")
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_docs: int | None = Field(default=None, gt=0, description="use the first documents only")
    block_len: int = Field(default=128, gt=1, description="tokens per training block")
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="documents held out (test)")
    val_blocks: int = Field(default=32, ge=0, description="training blocks carved out for validation (selection)")
    train_blocks: int | None = Field(default=None, gt=0, description="cap on training blocks (after val)")
    heldout_blocks: int | None = Field(default=None, gt=0, description="cap on held-out blocks")
    batch_size: int = Field(default=16, gt=0, description="global batch of blocks")
    eval_batch_size: int = Field(default=8, gt=0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _needs_path(self) -> LMDataConfig:
        if self.source != "builtin" and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path")
        return self


class LMCacheConfig(_Strict):
    """The teacher's outputs, computed once: full distribution, top-k with a tail bucket, or sampled."""

    kind: CacheKind = Field(default="dense", description="none: the live teacher runs every step")
    k: int = Field(default=64, gt=0, description="topk: ids kept per token")
    draws: int = Field(default=48, gt=0, description="sampled: draws per token (with replacement)")
    T: float = Field(default=1.0, gt=0.0, description="temperature of the stored distribution")
    batch_size: int = Field(default=8, gt=0, description="blocks per teacher forward while building")
    seed: int = Field(default=0, ge=0, description="sampled: seed of the draws")


class ArmConfig(_Strict):
    """One student of the comparison: its objective, and which teacher outputs it reads."""

    losses: dict[str, dict[str, Any] | None] = Field(description="a weighted sum of named loss terms")
    cache: CacheKind | None = Field(default=None, description="override cache.kind for this arm")


class VariantsConfig(_Strict):
    """Re-run one arm from other caches (e.g. the best one from top-k and sampled caches)."""

    of: str = Field(default="best", description="an arm name, or best (lowest validation perplexity of KD arms)")
    caches: list[Literal["dense", "topk", "sampled", "none"]] = Field(default_factory=list)


class EvalConfig(_Strict):
    """What the report shows besides perplexity."""

    prompts: list[str] = Field(default_factory=list, description="greedy generations of teacher and students")
    max_new_tokens: int = Field(default=32, gt=0)
    kl_blocks: int | None = Field(
        default=None, gt=0, description="held-out blocks for the teacher-student KL (None: all)"
    )


class DistributedConfig(_Strict):
    """How the teacher is placed under ``torchrun`` (one process: a whole teacher); students train with DDP."""

    teacher: Literal["replicate", "fsdp"] = Field(
        default="replicate", description="fsdp: shard the frozen teacher with FSDP2 (no optimizer state)"
    )


class LMRunConfig(_Strict):
    """A language-model distillation run: a teacher, students compared over seeds, one report."""

    kind: Literal["lm"] = "lm"
    name: str = "lm"
    description: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    teacher: LMModelConfig = Field(default_factory=lambda: LMModelConfig(source="smollm2"))
    student: LMModelConfig = Field(default_factory=LMModelConfig)
    tokenizer: Literal["teacher"] = Field(default="teacher", description="students share the teacher's tokenizer")
    cache: LMCacheConfig = Field(default_factory=LMCacheConfig)
    arms: dict[str, ArmConfig] = Field(
        default_factory=lambda: {"ce": ArmConfig(losses={"ce": {}}), "fkl": ArmConfig(losses={"fkl": {}})}
    )
    variants: VariantsConfig = Field(default_factory=VariantsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _arms(self) -> LMRunConfig:
        if not self.arms:
            raise ValueError("arms: give at least one student, e.g. {ce: {losses: {ce: {}}}}")
        if self.variants.caches and self.variants.of != "best" and self.variants.of not in self.arms:
            raise ValueError(f"variants.of: {self.variants.of!r} is not an arm; arms: {', '.join(self.arms)}")
        return self


def is_lm_recipe(raw: Any) -> bool:
    """Whether a raw recipe mapping is a language-model run (``kind: lm``)."""
    return isinstance(raw, dict) and raw.get("kind") == "lm"


def validate_lm_config(raw: dict[str, Any]) -> LMRunConfig:
    """Validate a raw ``kind: lm`` recipe (errors name the key path, with a "did you mean")."""
    for key in raw:
        if key not in LMRunConfig.model_fields:
            raise ConfigError(
                f"{key}: unknown key.{key_hint(str(key), LMRunConfig)} Valid keys: "
                f"{', '.join(LMRunConfig.model_fields)}."
            )
    try:
        return LMRunConfig(**raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(_with_hints(exc, LMRunConfig)) from None
