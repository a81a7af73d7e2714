"""The rewritten layers (one-pass statistics, hand-written backward) against their earlier formulation.

Each reference below is the layer's forward as it was written before it was fused: plain autograd
over full-size intermediates, no custom backward. The rewritten layer must give the same output,
input gradient and parameter gradients in float64, in training and in evaluation, for contiguous
and channels_last input, at the size the U-Net's top level has (2, 16, 256, 256).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize
from seg.norms import Condition, make_conv_norm, make_norm
from seg.norms.kernel import dropped_out
from seg.norms.local import window_counts

SHAPE = (2, 16, 256, 256)
TIGHT = dict(rtol=1e-9, atol=1e-9)
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- the earlier forwards


def frn_reference(layer, x, cond=None):
    nu2 = x.square().mean(dim=(2, 3), keepdim=True)
    y = torch.addcmul(layer.bias[:, None, None], x * torch.rsqrt(nu2 + layer.eps), layer.weight[:, None, None])
    tau = layer.tau[:, None, None]
    return torch.maximum(y, tau) - tau.clamp(max=0)


def group_norm_reference(layer, x, cond=None):
    return F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)


def pn_reference(layer, x, cond=None):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), layer.weight, layer.bias, layer.eps).permute(0, 3, 1, 2)


def _sized(shape, dim, size):
    shape = list(shape)
    shape[dim] = size
    return shape


def window_sums_reference(t, window):
    radius = window // 2
    for dim in (-2, -1):
        length = t.shape[dim]
        prefix = t.cumsum(dim)
        zeros = torch.zeros_like(prefix.narrow(dim, 0, 1)).expand(*_sized(prefix.shape, dim, radius + 1))
        last = prefix.narrow(dim, length - 1, 1).expand(*_sized(prefix.shape, dim, radius))
        padded = torch.cat([zeros, prefix, last], dim)
        t = padded.narrow(dim, 2 * radius + 1, length) - padded.narrow(dim, 0, length)
    return t


def lcn_reference(layer, x, cond=None):
    n, c, h, w = x.shape
    grouped = x.view(n, c // layer.channels_per_group, layer.channels_per_group, h, w)
    centred = grouped - grouped.mean(dim=(2, 3, 4), keepdim=True).detach()
    constant = layer.stop_stat_grad and layer.window < h and layer.window < w
    with torch.no_grad() if constant else contextlib.nullcontext():
        count = window_counts(h, w, layer.window, x.device) * layer.channels_per_group
        mean = window_sums_reference(centred.sum(2), layer.window) / count
        mean_sq = window_sums_reference(centred.square().sum(2), layer.window) / count
        var = (mean_sq - mean.square()).clamp_min(0)
    normalized = (centred - mean.unsqueeze(2)) * torch.rsqrt(var + layer.eps).unsqueeze(2)
    return torch.addcmul(layer.bias[:, None, None], normalized.reshape(n, c, h, w), layer.weight[:, None, None])


def kn_reference(layer, x, cond=None):
    out = F.conv2d(x, layer.weight, None, padding=layer.padding)
    source = dropped_out(x, layer.dropout_p, layer.training)  # the layer's sampler: the same draw under the seed
    box = dict(kernel_size=layer.kernel_size, stride=1, padding=layer.padding, count_include_pad=True)
    mean = F.avg_pool2d(source.sum(1, keepdim=True), **box) / layer.in_channels
    mean_sq = F.avg_pool2d(source.square().sum(1, keepdim=True), **box) / layer.in_channels
    var = (mean_sq - mean.square()).clamp_min(0)
    weight_sums = layer.weight.sum(dim=(1, 2, 3))[None, :, None, None]
    out = (out - mean * weight_sums) * torch.rsqrt(var + layer.eps)
    return out + layer.bias[None, :, None, None]


def resize_reference(m, x, mode="nearest"):
    if m.shape[-2:] == x.shape[-2:]:
        return m
    return F.interpolate(m, size=x.shape[-2:], mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


def modulation_reference(modulation, m):
    hidden = modulation.shared(m)
    return modulation.gamma(hidden), modulation.beta(hidden)


def spade_reference(layer, x, cond):
    gamma, beta = modulation_reference(layer.modulation, resize_reference(cond.image, x).to(x.dtype))
    return layer.norm(x) * (1 + gamma) + beta


def sean_reference(layer, x, cond):
    normalized = layer.norm(layer.add_noise(x))
    gamma_o, beta_o = modulation_reference(layer.modulation, resize_reference(cond.image, x).to(x.dtype))
    codes = cond.region_codes
    if layer.region_fc is not None:
        codes = torch.stack([torch.relu(fc(codes[:, k])) for k, fc in enumerate(layer.region_fc)], dim=1)
    style_map = torch.einsum("nkhw,nkd->ndhw", resize_reference(cond.regions, x, "bilinear"), codes).to(x.dtype)
    gamma_s, beta_s = layer.style_gamma(style_map), layer.style_beta(style_map)
    a_gamma, a_beta = torch.sigmoid(layer.blend_gamma), torch.sigmoid(layer.blend_beta)
    gamma = a_gamma * gamma_s + (1 - a_gamma) * gamma_o
    beta = a_beta * beta_s + (1 - a_beta) * beta_o
    return normalized * (1 + gamma) + beta


# ---------------------------------------------------------------------------- the layers under test


def condition(n, h, w, regions=3, style_dim=8):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(n, regions, h // 4, w // 4, generator=generator, dtype=torch.float64)
    return Condition(image=torch.randn(n, 1, h, w, generator=generator, dtype=torch.float64),
                     regions=torch.softmax(logits, 1),
                     region_codes=torch.randn(n, regions, style_dim, generator=generator, dtype=torch.float64))


def build(name):
    """(layer, reference forward) in float64, with non-trivial parameters."""
    c = SHAPE[1]
    if name == "frn":
        layer = randomize(make_norm("frn", c))
        with torch.no_grad():  # thresholds on both sides of 0, some above most outputs
            layer.tau.copy_(torch.linspace(-1.0, 1.5, c))
        return layer.double(), frn_reference
    if name == "pn":
        return randomize(make_norm("pn", c)).double(), pn_reference
    if name in ("gn", "in", "ln"):  # torch's group norm, except channels_last on the CPU (instance_affine)
        return randomize(make_norm(name, c, **({"groups": 4} if name == "gn" else {}))).double(), group_norm_reference
    if name.startswith("lcn"):
        options = {"lcn": {}, "lcn_window31": {"window": 31}, "lcn_stop": {"window": 31, "stop_stat_grad": True},
                   "lcn_cpg4": {"channels_per_group": 4, "window": 63}}[name]
        return randomize(make_norm("lcn", c, **options)).double(), lcn_reference
    if name == "kn":
        return randomize(make_conv_norm("kn", c, 24, 3)).double(), kn_reference
    if name == "spade":
        return randomize(make_norm("spade", c, hidden=16)).double(), spade_reference
    if name.startswith("sean"):
        options = {"sean": {}, "sean_plain": {"region_fc": False, "noise": False, "base": "in"}}[name]
        layer = randomize(make_norm("sean", c, hidden=16, style_dim=8, num_regions=3, **options)).double()
        return layer, sean_reference
    raise KeyError(name)


# the conv layers' cases take several seconds each (convolutions in float64 at 256x256): the slow tier
LAYERS = ["frn", "pn", "gn", "in", "ln", "lcn", "lcn_window31", "lcn_stop", "lcn_cpg4",
          *(pytest.param(name, marks=pytest.mark.slow) for name in ("kn", "spade", "sean", "sean_plain"))]


def run(layer, forward, x, cond, upstream):
    """Output and gradients (input, then every parameter) of ``forward(layer, x, cond)`` for ``upstream``."""
    torch.manual_seed(5)  # the same dropout / noise draws for both
    x = x.detach().requires_grad_()
    out = forward(layer, x, cond)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)
    return out.detach(), grads


def assert_same(layer, earlier, reference, x, upstream, cond=None, forward=lambda m, t, c: m(t, c)):
    """``layer`` (through ``forward``) and ``reference`` on ``earlier`` (a copy made before either ran): the same
    output and gradients (input, then every parameter) to float64 precision."""
    out, grads = run(layer, forward, x, cond, upstream)
    ref_out, ref_grads = run(earlier, reference, x, cond, upstream)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    assert len(grads) == len(ref_grads)
    for index, (got, want) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"gradient {index}: {m}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_the_rewritten_layer_computes_what_the_earlier_one_did(name, training, fmt):
    torch.manual_seed(0)
    layer, reference = build(name)
    layer = layer.to(memory_format=FORMATS[fmt]).train(training)
    earlier = copy.deepcopy(layer)  # its own running statistics
    x = (torch.randn(SHAPE, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=FORMATS[fmt])
    cond = condition(SHAPE[0], SHAPE[2], SHAPE[3])
    probe = reference(copy.deepcopy(earlier), x, cond)
    upstream = torch.randn(probe.shape, dtype=torch.float64)

    out, grads = run(layer, lambda m, t, c: m(t, c), x, cond, upstream)
    ref_out, ref_grads = run(earlier, reference, x, cond, upstream)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    if name == "pn":  # the earlier pn returned a channels_last tensor for a contiguous one; now x's format
        assert out.is_contiguous(memory_format=FORMATS[fmt])
    else:
        assert out.stride() == ref_out.stride()  # stored as before: the next layer sees the same memory format
    names = ["input"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for label, got, want in zip(names, grads, ref_grads):
        if want is None:
            assert got is None or not got.any(), label
            continue
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"{label}: {m}")
    for (label, buffer), (_, want) in zip(layer.named_buffers(), earlier.named_buffers()):
        torch.testing.assert_close(buffer, want, **TIGHT, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("tau", [0.0, -0.5, 0.7], ids=["tau0", "tau_negative", "tau_positive"])
def test_frn_splits_the_gradient_at_ties_as_torch_maximum_does(tau):
    """Where y = tau exactly (x = 0 with beta = tau: dead inputs at initialisation, where beta = tau = 0),
    torch.maximum gives half the gradient to each side; the rewritten backward must too."""
    torch.manual_seed(0)
    layer = randomize(make_norm("frn", SHAPE[1])).double()
    with torch.no_grad():
        layer.tau.fill_(tau)
        layer.bias.fill_(tau)
    x = torch.randn(SHAPE, dtype=torch.float64)
    x[:, :, :128] = 0  # half of every map: y = beta = tau
    upstream = torch.randn(SHAPE, dtype=torch.float64)
    assert_same(layer, copy.deepcopy(layer), frn_reference, x, upstream)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 8, 128, 128), (3, 8, 24, 20)], ids=["plane-blocks", "small"])
def test_kn_at_other_sizes_computes_what_the_earlier_one_did(shape, training, fmt):
    """kn's channel sums go one block of channel planes at a time (several images per block at 128 x 128,
    the last block short) or, for small inputs, through full-size temporaries: both against the plain form."""
    torch.manual_seed(0)
    layer = randomize(make_conv_norm("kn", shape[1], 6, 3)).double().to(memory_format=FORMATS[fmt]).train(training)
    earlier = copy.deepcopy(layer)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=FORMATS[fmt])
    upstream = torch.randn(shape[0], 6, *shape[2:], dtype=torch.float64)
    assert_same(layer, earlier, kn_reference, x, upstream, forward=lambda m, t, c: m(t))


# map sizes of the U-Net's deeper levels and odd shapes: windows larger than the map, windows that span it
# (group norm computes the layer there), one channel per group (no scratch room in the output), stop_stat_grad
LCN_SMALL = [((2, 8, 16, 16), {}), ((2, 8, 64, 64), {}), ((2, 8, 128, 128), {}), ((2, 8, 16, 16), {"window": 29}),
             ((2, 6, 24, 40), {"window": 31, "channels_per_group": 3}), ((2, 4, 20, 12), {"window": 5}),
             ((2, 4, 33, 17), {"window": 7, "channels_per_group": 1}), ((1, 4, 40, 40), {"window": 9, "stop_stat_grad": True})]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,options", LCN_SMALL, ids=[f"{s[2]}x{s[3]}-{o}" for s, o in LCN_SMALL])
def test_lcn_computes_what_the_earlier_one_did_at_other_sizes(shape, options, training, fmt):
    torch.manual_seed(0)
    layer = randomize(make_norm("lcn", shape[1], **options)).double().train(training)
    earlier = copy.deepcopy(layer)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=FORMATS[fmt])
    upstream = torch.randn(shape, dtype=torch.float64)
    assert_same(layer, earlier, lcn_reference, x, upstream)


def test_kn_on_constant_windows_clamps_the_variance_as_the_earlier_one_did():
    """Constant windows whose E[x^2] - E[x]^2 rounds below 0 (the variance clamped to 0, no gradient
    through the clamp): half of the image constant, the other half noise."""
    torch.manual_seed(0)
    layer = randomize(make_conv_norm("kn", 8, 6, 3)).double().eval()
    scale = torch.arange(1, 3, dtype=torch.float64)[:, None, None, None] * 0.37
    x = torch.full((2, 8, 40, 40), 1 / 3, dtype=torch.float64) * scale
    x[:, :, :20] += torch.randn(2, 8, 20, 40, dtype=torch.float64)
    box = dict(kernel_size=3, stride=1, padding=1)
    mean = F.avg_pool2d(x.sum(1, keepdim=True), **box) / 8
    assert (F.avg_pool2d(x.square().sum(1, keepdim=True), **box) / 8 < mean.square()).any()
    upstream = torch.randn(2, 6, 40, 40, dtype=torch.float64)
    assert_same(layer, copy.deepcopy(layer), kn_reference, x, upstream, forward=lambda m, t, c: m(t))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [1, 5])
def test_kn_with_other_kernel_sizes_computes_what_the_earlier_one_did(size, training):
    torch.manual_seed(0)
    layer = randomize(make_conv_norm("kn", 8, 6, size)).double().train(training)
    x = torch.randn(3, 8, 130, 40, dtype=torch.float64) * 2 + 0.5
    upstream = torch.randn(3, 6, 130, 40, dtype=torch.float64)
    assert_same(layer, copy.deepcopy(layer), kn_reference, x, upstream, forward=lambda m, t, c: m(t))
