"""Every feature and relation method trains on mismatched zoo pairs and on user-defined models."""

import math

import pytest
import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.describe import explain_loss, list_losses_text
from darkknowledge.errors import ConfigError
from darkknowledge.losses import LOSSES, list_losses
from darkknowledge.losses.base import SetupInfo
from darkknowledge.losses.objective import Objective
from darkknowledge.models import create_model
from darkknowledge.pairs import align_by_depth, propose_pairs
from darkknowledge.schemes.offline import offline_task

FEATURE_METHODS = [n for n in list_losses() if LOSSES.get(n).knowledge in ("feature", "relation")]

PAIRS = {
    # same family, same widths, different depth (CRD's res32x4 -> res8x4)
    "resnet32x4->resnet8x4": ("resnet32x4", "resnet8x4", (3, 16, 16)),
    # different family: wide-resnet stages (32,64,128 ch at 16,8,4 px) -> plain CNN (8,16 ch at 8,4 px)
    "wrn_16_2->cnn2d": ("wrn_16_2", "cnn2d", (3, 16, 16)),
    # one student stage (8 ch, 8x8 px) against the teacher's last (128 ch, 4x4 px): channels and size differ
    "wrn_16_2->cnn2d_shallow": ("wrn_16_2", "cnn2d_shallow", (3, 16, 16)),
}
CNN2D = {"cnn2d": {"channels": (8, 16), "hidden": 32}, "cnn2d_shallow": {"channels": (8,), "hidden": 32}}


def _step(student, teacher, x, losses):
    torch.manual_seed(0)
    batch = Batch(x, torch.arange(len(x)) % 10, torch.arange(len(x)))
    scheme = offline_task(student, Objective.from_config(losses), teacher)
    scheme.setup(batch, SetupInfo(num_samples=64, batch_size=len(x)))
    scheme.prepare([batch])  # losses with a pre-training stage run it on this one batch
    module = scheme.module.train()
    loss, terms = module(batch, 0.0)  # the frozen teacher runs inside the step
    loss.backward()
    return scheme, loss, terms


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_method_trains_on_mismatched_zoo_pair(name, pair):
    t_name, s_name, shape = PAIRS[pair]
    kw = {"num_classes": 10, "input_shape": shape}
    teacher = create_model(t_name, **kw)
    student = create_model(s_name.replace("_shallow", ""), **kw, **CNN2D.get(s_name, {}))
    if name == "fsp" and s_name == "cnn2d_shallow":  # FSP relates two layers: a one-stage student has no flow
        with pytest.raises(ConfigError, match="FSP needs at least 2 tap pairs"):
            _step(student, teacher, torch.randn(8, *shape), {name: {}})
        return
    scheme, loss, terms = _step(student, teacher, torch.randn(8, *shape), {name: {}})
    assert math.isfinite(loss.item()) and set(terms) == {name}
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in scheme.module.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


class UserNet(nn.Module):
    """A hand-written model outside the zoo: no feature_taps(), no 'fc'."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.classifier(self.pool(self.body(self.stem(x))).flatten(1))


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_method_works_on_user_models_given_module_paths(name):
    teacher, student = UserNet(16), UserNet(4)
    x = torch.randn(8, 1, 8, 8)
    from darkknowledge.losses.feature import FeatureLoss

    cls = LOSSES.get(name)
    if issubclass(cls, FeatureLoss) and cls.default_taps == "penultimate":
        taps = {"student_taps": ["classifier:input"], "teacher_taps": ["classifier:input"]}
    elif issubclass(cls, FeatureLoss) and cls.default_taps == "last_stage":
        taps = {"student_taps": ["body"], "teacher_taps": ["body"]}
    else:
        taps = {"student_taps": ["stem", "body"], "teacher_taps": ["stem", "body"]}
    _, loss, _ = _step(student, teacher, x, {name: taps})
    assert math.isfinite(loss.item())


def test_layer_pairs_for_models_outside_the_zoo():
    pairs = propose_pairs(UserNet(4), UserNet(16), torch.zeros(2, 1, 8, 8))
    assert [(p[0], p[1]) for p in pairs] == [("stem", "stem"), ("body", "body")]
    assert pairs[0][2] == (4, 8, 8) and pairs[0][3] == (16, 8, 8)
    assert align_by_depth(["a", "b"], ["1", "2", "3", "4"]) == (["a", "b"], ["2", "4"])


def test_every_method_is_listed_and_explained():
    listed = "\n".join(list_losses_text())
    for name in list_losses():
        assert f"  {name} " in listed
        text = explain_loss(name)
        assert LOSSES.get(name).citation in text and "parameters" in text
