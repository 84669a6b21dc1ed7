"""``dk run`` of a language-model recipe on tiny models built in the test (no download).

The teacher is a tiny Llama saved as a Hugging Face folder (``source: pretrained``), the students
tiny Llamas built from config; the data a generated text file. Checked: the whole plan (caches built
once and shared, variants of the best arm, report), that training from a cache never runs the
teacher, that the chunked sequence cross-entropy is the textbook one, resuming, and clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm.config import validate_lm_config
from darkknowledge.lm.models import lazy_logits
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs
from darkknowledge.runs.lm_run import run_lm
from lm_fixtures import lm_recipe, make_tokenizer, teacher_folder, tiny_lm


@pytest.fixture()
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DK_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_sequence_cross_entropy_is_the_textbook_one_chunked_or_not():
    torch.manual_seed(0)
    model = tiny_lm(40)
    x = torch.randint(0, 40, (3, 7))
    y = torch.randint(0, 40, (3, 7))
    y[0, :3] = UNLABELED  # a prompt
    y[2, 5:] = UNLABELED  # padding
    logits = model(x).logits  # (3, 7, 40)
    want = F.cross_entropy(logits.reshape(-1, 40), y.reshape(-1), ignore_index=UNLABELED)
    batch = Batch(x, y, torch.arange(3))
    ce = create_loss("ce")
    got_plain = ce(Outputs(logits), None, batch)
    got_lazy = ce(Outputs(None, tokens=lazy_logits(model, x)), None, batch)
    assert got_plain.item() == pytest.approx(want.item(), rel=1e-5)
    assert got_lazy.item() == pytest.approx(want.item(), rel=1e-5)
    grad_want = torch.autograd.grad(want, model.lm_head.weight)[0]
    grad_got = torch.autograd.grad(ce(Outputs(None, tokens=lazy_logits(model, x)), None, batch), model.lm_head.weight)[
        0
    ]
    assert torch.allclose(grad_want, grad_got, atol=1e-6)


def test_token_loss_teaches_every_classifier_sample_labelled_or_not():
    """On a classifier's (B, K) logits the token losses mask nothing (an unlabelled transfer sample
    is taught by the teacher), unlike an LM's ignored positions."""
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([1, UNLABELED, UNLABELED, 0])
    fkl = create_loss("fkl")
    got = fkl(Outputs(s), Outputs(t), Batch(s, y, torch.arange(4)))
    want = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_lm_run_builds_caches_once_trains_arms_and_variants(cache_env: Path):
    tmp = cache_env
    raw = lm_recipe(
        tmp,
        seeds=[0, 1],
        variants={"of": "best", "caches": ["topk", "sampled"]},
        arms={"ce": {"losses": {"ce": {}}}, "fkl": {"losses": {"fkl": {}}}, "jsd": {"losses": {"jsd": {"beta": 0.5}}}},
    )
    res = run_lm(validate_lm_config(raw), out=tmp / "run", progress=False)
    models = {m["name"]: m for m in json.loads((tmp / "run" / "results.json").read_text())["models"]}
    best = min(("fkl", "jsd"), key=lambda a: sum(models[f"{a}-s{s}"]["val_ppl"] for s in (0, 1)))
    expected = {
        "teacher",
        *(f"{a}-s{s}" for a in ("ce", "fkl", "jsd") for s in (0, 1)),
        *(f"{best}@{k}-s{s}" for k in ("topk", "sampled") for s in (0, 1)),
    }
    assert set(models) == expected
    for name, m in models.items():
        assert m["heldout_ppl"] > 1.0 and m["heldout_ppl"] == pytest.approx(2.718281828 ** m["heldout_loss"], rel=1e-6)
        if name != "teacher":
            assert m["kl_teacher_student"] >= 0.0 and m["train_tokens_per_s"] > 0
    # the same initialisation per seed: ce and fkl students start equal (their first batch's loss
    # is read from the same model), and different seeds differ
    assert models["ce-s0"]["params"] == models["fkl-s0"]["params"]
    assert models["fkl-s0"]["cache"] == "dense" and models[f"{best}@topk-s0"]["cache"] == "topk"
    caches = {m["teacher_cache"]["path"] for m in models.values() if m.get("teacher_cache")}
    assert len(caches) == 3  # dense, top-k, sampled: each built once and shared by arms and seeds
    topk = models[f"{best}@topk-s0"]["teacher_cache"]
    assert topk["bytes_per_token"] == 4 * 4 + 4  # k=4 ids (uint16) + fp16 log-probs, fp32 tail
    report = (tmp / "run" / "report.md").read_text()
    assert "## Verdict" in report and "## Teacher-output caches" in report and "## Generations" in report
    assert f"{best}@sampled" in report and "| teacher (" in report
    assert res["table"][0].startswith("| student |")


def test_training_from_a_cache_never_runs_the_teacher(cache_env: Path, monkeypatch: pytest.MonkeyPatch):
    tmp = cache_env
    raw = lm_recipe(tmp, cache={"kind": "topk", "k": 4}, arms={"fkl": {"losses": {"fkl": {}}}}, eval={"prompts": []})
    cfg = validate_lm_config(raw)
    run_lm(cfg, out=tmp / "first", progress=False)  # builds the caches
    calls = []
    from darkknowledge.teachers import lm_teacher

    real = lm_teacher.lazy_logits
    monkeypatch.setattr(lm_teacher, "lazy_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_lm(cfg, out=tmp / "second", progress=False)
    assert calls == []  # the student trained from the cache the first run built
    a = json.loads((tmp / "first" / "results.json").read_text())["models"]
    b = json.loads((tmp / "second" / "results.json").read_text())["models"]
    assert [m["heldout_ppl"] for m in a] == [m["heldout_ppl"] for m in b]  # and the same student


def test_lm_run_resumes_a_finished_and_an_interrupted_stage(cache_env: Path, monkeypatch: pytest.MonkeyPatch):
    tmp = cache_env
    raw = lm_recipe(
        tmp,
        arms={"ce": {"losses": {"ce": {}}}, "fkl": {"losses": {"fkl": {}}}},
        train={"epochs": 2, "optimizer": {"lr": 0.01}},
        eval={"prompts": []},
    )
    cfg = validate_lm_config(raw)
    full = run_lm(cfg, out=tmp / "full", progress=False)
    from darkknowledge.engine import trainer

    real = trainer.Trainer._evaluate
    seen = {"n": 0}

    def dying(self, result, epoch, step):  # the fkl stage dies after its first epoch's checkpoint
        real(self, result, epoch, step)
        if self.stage == "fkl-s0" and epoch == 1:
            raise KeyboardInterrupt
        seen["n"] += 1

    monkeypatch.setattr(trainer.Trainer, "_evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_lm(cfg, out=tmp / "cut", progress=False)
    monkeypatch.setattr(trainer.Trainer, "_evaluate", real)
    resumed = run_lm(cfg, out=tmp / "cut", resume=True, progress=False)
    want = {r["label"]: r["ppl"] for r in full["rows"]}
    got = {r["label"]: r["ppl"] for r in resumed["rows"]}
    assert got == pytest.approx(want, rel=1e-5)


def test_lm_config_errors_are_clear(tmp_path: Path):
    raw = lm_recipe(tmp_path)
    with pytest.raises(ConfigError, match="Did you mean"):
        validate_lm_config({**raw, "arm": {}})
    with pytest.raises(ConfigError, match="variants.of"):
        validate_lm_config({**raw, "variants": {"of": "nope", "caches": ["topk"]}})
    with pytest.raises(ConfigError, match="needs path"):
        validate_lm_config({**raw, "teacher": {"source": "pretrained"}})
    with pytest.raises(ConfigError, match="greater than 0"):
        validate_lm_config({**raw, "cache": {"kind": "topk", "k": 0}})


def test_a_bad_loss_in_any_arm_fails_before_the_teacher_loads(cache_env: Path, monkeypatch: pytest.MonkeyPatch):
    from darkknowledge.runs import lm_session

    monkeypatch.setattr(lm_session, "load_pretrained", lambda *a, **k: pytest.fail("the teacher was loaded"))
    raw = lm_recipe(cache_env, arms={"ce": {"losses": {"ce": {}}}, "late": {"losses": {"jsd": {"beta": 2.0}}}})
    with pytest.raises(ConfigError, match="arms.late.losses.jsd.beta"):
        run_lm(validate_lm_config(raw), out=cache_env / "run", progress=False)


def test_vocabulary_mismatch_is_one_clear_error(cache_env: Path):
    tok = make_tokenizer()
    teacher_folder(cache_env)
    student, teacher = tiny_lm(len(tok) + 3), tiny_lm(len(tok))
    x = torch.randint(0, len(tok), (2, 6))
    fkl = create_loss("fkl")
    with pytest.raises(ShapeError, match="vocabular"):
        fkl(
            Outputs(None, tokens=lazy_logits(student, x)),
            Outputs(None, tokens=lazy_logits(teacher, x)),
            Batch(x, x, torch.arange(2)),
        )


def test_shipped_lm_recipe_validates_and_uses_every_token_loss():
    from darkknowledge.losses import LOSSES
    from darkknowledge.recipes import read_recipe

    cfg = validate_lm_config(read_recipe("lm"))
    assert cfg.teacher.source == "smollm2" and len(cfg.seeds) >= 3
    used = {(s or {}).get("loss", n) for arm in cfg.arms.values() for n, s in arm.losses.items()}
    assert {"ce", "fkl", "rkl", "jsd", "skew_fkl"} <= used
    assert all(n in LOSSES.names() for n in used)


def test_hidden_state_taps_feed_a_feature_loss_through_a_per_token_adapter():
    """Taps on a transformer's layers by module path reach feature losses as (B, d, L): FitNets'
    regressor is then a per-token map from the student's width to the teacher's."""
    from darkknowledge.losses.base import SetupInfo
    from darkknowledge.schemes.lm_task import lm_task
    from darkknowledge.teachers.lm_teacher import LMTeacher

    teacher, student = tiny_lm(30, seed=1, hidden=48), tiny_lm(30, seed=0, hidden=16, layers=1)
    task = lm_task(
        student,
        {"fkl": {}, "fitnet": {"student_taps": ["model.layers.0"], "teacher_taps": ["model.layers.1"], "relu": False}},
        LMTeacher(teacher),
    )
    x = torch.randint(0, 30, (2, 6))
    batch = Batch(x, x, torch.arange(2))
    task.setup(batch, SetupInfo(num_samples=2, batch_size=2))
    conv = task.module.objective.terms["fitnet"].regressors[0][0]
    assert (conv.in_channels, conv.out_channels) == (16, 48)
    loss, terms = task.module(batch, 0.0)
    loss.backward()
    assert set(terms) == {"fkl", "fitnet"} and conv.weight.grad is not None
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
