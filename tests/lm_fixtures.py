"""Tiny language-model fixtures built in the tests (no download): a word-level tokenizer, a small
Llama teacher saved as a Hugging Face folder, a text corpus, and an ``lm`` recipe over them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

WORDS = (
    "the cat dog bird sat ran flew on in over a mat park tree and then quickly slowly big small red blue "
    "returns value list string number file path module function class object"
).split()
SPECIALS = ["<unk>", "<pad>", "<eos>", "<user>", "<assistant>"]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def corpus(n: int = 120, seed: int = 0) -> list[str]:
    """``n`` short documents of a few sentences each, drawn from ``WORDS`` with a fixed seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))) for _ in range(n)]


def make_tokenizer() -> Any:
    """A word-level tokenizer over ``WORDS`` with EOS, pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    out.chat_template = TEMPLATE
    return out


def tiny_lm(vocab: int, seed: int = 0, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    """A tiny Llama (random weights)."""
    from darkknowledge.lm.models import build_from_config

    return build_from_config(
        "llama",
        vocab,
        hidden_size=hidden,
        layers=layers,
        heads=4,
        kv_heads=2,
        intermediate_size=2 * hidden,
        max_positions=64,
        seed=seed,
    )


def teacher_folder(root: Path) -> Path:
    """A saved teacher (tiny Llama + tokenizer) that ``source: pretrained`` loads offline."""
    folder = root / "teacher"
    if (folder / "config.json").is_file():
        return folder
    tok = make_tokenizer()
    model = tiny_lm(len(tok), seed=123, hidden=48)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def corpus_file(root: Path, n: int = 120) -> Path:
    path = root / "corpus.txt"
    path.write_text("\n\n".join(corpus(n)) + "\n")
    return path


def lm_recipe(root: Path, **over: Any) -> dict[str, Any]:
    """A small ``kind: lm`` recipe over the fixtures (a few seconds per arm on a CPU)."""
    raw: dict[str, Any] = {
        "kind": "lm",
        "name": "tiny-lm",
        "seeds": [0],
        "data": {
            "source": "text",
            "path": str(corpus_file(root)),
            "block_len": 16,
            "heldout_fraction": 0.2,
            "val_blocks": 4,
            "batch_size": 8,
            "eval_batch_size": 8,
        },
        "teacher": {"source": "pretrained", "path": str(teacher_folder(root))},
        "student": {
            "source": "config",
            "family": "llama",
            "hidden_size": 16,
            "layers": 1,
            "heads": 2,
            "kv_heads": 1,
            "intermediate_size": 32,
            "max_positions": 64,
        },
        "cache": {"kind": "dense", "k": 4, "draws": 6, "batch_size": 4},
        "arms": {"ce": {"losses": {"ce": {}}}, "fkl": {"losses": {"fkl": {}}}},
        "train": {"epochs": 1, "optimizer": {"lr": 0.01}},
        "eval": {"prompts": ["the cat"], "max_new_tokens": 4},
    }
    for key, value in over.items():
        raw[key] = value
    return raw
