"""multi_teacher: mixed soft labels, confidence weights, one random teacher per step, a loss per teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import create_model
from darkknowledge.runs.build import build_objective, check_config
from darkknowledge.schemes.multi_teacher import multi_teacher_task
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.frozen import Frozen
from darkknowledge.teachers.mix import (
    ce_weights,
    correct_weights,
    draw_teacher,
    entropy_weights,
    fixed_weights,
    mixture_logits,
)
from darkknowledge.teachers.mixture import Mixture
from helpers import TINY, dk, results, torchrun

K = 10


def mlp(hidden=(16,), seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=K, input_shape=(40,), hidden=list(hidden))


def cnn(channels=8, seed=0, depth=3):
    torch.manual_seed(seed)
    return create_model("cnn1d", num_classes=K, input_shape=(40,), channels=channels, depth=depth)


def batch(n=8, labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    y = torch.randint(K, (n,), generator=g) if labels is None else labels
    return Batch(x, y, torch.arange(n))


def scheme(teachers, losses=None, student=None, names=None, cache=None, **params) -> FlowTask:
    """The multi_teacher task over frozen ``teachers``, set up on a batch (as the engine does)."""
    losses = losses or {"kd": {"T": 4.0, "alpha": 1.0}}
    names = names or [f"teachers.{i}" for i in range(len(teachers))]
    frozen = [Frozen(t, name, cache) for t, name in zip(teachers, names)]
    made = multi_teacher_task(student or mlp(seed=9), lambda: build_objective(losses), frozen, **params)
    made.setup(batch())
    return made


def mixture(task: FlowTask) -> Mixture:
    """The one mixed teacher of a mean/weighted/confidence task."""
    [mixed] = {id(link.teacher): link.teacher for link in task.flow.links if link.teacher is not None}.values()
    assert isinstance(mixed, Mixture)
    return mixed


def per_teacher_objectives(task: FlowTask) -> list:
    """The objectives of the teacher-reading links, in teacher order (one per teacher)."""
    return [link.objective for link in task.flow.links if link.teacher is not None]


# ------------------------------------------------------------ aggregation math
def test_mixture_logits_soften_to_exactly_the_weighted_mixture():
    z = torch.randn(3, 5, K) * 3  # (N, B, K)
    w = torch.softmax(torch.randn(3, 5), dim=0)  # (N, B) per-sample weights
    for T in (1.0, 4.0):
        mixed = mixture_logits(z, w, T)
        expected = (w[..., None] * torch.softmax(z / T, dim=-1)).sum(0)
        assert torch.allclose(torch.softmax(mixed / T, dim=-1), expected, atol=1e-6)
    one_hot_w = torch.tensor([0.0, 1.0, 0.0])  # (N,) a zero weight drops a teacher entirely
    assert torch.allclose(
        torch.softmax(mixture_logits(z, one_hot_w, 2.0) / 2.0, -1), torch.softmax(z[1] / 2.0, -1), atol=1e-6
    )


def test_fixed_weights_are_normalised_and_checked():
    assert torch.allclose(fixed_weights([1, 3], 2), torch.tensor([0.25, 0.75]))
    with pytest.raises(ConfigError, match=r"weights: got 3 weights .* for 2 teachers"):
        fixed_weights([1, 1, 1], 2)
    with pytest.raises(ConfigError, match="positive sum"):
        fixed_weights([0, 0], 2)


def test_confidence_weights_favour_the_correct_and_the_certain_teacher():
    y = torch.tensor([2, 7, -1])
    right = F.one_hot(torch.tensor([2, 7, 0]), K).float() * 5  # confident and correct
    wrong = F.one_hot(torch.tensor([4, 4, 4]), K).float() * 5  # confident and wrong
    z = torch.stack([wrong, right])  # (N=2, B=3, K)
    for w in (ce_weights(z, y), correct_weights(z, y)):
        assert torch.allclose(w.sum(0), torch.ones(3))
        assert (w[1, :2] > 0.9).all() and (w[0, :2] < 0.1).all()  # labelled: the right teacher dominates
        assert torch.allclose(w[:, 2], torch.full((2,), 0.5))  # unlabelled (y = -1): uniform
    # CA-MKD by hand: w_i = (1 - softmax_i(CE_i)) / (N - 1)
    ce = torch.stack([F.cross_entropy(zi, y.clamp_min(0), reduction="none") for zi in z])
    assert torch.allclose(ce_weights(z, y)[:, :2], (1 - torch.softmax(ce, 0))[:, :2])
    sharp, flat = torch.randn(4, K) * 10, torch.randn(4, K) * 0.1  # low vs high entropy
    w = entropy_weights(torch.stack([flat, sharp, flat * 2]))  # (3, 4)
    assert torch.allclose(w.sum(0), torch.ones(4)) and (w[1] > w[0]).all() and (w[1] > w[2]).all()
    none_right = correct_weights(torch.stack([wrong, wrong]), torch.tensor([2, 7, -1]))
    assert torch.allclose(none_right, torch.full((2, 3), 0.5))  # nobody correct: uniform


def test_draws_are_reproducible_and_use_every_teacher():
    seq = [draw_teacher(3, s, 3) for s in range(60)]
    assert seq == [draw_teacher(3, s, 3) for s in range(60)]
    assert set(seq) == {0, 1, 2} and seq != [draw_teacher(4, s, 3) for s in range(60)]


# ------------------------------------------------------------ the scheme
def test_mean_student_learns_the_mixture_and_only_the_student_gets_gradients():
    teachers = [cnn(seed=1), mlp((32,), seed=2)]  # different architectures
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    s = scheme(teachers, T=None)
    assert mixture(s).T == 4.0  # from kd's T
    b = batch()
    loss, terms = s.training_step(s.module, b, 0.0)
    with torch.no_grad():
        z = torch.stack([t(b.x) for t in teachers])
        mix = 0.5 * (torch.softmax(z[0] / 4, -1) + torch.softmax(z[1] / 4, -1))
        student_logits = s.flow.student(b.x)
    expected = (mix * (mix.log() - F.log_softmax(student_logits / 4, -1))).sum(-1).mean() * 16  # T^2 KL(mix || p_s)
    assert torch.allclose(loss, expected, atol=1e-5) and set(terms) == {"kd"}
    loss.backward()
    assert all(p.grad is not None for p in s.flow.student.parameters())
    assert all(p.grad is None and not p.requires_grad for t in teachers for p in t.parameters())
    assert all(torch.equal(t.state_dict()[k], v) for t, sd in zip(teachers, before) for k, v in sd.items())


def test_weighted_and_confidence_change_the_mixed_teacher():
    teachers = [mlp(seed=1), mlp(seed=2)]
    b = batch()
    only_second = mixture(scheme(teachers, aggregation="weighted", weights=[0.0, 2.0]))(b).logits
    with torch.no_grad():
        z1 = teachers[1](b.x)
    assert torch.allclose(torch.softmax(only_second / 4, -1), torch.softmax(z1 / 4, -1), atol=1e-6)
    conf = mixture(scheme(teachers, aggregation="confidence", confidence="correct", T=1.0))
    labels = z1.argmax(-1)  # teacher 1 is right on every sample, teacher 0 only where it agrees
    mixed = conf(batch(labels=labels)).logits
    with torch.no_grad():
        z = torch.stack([teachers[0](b.x), z1])
    w = correct_weights(z, labels)
    assert (w[1] >= 0.5).all()
    assert torch.allclose(torch.softmax(mixed, -1), (w[..., None] * torch.softmax(z, -1)).sum(0), atol=1e-6)


def test_random_runs_exactly_one_teacher_per_step_and_resumes_the_sequence():
    teachers = [cnn(seed=1), mlp((32,), seed=2), mlp((24,), seed=3)]
    calls: list[int] = []
    for i, t in enumerate(teachers):
        t.register_forward_hook(lambda *_, i=i: calls.append(i))
    s = scheme(teachers, aggregation="random", seed=5)
    calls.clear()
    for step in range(12):
        before = len(calls)
        s.training_step(s.module, batch(seed=step), step / 12)
        assert len(calls) == before + 1  # exactly one teacher ran in this step
    assert calls == [draw_teacher(5, step, 3) for step in range(12)]
    assert set(calls) == {0, 1, 2} and s.flow.draws.tolist() == [12]  # one group, drawn 12 times
    resumed = scheme(teachers, aggregation="random", seed=5)
    resumed.module.load_state_dict(s.module.state_dict())  # what the trainer does on --resume
    calls.clear()
    resumed.training_step(resumed.module, batch(), 0.0)
    assert calls == [draw_teacher(5, 12, 3)]


def test_per_teacher_builds_separate_adapters_and_averages_the_terms():
    teachers = [cnn(channels=12, seed=1), cnn(channels=24, depth=2, seed=2)]  # different widths and depths
    losses = {"ce": {}, "fitnet": {}, "kd": {"T": 2.0, "alpha": 1.0}}
    s = scheme(teachers, losses, student=cnn(seed=9), aggregation="per_teacher")
    regs = [o.terms["fitnet"].regressors for o in per_teacher_objectives(s)]
    convs = [next(m for m in r.modules() if isinstance(m, torch.nn.Conv1d)) for r in regs]
    assert [c.out_channels for c in convs] == [12, 24]  # one regressor per teacher, to its own width
    assert s.describe()["losses"] == ["ce", "fitnet@t0", "kd@t0", "fitnet@t1", "kd@t1"]
    assert s.describe()["adapter_params"] == sum(p.numel() for r in regs for p in r.parameters()) > 0
    b = batch()
    loss, terms = s.training_step(s.module, b, 0.0)
    per = [terms["fitnet@t0"] + terms["kd@t0"], terms["fitnet@t1"] + terms["kd@t1"]]
    assert torch.allclose(loss.detach(), terms["ce"] + 0.5 * (per[0] + per[1]))  # ce once + mean over teachers
    assert torch.allclose(terms["kd@t1"], kd_soft_loss(s.flow.student(b.x), teachers[1](b.x), 2.0))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for r in regs for p in r.parameters() if p.dim() > 1)
    assert all(p.grad is None for t in teachers for p in t.parameters())


def test_a_mixed_teacher_refuses_feature_losses_and_points_to_per_teacher():
    teachers = [cnn(channels=12, seed=1), cnn(channels=24, depth=2, seed=2)]
    losses = {"ce": {}, "fitnet": {}, "kd": {"T": 2.0, "alpha": 1.0}}
    with pytest.raises(ConfigError, match="per_teacher"):  # a mixed teacher has no features
        scheme(teachers, losses, student=cnn(seed=9), aggregation="mean")


def test_random_with_a_feature_loss_gives_idle_adapters_a_zero_gradient():
    teachers = [cnn(channels=12, seed=1), cnn(channels=24, depth=2, seed=2)]
    s = scheme(teachers, {"fitnet": {}}, student=cnn(seed=9), aggregation="random", seed=0)
    drawn = draw_teacher(0, 0, 2)
    loss, terms = s.training_step(s.module, batch(), 0.0)
    assert set(terms) == {"fitnet"}  # the drawn teacher's value, under the plain name
    loss.backward()
    for i, objective in enumerate(per_teacher_objectives(s)):
        grads = [p.grad for p in objective.parameters()]
        assert all(g is not None for g in grads)  # DDP without find_unused_parameters needs them all
        assert (sum(float(g.abs().sum()) for g in grads) > 0) == (i == drawn)


def test_cached_teacher_outputs_replace_the_live_teachers():
    teachers = [mlp(seed=1), mlp(seed=2)]
    s = scheme(teachers, aggregation="per_teacher")
    fixed = [torch.randn(8, K), torch.randn(8, K)]

    class Cache:  # what darkknowledge.teachers.cache.TeacherOutputCache.lookup gives: rows by sample index
        def __init__(self, logits):
            self.logits = logits

        def lookup(self, batch):
            return Outputs(logits=self.logits[batch.idx].to(batch.x.device))

    for teacher, z in zip(s.teachers, fixed):  # each frozen teacher reads its own cache
        teacher.cache = Cache(z)
    calls = []
    for t in teachers:
        t.register_forward_hook(lambda *_: calls.append(1))
    b = batch()
    _, terms = s.training_step(s.module, b, 0.0)
    assert not calls  # no teacher forward: the cache answers
    with torch.no_grad():
        z_s = s.flow.student(b.x)
    assert torch.allclose(terms["kd@t1"], kd_soft_loss(z_s, fixed[1], 4.0), atol=1e-6)


def test_live_teachers_run_ahead_on_groups_of_batches_with_the_same_result():
    from darkknowledge.config import CacheConfig

    batches = [batch(n=6, seed=k) for k in range(5)]
    for aggregation, ahead_expected in (("mean", True), ("per_teacher", True), ("random", False)):
        losses = {}
        for n in (1, 2):
            teachers = [mlp(seed=1), mlp(seed=2)]
            calls = []
            for t in teachers:
                t.register_forward_hook(lambda _m, x, _o, calls=calls: calls.append(len(x[0])))
            s = scheme(teachers, aggregation=aggregation, cache=CacheConfig(live_batches=n))  # set up on a batch
            aheads = [t.ahead for t in s.teachers if isinstance(t, Frozen) and t.ahead is not None]
            assert len(aheads) == (2 if n > 1 and ahead_expected else 0)
            calls.clear()
            losses[n] = [s.training_step(s.module, b, 0.0)[0].detach() for b in s.batches(iter(batches))]
            if aheads:  # each teacher ran on groups of two batches (12 samples), the last one alone
                assert sorted(calls) == [6, 6, 12, 12, 12, 12], (aggregation, calls)
        torch.testing.assert_close(torch.stack(losses[2]), torch.stack(losses[1]))


def test_clear_errors():
    with pytest.raises(ConfigError, match="at least 2 teachers"):
        scheme([mlp()])
    with pytest.raises(ConfigError, match=r"got 3 weights \[1.0, 1.0, 1.0\] for 2 teachers"):
        scheme([mlp(), mlp()], aggregation="weighted", weights=[1, 1, 1])
    with pytest.raises(ConfigError, match="needs scheme.params.weights"):
        scheme([mlp(), mlp()], aggregation="weighted")
    with pytest.raises(ConfigError, match="only used with aggregation 'weighted'"):
        scheme([mlp(), mlp()], weights=[1, 1])
    with pytest.raises(ConfigError, match="none of the losses .*'ce'.* reads a teacher"):
        scheme([mlp(), mlp()], {"ce": {}})
    with pytest.raises(ConfigError, match="different temperatures"):
        scheme([mlp(), mlp()], {"kd": {"T": 4.0}, "dkd": {"T": 2.0}})


def test_a_teacher_predicting_other_classes_is_named():
    wrong = create_model("mlp", num_classes=5, input_shape=(40,), hidden=[8])
    with pytest.raises(ShapeError, match="teachers.1 predicts 5 classes but the student predicts 10"):
        scheme([mlp(), wrong], {"kd": {}}, student=mlp(), names=["teacher", "teachers.1"])


def test_teacher_hash_covers_every_teacher():
    a, b = mlp(seed=1), mlp(seed=2)
    h = scheme([a, b]).fingerprint()
    assert h == scheme([a, b]).fingerprint()
    assert h != scheme([a, mlp(seed=3)]).fingerprint()
    assert h != scheme([a, b, mlp(seed=3)]).fingerprint()


def test_recipe_params_are_validated_before_running():
    cfg = deep_merge(
        TINY, {"scheme": {"name": "multi_teacher", "params": {"aggregation": "avg"}}, "teachers": [{"name": "mlp"}]}
    )
    with pytest.raises(ConfigError, match=r"scheme\.params\.aggregation.*'mean'.*'per_teacher'"):
        check_config(load_config(cfg))
    cfg["scheme"]["params"] = {"aggregation": "weighted", "weights": [1, -1]}
    with pytest.raises(ConfigError, match=r"scheme\.params\.weights\.1.*greater than or equal to 0"):
        check_config(load_config(cfg))
    cfg["scheme"]["params"] = {"temperature": 2.0}  # the former name: refused with where it went
    with pytest.raises(ConfigError, match=r"scheme\.params\.temperature: .*renamed to T"):
        check_config(load_config(cfg))


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_recipe_runs_end_to_end_with_three_teachers(tmp_path):
    small = [
        "data.params.num_samples=600",
        "data.params.transfer_samples=200",
        "train.epochs=2",
        "teacher.train.epochs=2",
        "seeds=[0]",
        "scheme.params.aggregation=random",
        "train.device=cpu",
        "cache.enabled=true",
    ]
    proc = dk(
        "run",
        "multi_teacher",
        *small,
        "--out",
        "mt",
        "--quiet",
        cwd=tmp_path,
        env={"DK_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = results(tmp_path / "mt")
    assert {"teacher", "teachers.0", "teachers.1", "baseline-s0", "multi_teacher-s0"} <= set(entries)
    student = entries["multi_teacher-s0"]
    assert student["method"] == "multi_teacher[random]:kd" and student["transfer"]
    assert len(student["teacher_cache"]) == 3  # one teacher-output cache per teacher
    assert math.isfinite(student["last_acc"]) and student["epochs"] == 2
    assert (tmp_path / "mt" / "report.md").is_file()


@pytest.mark.slow
def test_random_feature_distillation_under_two_process_ddp(tmp_path):
    """Each step one teacher runs and the other teacher's adapter still takes part (zero gradient):
    DDP without find_unused_parameters would otherwise fail; both ranks draw the same teacher."""
    raw = deep_merge(
        TINY,
        {
            "seeds": [0],
            "data": {"params": {"num_samples": 400}},
            "train": {"epochs": 2},
            "losses": {"ce": {}, "fitnet": {}, "kd": {"T": 4.0, "alpha": 1.0}},
            "scheme": {"name": "multi_teacher", "params": {"aggregation": "random"}},
        },
    )
    raw["teacher"] = {"name": "cnn1d", "params": {"channels": 12}, "train": {"epochs": 1}}
    raw["teachers"] = [{"name": "cnn1d", "params": {"channels": 16, "depth": 2}, "seed": 1, "train": {"epochs": 1}}]
    raw["student"] = {"name": "cnn1d", "params": {"channels": 8}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    ddp = torchrun(
        "distill", str(recipe), "--out", "ddp", "--quiet", cwd=tmp_path, env={"DK_CACHE": str(tmp_path / "cache")}
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    entry = results(tmp_path / "ddp")["multi_teacher-s0"]
    assert entry["losses"] == ["ce", "fitnet", "kd"] and entry["extra_params"] > 0
    assert math.isfinite(entry["last_acc"])
