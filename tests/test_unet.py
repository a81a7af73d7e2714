"""The U-Net: shapes, where the normalization sits, initialisation, the public API."""

import math

import pytest
import torch
from torch import nn

from seg.norms import NORMS, make_norm, names, register_monai, spec
from seg.norms.fused import _SINGLE_PASS_MIN_NUMEL
from seg.model.unet import ConvNormAct, UNet


@pytest.mark.parametrize("depth", [1, 2, pytest.param(4, marks=pytest.mark.slow)])  # depth 4: 256-channel weights, seconds
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shape_and_widths(depth, num_classes):
    model = UNet(in_channels=1, num_classes=num_classes, base_channels=16, depth=depth, norm="gn")
    x = torch.randn(2, 1, 2**depth * 4, 2**depth * 3)
    assert model(x).shape == (2, num_classes, *x.shape[2:])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs[0].out_channels == 16
    assert max(c.out_channels for c in convs) == 16 * 2**depth


@pytest.mark.slow
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


# ---------------------------------------------------------------------------- every layer before an in-place activation
#
# The fused layers (seg/norms/fused.py) take a faster CPU route for contiguous tensors of at least
# _SINGLE_PASS_MIN_NUMEL elements. Both U-Nets below are sized so that their first level (16
# channels, full resolution) is at or above that threshold and their deepest level below it: one
# training step crosses both routes, each output then modified in place by the network's own
# activation (the U-Net's ReLU(inplace=True), BasicUNet's LeakyReLU(inplace=True)).

FUSED_PATH_MIN_NUMEL = _SINGLE_PASS_MIN_NUMEL  # 2**16 today
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


def smallest_side(batch: int, channels: int, multiple: int) -> int:
    """The smallest image side, a multiple of ``multiple``, with batch * channels * side**2 >= the threshold."""
    side = multiple
    while batch * channels * side * side < FUSED_PATH_MIN_NUMEL:
        side += multiple
    return side


def train_step(model, x, *args):
    out = model(x, *args)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", names())
def test_every_layer_trains_before_the_unets_in_place_relu_on_both_cpu_routes(name, memory_format, one_thread):
    batch, base, depth = 2, 16, 1
    side = smallest_side(batch, base, 2**depth)
    assert batch * base * side**2 >= FUSED_PATH_MIN_NUMEL > batch * 2 * base * (side // 2)**2
    torch.manual_seed(0)
    options = {"hidden": 16} if "hidden" in spec(name).options else None  # the modulation's width does not matter here
    model = UNet(norm=name, base_channels=base, depth=depth, num_domains=2, norm_options=options)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 1, side, side).contiguous(memory_format=memory_format)
    train_step(model, x, torch.tensor([0, 1]))  # domain ids: read by cin, ignored by the rest


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last"])
def test_monai_basic_unet_trains_with_every_bridged_layer_on_both_cpu_routes(memory_format, one_thread):
    from monai.networks.nets import BasicUNet

    features = (16, 16, 32, 32, 64, 16)
    batch, levels = 2, 4  # BasicUNet pools 4 times
    side = smallest_side(batch, features[0], 2**levels)
    assert batch * features[0] * side**2 >= FUSED_PATH_MIN_NUMEL > batch * features[4] * (side // 2**levels)**2
    registered = register_monai()
    assert registered == names(fits_monai=True)
    for name in registered:
        torch.manual_seed(0)
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=features, norm=name)
        assert any(isinstance(m, nn.LeakyReLU) and m.inplace for m in net.modules())
        net = net.to(memory_format=memory_format)
        x = torch.randn(batch, 1, side, side).contiguous(memory_format=memory_format)
        try:
            train_step(net, x)
        except RuntimeError as error:
            pytest.fail(f"BasicUNet(norm={name!r}), {memory_format}: {error}")
