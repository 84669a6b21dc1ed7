"""Adversarial losses: the GAN objectives, adversarial_kd (Xu et al. 2018) and afd (Chung et al.
2020), their discriminators as a separate part of the engine's task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.config import OptimizerConfig, TrainConfig
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import safe_load
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import create_loss
from darkknowledge.losses.adversarial_kd import (
    LogitDiscriminator,
    discriminator_input,
    label_head_loss,
)
from darkknowledge.losses.afd import FeatureDiscriminator
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.gan import GAN_KINDS, discriminator_loss, generator_loss
from darkknowledge.losses.objective import Objective
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task

LOG2 = math.log(2.0)


# ------------------------------------------------------------------ the GAN objectives
def test_gan_objectives_at_known_scores():
    zero = torch.zeros(4)
    # non-saturating: -log sigma(0) = -log(1 - sigma(0)) = log 2
    assert torch.allclose(discriminator_loss(zero, zero, "non_saturating"), torch.tensor(2 * LOG2))
    assert torch.allclose(generator_loss(zero, "non_saturating"), torch.tensor(LOG2))
    # hinge: 0 once real >= 1 and fake <= -1; relu(1 - 0) + relu(1 + 0) = 2 at 0; G = -mean f
    assert discriminator_loss(torch.full((3,), 1.0), torch.full((3,), -1.0), "hinge").item() == 0.0
    assert discriminator_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0]), "hinge").item() == pytest.approx(
        (0.0 + 0.5) / 2 + (0.0 + 1.0) / 2
    )
    assert discriminator_loss(zero, zero, "hinge").item() == 2.0
    assert generator_loss(torch.tensor([1.0, -3.0]), "hinge").item() == 1.0
    # least squares (Mao et al.): D's minimum at r = 1, f = 0; G's at f = 1; 1/2 factors
    assert discriminator_loss(torch.ones(5), torch.zeros(5), "least_squares").item() == 0.0
    assert discriminator_loss(zero, zero, "least_squares").item() == 0.5
    assert generator_loss(torch.ones(5), "least_squares").item() == 0.0
    assert generator_loss(torch.tensor([0.0, 3.0]), "least_squares").item() == pytest.approx((0.5 + 2.0) / 2)


def test_non_saturating_is_bce_with_logits_and_its_generator_gradient():
    g = torch.Generator().manual_seed(0)
    r, f = torch.randn(7, generator=g) * 3, torch.randn(5, generator=g) * 3
    bce = F.binary_cross_entropy_with_logits(r, torch.ones(7)) + F.binary_cross_entropy_with_logits(f, torch.zeros(5))
    assert torch.allclose(discriminator_loss(r, f, "non_saturating"), bce, atol=1e-6)
    assert torch.allclose(generator_loss(f, "non_saturating"), F.binary_cross_entropy_with_logits(f, torch.ones(5)))
    s = torch.zeros(4, requires_grad=True)
    generator_loss(s, "non_saturating").backward()  # d/df -log sigma(f) = -(1 - sigma(f)) = -1/2 at 0, / B
    assert torch.allclose(s.grad, torch.full((4,), -0.5 / 4))


def test_gan_objectives_edge_cases():
    for kind in GAN_KINDS:
        empty = torch.zeros(0, requires_grad=True)
        assert discriminator_loss(empty, empty, kind).item() == 0.0  # an empty DDP share: 0, not 0/0
        assert generator_loss(empty, kind).item() == 0.0
        half = generator_loss(torch.zeros(3, 1, dtype=torch.bfloat16), kind)  # (B, 1) accepted, computed in fp32
        assert half.dtype == torch.float32
    with pytest.raises(ConfigError, match="'wgan' is not one of non_saturating, hinge, least_squares"):
        generator_loss(torch.zeros(2), "wgan")
    with pytest.raises(ShapeError, match=r"one per sample; got \(2, 3\)"):
        discriminator_loss(torch.zeros(2, 3), torch.zeros(2), "hinge")


@pytest.mark.parametrize("kind", GAN_KINDS)
def test_a_discriminator_learns_to_separate_two_fixed_distributions(kind):
    torch.manual_seed(0)
    real, fake = torch.randn(64, 6) + 1.0, torch.randn(64, 6) - 1.0  # teacher-like and student-like logits
    d = LogitDiscriminator(6, (16,))
    opt = torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.5, 0.999))
    losses = []
    for _ in range(40):
        loss = discriminator_loss(d(real)[:, 0], d(fake)[:, 0], kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (d(real)[:, 0] > d(fake)[:, 0].max()).float().mean() > 0.8  # real scored above (almost) every fake


def test_a_feature_discriminator_separates_maps_and_keeps_batchnorm_off_single_values():
    torch.manual_seed(0)
    d = FeatureDiscriminator((4, 5, 5), hidden=8, layers=3)  # 5 -> 3 -> 2 -> 2: stride 1 once a dim is <= 2
    assert d(torch.randn(1, 4, 5, 5)).shape == (1,)  # batch of one: BatchNorm sees 2x2 positions
    assert FeatureDiscriminator((3, 7), hidden=4)(torch.randn(2, 3, 7)).shape == (2,)  # 1-D maps
    assert FeatureDiscriminator((10,), hidden=4)(torch.randn(2, 10)).shape == (2,)  # vectors
    real, fake = torch.randn(32, 4, 5, 5).abs(), -torch.randn(32, 4, 5, 5).abs()
    opt = torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.5, 0.999))
    first = None
    for _ in range(25):
        loss = discriminator_loss(d(real), d(fake), "least_squares")
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(ShapeError, match="no discriminator for features"):
        FeatureDiscriminator((2, 3, 4, 5))


# ------------------------------------------------------------------ adversarial_kd
def _logits(b=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g), torch.randn(b, k, generator=g) * 2


def _batch(y):
    y = torch.as_tensor(y)
    return Batch(torch.zeros(len(y), 1), y, torch.arange(len(y)))


def test_adversarial_kd_adversary_exists_only_after_setup():
    s, t = _logits()
    loss = create_loss("adversarial_kd", d_every=3, d_optimizer={"name": "adam", "lr": 1e-4, "betas": [0.5, 0.9]})
    assert loss.adversary() is None
    loss.setup(Outputs(s), Outputs(t), SetupInfo())
    adv = loss.adversary()
    assert adv.module is loss.discriminator and adv.every == 3
    assert adv.optimizer == OptimizerConfig(name="adam", lr=1e-4, betas=(0.5, 0.9))
    assert create_loss("adversarial_kd", d_optimizer=None).d_optimizer is None  # the stage's optimizer
    with pytest.raises(ConfigError, match=r"losses.adversarial_kd.d_optimizer.lr: .*greater than 0"):
        create_loss("adversarial_kd", d_optimizer={"name": "adam", "lr": 0})
    with pytest.raises(ConfigError, match=r"losses.adversarial_kd.d_optimizer.nme"):
        create_loss("adversarial_kd", d_optimizer={"nme": "adam"})


@pytest.mark.parametrize(
    "conditional,aux_weight,width_in,width_out",
    [(False, 0.0, 5, 1), (True, 0.0, 10, 1), (False, 1.0, 5, 6), (True, 1.0, 10, 6)],
)
def test_conditioning_and_the_label_head_set_the_discriminator_widths(conditional, aux_weight, width_in, width_out):
    s, t = _logits()
    loss = create_loss("adversarial_kd", conditional=conditional, aux_weight=aux_weight, hidden=[8])
    assert loss.bind(None, None).labels == (conditional or aux_weight > 0)
    loss.setup(Outputs(s), Outputs(t), SetupInfo())
    layers = [m for m in loss.discriminator.modules() if isinstance(m, torch.nn.Linear)]
    assert layers[0].in_features == width_in and layers[-1].out_features == width_out


def test_conditional_input_and_unlabelled_samples():
    z = torch.arange(6.0).view(2, 3)
    x = discriminator_input(z, torch.tensor([2, -1]), conditional=True)
    assert torch.equal(x, torch.tensor([[0.0, 1, 2, 0, 0, 1], [3, 4, 5, 0, 0, 0]]))  # unlabelled: zero one-hot
    assert discriminator_input(z, torch.tensor([2, -1]), conditional=False) is z
    out = torch.randn(4, 4)  # score + 3 class logits
    y = torch.tensor([0, -1, 2, -1])
    assert torch.allclose(label_head_loss(out, y), F.cross_entropy(out[[0, 2], 1:], y[[0, 2]]))
    assert label_head_loss(out, torch.full((4,), -1)).item() == 0.0
    assert label_head_loss(out[:, :1], y).item() == 0.0  # no head
    s, t = _logits(b=4)
    loss = create_loss("adversarial_kd", conditional=True)
    loss.setup(Outputs(s), Outputs(t), SetupInfo())
    for labels in ([1, -1, 3, -1], [-1, -1, -1, -1]):
        value = loss(Outputs(s), Outputs(t), _batch(labels))
        d_value = loss.discriminator_step(Outputs(s), Outputs(t), _batch(labels))
        assert math.isfinite(value.item()) and math.isfinite(d_value.item())


def test_adversarial_kd_student_term_and_its_gradients():
    torch.manual_seed(0)
    s, t = _logits()
    y = [0, 1, 2, 3, 4, 0]
    loss = create_loss("adversarial_kd", gan="least_squares", aux_weight=0.0, hidden=[8])
    loss.setup(Outputs(s), Outputs(t), SetupInfo())
    s = s.clone().requires_grad_()
    value = loss(Outputs(s), Outputs(t), _batch(y))
    assert torch.allclose(value, generator_loss(loss.discriminator(s)[:, 0], "least_squares"))
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0  # the student's logits get the adversarial gradient
    with_l1 = create_loss("adversarial_kd", gan="least_squares", aux_weight=0.0, hidden=[8], l1=0.5)
    with_l1.setup(Outputs(s), Outputs(t), SetupInfo())
    with_l1.discriminator.load_state_dict(loss.discriminator.state_dict())
    extra = with_l1(Outputs(s), Outputs(t), _batch(y)) - loss(Outputs(s), Outputs(t), _batch(y))
    assert torch.allclose(extra, 0.5 * (s - t).abs().sum(-1).mean())  # the sample-level L1 term


def test_the_discriminator_step_reads_detached_outputs_and_trains_only_the_discriminator():
    s, t = _logits()
    loss = create_loss("adversarial_kd", hidden=[8])
    loss.setup(Outputs(s), Outputs(t), SetupInfo())
    s = s.clone().requires_grad_()
    d_loss = loss.discriminator_step(Outputs(s), Outputs(t), _batch([0, 1, 2, 3, 4, 0]))
    d_loss.backward()
    assert s.grad is None and all(p.grad is not None for p in loss.discriminator.parameters())


# ------------------------------------------------------------------ afd
def _maps():
    torch.manual_seed(0)
    return torch.randn(4, 3, 6, 6), torch.randn(4, 8, 3, 3)  # student (C_s=3, 6x6), teacher (C_t=8, 3x3)


def _afd(**params):
    f_s, f_t = _maps()
    loss = create_loss("afd", student_taps=["s"], teacher_taps=["t"], hidden=8, **params)
    loss.pairs = [("s", "t")]  # what bind() resolves from the taps
    assert loss.adversary() is None
    loss.setup(Outputs(None, {"s": f_s}), Outputs(None, {"t": f_t}), SetupInfo())
    return loss, f_s, f_t


def test_afd_reads_only_the_teachers_features_and_its_student_term_reaches_student_and_adapter():
    loss, f_s, f_t = _afd()
    assert len(loss.adapters) == 1 and not isinstance(loss.adapters[0], torch.nn.Identity)  # 3 -> 8 ch, 6 -> 3 px
    f_s = f_s.clone().requires_grad_()
    teacher = Outputs(None, {"t": f_t})  # a peer's detached maps: no logits, only the tapped feature
    value = loss(Outputs(None, {"s": f_s}), teacher, _batch([0, 1, 2, 3]))
    fake = loss.adapters[0](f_s)
    assert torch.allclose(value, generator_loss(loss.discriminators[0](fake), "least_squares"))
    value.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.adapters.parameters())


def test_afd_discriminator_step_trains_the_discriminators_not_the_adapter():
    loss, f_s, f_t = _afd(gan="hinge", d_every=2)
    adv = loss.adversary()
    assert adv.module is loss.discriminators and adv.every == 2 and adv.optimizer.betas == (0.5, 0.999)
    d_loss = adv.loss(Outputs(None, {"s": f_s}), Outputs(None, {"t": f_t}), _batch([0, 1, 2, 3]))
    d_loss.backward()
    assert all(p.grad is None for p in loss.adapters.parameters())
    assert all(p.grad is not None for p in loss.discriminators.parameters())


def test_afd_binds_the_last_stages_and_refuses_mixed_ranks():
    student = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(4, 8), hidden=16)
    teacher = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(8, 16), hidden=32)
    needs = create_loss("afd").bind(student, teacher)
    assert len(needs.student_taps) == len(needs.teacher_taps) == 1 and not needs.teacher_logits
    loss = create_loss("afd", student_taps=["s"], teacher_taps=["t"])
    loss.pairs = [("s", "t")]
    with pytest.raises(ShapeError, match="pair feature maps"):
        loss.setup(Outputs(None, {"s": torch.randn(2, 4)}), Outputs(None, {"t": torch.randn(2, 4, 3, 3)}), SetupInfo())


# ------------------------------------------------------------------ end to end: the discriminators as parts
def test_the_trainer_steps_the_discriminators_as_parts_and_checkpoints_their_optimizers(tmp_path):
    torch.manual_seed(0)
    kw = {"num_classes": 4, "input_shape": (1, 8, 8)}
    student = create_model("cnn2d", **kw, channels=(4, 8), hidden=16)
    teacher = create_model("cnn2d", **kw, channels=(8, 16), hidden=32).eval()
    objective = Objective.from_config(
        {
            "ce": {},
            "adversarial_kd": {"hidden": [8], "d_every": 2},
            "afd": {"hidden": 8, "d_optimizer": {"name": "sgd", "lr": 0.05}},
        }
    )
    task = offline_task(student, objective, teacher)
    x = torch.randn(48, 1, 8, 8)
    data = TensorData(x, (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long())
    cfg = TrainConfig(epochs=2, device="cpu", deterministic=True, optimizer={"name": "adamw", "lr": 0.01})
    trainer = Trainer(
        task,
        BatchLoader(data, 16, seed=0),
        BatchLoader(data, 48, shuffle=False),
        cfg,
        torch.device("cpu"),
        run_dir=tmp_path,
        progress=False,
    )
    before = {}

    def remember(batch, info=None, setup=task.setup):
        setup(batch, info)
        before.update({k: v.clone() for k, v in task.flow.state_dict().items() if ".discriminator" in k})

    task.setup = remember
    trainer.fit()
    assert [p.name for p in task.parts()] == ["main", "d_adversarial_kd", "d_afd"]
    assert [p.every for p in task.parts()] == [1, 2, 1]
    main_params = {id(p) for p in task.parts()[0].parameters()}
    assert not main_params & {id(p) for p in objective.terms["adversarial_kd"].discriminator.parameters()}
    after = task.flow.state_dict()
    weights = [k for k in before if k.endswith("weight")]
    assert weights and all(not torch.equal(before[k], after[k]) for k in weights)  # every discriminator learned
    state = safe_load(tmp_path / "last.pt")
    assert set(state["parts"]) == {"main", "d_adversarial_kd", "d_afd"}
    adam = state["parts"]["d_adversarial_kd"]["optimizer"]
    assert state["parts"]["d_adversarial_kd"]["scheduler"]["base_lrs"] == [pytest.approx(2e-4)]  # DCGAN's Adam
    assert tuple(adam["param_groups"][0]["betas"]) == (0.5, 0.999)
    assert all(int(s["step"]) == 3 for s in adam["state"].values())  # 6 batches, every 2nd
    assert state["parts"]["d_afd"]["optimizer"]["state"]  # SGD with momentum: a buffer per parameter
    assert any(".discriminator" in k for k in state["module"])


def test_the_distiller_refuses_a_loss_whose_discriminator_it_cannot_train():
    import darkknowledge as dk
    from darkknowledge.errors import ConfigError

    student, teacher = nn.Sequential(nn.Linear(6, 4)), nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"losses with a discriminator \(adversarial_kd\)"):
        dk.Distiller(student, teacher, {"kd": {}, "adversarial_kd": {}}, example=torch.randn(3, 6))


@pytest.mark.slow
def test_online_peers_each_get_their_own_discriminator(tmp_path):
    """The survey's case (c): discriminators supervise online distillation between mutual peers."""
    from darkknowledge import commands
    from darkknowledge.config import load_config

    cfg = load_config(
        {
            "name": "afd-mutual",
            "seeds": [0],
            "data": {"name": "mnist1d", "params": {"num_samples": 300}, "batch_size": 60},
            "student": {"name": "cnn1d", "params": {"channels": 4}},
            "losses": {
                "ce": {},
                "kd": {"T": 3.0, "alpha": 1.0},
                "afd": {"weight": 0.1, "student_taps": ["blocks.1"], "teacher_taps": ["blocks.1"]},
            },
            "scheme": {"name": "mutual", "params": {"n": 2}},
            "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.01}, "device": "cpu"},
        }
    )
    out = commands.distill(cfg, out=tmp_path / "run", progress=False)
    state = safe_load(tmp_path / "run" / out["student"]["name"] / "last.pt", map_location="cpu")
    assert set(state["parts"]) == {"main", "d_afd", "d_afd@peer1"}
    assert all(state["parts"][p]["optimizer"]["state"] for p in ("d_afd", "d_afd@peer1"))  # both stepped
