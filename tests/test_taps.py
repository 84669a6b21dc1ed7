import pytest
import torch
from torch import nn

from darkknowledge.errors import TapError
from darkknowledge.taps import FeatureTaps, parse_tap, probe_shapes, validate_taps


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)))


class Shared(nn.Module):
    """Calls the same block twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(self.block(x))


def test_output_input_and_nested_paths():
    net = Net()
    x = torch.randn(2, 4)
    with FeatureTaps(net, ["layer1", "layer2.1", "fc:input"]) as taps:
        out = net(x)
        feats = taps.pop()
    h1 = net.layer1(x)
    h2 = net.layer2(h1)
    assert torch.allclose(feats["layer1"], h1)
    assert torch.allclose(feats["layer2.1"], h2)
    assert torch.allclose(feats["fc:input"], h2)  # the input of fc is layer2's output
    assert out.shape == (2, 3)
    assert feats["layer1"].requires_grad  # student features keep their graph


def test_hooks_removed_on_exit():
    net = Net()
    with FeatureTaps(net, ["layer1"]) as taps:
        pass
    net(torch.randn(2, 4))
    assert taps.features == {}


def test_ddp_prefix_accepted_both_ways():
    assert parse_tap("module.layer3.1.bn2").module == "layer3.1.bn2"
    assert parse_tap("layer3:input").kind == "input"
    net = Net()
    with FeatureTaps(net, ["module.layer1"]) as taps:
        net(torch.randn(2, 4))
        assert "module.layer1" in taps.features


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        net = Net()
        ddp = nn.parallel.DistributedDataParallel(net)
        with FeatureTaps(ddp, ["layer1", "module.layer2"]) as taps:
            ddp(torch.randn(3, 4))
            feats = taps.pop()
        assert feats["layer1"].shape == (3, 6) and feats["module.layer2"].shape == (3, 5)
    finally:
        dist.destroy_process_group()


def test_unknown_path_names_closest():
    with pytest.raises(TapError) as err:
        validate_taps(Net(), ["layer3"])
    msg = str(err.value)
    assert "'layer3'" in msg and "'layer1'" in msg and "'layer2'" in msg
    with pytest.raises(TapError, match="unknown kind"):
        parse_tap("fc:inputs")


def test_module_called_twice_errors_or_lists():
    net = Shared()
    x = torch.randn(2, 4)
    with FeatureTaps(net, ["block"]) as taps:
        with pytest.raises(TapError, match="more than once"):
            net(x)
    with FeatureTaps(net, ["block"], on_repeat="list") as taps:
        net(x)
        feats = taps.pop()["block"]
    assert isinstance(feats, list) and len(feats) == 2
    assert torch.allclose(feats[1], net.block(net.block(x)))
    with FeatureTaps(net, ["block"], on_repeat="last") as taps:
        net(x)
        assert torch.allclose(taps.pop()["block"], feats[1])


def test_probe_shapes_keeps_mode():
    net = Net().train()
    shapes = probe_shapes(net, torch.randn(4, 4), ["layer1", "fc:input"])
    assert shapes == {"layer1": (6,), "fc:input": (5,)}
    assert net.training


def test_inactive_taps_record_nothing():
    net = Net()
    with FeatureTaps(net, ["layer1"]) as taps:
        taps.active = False
        net(torch.randn(2, 4))
        assert taps.features == {}
