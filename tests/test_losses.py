"""KD math, the objective, and contract tests run for every registered loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, RegistryError, ShapeError
from darkknowledge.losses import LOSSES, create_loss, fused, list_losses
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.kd import kd_loss, kd_soft_loss
from darkknowledge.losses.objective import Objective, term_weight
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task


def test_identical_logits_give_zero_kd():
    z = torch.randn(16, 10)
    assert kd_soft_loss(z, z.clone(), T=4.0).abs().item() < 1e-6


def test_kd_matches_hand_computed_kl():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    p_s = torch.softmax(s / T, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() * T * T
    assert torch.allclose(kd_soft_loss(s, t, T), expected, atol=1e-6)


def test_large_temperature_limit_is_logit_matching():
    """Hinton 2015 Sec. 2.1: T^2 KL -> 1/(2K) * ||z_s - z_t||^2 for zero-mean logits."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=g, dtype=torch.float64)
    t = torch.randn(8, 10, generator=g, dtype=torch.float64)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    limit = ((s - t) ** 2).sum(-1).mean() / (2 * 10)
    assert torch.allclose(kd_soft_loss(s, t, T=1000.0), limit, rtol=1e-3)
    assert not torch.allclose(kd_soft_loss(s, t, T=1.0), limit, rtol=1e-2)


def test_t_squared_keeps_gradient_scale():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(32, 10, generator=g)
    norms = []
    for T in (4.0, 40.0):
        s = torch.randn(32, 10, generator=torch.Generator().manual_seed(2)).requires_grad_()
        kd_soft_loss(s, t, T).backward()
        norms.append(s.grad.norm().item())
    # the soft gradient is ~ (p_s - p_t) / T, times T^2 -> ~T * (z_s - z_t) / (K T) = O(1):
    # with the T^2 factor the norms stay within a small factor; without it they would differ ~100x
    assert 0.2 < norms[0] / norms[1] < 5.0


def test_kd_alpha_mixes_ce():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    batch = Batch(torch.zeros(6, 1), y, torch.arange(6))
    loss = create_loss("kd", T=3.0, alpha=0.25)
    expected = 0.25 * kd_soft_loss(s, t, 3.0) + 0.75 * F.cross_entropy(s, y)
    assert torch.allclose(loss(Outputs(s), Outputs(t), batch), expected, atol=1e-6)


def test_kd_unlabelled_samples_get_soft_term_only():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([1, -1, 2, -1])
    batch = Batch(torch.zeros(4, 1), y, torch.arange(4))
    out = create_loss("kd", T=2.0, alpha=0.5)(Outputs(s), Outputs(t), batch)
    keep = y >= 0
    expected = 0.5 * kd_soft_loss(s, t, 2.0) + 0.5 * F.cross_entropy(s[keep], y[keep])
    assert torch.allclose(out, expected, atol=1e-6)


def _reference_kd(s, t, y, T, alpha):
    """The textbook composite: F.kl_div (batchmean) * T^2 and F.cross_entropy (fp16/bf16 in float32)."""
    s, t = (z.float() if z.dtype in (torch.float16, torch.bfloat16) else z for z in (s, t))
    log_p_s, log_p_t = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, y)


def _value_and_grad(fn, s, *args):
    s = s.detach().clone().requires_grad_()
    out = fn(s, *args)
    out.backward()
    return out, s.grad


@pytest.mark.parametrize("all_labeled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,alpha", [(4.0, 0.9), (1.0, 0.5), (3.0, 1.0), (2.0, 0.0)])
def test_fused_kd_equals_the_textbook_kd_in_value_and_gradient(dtype, T, alpha, all_labeled):
    """The fast path (all_labeled: the two sums added once) and the textbook kd_loss give the
    composite's value and gradient."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(16, 7, generator=g, dtype=dtype) * 3
    y = torch.randint(0, 7, (16,), generator=g)
    s = torch.randn(16, 7, generator=g, dtype=dtype) * 3
    out, grad = _value_and_grad(fused.kd_loss, s, t, y, T, alpha, all_labeled)
    book, book_grad = _value_and_grad(kd_loss, s, t, y, T, alpha)
    ref, ref_grad = _value_and_grad(_reference_kd, s, t, y, T, alpha)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert out.dtype == dtype and book.dtype == dtype
    for value, g_s in ((out, grad), (book, book_grad)):
        torch.testing.assert_close(value, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(g_s, ref_grad, atol=tol, rtol=tol)


def test_fused_kl_sum_is_the_unscaled_textbook_kl():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fused.kl_sum(s, t, 3.0), kd_soft_loss(s, t, 3.0) * 9 / 3.0**2)  # T^2 KL, batch mean
    torch.testing.assert_close(fused.kl_sum(s, s.clone(), 3.0), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("enabled", [True, False])
def test_kd_on_labelled_batches_equals_the_composite_in_value_and_gradient(monkeypatch, enabled):
    """The KD term passes Batch.labeled to the fast path while fused.ENABLED, else takes the
    textbook path; both give the composite's value and gradient."""
    monkeypatch.setattr(fused, "ENABLED", enabled)
    flags, fast = [], fused.kd_loss
    monkeypatch.setattr(fused, "kd_loss", lambda *args: flags.append(args[-1]) or fast(*args))
    g = torch.Generator().manual_seed(3)
    t = torch.randn(16, 7, generator=g) * 3
    y = torch.randint(0, 7, (16,), generator=g)
    s = torch.randn(16, 7, generator=g) * 3
    loss = create_loss("kd", T=4.0, alpha=0.9)
    for labeled in (True, False):
        batch = Batch(torch.zeros(16, 1), y, torch.arange(16), labeled=labeled)
        out, grad = _value_and_grad(lambda z, batch=batch: loss(Outputs(z), Outputs(t), batch), s)
        ref, ref_grad = _value_and_grad(_reference_kd, s, t, y, 4.0, 0.9)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    assert flags == ([True, False] if enabled else [])  # the batch's flag reaches the fast path


def test_kd_takes_half_precision_logits_in_float32():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    batch = Batch(torch.zeros(8, 1), y, torch.arange(8), labeled=True)
    for half in (torch.float16, torch.bfloat16):
        out = create_loss("kd", T=4.0, alpha=1.0)(Outputs(s.to(half)), Outputs(t.to(half)), batch)
        assert out.dtype == torch.float32
        assert torch.allclose(out, _reference_kd(s.to(half), t.to(half), y, 4.0, 1.0), atol=1e-6)
        for alpha in (1.0, 0.5):  # the fast path equals the textbook one (CE mixed in at the logits' precision)
            fast = fused.kd_loss(s.to(half), t.to(half), y, 4.0, alpha, all_labeled=True)
            book = kd_loss(s.to(half), t.to(half), y, 4.0, alpha)
            assert fast.dtype == book.dtype == torch.float32
            torch.testing.assert_close(fast, book, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(book, _reference_kd(s.to(half), t.to(half), y, 4.0, alpha), atol=1e-2, rtol=1e-2)


def test_kd_of_an_empty_batch_is_zero():
    """An uneven DDP share can be empty: zero with a gradient path, not 0/0."""
    s = torch.zeros(0, 5, requires_grad=True)
    assert kd_soft_loss(s, torch.zeros(0, 5), 4.0).item() == 0.0
    batch = Batch(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), labeled=True)
    out = create_loss("kd", T=4.0, alpha=0.5)(Outputs(s), Outputs(torch.zeros(0, 5)), batch)
    out.backward()
    assert out.item() == 0.0 and s.grad is not None
    for all_labeled in (True, False):
        fast = fused.kd_loss(s, torch.zeros(0, 5), batch.y, 4.0, 0.5, all_labeled)
        assert fast.item() == 0.0 and fast.requires_grad
    assert kd_loss(s, torch.zeros(0, 5), batch.y, 4.0, 0.5).item() == 0.0


def test_loss_constants_made_in_inference_mode_can_be_saved_for_backward():
    from darkknowledge.losses.scalar import scalar

    with torch.inference_mode():
        c = scalar(0.123456)  # the first call happens under inference mode (a teacher's eval)
    assert not c.is_inference() and c.dim() == 0 and scalar(0.123456) is c
    z = torch.randn(3, requires_grad=True)
    (z * c).sum().backward()
    assert torch.allclose(z.grad, torch.full((3,), 0.123456))


def test_kd_param_errors():
    with pytest.raises(ConfigError, match=r"losses.kd.T: .*greater than 0"):
        create_loss("kd", T=0)
    with pytest.raises(ConfigError, match="losses.kd.alpah: unknown parameter .*Did you mean 'alpha'"):
        create_loss("kd", alpah=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        create_loss("kd", alpha="lots")
    with pytest.raises(RegistryError, match="Did you mean 'kd'"):
        create_loss("kdd")


def test_class_count_mismatch_fails_in_setup():
    student = create_model("mlp", num_classes=10, input_shape=(8,))
    teacher = create_model("mlp", num_classes=7, input_shape=(8,))
    scheme = offline_task(student, Objective.from_config({"kd": {}}), teacher)
    batch = Batch(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    with pytest.raises(ShapeError, match=r"teacher predicts 7 classes but the student predicts 10"):
        scheme.setup(batch)


def test_objective_weights_and_warmup():
    assert term_weight(2.0, 0, 0.0) == 2.0
    assert term_weight(2.0, 4, 1.0) == 0.5 and term_weight(2.0, 4, 10.0) == 2.0
    obj = Objective.from_config(
        {"ce": {"weight": 0.5}, "soft": {"loss": "kd", "alpha": 1.0, "T": 2.0, "warmup_epochs": 2}}
    )
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    batch = Batch(torch.zeros(4, 1), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    total, terms = obj(Outputs(s), Outputs(t), batch, epoch_progress=1.0)
    assert set(terms) == {"ce", "soft"}
    assert torch.allclose(total, 0.5 * terms["ce"] + 0.5 * terms["soft"], atol=1e-6)
    with pytest.raises(ConfigError, match="losses.ce.weight"):
        Objective.from_config({"ce": {"weight": -1}})


# ----------------------------------------------------------------- registry-wide contract
def _pair():
    torch.manual_seed(0)
    student = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(4, 8), hidden=16)
    teacher = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(8, 16), hidden=32)
    x = torch.randn(6, 1, 8, 8)
    batch = Batch(x, torch.tensor([0, 1, 2, 3, 4, 0]), torch.arange(6))
    return student, teacher, batch


@pytest.mark.parametrize("name", list_losses())
def test_contract_every_loss(name):
    """Finite scalar; gradients reach the student (and adapters), never the teacher; deterministic."""
    student, teacher, batch = _pair()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    scheme = offline_task(student, Objective.from_config({name: {}}), teacher)
    scheme.setup(batch)
    module = scheme.module.train()
    loss, terms = module(batch)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and set(terms) == {name}
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the student"
    assert all(p.grad is None for p in teacher.parameters()), "a gradient reached the teacher"
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    again, _ = module(batch)
    assert torch.allclose(loss.detach(), again.detach())


def test_every_loss_is_documented():
    for name, cls in LOSSES.items():
        assert cls.citation and cls.__doc__ and cls.knowledge in ("label", "response", "feature", "relation"), name


def test_ce_ignores_unlabelled_and_handles_a_batch_without_labels():
    from darkknowledge.losses.ce import cross_entropy

    z = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([1, -1, 2, 3, -1])
    assert torch.allclose(cross_entropy(z, y), F.cross_entropy(z[y >= 0], y[y >= 0]))
    none = cross_entropy(z, torch.full((5,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(z.grad).all()
