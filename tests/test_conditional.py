"""Conditional normalizations (cin, adain, spade, sean): each against its formula written naively here,
the conditions the U-Net builds for them, and training end to end with the real config."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_train, randn, randomize, run_train
from seg.training.checks import ConfigError, validate
from seg.config.launch import register_configs
from seg.inference.predict import load_segmenter
from seg.norms import NORMS, Condition, make_conv_norm, make_norm, names, spec
from seg.norms.conditional import RegionConditioner, StyleEncoder, region_codes
from seg.model.unet import UNet

CONDITIONAL = names("conditional")
TIGHT = dict(rtol=1e-9, atol=1e-10)

register_configs()
pytestmark = pytest.mark.usefixtures("one_thread")


def naive_standardize(x, dims, eps=1e-5):
    """(x - mean) / sqrt(biased variance + eps) over ``dims``, written out."""
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def naive_nearest(m, size):
    """Nearest-neighbour resize by index arithmetic: output pixel i takes input pixel floor(i * in / out)."""
    rows = (torch.arange(size[0]) * m.shape[-2] // size[0])
    cols = (torch.arange(size[1]) * m.shape[-1] // size[1])
    return m[..., rows, :][..., cols]


def naive_modulation(modulation, m):
    hidden = torch.relu(F.conv2d(m, modulation.shared[0].weight, modulation.shared[0].bias, padding=1))
    return (F.conv2d(hidden, modulation.gamma.weight, modulation.gamma.bias, padding=1),
            F.conv2d(hidden, modulation.beta.weight, modulation.beta.bias, padding=1))


def gradients(out, tensors):
    torch.manual_seed(1)
    weight = torch.randn_like(out)
    return torch.autograd.grad((out * weight).sum(), tensors, allow_unused=True)


def assert_same(layer, output, reference, inputs):
    torch.testing.assert_close(output, reference, **TIGHT)
    tensors = [*inputs, *[p for p in layer.parameters() if p.requires_grad]]
    for got, want in zip(gradients(output, tensors), gradients(reference, tensors)):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, **TIGHT)


# ---------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("train", [True, False])
def test_cin_is_instance_norm_with_a_row_per_domain_and_the_mean_row_for_unseen_domains(train):
    torch.manual_seed(0)
    layer = randomize(make_norm("cin", 5, num_domains=3)).double().train(train)
    x = randn(4, 5, 7, 9, scale=2, shift=1)
    domain = torch.tensor([2, 0, -1, 2])
    out = layer(x, Condition(image=x, domain=domain))
    weight = torch.stack([layer.weight[2], layer.weight[0], layer.weight.mean(0), layer.weight[2]])
    bias = torch.stack([layer.bias[2], layer.bias[0], layer.bias.mean(0), layer.bias[2]])
    reference = naive_standardize(x, (2, 3)) * weight[:, :, None, None] + bias[:, :, None, None]
    assert_same(layer, out, reference, [x])


def test_cin_without_domain_ids_is_a_clear_error():
    layer = make_norm("cin", 4, num_domains=2)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="'cin' needs the condition 'domain'"):
        layer(x, Condition(image=x))
    with pytest.raises(ValueError, match="'cin' needs the condition 'domain'"):
        layer(x)


@pytest.mark.parametrize("train", [True, False])
def test_adain_is_instance_norm_scaled_and_shifted_by_the_style_code(train):
    torch.manual_seed(0)
    layer = make_norm("adain", 6, style_dim=8).double().train(train)
    x = randn(3, 6, 7, 9, scale=3, shift=-1)
    style = randn(3, 8)
    with torch.no_grad():
        layer.to_affine.weight.normal_()
    out = layer(x, Condition(image=x, style=style))
    affine = style @ layer.to_affine.weight.T + layer.to_affine.bias
    sigma_y, mu_y = affine[:, :6], affine[:, 6:]
    reference = sigma_y[:, :, None, None] * naive_standardize(x, (2, 3)) + mu_y[:, :, None, None]
    assert_same(layer, out, reference, [x, style])


def test_adain_starts_as_plain_instance_norm():
    layer = make_norm("adain", 4).double()
    x = randn(2, 4, 6, 6)
    out = layer(x, Condition(image=x, style=torch.randn(2, 64, dtype=torch.float64)))
    torch.testing.assert_close(out, naive_standardize(x, (2, 3)), **TIGHT)


def test_style_encoder_codes_differ_with_the_image_appearance():
    torch.manual_seed(0)
    encoder = StyleEncoder(1, 16).double()
    image = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    codes = encoder(torch.cat([image, 3 * image ** 2]))  # same anatomy, another contrast
    assert codes.shape == (2, 16) and not torch.allclose(codes[0], codes[1])
    assert torch.equal(encoder(image), encoder(image))


@pytest.mark.parametrize("base", ["bn", "in"])
@pytest.mark.parametrize("train", [True, False])
def test_spade_is_a_parameter_free_norm_modulated_by_the_resized_image(base, train):
    torch.manual_seed(0)
    layer = make_norm("spade", 5, hidden=7, base=base, image_channels=2).double()
    with torch.no_grad():
        if base == "bn":
            layer.norm.running_mean.uniform_(-1, 1)
            layer.norm.running_var.uniform_(0.5, 2)
    running = None if base == "in" else (layer.norm.running_mean.clone(), layer.norm.running_var.clone())
    layer.train(train)
    x = randn(3, 5, 8, 6, scale=2, shift=1)
    image = randn(3, 2, 32, 24)
    out = layer(x, Condition(image=image))
    if base == "in":
        x_hat = naive_standardize(x, (2, 3))
    elif train:
        x_hat = naive_standardize(x, (0, 2, 3))
    else:
        mean, var = running
        x_hat = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
    gamma, beta = naive_modulation(layer.modulation, naive_nearest(image, (8, 6)))
    assert_same(layer, out, x_hat * (1 + gamma) + beta, [x, image])


def test_spade_and_sean_refuse_an_unknown_base():
    for name in ("spade", "sean"):
        with pytest.raises(ValueError, match=f"{name}: base='ln' is not valid; choose one of: bn, in"):
            make_norm(name, 4, base="ln")


def test_region_codes_are_masked_means():
    torch.manual_seed(0)
    regions = torch.softmax(torch.randn(2, 3, 5, 4, dtype=torch.float64), 1)
    features = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    codes = region_codes(regions, features)
    for n in range(2):
        for k in range(3):
            mask = regions[n, k]
            expected = (features[n] * mask).sum((1, 2)) / mask.sum()
            torch.testing.assert_close(codes[n, k], expected, **TIGHT)


@pytest.mark.parametrize("train", [True, False])
def test_sean_blends_spade_and_region_style_modulations(train):
    """Without the official per-region fc and noise (region_fc, noise false): the codes broadcast as they are."""
    torch.manual_seed(0)
    layer = make_norm("sean", 5, hidden=7, style_dim=4, base="in", image_channels=1, region_fc=False,
                      noise=False).double().train(train)
    with torch.no_grad():
        layer.blend_gamma.fill_(0.7)
        layer.blend_beta.fill_(-1.2)
    x = randn(2, 5, 8, 8, scale=2)
    image = randn(2, 1, 32, 32)
    regions = torch.softmax(torch.randn(2, 3, 4, 4, dtype=torch.float64), 1)
    codes = randn(2, 3, 4)
    out = layer(x, Condition(image=image, regions=regions, region_codes=codes))
    # style map: each region's code broadcast into its (upsampled) soft mask, summed over regions
    masks = F.interpolate(regions, size=(8, 8), mode="bilinear", align_corners=False)
    style_map = sum(masks[:, k:k + 1] * codes[:, k, :, None, None] for k in range(3))
    gamma_s = F.conv2d(style_map, layer.style_gamma.weight, layer.style_gamma.bias, padding=1)
    beta_s = F.conv2d(style_map, layer.style_beta.weight, layer.style_beta.bias, padding=1)
    gamma_o, beta_o = naive_modulation(layer.modulation, naive_nearest(image, (8, 8)))
    a_gamma, a_beta = 1 / (1 + torch.exp(-layer.blend_gamma)), 1 / (1 + torch.exp(-layer.blend_beta))
    gamma = a_gamma * gamma_s + (1 - a_gamma) * gamma_o
    beta = a_beta * beta_s + (1 - a_beta) * beta_o
    assert_same(layer, out, naive_standardize(x, (2, 3)) * (1 + gamma) + beta, [x, image, codes])


def one_hot_regions(n, k, h, w):
    labels = torch.randint(0, k, (n, h, w))
    labels[0, :2] = k - 1  # every label present somewhere in the batch
    labels[0, 2:4] = 0
    return F.one_hot(labels, k).permute(0, 3, 1, 2).double()


@pytest.mark.parametrize("base", ["bn", "in"])
@pytest.mark.parametrize("train", [True, False])
def test_sean_is_the_official_ace_block_on_a_label_map(train, base):
    """With a hard one-hot label map as regions and as the SPADE input, the layer is ZPdesu/SEAN's ACE: noise
    (same draw) before the norm, each present region's code through its fc_mu + ReLU scattered into its
    pixels, 3x3 convs, SPADE, the blend -- written naively here, a loop over samples and regions."""
    torch.manual_seed(0)
    layer = make_norm("sean", 5, hidden=7, style_dim=4, base=base, image_channels=3, num_regions=3).double()
    with torch.no_grad():
        layer.noise_var.uniform_(0.5, 1.5)  # trained values (it starts at zero)
        layer.blend_gamma.fill_(0.4)
        layer.blend_beta.fill_(-0.8)
    layer.train(train)
    x = randn(2, 5, 8, 6, scale=2, shift=1)
    segmap = one_hot_regions(2, 3, 8, 6)
    codes = randn(2, 3, 4)
    torch.manual_seed(7)
    out = layer(x, Condition(image=segmap, regions=segmap, region_codes=codes))
    torch.manual_seed(7)
    n, c, h, w = x.shape
    noisy = x + (torch.randn(n, w, h, 1, dtype=x.dtype) * layer.noise_var).transpose(1, 3) if train else x
    if base == "in":
        x_hat = naive_standardize(noisy, (2, 3))
    elif train:
        x_hat = naive_standardize(noisy, (0, 2, 3))
    else:  # running statistics, untouched since initialisation
        x_hat = noisy / (1 + 1e-5) ** 0.5
    style_map = torch.zeros(n, 4, h, w, dtype=x.dtype)
    for i in range(n):
        for k in range(3):
            mask = segmap[i, k].bool()
            if mask.any():
                fc = layer.region_fc[k]
                style_map[i, :, mask] = torch.relu(codes[i, k] @ fc.weight.T + fc.bias)[:, None]
    gamma_s = F.conv2d(style_map, layer.style_gamma.weight, layer.style_gamma.bias, padding=1)
    beta_s = F.conv2d(style_map, layer.style_beta.weight, layer.style_beta.bias, padding=1)
    gamma_o, beta_o = naive_modulation(layer.modulation, segmap)
    a_gamma, a_beta = 1 / (1 + torch.exp(-layer.blend_gamma)), 1 / (1 + torch.exp(-layer.blend_beta))
    reference = x_hat * (1 + a_gamma * gamma_s + (1 - a_gamma) * gamma_o) + a_beta * beta_s + (1 - a_beta) * beta_o
    torch.manual_seed(7)  # the gradients re-run nothing random; the seed only keeps the draws aligned
    assert_same(layer, out, reference, [x, codes])


def test_sean_noise_and_region_fc_options():
    layer = make_norm("sean", 4, num_regions=3)
    assert torch.equal(layer.noise_var, torch.zeros(4)) and len(layer.region_fc) == 3  # noise starts at zero
    bare = make_norm("sean", 4, num_regions=3, region_fc=False, noise=False)
    assert bare.region_fc is None and bare.noise_var is None
    assert not any("noise" in n or "region_fc" in n for n, _ in bare.named_parameters())
    x = torch.randn(2, 4, 6, 6)
    cond = Condition(image=torch.randn(2, 1, 6, 6), regions=torch.softmax(torch.randn(2, 3, 6, 6), 1),
                     region_codes=torch.randn(2, 3, 64))
    layer.eval()
    with torch.no_grad():
        layer.noise_var.fill_(1.0)
        assert torch.equal(layer(x, cond), layer(x, cond))  # no noise in evaluation


def test_sean_blend_weights_start_at_one_half_and_are_logged():
    weights = make_norm("sean", 4).mixing_weights()
    assert set(weights) == {"alpha_gamma", "alpha_beta"} and all(float(w.detach()) == 0.5 for w in weights.values())


def test_region_conditioner_predicts_coarse_classes_and_detaches_the_masks():
    torch.manual_seed(0)
    conditioner = RegionConditioner(1, num_regions=3, style_dim=5, scale=4)
    image = torch.randn(2, 1, 32, 32)
    cond = conditioner(image)
    assert cond.aux_logits.shape == (2, 3, 8, 8) and cond.regions.shape == (2, 3, 8, 8)
    assert cond.region_codes.shape == (2, 3, 5) and cond.image is image
    torch.testing.assert_close(cond.regions.sum(1), torch.ones(2, 8, 8))
    assert not cond.regions.requires_grad and cond.aux_logits.requires_grad and cond.region_codes.requires_grad


# ---------------------------------------------------------------------------- in the U-Net


def unet(name, **kwargs):
    return UNet(norm=name, base_channels=16, depth=2, num_classes=3, num_domains=2, **kwargs)


@pytest.mark.parametrize("name", CONDITIONAL)
def test_the_unet_builds_the_condition_each_layer_asks_for(name):
    torch.manual_seed(0)
    model = unet(name)
    x, domain = torch.randn(2, 1, 32, 32), torch.tensor([1, -1])
    layers = [m for m in model.modules() if isinstance(m, NORMS[name])]
    assert len(layers) == 2 * 3 + 2 + 2 * 2  # every conv of the three levels (and the up-convs) has one
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[1])) for m in layers]
    logits, aux = model(x, domain, with_aux=True)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (2, 3, 32, 32) and len(seen) == len(layers)
    assert all(c is seen[0] for c in seen)  # one condition per forward pass, shared by every layer
    assert seen[0].image is x and torch.equal(seen[0].domain, domain)
    assert (aux is not None) == (name == "sean")
    assert torch.equal(model(x, domain), logits)


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_unets_train_channels_last_and_under_bfloat16_autocast(name):
    torch.manual_seed(0)
    model = unet(name, norm_options={"hidden": 16} if "hidden" in spec(name).options else None)
    x, domain = torch.randn(2, 1, 32, 32), torch.tensor([0, 1])
    for memory_format, autocast in ((torch.contiguous_format, False), (torch.channels_last, False),
                                    (torch.channels_last, True)):
        model = model.to(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.contiguous(memory_format=memory_format), domain)
        out.float().square().mean().backward()
        assert torch.isfinite(out).all(), (name, memory_format, autocast)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), (name, memory_format, autocast)
        model.zero_grad()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x[:1], domain[:1]), model(x[:1], domain[:1]))  # eval: deterministic, batch 1


@pytest.mark.slow
def test_conditional_unets_compile_to_the_same_outputs_and_gradients():
    torch._dynamo.reset()
    for name in CONDITIONAL:
        torch.manual_seed(0)
        model = unet(name, norm_options={"hidden": 8} if "hidden" in spec(name).options else None).double()
        x, domain = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, -1])
        torch.manual_seed(1)  # the same draws (sean's noise) on both sides
        eager = model(x, domain)
        eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()), allow_unused=True)
        torch.manual_seed(1)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, domain)
        compiled_grads = torch.autograd.grad(compiled.sum(), list(model.parameters()), allow_unused=True)
        torch.testing.assert_close(compiled, eager, rtol=1e-7, atol=1e-9, msg=name)
        for got, want in zip(compiled_grads, eager_grads):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=name)


def test_a_cin_unet_without_domain_ids_says_what_is_missing():
    with pytest.raises(ValueError, match="'cin' needs the condition 'domain'"):
        unet("cin")(torch.randn(1, 1, 16, 16))


def test_a_layer_built_alone_without_its_condition_says_so():
    pair = make_conv_norm("spade", 4, 4, 3)
    with pytest.raises(ValueError, match="'spade' needs the condition 'image'"):
        pair(torch.randn(1, 4, 8, 8))


# ---------------------------------------------------------------------------- config and training


@pytest.mark.parametrize("name", CONDITIONAL)
def test_every_conditional_config_composes_and_validates(name):
    cfg = compose_train(f"norm={name}")
    validate(cfg)
    options = {k: v for k, v in OmegaConf.to_container(cfg.norm).items() if k != "name"}
    assert isinstance(make_norm(name, 16, **options), NORMS[name])


def test_sizes_given_by_the_data_cannot_be_set_in_the_config():
    cfg = compose_train("norm=cin", "+norm.num_domains=3")
    with pytest.raises(ConfigError, match="norm.num_domains is set by the trainer"):
        validate(cfg)


def smoke(data_dir, *overrides):
    return ["experiment=smoke", f"paths.data_dir={data_dir}", "data.phantom.num_patients=6",
            "trainer.progress=false", *overrides]


@pytest.mark.slow
def test_conditional_norms_train_end_to_end_on_the_phantom(data_dir, tmp_path):
    run_train("-m", *smoke(data_dir, f"norm={','.join(CONDITIONAL)}", "lr=0.1", f"hydra.sweep.dir={tmp_path}"))
    runs = {m["norm"]: m for m in (json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json"))}
    assert set(runs) == set(CONDITIONAL)
    for name, metrics in runs.items():
        assert metrics["status"] == "ok" and 0 <= metrics["dice"] <= 1, name
        domains = metrics["domains"]  # the training patients' vendors, in order
        assert domains == sorted(domains) and set(domains) <= {"A", "B", "C", "D"} and len(domains) >= 2, name
    alphas = runs["sean"]["mixing_weights"]
    assert len(alphas) == 12 and all(set(w) == {"alpha_gamma", "alpha_beta"} for w in alphas.values())
    assert any(w["alpha_gamma"] != 0.5 for w in alphas.values())  # the blend is learned

    # a cin checkpoint segments new volumes: of a training vendor (its row) or of another (the mean row)
    cin_run = next(p.parent for p in tmp_path.glob("*/metrics.json") if "norm=cin" in p.parent.name)
    volume = np.random.default_rng(0).normal(size=(40, 48, 3)).astype(np.float32)
    seen = load_segmenter(cin_run / "checkpoints" / "best.pt", device="cpu", domain=runs["cin"]["domains"][0])
    unseen = load_segmenter(cin_run / "checkpoints" / "best.pt", device="cpu", domain="Z")
    assert seen.domains == tuple(runs["cin"]["domains"])
    for segmenter in (seen, unseen):
        assert segmenter.segment(volume, (1.5, 1.5, 8.0)).shape == volume.shape


@pytest.mark.slow
def test_cin_on_data_without_domains_is_refused(acdc_root, tmp_path):
    result = run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "norm=cin",
                       "trainer.progress=false", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 1
    assert "norm=cin needs a domain per image" in result.stderr and "Traceback" not in result.stderr


def test_domain_shift_preset_compares_conditional_norms():
    cfg = compose_train("experiment=domain_shift", hydra=True)
    norms = cfg.hydra.sweeper.params.norm.split(",")
    assert {"cin", "adain", "spade"} <= set(norms) and "bn" in norms
