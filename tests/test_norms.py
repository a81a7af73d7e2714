"""The normalization layers against independent references, forward and backward, train and eval.

References: torch's own BatchNorm2d / InstanceNorm2d / GroupNorm for bn, in, ln, gn; the official
SwitchNorm2d (tests/official.py) for sn; "KernelNorm on unfolded windows, then the
convolution" for kn; the formulas of docs/layers.md written naively here for bin, iln, pn, lcn and bkn.
Comparisons run in float64 so that tolerances can be tight.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import official
from conftest import ROOT, compose_train, randn, randomize
from seg.training.checks import validate
from seg.config.launch import register_configs
from seg.norms import NORMS, layer_spec, make_conv_norm, make_norm, names, register_monai, spec
from seg.norms.fused import (_SINGLE_PASS_MIN_NUMEL, _InstanceAffine, instance_affine_reference, instance_moments,
                             product_sums, scale_shift)
from seg.norms.kernel import dropout_mask
from seg.norms.kalman import PRIOR_ATTRIBUTE, KalmanConvNorm, rectified_gaussian_moments
from seg.training.optimizers import build_optimizer
from seg.model.unet import UNet

CONDITIONAL = names("conditional")  # need a Condition: tested in test_conditional.py
ALL = sorted(set(names()) - set(CONDITIONAL))
PAIR_ONLY = names("conv_pair")  # replace the conv + norm pair; no standalone layer
POST_CONV = names("post_conv")
TIGHT = dict(rtol=1e-9, atol=1e-10)

register_configs()
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- helpers


def value_and_grads(fn, inputs):
    """fn's output and the gradients of a fixed random projection of it with respect to ``inputs``."""
    out = fn()
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)
    return out, grads


def assert_same(fn, reference, inputs, **tolerance):
    out, grads = value_and_grads(fn, inputs)
    ref_out, ref_grads = value_and_grads(reference, inputs)
    torch.testing.assert_close(out, ref_out, **(tolerance or TIGHT))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **(tolerance or TIGHT))


def bn_naive(x, mean, var, eps=1e-5):
    return (x - mean) / torch.sqrt(var + eps)


def batch_moments(x):
    return x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)


def instance_moments_naive(x):
    return x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)


def per_channel(t):
    return t.view(1, -1, 1, 1)


def compose_norm(name):
    return compose_train(f"norm={name}")


# ---------------------------------------------------------------------------- registry


def declared_layers_in_the_source() -> dict[str, bool]:
    """Every class of seg/norms that declares a ``kind``, by name: whether it is decorated with
    ``register_norm`` (read from the source, so nothing is imported)."""
    found = {}
    for path in sorted((ROOT / "seg" / "norms").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "kind" for t in s.targets)
                    for s in node.body):
                found[f"{path.stem}.{node.name}"] = any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register_norm"
                    for d in node.decorator_list)
    return found


@pytest.mark.slow
def test_importing_the_package_registers_every_layer_of_its_modules():
    """No list of modules to keep up to date: a fresh ``import seg.norms`` registers every class of the
    package that declares a kind, and every such class is registered."""
    declared = declared_layers_in_the_source()
    assert declared and all(declared.values()), [name for name, registered in declared.items() if not registered]
    fresh = subprocess.run([sys.executable, "-c", "import seg.norms as n; "
                            "print(*(c.__module__.split('.')[-1] + '.' + c.__name__ for c in n.NORMS.values()))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    classes = set(fresh.stdout.split())
    assert classes == set(declared)


@pytest.mark.parametrize("name", names())
def test_each_layer_config_states_exactly_its_options_with_their_defaults(name):
    """configs/norm/<name>.yaml exposes the options of the layer's signature (less the sizes the
    U-Net fills in), each with the signature's default and of the same type."""
    path = ROOT / "configs" / "norm" / f"{name}.yaml"
    assert path.is_file(), f"norm={name} has no {path.relative_to(ROOT)}"
    config = OmegaConf.to_container(OmegaConf.load(path))
    assert config.pop("name", None) == name
    declared = dict(spec(name).options)
    assert sorted(config) == sorted(declared), f"{path.name}: options differ from the signature of {name}"
    for key, default in declared.items():
        assert (type(config[key]), config[key]) == (type(default), default), f"{path.name}: {key}"


def test_every_norm_config_is_a_registered_layer():
    assert sorted(path.stem for path in (ROOT / "configs" / "norm").glob("*.yaml")) == names()


def test_every_layer_is_of_one_kind_and_the_registry_refuses_unknown_questions():
    assert sorted(name for kind in ("post_conv", "conv_pair", "conditional") for name in names(kind)) == names()
    assert names(can_sync=True) == sorted(set(names(can_sync=True)) & set(names(batch_statistics=True)))
    assert names(fits_monai=True) == names("post_conv")
    assert set(names(needs_domain=True)) <= set(CONDITIONAL)
    with pytest.raises(ValueError, match="unknown kind of normalization 'pair'; kinds: post_conv, conv_pair"):
        names("pair")
    with pytest.raises(TypeError, match="no capability 'sync'; ask about: can_sync, batch_statistics"):
        names(sync=True)


def test_registry_refuses_unknown_names_and_options():
    with pytest.raises(ValueError, match=rf"unknown normalization 'foo'; valid names: {', '.join(names())}$"):
        make_norm("foo", 16)
    with pytest.raises(ValueError, match=r"'sn' has no option 'rho'; its options are: eps, momentum, unbiased"):
        make_norm("sn", 16, rho=1.0)
    with pytest.raises(TypeError, match=r"norm option 'window' of 'lcn' must be an integer"):
        make_norm("lcn", 16, window=7.5)
    with pytest.raises(TypeError, match=r"norm option 'freeze' of 'bn' must be true/false"):
        make_norm("bn", 16, freeze="yes")
    with pytest.raises(ValueError, match=r"'kn' has no option 'groups'"):
        make_conv_norm("kn", 16, 16, 3, groups=4)


class Halve(nn.Module):
    """A post-conv layer that follows the protocol, registered nowhere: x * factor."""

    kind = "post_conv"

    def __init__(self, num_channels: int, factor: float = 0.5):
        super().__init__()
        self.factor = factor

    def forward(self, x, cond=None):
        return x * self.factor


def test_a_class_or_a_partial_is_taken_in_place_of_a_name():
    gn4 = functools.partial(NORMS["gn"], groups=4)
    assert make_norm(gn4, 16).num_groups == 4 and make_norm(gn4, 16, groups=8).num_groups == 8
    model = UNet(norm=gn4, base_channels=16, depth=1)
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {4}
    assert spec(NORMS["iln"]) is spec("iln") and spec(gn4) is spec("gn")

    assert "Halve" not in NORMS and spec(Halve).options == {"factor": 0.5} and spec(Halve).kind == "post_conv"
    pair = make_conv_norm(Halve, 2, 3, 3, factor=0.25)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(pair(x), pair.conv(x) * 0.25)
    assert isinstance(UNet(norm=Halve, depth=1).down[0].first.conv_norm.norm, Halve)
    with pytest.raises(ValueError, match="'Halve' has no option 'groups'; its options are: factor"):
        make_norm(Halve, 4, groups=2)
    with pytest.raises(TypeError, match="'kn' replaces the convolution"):
        make_norm(functools.partial(NORMS["kn"], eps=1e-3), 4)
    with pytest.raises(TypeError, match="by keyword only"):
        make_norm(functools.partial(Halve, 4), 4)


def init_without_defaults(self, num_channels: int, eps: float):
    pass


def init_with_sync(self, num_channels: int, sync: bool = False):
    pass


@pytest.mark.parametrize(("declared", "message"), [
    ({"kind": "after_conv"},
     "kind = 'after_conv'; a layer declares its kind, one of: post_conv, conv_pair, conditional"),
    ({"kind": "conv_pair"}, "a conv_pair layer, and only a conv_pair layer, defines the classmethod conv_norm"),
    ({"conv_norm": classmethod(lambda cls, i, o, k, *, transpose: None)}, "only a conv_pair layer, defines"),
    ({"kind": "conditional"}, "a conditional layer, and only a conditional layer, names what it reads"),
    ({"kind": "conditional", "condition_inputs": ("vendor",)}, "condition_inputs names vendor, which a Condition"),
    ({"batch_statistics": 1}, "batch_statistics must be True or False, got 1"),
    ({"can_sync": True, "batch_statistics": True}, "declares can_sync exactly when it takes the option sync"),
    ({"__init__": init_with_sync, "batch_statistics": True}, "declares can_sync exactly when it takes the option sync"),
    ({"__init__": init_with_sync, "can_sync": True}, "can_sync without batch_statistics"),
    ({"__init__": init_without_defaults}, "option 'eps' must be a keyword with a default"),
    ({"kind": "conditional", "condition_inputs": ("style",),
      "conditioner": classmethod(lambda cls, image_channels, num_classes, *, width, **_: None)},
     "the conditioner's options width are not the layer's options"),
    ({"conditioner": classmethod(lambda cls, image_channels, num_classes, **_: None)},
     "only a conditional layer has a conditioner"),
])
def test_a_layer_whose_declarations_contradict_each_other_is_refused(declared, message):
    assert layer_spec(Halve).kind == "post_conv"
    with pytest.raises(TypeError, match=re.escape(message)):
        layer_spec(type("Bad", (Halve,), declared), "bad")


@pytest.mark.parametrize("name", PAIR_ONLY)
def test_pair_only_layers_say_how_to_build_them(name):
    with pytest.raises(TypeError, match=rf"{name!r} replaces the convolution \+ normalization pair.*make_conv_norm"):
        make_norm(name, 16)


@pytest.mark.parametrize("name", ALL)
def test_every_norm_config_composes_and_builds(name):
    """configs/norm/<name>.yaml through the real Hydra config: valid options, a working pair."""
    cfg = compose_norm(name)
    validate(cfg)
    options = {k: v for k, v in OmegaConf.to_container(cfg.norm).items() if k != "name"}
    pair = make_conv_norm(name, 16, 16, 3, **options)
    assert pair(torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)


@pytest.mark.parametrize(("name", "channels", "message"), [
    ("gn", 24, "gn: 24 channels cannot be split into 16 groups"),
    ("iln", 8, "iln: 8 channels cannot be split into 16 groups"),
    ("lcn", 15, "lcn: 15 channels cannot be split into groups of 2 channels"),
])
def test_channel_counts_that_groups_do_not_divide_are_refused(name, channels, message):
    with pytest.raises(ValueError, match=message):
        make_norm(name, channels)


# ---------------------------------------------------------------------------- bn, in, ln, gn: torch's own


@pytest.mark.parametrize("shape", [(4, 6, 7, 9), (1, 6, 5, 5)])
def test_bn_is_torch_batchnorm(shape):
    ours, ref = make_norm("bn", 6).double(), nn.BatchNorm2d(6).double()
    randomize(ours)
    ref.load_state_dict(ours.state_dict())
    for _ in range(2):  # train (updates the running statistics), then once more
        x = randn(*shape, scale=2, shift=1)
        assert_same(lambda: ours(x), lambda: ref(x), [x])
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **TIGHT)
        torch.testing.assert_close(ours.running_var, ref.running_var, **TIGHT)
    ours.eval(), ref.eval()
    x = randn(*shape)
    assert_same(lambda: ours(x), lambda: ref(x), [x])


def test_bn_parameter_gradients_match_torch():
    ours, ref = randomize(make_norm("bn", 6).double()), nn.BatchNorm2d(6).double()
    ref.load_state_dict(ours.state_dict())
    x = randn(3, 6, 7, 9)
    _, grads = value_and_grads(lambda: ours(x), [ours.weight, ours.bias])
    _, ref_grads = value_and_grads(lambda: ref(x), [ref.weight, ref.bias])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize(("name", "reference"), [
    ("in", lambda c: nn.InstanceNorm2d(c, affine=True)),
    ("ln", lambda c: nn.GroupNorm(1, c)),
    ("gn", lambda c: nn.GroupNorm(16, c)),
])
@pytest.mark.parametrize("train", [True, False])
def test_in_ln_gn_are_torch_layers(name, reference, train):
    ours, ref = randomize(make_norm(name, 32).double()), reference(32).double()
    ref.load_state_dict(ours.state_dict())
    ours.train(train), ref.train(train)
    x = randn(2, 32, 7, 9, scale=3, shift=-1)
    assert_same(lambda: ours(x), lambda: ref(x), [x])
    _, grads = value_and_grads(lambda: ours(x), [ours.weight, ours.bias])
    _, ref_grads = value_and_grads(lambda: ref(x), [ref.weight, ref.bias])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TIGHT)


def test_frozen_bn_is_a_fixed_linear_layer():
    """BN*: loaded from a trained BN, it uses the running statistics and never updates them."""
    trained = make_norm("bn", 6).double()
    for _ in range(3):
        trained(randn(4, 6, 5, 5, scale=2, shift=1))
    randomize(trained)
    frozen = make_norm("bn", 6, freeze=True).double()
    frozen.load_state_dict(trained.state_dict())  # what model.init_from does
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()
    x = randn(4, 6, 5, 5)
    mean, var = per_channel(trained.running_mean), per_channel(trained.running_var)
    expected = lambda: bn_naive(x, mean, var) * per_channel(trained.weight) + per_channel(trained.bias)  # noqa: E731
    assert_same(lambda: frozen(x), expected, [x])
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key
    trainable = make_norm("bn", 6, freeze=True, freeze_affine=False)
    assert trainable.weight.requires_grad and trainable.bias.requires_grad


def test_frozen_bn_in_the_unet_after_loading_a_bn_checkpoint():
    source = UNet(norm="bn", base_channels=16, depth=1)
    source(torch.randn(2, 1, 16, 16))  # some running statistics
    model = UNet(norm="bn", norm_options={"freeze": True}, base_channels=16, depth=1)
    model.load_state_dict(source.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(m.weight.grad is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_sync_bn_without_distributed_is_bn(tmp_path):
    ours, ref = make_norm("bn", 6, sync=True).double(), nn.BatchNorm2d(6).double()
    x = randn(4, 6, 5, 5, shift=2)
    assert_same(lambda: ours(x), lambda: ref(x), [x])
    # a one-process group: still plain BN (synchronizing needs more than one process)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert_same(lambda: ours(x), lambda: ref(x), [x])
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **TIGHT)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- bin


def bin_naive(x, layer, running=None):
    """docs/layers.md: (rho BN(x) + (1 - rho) IN(x)) gamma + beta, BN from running statistics in eval."""
    mean_bn, var_bn = batch_moments(x) if running is None else running
    bn = bn_naive(x, mean_bn, var_bn, layer.eps)
    inst = bn_naive(x, *instance_moments_naive(x), layer.eps)
    rho = per_channel(layer.rho)
    return (rho * bn + (1 - rho) * inst) * per_channel(layer.weight) + per_channel(layer.bias)


@pytest.mark.parametrize("shape", [(4, 6, 7, 9), (1, 6, 7, 9)])
def test_bin_matches_the_formula_and_keeps_bn_running_stats(shape):
    layer = randomize(make_norm("bin", 6).double())
    with torch.no_grad():
        layer.rho.copy_(torch.linspace(0, 1, 6))
    bn = nn.BatchNorm2d(6).double()  # the running statistics are exactly torch's
    params = [layer.rho, layer.weight, layer.bias]
    for _ in range(2):
        x = randn(*shape, scale=2, shift=1)
        assert_same(lambda: layer(x), lambda: bin_naive(x, layer), [x, *params])
        bn(x)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, **TIGHT)
        torch.testing.assert_close(layer.running_var, bn.running_var, **TIGHT)
    layer.eval()
    x = randn(*shape)
    running = (per_channel(layer.running_mean), per_channel(layer.running_var))
    assert_same(lambda: layer(x), lambda: bin_naive(x, layer, running), [x, *params])


def test_bin_rho_is_clipped_after_a_step_and_has_its_own_optimizer_group():
    model = UNet(norm="bin", base_channels=16, depth=1)
    optim_cfg = OmegaConf.create({"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False})
    optimizer = build_optimizer(model, optim_cfg)
    rhos = [m.rho for m in model.modules() if isinstance(m, NORMS["bin"])]
    rho_group = next(g for g in optimizer.param_groups if any(p is rhos[0] for p in g["params"]))
    assert {id(p) for p in rho_group["params"]} == {id(r) for r in rhos}
    assert rho_group["lr"] == pytest.approx(1.0) and rho_group["weight_decay"] == 0.0
    other = [g for g in optimizer.param_groups if g is not rho_group]
    assert all(g["lr"] == pytest.approx(0.1) and g["weight_decay"] == 1e-4 for g in other)

    for rho in rhos:
        rho.grad = torch.full_like(rho, -50.0)  # pushes rho far above 1
    optimizer.step()
    assert all((rho > 1).all() for rho in rhos)
    for layer in model.modules():
        if hasattr(layer, "after_optimizer_step"):
            layer.after_optimizer_step()
    assert all(torch.equal(rho, torch.ones_like(rho)) for rho in rhos)
    with torch.no_grad():
        rhos[0].fill_(-0.3)
    next(m for m in model.modules() if isinstance(m, NORMS["bin"])).after_optimizer_step()
    assert torch.equal(rhos[0], torch.zeros_like(rhos[0]))
    assert make_norm("bin", 4, rho_lr_scale=3.0).rho.optim_group == {"lr_scale": 3.0, "weight_decay": 0.0}


def test_bin_is_not_a_batchnorm_subclass():
    """convert_sync_batchnorm replaces _BatchNorm subclasses and would drop rho."""
    model = nn.Sequential(make_norm("bin", 4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], NORMS["bin"])


# ---------------------------------------------------------------------------- iln


def iln_naive(x, layer):
    """Seed-style ILN: IN and LN each computed, mixed by sigmoid(rho), then torch's GroupNorm."""
    inst = bn_naive(x, *instance_moments_naive(x), layer.eps)
    mean_ln, var_ln = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)
    s = torch.sigmoid(per_channel(layer.rho))
    mixed = s * inst + (1 - s) * bn_naive(x, mean_ln, var_ln, layer.eps)
    return F.group_norm(mixed, layer.groups, eps=layer.eps) * per_channel(layer.weight) + per_channel(layer.bias)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(3, 32, 7, 9), (1, 32, 5, 5)])
def test_iln_matches_the_three_step_formula(train, shape):
    layer = randomize(make_norm("iln", 32).double()).train(train)
    x = randn(*shape, scale=2, shift=3)
    assert_same(lambda: layer(x), lambda: iln_naive(x, layer), [x, layer.rho, layer.weight, layer.bias])
    assert set(layer.mixing_weights()) == {"sigmoid_rho"}


def rho_gradient(channels, groups, eps=1e-5, rho=None):
    """Output and the gradient of rho (of a fixed random projection of the output) of one ILN layer, float64."""
    torch.manual_seed(3)
    layer = randomize(make_norm("iln", channels, groups=groups, eps=eps).double())
    if rho is not None:
        with torch.no_grad():
            layer.rho.copy_(rho)
    x = randn(2, channels, 9, 11, scale=2, shift=1)
    out, (grad,) = value_and_grads(lambda: layer(x), [layer.rho])
    return out, grad


def test_iln_rho_has_no_effect_where_channels_equal_groups():
    """16 channels in 16 groups: the output is IN(x) whatever rho is (exactly without eps), and rho's gradient
    vanishes; with 32 channels (2 per group) it does not. The layer says so in ``mixing_weights_inert``."""
    rho_a, rho_b = torch.zeros(16, dtype=torch.float64), torch.linspace(-3, 3, 16, dtype=torch.float64)
    out_a, grad = rho_gradient(16, 16, eps=0.0, rho=rho_a)
    out_b, _ = rho_gradient(16, 16, eps=0.0, rho=rho_b)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-12)
    assert grad.abs().max() < 1e-10
    _, grad_with_eps = rho_gradient(16, 16)
    _, effective = rho_gradient(32, 16)
    assert grad_with_eps.abs().max() < 1e-3 * effective.abs().max()
    assert make_norm("iln", 16).mixing_weights_inert == "rho has no effect (channels = groups)"
    assert make_norm("iln", 32).mixing_weights_inert is None


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_iln_rho_acts_at_16_channels_with_fewer_groups(groups):
    """groups 1, 2, 4, 8 divide every U-Net width (16 * 2^level) and leave two or more channels per group."""
    _, grad = rho_gradient(16, groups)
    _, effective = rho_gradient(32, 16)
    assert grad.abs().max() > 1e-2 * effective.abs().max()
    assert make_norm("iln", 16, groups=groups).mixing_weights_inert is None


# ---------------------------------------------------------------------------- sn: the official code


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 7, 9), (1, 6, 7, 9)])
def test_sn_matches_the_official_switchnorm(unbiased, shape):
    ours = make_norm("sn", 6, unbiased=unbiased).double()
    ref = official.SwitchNorm2d(6, unbiased=unbiased).double()
    with torch.no_grad():
        for module in (ours, ref):
            module.weight.copy_(torch.linspace(0.5, 1.5, 6).view_as(module.weight))
            module.bias.copy_(torch.linspace(-1, 1, 6).view_as(module.bias))
            module.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.9]))
            module.var_weight.copy_(torch.tensor([-0.4, 0.8, 0.1]))
    ours_params = [ours.weight, ours.bias, ours.mean_weight, ours.var_weight]
    ref_params = [ref.weight, ref.bias, ref.mean_weight, ref.var_weight]
    for train in (True, True, False):  # two training steps (running statistics move), then eval
        ours.train(train), ref.train(train)
        x = randn(*shape, scale=2, shift=1)
        out, grads = value_and_grads(lambda: ours(x), [x, *ours_params])
        ref_out, ref_grads = value_and_grads(lambda: ref(x), [x, *ref_params])
        torch.testing.assert_close(out, ref_out, **TIGHT)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad.view_as(grad), **TIGHT)
        torch.testing.assert_close(ours.running_mean, ref.running_mean.flatten(), **TIGHT)
        torch.testing.assert_close(ours.running_var, ref.running_var.flatten(), **TIGHT)
    weights = ours.mixing_weights()
    assert set(weights) == {"mean_in", "mean_ln", "mean_bn", "var_in", "var_ln", "var_bn"}
    torch.testing.assert_close(sum(weights[f"mean_{k}"] for k in ("in", "ln", "bn")).item(), 1.0)


def test_sn_starts_with_equal_weights_and_zero_running_stats():
    layer = make_norm("sn", 4)
    assert all(v.item() == pytest.approx(1 / 3) for v in layer.mixing_weights().values())
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.zeros(4))


# ---------------------------------------------------------------------------- the fused one-pass kernel


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iln", "bin", "sn"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_backward_passes_gradcheck(name, train):
    layer = randomize(make_norm(name, 16).double()).train(train)
    if name == "sn":
        coefficients = functools.partial(layer.coefficients, 15)
        params = [layer.mean_weight, layer.var_weight, layer.weight, layer.bias]
    else:
        coefficients, params = layer.coefficients, [p for p in (getattr(layer, "rho", None), layer.weight,
                                                               layer.bias) if p is not None]
    running = [] if train or name == "iln" else [layer.running_mean + 0.3, layer.running_var + 0.5]
    x = randn(2, 16, 3, 5, scale=2, shift=1)

    def fused(x, *params):
        return _InstanceAffine.apply(x, coefficients, *params, *running)[0]

    assert torch.autograd.gradcheck(fused, (x, *params))
    # and equal to the plain autograd formulation
    assert_same(lambda: fused(x, *params), lambda: instance_affine_reference(x, coefficients, *params, *running)[0],
                [x, *params])


def test_fused_statistics_outputs_are_differentiable():
    """The instance statistics that instance_affine returns carry their gradient into dx (gradcheck)."""
    layer = randomize(make_norm("iln", 16).double())
    x = randn(2, 16, 3, 5, scale=2, shift=1)
    weights = torch.randn(3, 2, 16, dtype=torch.float64)

    def fused(x, rho):
        y, var, mean = _InstanceAffine.apply(x, layer.coefficients, rho, layer.weight, layer.bias)
        return (y.sum((2, 3)) * weights[0]).sum() + (var * weights[1]).sum() + (mean * weights[2]).sum()

    assert torch.autograd.gradcheck(fused, (x, layer.rho))


@pytest.mark.parametrize("name", ["iln", "bin", "sn"])
def test_mixed_layers_give_the_same_on_channels_last_input(name):
    layer = randomize(make_norm(name, 16).double())
    x = randn(2, 16, 5, 7, scale=2, shift=1)
    assert_same(lambda: layer(x.contiguous(memory_format=torch.channels_last)), lambda: layer(x),
                [x, *layer.parameters()])


@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 8, 64, 64)])  # small: plain sums; large: one pass on CPU
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_product_sums(memory_format, shape):
    grad, x = (torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=memory_format) for _ in "gx")
    dot, total = product_sums(grad, x)
    torch.testing.assert_close(dot, (grad * x).sum((2, 3)), **TIGHT)
    torch.testing.assert_close(total, grad.sum((2, 3)), **TIGHT)


@pytest.mark.parametrize("numel", [_SINGLE_PASS_MIN_NUMEL - 2 * 8 * 64, _SINGLE_PASS_MIN_NUMEL])  # below, at the threshold
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_output_and_input_gradient_are_fresh_tensors_not_views(memory_format, numel):
    """A view returned by a custom Function cannot be modified in place (the networks' in-place ReLU)."""
    height = numel // (2 * 8 * 64)
    x = randn(2, 8, height, 64, scale=2, shift=1).detach().contiguous(memory_format=memory_format)
    scale, shift = torch.rand(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    y = scale_shift(x, scale, shift)
    assert y._base is None
    torch.testing.assert_close(y, x * scale[..., None, None] + shift[..., None, None], **TIGHT)
    layer = randomize(make_norm("iln", 16).double())
    x = randn(1, 16, height, 64, scale=2, shift=1).detach().contiguous(memory_format=memory_format).requires_grad_()
    out = layer(x)
    assert out._base is None
    torch.relu_(out).sum().backward()
    assert x.grad._base is None


def test_instance_moments_are_exact_even_with_a_large_mean():
    x = torch.randn(2, 3, 64, 64) * 0.01 + torch.tensor([0.0, 5.0, 1000.0]).view(1, 3, 1, 1)
    var, mean = instance_moments(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------- pn, lcn


def test_pn_matches_the_formula():
    layer = randomize(make_norm("pn", 6).double())
    x = randn(2, 6, 7, 9, scale=2, shift=1)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    expected = lambda: bn_naive(x, mean, var) * per_channel(layer.weight) + per_channel(layer.bias)  # noqa: E731
    assert_same(lambda: layer(x), expected, [x, layer.weight, layer.bias])


def lcn_naive(x, layer, constant_statistics=False):
    """Every pixel, explicitly: mean and biased variance of its channel group over its window clipped to the
    image (``constant_statistics``: both without gradient)."""
    n, c, h, w = x.shape
    size, r = layer.channels_per_group, layer.window // 2
    rows = []
    for i in range(h):
        cols = []
        for j in range(w):
            window = x[:, :, max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].reshape(n, c // size, -1)
            var, mean = torch.var_mean(window.detach() if constant_statistics else window, dim=2, correction=0)
            pixel = x[:, :, i, j].reshape(n, c // size, size)
            cols.append(((pixel - mean[..., None]) / torch.sqrt(var[..., None] + layer.eps)).reshape(n, c))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2) * per_channel(layer.weight) + per_channel(layer.bias)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_lcn_matches_the_per_pixel_formula(window):
    layer = randomize(make_norm("lcn", 6, window=window).double())
    x = randn(2, 6, 7, 9, scale=2, shift=1)
    assert_same(lambda: layer(x), lambda: lcn_naive(x, layer), [x, layer.weight, layer.bias])


@pytest.mark.parametrize("window", [3, 5])
def test_lcn_stop_stat_grad_treats_the_local_statistics_as_constants_as_the_official_code(window):
    """Same forward pass; the input gradient of (x - mean) / sqrt(var + eps) with mean, var held constant
    where the window is smaller than the map (7 x 9 here), as anthonymlortiz/lcn computes them under no_grad."""
    layer = randomize(make_norm("lcn", 6, window=window, stop_stat_grad=True).double())
    x = randn(2, 6, 7, 9, scale=2, shift=1)
    assert_same(lambda: layer(x), lambda: lcn_naive(x, layer, constant_statistics=True), [x, layer.weight, layer.bias])
    full = randomize(make_norm("lcn", 6, window=window).double())
    full.load_state_dict(layer.state_dict())
    (grad,), (full_grad,) = (value_and_grads(lambda m=m: m(x), [x])[1] for m in (layer, full))
    assert (grad - full_grad).abs().max() > 1e-3  # the option changes training


def test_lcn_stop_stat_grad_keeps_the_gradient_where_the_window_is_not_smaller_than_the_map():
    """Where the official code falls back to group norm (window >= height or width), with gradient."""
    layer = randomize(make_norm("lcn", 6, window=7, stop_stat_grad=True).double())
    x = randn(2, 6, 7, 9, scale=2, shift=1)
    assert_same(lambda: layer(x), lambda: lcn_naive(x, layer), [x, layer.weight, layer.bias])


def test_lcn_with_a_window_over_the_whole_map_is_group_norm():
    layer = randomize(make_norm("lcn", 8, channels_per_group=2, window=17).double())
    reference = nn.GroupNorm(4, 8).double()
    reference.load_state_dict(layer.state_dict())
    x = randn(2, 8, 7, 9, scale=3, shift=-2)
    assert_same(lambda: layer(x), lambda: reference(x), [x])
    with pytest.raises(ValueError, match="window must be a positive odd number"):
        make_norm("lcn", 8, window=8)


# ---------------------------------------------------------------------------- kn: KNConv


def kernel_norm_then_conv(x, weight, bias, eps, stats_from=None):
    """KernelNorm on the unfolded windows (biased statistics over C_in x k x k, zero padding
    included; statistics from ``stats_from`` if given), then the convolution as a matrix product."""
    n, _, h, w = x.shape
    k = weight.shape[-1]
    windows = F.unfold(x, k, padding=k // 2)  # (N, C_in k k, H W)
    source = windows if stats_from is None else F.unfold(stats_from, k, padding=k // 2)
    var, mean = torch.var_mean(source, dim=1, keepdim=True, correction=0)
    normalized = (windows - mean) / torch.sqrt(var + eps)
    out = weight.reshape(weight.shape[0], -1) @ normalized + bias[:, None]
    return out.view(n, -1, h, w)


@pytest.mark.parametrize("mode", ["eval", "train without dropout"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 6, 6)])
def test_knconv_is_kernel_norm_on_unfolded_windows_then_conv(mode, shape):
    options = {"dropout_p": 0.0} if mode.startswith("train") else {}
    conv = make_conv_norm("kn", shape[1], 4, 3, **options).double().train(mode.startswith("train"))
    x = randn(*shape, scale=2, shift=1)
    assert_same(lambda: conv(x), lambda: kernel_norm_then_conv(x, conv.weight, conv.bias, conv.eps),
                [x, conv.weight, conv.bias])


def test_knconv_statistics_come_from_a_dropped_out_copy_in_training_only():
    conv = make_conv_norm("kn", 4, 3, 3, dropout_p=0.3).double()
    x = randn(2, 4, 6, 7, shift=1)
    torch.manual_seed(5)
    out = conv(x)
    torch.manual_seed(5)
    dropped = x * dropout_mask(x, 0.3) / 0.7  # the same mask: the layer's only random draw
    expected = kernel_norm_then_conv(x, conv.weight, conv.bias, conv.eps, stats_from=dropped)
    torch.testing.assert_close(out, expected, **TIGHT)
    assert not torch.equal(conv(x), conv(x))  # random in training
    conv.eval()
    torch.testing.assert_close(conv(x), kernel_norm_then_conv(x, conv.weight, conv.bias, conv.eps), **TIGHT)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_kn_dropout_masks_keep_each_element_with_probability_1_minus_p_under_the_seed(fmt):
    """kn's dropout mask (numpy's PCG64 seeded from torch's generator on the CPU), at the U-Net's top size: the
    keep rate is 1 - p within 5 standard errors, in every channel; torch.manual_seed repeats the draw, the next
    call draws another; the draw follows memory order (the same numbers for either layout) and consumes torch's
    generator (a later torch draw depends on it)."""
    p, shape = 0.05, (8, 16, 256, 256)
    x = torch.empty(shape).contiguous(memory_format=fmt)
    torch.manual_seed(7)
    first, second, after = dropout_mask(x, p), dropout_mask(x, p), torch.rand(())
    torch.manual_seed(7)
    again = dropout_mask(x, p)
    assert first.shape == shape and first.is_contiguous(memory_format=fmt)
    assert set(first.unique().tolist()) == {0, 1}
    keep = first.double().mean(dim=(0, 2, 3))
    assert ((keep - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (first.numel() / 16))).all(), keep
    assert torch.equal(first, again) and not torch.equal(first, second)
    in_memory_order = first.permute(0, 2, 3, 1) if fmt == torch.channels_last else first
    assert torch.equal(in_memory_order.flatten().to(torch.uint8), _memory_order_draw(p, shape))
    torch.manual_seed(7)
    assert torch.rand(()) != after  # the mask's seed came from torch's generator


def _memory_order_draw(p, shape):
    torch.manual_seed(7)
    return dropout_mask(torch.empty(shape), p).flatten().to(torch.uint8)


def test_kn_up_convolution_normalizes_each_position_then_transposed_conv():
    up = make_conv_norm("kn", 6, 3, 2, transpose=True, dropout_p=0.0).double()
    x = randn(2, 6, 5, 7, scale=2, shift=1)

    def reference():
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        return F.conv_transpose2d((x - mean) / torch.sqrt(var + up.eps), up.weight, up.bias, stride=2)

    assert_same(lambda: up(x), reference, [x, up.weight, up.bias])
    assert up(x).shape == (2, 3, 10, 14)


# ---------------------------------------------------------------------------- wn


def test_wn_convs_are_weight_normed_per_output_channel():
    conv = make_conv_norm("wn", 4, 6, 3).double()
    up = make_conv_norm("wn", 6, 4, 2, transpose=True).double()
    x = randn(2, 4, 7, 9)
    for layer, dim, op in ((conv, 0, lambda x, w, b: F.conv2d(x, w, b, padding=1)),
                           (up, 1, lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2))):
        g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
        with torch.no_grad():
            g.mul_(torch.rand_like(g) + 0.5)
        other = tuple(d for d in range(4) if d != dim)
        effective = lambda: g * v / v.square().sum(other, keepdim=True).sqrt()  # noqa: E731
        inputs = x if layer is conv else F.relu(conv(x))
        assert_same(lambda: layer(inputs), lambda: op(inputs, effective(), layer.bias), [g, v, layer.bias])


def test_wn_unet_convs_follow_the_initialisation_scheme():
    torch.manual_seed(0)
    model = UNet(norm="wn", base_channels=16, depth=2)
    conv = model.down[2].second.conv_norm  # 3x3, 64 -> 64
    std = math.sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(std * 0.88, rel=0.05)
    assert conv.weight.abs().max().item() <= 2 * std + 1e-6 and torch.all(conv.bias == 0.1)
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    torch.testing.assert_close(g.flatten(), v.flatten(1).norm(dim=1))


# ---------------------------------------------------------------------------- bkn


def rectified_moments_by_quadrature(mean, std):
    """E[ReLU(z)] and Var[ReLU(z)] for z ~ N(mean, std^2) by Simpson's rule over z >= 0."""
    upper = float((mean + 12 * std).detach().max().clamp_min(1.0))
    z = torch.linspace(0, upper, 20001, dtype=mean.dtype)
    pdf = torch.exp(-0.5 * ((z - mean[:, None]) / std[:, None]) ** 2) / (std[:, None] * math.sqrt(2 * math.pi))
    simpson = torch.ones_like(z)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    step = (z[1] - z[0]) / 3
    first = (z * pdf * simpson).sum(1) * step
    second = (z ** 2 * pdf * simpson).sum(1) * step
    return first, second - first ** 2


def conv_prior_naive(conv, relu_mean, relu_var):
    """Output moments of conv on constant images of the input moments (what independence implies)."""
    c = relu_mean.numel()
    if isinstance(conv, nn.ConvTranspose2d):
        taps_mean = F.conv_transpose2d(relu_mean.view(1, c, 1, 1), conv.weight, conv.bias, stride=2)[0]
        taps_var = F.conv_transpose2d(relu_var.view(1, c, 1, 1), conv.weight ** 2, stride=2)[0]
        return taps_mean.mean((1, 2)), taps_var.mean((1, 2)) + taps_mean.var((1, 2), unbiased=False)
    k = conv.kernel_size[0]
    mean = F.conv2d(relu_mean.view(1, c, 1, 1).expand(1, c, k, k), conv.weight, conv.bias).flatten()
    var = F.conv2d(relu_var.view(1, c, 1, 1).expand(1, c, k, k), conv.weight ** 2).flatten()
    return mean, var


def bkn_naive(y, layer, prior=None, p=0.9):
    """docs/layers.md's Kalman combination of the batch statistics of y with a prior (mean, var)."""
    mean_b, var_b = batch_moments(y)
    if prior is None:
        mean, var = mean_b, var_b
    else:
        mean_p, var_p = per_channel(prior[0]), per_channel(prior[1])
        mean = p * mean_p + (1 - p) * mean_b
        var = p * var_p + (1 - p) * var_b + p * (1 - p) * (mean_b - mean_p) ** 2
    return bn_naive(y, mean, var, layer.eps) * per_channel(layer.weight) + per_channel(layer.bias)


def test_rectified_gaussian_moments():
    mean = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 1.0, 2.0, 0.8, 1.5], dtype=torch.float64, requires_grad=True)
    for ours, reference in zip(rectified_gaussian_moments(mean, std), rectified_moments_by_quadrature(mean, std)):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
        for grad, ref_grad in zip(torch.autograd.grad(ours.sum(), [mean, std], retain_graph=True),
                                  torch.autograd.grad(reference.sum(), [mean, std], retain_graph=True)):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("transpose", [False, True])
def test_bkn_analytic_prior_agrees_with_sampling_its_own_gaussian(transpose):
    """``prior=analytic``: the moments of N(beta, gamma^2) through ReLU and the conv, checked by sampling."""
    torch.manual_seed(0)
    pair = make_conv_norm("bkn", 4, 3, 2 if transpose else 3, transpose=transpose, prior="analytic").double()
    gamma = torch.tensor([1.0, 0.5, 2.0, 1.2], dtype=torch.float64)
    beta = torch.tensor([0.0, 0.4, -1.0, 0.8], dtype=torch.float64)
    mean, var = pair.analytic_prior(gamma, beta)
    samples = F.relu(torch.randn(16, 4, 64, 64, dtype=torch.float64) * per_channel(gamma) + per_channel(beta))
    out = pair.conv(samples)
    if not transpose:
        out = out[..., 1:-1, 1:-1]  # interior: borders see zero padding, which the prior ignores
    torch.testing.assert_close(mean, out.mean((0, 2, 3)), rtol=0.02, atol=0.02)
    torch.testing.assert_close(var, out.var((0, 2, 3)), rtol=0.03, atol=0.02)
    # and the same as pushing constant moment images through the convolution
    relu_mean, relu_var = rectified_moments_by_quadrature(beta, gamma)
    for ours, naive in zip((mean, var), conv_prior_naive(pair.conv, relu_mean, relu_var)):
        torch.testing.assert_close(ours, naive, rtol=1e-8, atol=1e-10)


def bkn_chain(prior, transpose):
    torch.manual_seed(0)
    first = make_conv_norm("bkn", 3, 4, 3, prior=prior).double()
    second = make_conv_norm("bkn", 4, 5, 2 if transpose else 3, transpose=transpose, prior=prior).double()
    randomize(first), randomize(second)
    with torch.no_grad():
        for pair in (first, second):
            pair.conv.bias.mul_(0.2)  # keep the prior within 100x the batch variance: the Kalman branch
    return first, second


@pytest.mark.parametrize("transpose", [False, True])
def test_bkn_sampled_prior_is_the_official_layer_train_and_eval(transpose):
    """conv1 -> BKN (no preceding BKN) -> ReLU -> conv2 -> BKN with the official sampled prior, against
    tests/official.py's KalmanNorm with the same random draw: outputs, input and parameter gradients,
    moving averages, and evaluation."""
    first, second = bkn_chain("sampled", transpose)
    refs = [official.KalmanNorm(4, fused_eps_floor=False), official.KalmanNorm(5)]
    params = [p for m in (first, second) for p in m.parameters()]
    for step in range(2):
        x = randn(3, 3, 7, 9, scale=2, shift=1)
        torch.manual_seed(step)
        out, grads = value_and_grads(lambda: second(torch.relu_(first(x))), [x, *params])
        torch.manual_seed(step)
        hidden, reported = refs[0](first.conv(x), first.weight, first.bias)
        prior = official.kalman_sampled_prior(second.conv, hidden.shape, *reported)
        assert (prior[1] / second.conv(F.relu(hidden)).var((0, 2, 3), unbiased=False)).mean() < 100  # Kalman branch
        ref_out, ref_grads = value_and_grads(
            lambda: refs[1](second.conv(F.relu(hidden)), second.weight, second.bias, prior)[0], [x, *params])
        torch.testing.assert_close(out, ref_out, **TIGHT)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, **TIGHT)
        for ours, ref in zip((first, second), refs):  # value_and_grads ran each forward once
            torch.testing.assert_close(ours.running_mean, ref.moving_mean, **TIGHT)
            torch.testing.assert_close(ours.running_var, ref.moving_var, **TIGHT)
    first.eval(), second.eval()
    x = randn(2, 3, 7, 9)
    assert_same(lambda: second(torch.relu_(first(x))),
                lambda: refs[1](second.conv(F.relu(refs[0](first.conv(x), first.weight, first.bias,
                                                             training=False)[0])),
                                second.weight, second.bias, training=False)[0], [x, *params])


@pytest.mark.parametrize("transpose", [False, True])
def test_bkn_analytic_chain_matches_the_formula_train_and_eval(transpose):
    """``prior=analytic``: the same chain with the prior from N(beta, gamma^2) of the first layer."""
    first, second = bkn_chain("analytic", transpose)
    params = [p for m in (first, second) for p in m.parameters()]
    x = randn(3, 3, 7, 9, scale=2, shift=1)

    def ours():
        return second(torch.relu_(first(x)))

    def reference():
        out1 = bkn_naive(first.conv(x), first)
        relu_mean, relu_var = rectified_moments_by_quadrature(first.bias, first.weight.abs())
        prior = conv_prior_naive(second.conv, relu_mean, relu_var)
        return bkn_naive(second.conv(F.relu(out1)), second, prior)

    assert_same(ours, reference, [x, *params], rtol=1e-7, atol=1e-8)
    # running statistics: moving averages of the Kalman statistics used (biased batch variance)
    y = second.conv(F.relu(first(x))).detach()
    before = second.running_var.clone()
    second(torch.relu_(first(x)))
    relu_mean, relu_var = rectified_moments_by_quadrature(first.bias, first.weight.abs())
    prior_mean, prior_var = conv_prior_naive(second.conv, relu_mean, relu_var)
    mean_b, var_b = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    used = 0.9 * prior_var + 0.1 * var_b + 0.09 * (mean_b - prior_mean) ** 2
    torch.testing.assert_close(second.running_var, 0.9 * before + 0.1 * used.detach(), rtol=1e-7, atol=1e-9)
    for layer in (first, second):
        layer.eval()
    x = randn(2, 3, 7, 9)

    def evaluated(layer, y):
        stats = (per_channel(layer.running_mean), per_channel(layer.running_var))
        return bn_naive(y, *stats, layer.eps) * per_channel(layer.weight) + per_channel(layer.bias)

    assert_same(ours, lambda: evaluated(second, second.conv(F.relu(evaluated(first, first.conv(x))))), [x, *params])


@pytest.mark.parametrize("prior", ["sampled", "analytic"])
def test_bkn_drops_a_prior_whose_variance_is_100_times_the_batch_variance(prior):
    """The official guard: mean over channels of prior var / batch var >= 100 -> batch statistics."""
    pair = make_conv_norm("bkn", 4, 5, 3, prior=prior).double()
    y = randn(3, 5, 6, 6)
    var_in, mean_in = torch.var_mean(y, dim=(2, 3), correction=0)
    batch_var, batch_mean = y.var((0, 2, 3), unbiased=False), y.mean((0, 2, 3))
    for factor, trusted in ((99.0, True), (101.0, False)):
        prior_var = batch_var * factor
        mean, var = pair.statistics(var_in, mean_in, batch_mean + 1, prior_var)
        assert torch.allclose(var, batch_var) != trusted and torch.allclose(mean, batch_mean) != trusted


def test_bkn_refuses_an_unknown_prior():
    with pytest.raises(ValueError, match="bkn: prior='mc' is not valid; choose one of: sampled, analytic"):
        make_conv_norm("bkn", 4, 4, 3, prior="mc")


def test_bkn_prior_follows_the_data_path_in_the_unet():
    """Pairs fed by the in-place ReLU of a BKN pair use a prior; after max-pool or the skip concat, none."""
    model = UNet(norm="bkn", base_channels=16, depth=2)
    used = {}
    for name, module in model.named_modules():
        if isinstance(module, KalmanConvNorm):
            module.register_forward_pre_hook(
                lambda m, args, name=name: used.__setitem__(name, hasattr(args[0], PRIOR_ATTRIBUTE)))
    model(torch.randn(2, 1, 16, 16))
    assert not used["down.0.first.conv_norm"] and not used["down.1.first.conv_norm"]  # image / after max-pool
    assert not used["up.0.first.conv_norm"]  # after the skip concatenation
    assert used["down.0.second.conv_norm"] and used["upsample.1.conv_norm"] and used["up.0.second.conv_norm"]


# ---------------------------------------------------------------------------- every layer


@pytest.mark.parametrize("name", ALL)
def test_every_layer_is_deterministic_in_eval_and_works_at_batch_size_one(name):
    torch.manual_seed(0)
    pair = make_conv_norm(name, 16, 16, 3).double()
    x = randn(1, 16, 7, 9, shift=0.5)
    out = pair(x)  # training step at batch size 1, odd size
    grads = torch.autograd.grad(out.square().sum(), [x, *pair.parameters()], allow_unused=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads if g is not None)
    pair.eval()
    with torch.no_grad():
        assert torch.equal(pair(x), pair(x))


def test_mixing_weights_keys():
    assert set(make_norm("bin", 4).mixing_weights()) == {"rho"}
    assert set(make_norm("iln", 16).mixing_weights()) == {"sigmoid_rho"}
    assert set(make_norm("sn", 4).mixing_weights()) == {"mean_in", "mean_ln", "mean_bn", "var_in", "var_ln",
                                                        "var_bn"}


def small_unet(name, **kwargs):
    """A one-level U-Net of the layer, with a narrow modulation network where the layer has one."""
    options = {"hidden": 16} if "hidden" in spec(name).options else None
    return UNet(norm=name, base_channels=16, depth=1, num_domains=2, norm_options=options, **kwargs)


@pytest.mark.parametrize("name", names())
def test_the_registry_says_which_layers_log_mixing_weights_and_need_domain_ids(name):
    """What the trainer finds in the model agrees with what the registry says of the layer."""
    torch.manual_seed(0)
    model = small_unet(name)
    mixing = [m.mixing_weights() for m in model.modules() if hasattr(m, "mixing_weights")]
    assert bool(mixing) == spec(name).mixing_weights
    assert all(weights and all(torch.isfinite(w).all() for w in weights.values()) for weights in mixing)
    x = torch.randn(2, 1, 16, 16)
    if spec(name).needs_domain:
        with pytest.raises(ValueError, match=f"{name!r} needs the condition 'domain'"):
            model(x)
    else:
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", names())
def test_batch_statistics_is_declared_by_exactly_the_layers_whose_training_output_depends_on_the_batch(name):
    """Change every image of a batch but the first: its output moves in training exactly for the
    layers that declare batch_statistics (with their default options), and in evaluation for none."""
    torch.manual_seed(0)
    model = small_unet(name).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    others = torch.cat([x[:1], torch.randn(2, 1, 16, 16, dtype=torch.float64) * 3 + 1])
    domain = torch.tensor([0, 1, 1])

    def first_image(batch, training):
        model.train(training)
        torch.manual_seed(1)  # the same random draws for both batches (kn's dropout, sean's noise, bkn's prior)
        with torch.no_grad():
            return model(batch, domain)[0]

    moved = (first_image(x, True) - first_image(others, True)).abs().max().item()
    assert (moved > 1e-6) == spec(name).batch_statistics, moved
    torch.testing.assert_close(first_image(x, False), first_image(others, False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_every_layer_trains_in_the_unet_channels_last_and_under_bfloat16_autocast(name):
    torch.manual_seed(0)
    model = UNet(norm=name, base_channels=16, depth=2)
    x = torch.randn(2, 1, 32, 32)
    for memory_format, autocast in ((torch.contiguous_format, False), (torch.channels_last, False),
                                    (torch.channels_last, True)):  # the trainer's default is channels_last
        model = model.to(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.contiguous(memory_format=memory_format))
        out.float().square().mean().backward()
        assert torch.isfinite(out).all(), (name, memory_format, autocast)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), (name, memory_format, autocast)
        model.zero_grad()


class EveryPair(nn.Module):
    """One 16 -> 16 conv + norm pair of every layer, chained with in-place ReLUs."""

    def __init__(self):
        super().__init__()
        self.pairs = nn.ModuleList(make_conv_norm(n, 16, 16, 3, **({"dropout_p": 0.0} if n == "kn" else {}))
                                   for n in ALL)

    def forward(self, x):
        outputs = []
        for pair in self.pairs:
            x = torch.relu_(pair(x))
            outputs.append(x)
        return outputs


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo + AOT autograd: tracing, no C++ code generation (a few seconds)
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("SEG_INDUCTOR_TESTS"),
                                                      reason="C++ code generation takes minutes on CPU; "
                                                             "set SEG_INDUCTOR_TESTS=1")),
])
def test_every_layer_under_torch_compile(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EveryPair().double()
    x = randn(2, 16, 8, 8)
    inputs = [x, *model.parameters()]
    eager = model(x)
    eager_grads = torch.autograd.grad(sum(o.sum() for o in eager), inputs)
    compiled = torch.compile(model, backend=backend)(x)
    compiled_grads = torch.autograd.grad(sum(o.sum() for o in compiled), inputs)
    for name, out, ref in zip(ALL, compiled, eager):
        torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9, msg=name)
    for grad, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------- MONAI


def test_monai_networks_take_our_layers_by_name():
    from monai.networks.nets import BasicUNet

    registered = register_monai()
    assert registered == POST_CONV and register_monai() == registered  # idempotent
    x = torch.randn(2, 1, 32, 32)
    for name in registered:
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(16, 16, 32, 32, 64, 16), norm=name)
        assert any(isinstance(m, NORMS[name]) for m in net.modules()), name
        assert torch.isfinite(net(x)).all(), name
    net = BasicUNet(spatial_dims=2, features=(16, 16, 32, 32, 64, 16), norm=("gn", {"groups": 8}))
    assert {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)} == {8}
    with pytest.raises(ValueError, match="'gn' has no option 'num_groups'"):
        BasicUNet(spatial_dims=2, norm=("gn", {"num_groups": 8}))
    with pytest.raises(ValueError, match="2D only"):
        BasicUNet(spatial_dims=3, norm="iln")

