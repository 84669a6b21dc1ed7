"""Generator synthesisers (DAFL, DFAD, ZSKT), the noise floor, and the logit_l1 loss."""

import math

import pytest
import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError, TapError
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.logit_l1 import logit_l1_loss
from darkknowledge.models import create_model
from darkknowledge.synthesis import SYNTHESIZERS, draw_latent, resolve_synthesizer
from darkknowledge.synthesis.dafl import activation_loss, information_entropy_loss, one_hot_loss
from darkknowledge.synthesis.generators import GENERATOR, build_generator

SHAPE = (1, 8, 8)
K = 10


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A tiny BN teacher (frozen) and a tiny student (train mode) on 8x8 digits."""
    torch.manual_seed(seed)
    teacher = _frozen(create_model("cnn2d", num_classes=K, input_shape=SHAPE, channels=(8, 16), hidden=16))
    student = create_model("cnn2d", num_classes=K, input_shape=SHAPE, channels=(4, 8), hidden=8).train()
    return teacher, student


def _synth(name: str, teacher: nn.Module, **params):
    cls, p = resolve_synthesizer(name, {**SYNTHESIZERS.get(name).example, **params})
    return cls(p, teacher, SHAPE, K).train()


def _latent(synth, batch: int = 8, step: int = 0) -> Batch:
    return draw_latent(0, (0, step), batch, synth.latent_dim, K)


# ------------------------------------------------------------------ generator networks
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 32, 32), (3, 32, 32), (1, 8, 8), (1, 40), (3, 30, 17), (6,)])
def test_generator_makes_inputs_of_the_exact_shape_normalised_per_channel(shape):
    torch.manual_seed(0)
    g = build_generator(shape, latent_dim=12, width=0.0625).train()
    x = g(torch.randn(4, 12))
    assert tuple(x.shape) == (4, *shape)
    # the final affine-free batch norm: zero mean, unit variance per channel over the batch (like standardised data)
    per_channel = x.reshape(1, -1) if len(shape) == 1 else x.transpose(0, 1).reshape(shape[0], -1)  # (C, B*S)
    assert torch.allclose(per_channel.mean(dim=-1), torch.zeros(()), atol=1e-4)
    assert torch.allclose(per_channel.var(dim=-1, unbiased=False), torch.ones(()), atol=1e-2)


def test_generator_grows_from_a_quarter_of_the_size_and_width_scales_channels():
    assert build_generator((1, 28, 28), 4).init_size == (7, 7)  # DAFL's MNIST size: no crop
    assert build_generator((1, 8, 8), 4).init_size == (2, 2)
    assert build_generator((1, 40), 4).init_size == (10,)
    assert build_generator((3, 30, 17), 4).init_size == (8, 5)  # ceil(S/4), then a centre crop
    full, half = build_generator((1, 8, 8), 4, width=1.0), build_generator((1, 8, 8), 4, width=0.5)
    assert full.block2[0].out_channels == 64 and half.block2[0].out_channels == 32 and half.wide == 64
    assert isinstance(build_generator((1, 40), 4).block1[0], nn.Conv1d)


def test_generator_rejects_other_shapes():
    with pytest.raises(ShapeError, match=r"\(C, H, W\), \(C, L\) or \(D,\)"):
        build_generator((1, 2, 8, 8), 4)


# ------------------------------------------------------------------ DAFL's losses (Eq. 3-6)
def test_information_entropy_is_minimal_for_balanced_predictions():
    balanced = torch.eye(K) * 20.0  # each class predicted once, confidently
    one_class = torch.zeros(K, K)
    one_class[:, 3] = 20.0
    assert information_entropy_loss(balanced).item() == pytest.approx(-math.log10(K), abs=1e-4)
    assert information_entropy_loss(one_class).item() == pytest.approx(0.0, abs=1e-4)
    # a probability of exactly 0 in the batch mean contributes 0, not NaN
    assert torch.isfinite(information_entropy_loss(torch.tensor([[0.0, 1e4]])))


def test_one_hot_loss_is_near_zero_for_confident_logits_and_log_k_for_flat_ones():
    confident = torch.eye(K) * 30.0
    assert one_hot_loss(confident).item() < 1e-6
    assert one_hot_loss(torch.zeros(4, K)).item() == pytest.approx(math.log(K), abs=1e-5)


def test_activation_loss_is_minus_the_mean_absolute_feature():
    f = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
    assert activation_loss(f).item() == pytest.approx(-1.5)
    assert activation_loss(2 * f) < activation_loss(f) < 0  # stronger activations, lower loss


def test_dafl_defaults_are_the_authors_code():
    p = resolve_synthesizer("dafl", {})[1]
    assert (p.oh, p.a, p.ie, p.latent_dim, p.every) == (1.0, 0.1, 5.0, 100, 1)
    assert (p.optimizer.name, p.optimizer.lr, p.scheduler.name) == ("adam", 0.2, "constant")
    partial = resolve_synthesizer("dafl", {"optimizer": {"lr": 0.02}})[1]  # keeps Adam, not the stage's AdamW
    assert (partial.optimizer.name, partial.optimizer.lr) == ("adam", 0.02)


def test_dafl_generator_steps_reduce_its_loss():
    teacher, student = _pair()
    synth = _synth("dafl", teacher)
    opt = torch.optim.Adam(synth.generator.parameters(), lr=0.02)
    latent = _latent(synth, batch=16)  # activations under glibc's 128 KiB mmap threshold: no page faults per step
    losses = []
    for _ in range(10):
        loss, terms = synth.part_loss(GENERATOR, latent, student)
        assert set(terms) == {"one_hot", "activation", "info_entropy"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03  # a random teacher's logits are small: ~0.06 in 10 steps


def test_dafl_student_trains_on_the_generators_own_batch():
    teacher, student = _pair()
    synth = _synth("dafl", teacher)
    latent = _latent(synth)
    synth.part_loss(GENERATOR, latent, student)
    made = synth._made[1]
    x = synth.sample(latent, student)
    assert x is made and not x.requires_grad
    other = _latent(synth, step=1)
    fresh = synth.sample(other, student)
    assert not fresh.requires_grad and not torch.equal(fresh, x)


def test_dafl_feature_tap_default_and_errors():
    teacher, _ = _pair()
    assert _synth("dafl", teacher).feature_tap == "blocks.1"  # the last of teacher.feature_taps()
    assert _synth("dafl", teacher, feature_tap="fc:input").feature_tap == "fc:input"
    plain = _frozen(nn.Sequential(nn.Flatten(), nn.Linear(64, K)))
    with pytest.raises(ConfigError, match="feature_tap"):
        _synth("dafl", plain)
    assert _synth("dafl", plain, a=0.0).feature_tap is None  # no activation loss, no tap needed
    with pytest.raises(TapError, match="Closest valid paths"):
        _synth("dafl", teacher, feature_tap="blocks.9")


def test_dafl_leaves_no_hook_on_the_shared_teacher():
    teacher, student = _pair()
    synth = _synth("dafl", teacher)
    synth.part_loss(GENERATOR, _latent(synth), student)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


# ------------------------------------------------------------------ DFAD / ZSKT
def test_dfad_generator_loss_is_minus_logit_l1_and_its_defaults():
    teacher, student = _pair()
    synth = _synth("dfad", teacher)
    latent = _latent(synth)
    loss, terms = synth.part_loss(GENERATOR, latent, student)
    with torch.no_grad():
        x = synth.generator(latent.x)  # train-mode BN: the same batch gives the same x
        expected = logit_l1_loss(student(x), teacher(x))
    assert loss.item() == pytest.approx(-expected.item(), rel=1e-5)
    assert set(terms) == {"logit_l1"} and terms["logit_l1"].item() == pytest.approx(expected.item(), rel=1e-5)
    p = resolve_synthesizer("dfad", {})[1]
    assert (p.latent_dim, p.every, p.optimizer.name, p.optimizer.lr, p.discrepancy) == (
        256,
        5,
        "adam",
        1e-3,
        {"logit_l1": {}},
    )
    assert synth.parts()[0].every == 2  # the example's ratio


def test_dfad_samples_a_fresh_batch_per_latent():
    teacher, student = _pair()
    synth = _synth("dfad", teacher)
    a, b = synth.sample(_latent(synth, step=0), student), synth.sample(_latent(synth, step=1), student)
    assert not a.requires_grad and not torch.equal(a, b)


def test_zskt_reuses_the_generator_steps_batch_until_its_next_step():
    teacher, student = _pair()
    synth = _synth("zskt", teacher, student_steps=3)
    assert synth.parts()[0].every == 3
    opt = torch.optim.Adam(synth.generator.parameters(), lr=0.05)
    seen = []
    for step in range(6):
        latent = _latent(synth, step=step)
        if synth.parts()[0].due(step):
            loss, terms = synth.part_loss(GENERATOR, latent, student)
            assert set(terms) == {"kd"} and loss.item() == pytest.approx(-terms["kd"].item())
            with torch.no_grad():
                before = synth.generator(latent.x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            z = latent.x
        seen.append(synth.sample(latent, student))
    assert seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5]
    assert not torch.equal(seen[2], seen[3])
    with torch.no_grad():  # the stash is G(z) of the step's codes, made after its update (the authors' loader)
        assert torch.allclose(seen[3], synth.generator(z), atol=1e-6)
    assert not torch.allclose(seen[3], before, atol=1e-4)


def test_zskt_defaults_and_a_stash_before_any_generator_step():
    p = resolve_synthesizer("zskt", {})[1]
    assert (p.latent_dim, p.student_steps, p.optimizer.lr, p.discrepancy) == (
        100,
        10,
        1e-3,
        {"kd": {"T": 1.0, "alpha": 1.0}},
    )
    teacher, student = _pair()
    synth = _synth("zskt", teacher)
    first = synth.sample(_latent(synth, step=1), student)  # e.g. a resume mid-cycle: this batch starts the stash
    assert synth.sample(_latent(synth, step=2), student) is first
    assert synth.preview(3).shape == (3, *SHAPE)
    assert synth.sample(_latent(synth, step=3), student) is first  # preview left the stash alone


@pytest.mark.parametrize("name", ["dafl", "dfad", "zskt"])
def test_gradients_reach_the_generator_and_never_the_teacher(name):
    teacher, student = _pair()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    synth = _synth(name, teacher)
    loss, _ = synth.part_loss(GENERATOR, _latent(synth), student)
    loss.backward()
    grads = [p.grad for p in synth.generator.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())  # eval BN: stats untouched


def test_discrepancy_refuses_terms_beyond_logits():
    teacher, student = _pair()
    with pytest.raises(ConfigError, match="discrepancy.*unknown loss 'nope'"):
        resolve_synthesizer("dfad", {"discrepancy": {"nope": {}}})
    with pytest.raises(ConfigError, match="does not compare the teacher's logits"):
        resolve_synthesizer("zskt", {"discrepancy": {"ce": {}}})
    with pytest.raises(ConfigError, match="constant weight only"):
        resolve_synthesizer("dfad", {"discrepancy": {"logit_l1": {"warmup_epochs": 1}}})
    synth = _synth("dfad", teacher, discrepancy={"kd": {"T": 1.0, "alpha": 0.5}})
    with pytest.raises(ConfigError, match="reads labels"):
        synth.part_loss(GENERATOR, _latent(synth), student)


def test_every_synthesizer_is_documented():
    for name in ("dafl", "dfad", "zskt", "noise"):
        cls = SYNTHESIZERS.get(name)
        assert cls.citation and cls.summary and cls.__doc__ and cls.Params.model_config["extra"] == "forbid"
        for field in cls.Params.model_fields.values():
            assert field.description, name
    with pytest.raises(ConfigError, match="unknown parameter 'lr'"):
        resolve_synthesizer("dafl", {"lr": 0.1})


# ------------------------------------------------------------------ the noise floor
def test_noise_is_deterministic_per_latent_batch():
    teacher, student = _pair()
    synth = _synth("noise", teacher, std=0.5)
    assert synth.latent_dim == 64 and synth.parts() == []
    a = synth.sample(draw_latent(3, (1, 2), 8, synth.latent_dim, K), student)
    b = synth.sample(draw_latent(3, (1, 2), 8, synth.latent_dim, K), student)
    c = synth.sample(draw_latent(3, (1, 3), 8, synth.latent_dim, K), student)
    assert a.shape == (8, *SHAPE) and torch.equal(a, b) and not torch.equal(a, c)
    z = draw_latent(3, (1, 2), 8, synth.latent_dim, K).x
    assert torch.equal(a, 0.5 * z.view(8, *SHAPE))
    with pytest.raises(ShapeError, match="prod"):
        synth.sample(draw_latent(3, (1, 2), 8, 5, K), student)


# ------------------------------------------------------------------ logit_l1 (DFAD's MAE)
def test_logit_l1_is_zero_for_equal_logits_and_the_mean_absolute_error():
    z = torch.randn(5, 4)
    assert logit_l1_loss(z, z.clone()).item() == 0.0
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert logit_l1_loss(s, t).item() == pytest.approx((1 + 2 + 2 + 1) / 4)  # (1/B) sum_b (1/K) sum_k |.|
    loss = create_loss("logit_l1")
    batch = Batch(torch.zeros(2, 1), torch.full((2,), -1), torch.arange(2))
    assert loss(Outputs(s), Outputs(t), batch).item() == pytest.approx(1.5)
    t_grad = t.clone().requires_grad_()
    logit_l1_loss(s, t_grad).backward()  # the generator's gradient runs through the teacher's logits too
    assert torch.allclose(t_grad.grad, -torch.sign(s - t) / 4)
    assert logit_l1_loss(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0
