"""The U-Net: shapes, where the normalization sits, initialisation, the public API."""

import math

import pytest
import torch
from torch import nn

from seg.norms import NORMS, make_norm
from seg.unet import ConvNormAct, UNet


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shape_and_widths(depth, num_classes):
    model = UNet(in_channels=1, num_classes=num_classes, base_channels=16, depth=depth, norm="gn")
    x = torch.randn(2, 1, 2**depth * 4, 2**depth * 3)
    assert model(x).shape == (2, num_classes, *x.shape[2:])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs[0].out_channels == 16
    assert max(c.out_channels for c in convs) == 16 * 2**depth


def test_default_is_the_paper_network():
    model = UNet()
    assert (model.depth, model.norm) == (4, "bn")
    # 2 convs per level on the way down (5 levels) and up (4 levels) + 4 up-convs, each with a norm
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2 * 5 + 2 * 4 + 4
    assert model(torch.randn(1, 1, 256, 256)).shape == (1, 2, 256, 256)


def test_norm_sits_between_every_conv_and_its_relu():
    """Record the order of module calls: every conv is followed by a norm, then a ReLU."""
    model = UNet(base_channels=16, depth=2, norm="iln")
    calls = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, NORMS["iln"])):
            module.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model(torch.randn(1, 1, 16, 16))
    body = calls[:-1]  # the 1x1 head conv gives logits: no norm, no ReLU
    assert calls[-1] == "Conv2d"
    assert len(body) % 3 == 0 and len(body) == 3 * (2 * 3 + 2 * 2 + 2)
    for i in range(0, len(body), 3):
        assert body[i] in ("Conv2d", "ConvTranspose2d") and body[i + 1] == "InstanceLayerNorm" and body[i + 2] == "ReLU"


def test_none_norm_is_conv_relu():
    model = UNet(depth=1, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert all(isinstance(b, ConvNormAct) for b in [model.down[0].first, model.upsample[0]])


def test_paper_initialisation():
    torch.manual_seed(0)
    model = UNet(base_channels=16, depth=2, norm="bn")
    conv = model.down[2].second.conv_norm.conv  # 3x3, 64 -> 64: 36864 weights
    std = math.sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(std * 0.88, rel=0.05)  # a normal truncated at 2 std
    assert conv.weight.abs().max().item() <= 2 * std + 1e-6
    assert torch.all(conv.bias == 0.1)
    kaiming = UNet(base_channels=16, depth=2, norm="bn", init="kaiming", bias_init=0.0)
    assert torch.all(kaiming.down[2].second.conv_norm.conv.bias == 0)
    with pytest.raises(ValueError, match="unknown initialisation 'xavier'"):
        UNet(init="xavier")


def test_input_size_must_fit_depth():
    model = UNet(depth=3, norm="gn")
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 1, 20, 24))


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown normalization 'foo'; valid names: .*bn.*iln"):
        UNet(norm="foo")


def test_norm_options_reach_every_layer():
    model = UNet(depth=1, norm="gn", norm_options={"groups": 4})
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {4}
    with pytest.raises(ValueError, match="32 channels cannot be split into 12 groups"):
        make_norm("gn", 32, groups=12)
