"""The augmentation options (seg/data/augmentations.py, seg/training/augment.py): each one's statistics at
256x256, labels moved with every spatial transform and never interpolated into new classes, nothing drawn
when an option is off (the ILN protocol draws what it always has), the preset, the refusals, and a resumed
run drawing the same augmentations as an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train
from seg.config.schema import ConfigError
from seg.data.augmentations import SPECS, Augmentation, Step, augmentation_of
from seg.training import loop
from seg.training.augment import augment_batch, draw_augmentation, legendre, resize_matrix
from seg.training.checks import validate
from seg.runtime.stopping import Interrupted, StopSignals

SIZE = 256
ALL = [spec.name for spec in SPECS]


@pytest.fixture(autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def only(name: str, low: float, high: float, extra=None, p: float = 1.0) -> Augmentation:
    return Augmentation(steps=(Step(name, p, (low, high), extra),))


def run(augmentation: Augmentation, images: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0):
    labels = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.uint8) if labels is None else labels
    return augment_batch(images, labels, augmentation, generator=torch.Generator().manual_seed(seed))


def draws_of(augmentation: Augmentation, n: int, seed: int = 0) -> dict:
    return draw_augmentation(n, (1, SIZE, SIZE), torch.Generator().manual_seed(seed), "cpu", augmentation)


def disk_labels(n: int = 4) -> torch.Tensor:
    """Three nested classes off-centre, as a heart's: 1 around 2 around 3."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    radius = ((y - 100.0) ** 2 + (x - 140.0) ** 2).sqrt()
    labels = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    labels[radius < 60], labels[radius < 40], labels[radius < 20] = 1, 2, 3
    return labels.expand(n, SIZE, SIZE).clone()


# ---------------------------------------------------------------------------- off: nothing drawn


def test_the_iln_protocol_draws_only_its_rotation_and_options_off_draw_nothing():
    """Defaults (rotate_deg 15, every new option off): one uniform per image, as before the options existed;
    rotation 0 and every option off: the batch untouched and the generator too."""
    augmentation = augmentation_of(compose_train().data.augment)
    assert augmentation == Augmentation(15.0, False, ())
    generator, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    images = torch.randn(3, 1, 32, 32)
    augment_batch(images, torch.zeros(3, 32, 32, dtype=torch.uint8), augmentation, generator=generator)
    torch.rand(3, generator=twin)
    assert generator.get_state().equal(twin.get_state())
    off = augmentation_of(compose_train("data.augment.rotate_deg=0", "data.augment.preset=none").data.augment)
    before = generator.get_state()
    assert augment_batch(images, images[:, 0].to(torch.uint8), off, generator=generator)[0] is images
    assert generator.get_state().equal(before)


def test_the_nnunet_preset_sets_the_probabilities_and_an_explicit_p_overrides_it():
    preset = augmentation_of(compose_train("data.augment.preset=nnunet").data.augment)
    assert {step.name: step.p for step in preset.steps} == {
        "scale": 0.2, "bias_field": 0.1, "rician": 0.1, "noise": 0.1, "blur": 0.1, "brightness": 0.15,
        "contrast": 0.15, "lowres": 0.125, "gamma_inverted": 0.1, "gamma": 0.3}  # elastic off, as nnU-Net's trainers
    assert preset.rotate_deg == 15.0 and not preset.flip  # rotation and mirroring are their own keys
    mixed = augmentation_of(compose_train("data.augment.preset=nnunet", "data.augment.gamma.p=0",
                                          "data.augment.elastic.p=0.5").data.augment)
    assert mixed.step("gamma") is None and mixed.step("elastic").p == 0.5 and mixed.step("elastic").extra == (9, 13)


@pytest.mark.parametrize("override, message", [
    ("data.augment.preset=heavy", "data.augment.preset='heavy' is not valid; choose one of: none, nnunet"),
    ("data.augment.noise.p=1.5", "data.augment.noise.p=1.5 must be between 0 and 1"),
    ("data.augment.gamma.range=[1.5,0.7]", "data.augment.gamma.range=[1.5, 0.7] must satisfy low <= high"),
    ("data.augment.gamma.range=[0,1]", "data.augment.gamma.range=[0, 1] must satisfy low <= high, both in (0, 100]"),
    ("data.augment.lowres.range=[0.5,2]", "data.augment.lowres.range=[0.5, 2] must satisfy"),
    ("data.augment.scale.range=[0.7]", "data.augment.scale.range=[0.7] must be two numbers"),
    ("data.augment.elastic.sigma=[0,13]", "data.augment.elastic.sigma=[0, 13] must satisfy"),
    ("data.augment.bias_field.degree=0", "data.augment.bias_field.degree=0 must be an integer between 1 and 10"),
    ("data.augment.noise.range=[0,nan]", "data.augment.noise.range=[0.0, nan] must be two numbers"),
])
def test_a_bad_augmentation_value_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace("]", r"\]")
                       .replace(")", r"\)").replace("+", r"\+")):
        validate(compose_train(override))


# ---------------------------------------------------------------------------- each option's statistics


def ramp(n: int = 2) -> torch.Tensor:
    """Images of [0, 1]: a ramp over the columns."""
    return torch.linspace(0, 1, SIZE).expand(n, 1, SIZE, SIZE).clone()


@pytest.mark.parametrize("name", ["gamma", "gamma_inverted"])
def test_gamma_maps_0_1_monotonically_by_the_drawn_gamma_and_keeps_mean_and_std(name):
    images = ramp(4)
    out, _ = run(only(name, 0.7, 1.5), images)
    gammas = draws_of(only(name, 0.7, 1.5), 4)[f"{name}_value"]
    assert (gammas < 1).any() and (gammas > 1).any()  # nnU-Net's two-sided draw
    for image, result, g in zip(images[:, 0, 0], out[:, 0, 0], gammas):
        assert (result.diff() >= -1e-6).all()  # monotone: the order of intensities is kept
        unit = (result - result.min()) / (result.max() - result.min())
        expected = image ** g if name == "gamma" else 1 - (1 - image) ** g
        torch.testing.assert_close(unit, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((1, 2, 3)), images.std((1, 2, 3)), atol=1e-5, rtol=0)


def test_gaussian_noise_has_the_std_asked():
    images = torch.randn(2, 1, SIZE, SIZE)
    out, _ = run(only("noise", 0.05, 0.05), images)
    assert (out - images).std().item() == pytest.approx(0.05, rel=0.02)
    assert (out - images).mean().abs().item() < 0.002
    drawn = draws_of(only("noise", 0.0, 0.1), 200)["noise_value"]  # nnU-Net's range, drawn uniformly
    assert 0 <= drawn.min() and drawn.max() <= 0.1 and drawn.mean().item() == pytest.approx(0.05, abs=0.01)


def test_rician_noise_is_gaussian_on_bright_tissue_and_rayleigh_on_the_background():
    images = torch.zeros(4, 1, SIZE, SIZE)
    images[:, :, :, SIZE // 2:] = 10.0  # bright half; the dark half is the image's minimum
    images = images - 3.0  # z-scored images go below 0: the noise acts on the image shifted to a minimum of 0
    sigma = 0.2
    out, _ = run(only("rician", sigma, sigma), images)
    bright, dark = (out - images)[..., SIZE // 2:], out[..., :SIZE // 2] + 3.0
    assert bright.std().item() == pytest.approx(sigma, rel=0.03)
    assert dark.mean().item() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)  # Rayleigh's mean
    assert (dark >= 0).all()


def test_the_bias_field_is_positive_smooth_and_a_legendre_polynomial_in_its_log():
    images = torch.ones(3, 1, SIZE, SIZE)
    out, _ = run(only("bias_field", -0.3, 0.3, 3), images)  # wider than MONAI's (0, 0.1): a visible field
    field = out[:, 0]
    assert (field > 0).all() and not torch.allclose(field, torch.ones_like(field))
    # log(field) lies in the span of P_i(y) P_j(x), j <= i <= 3 (MONAI's terms): fitted exactly
    basis_y, basis_x = legendre(3, SIZE, "cpu", torch.float64), legendre(3, SIZE, "cpu", torch.float64)
    terms = torch.stack([torch.outer(basis_y[i], basis_x[j]).flatten() for i in range(4) for j in range(i + 1)], 1)
    for log_field in field.double().log().flatten(1):
        solution = torch.linalg.lstsq(terms, log_field.unsqueeze(1)).solution
        assert (terms @ solution - log_field.unsqueeze(1)).abs().max() < 1e-5
    # smooth: neighbouring pixels differ by a tiny fraction (a polynomial over the whole image)
    assert (field.log().diff(dim=1).abs().max() < 0.05) and (field.log().diff(dim=2).abs().max() < 0.05)


def test_blur_keeps_a_constant_image_and_divides_white_noise_variance_as_its_kernel_says():
    constant = torch.full((2, 1, SIZE, SIZE), 3.0)
    torch.testing.assert_close(run(only("blur", 0.5, 1.0), constant)[0], constant)
    noise = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    out, _ = run(only("blur", 1.0, 1.0), noise)
    x = torch.arange(-4, 5, dtype=torch.float64)
    kernel = torch.exp(-0.5 * x ** 2)
    kernel /= kernel.sum()
    expected = float((kernel ** 2).sum()) ** 2  # separable: the 2D kernel's sum of squares
    assert out[..., 8:-8, 8:-8].var().item() == pytest.approx(expected, rel=0.05)


def test_brightness_multiplies_and_contrast_scales_about_the_mean():
    images = torch.randn(4, 1, SIZE, SIZE)
    out, _ = run(only("brightness", 0.75, 1.25), images)
    factors = draws_of(only("brightness", 0.75, 1.25), 4)["brightness_value"]
    torch.testing.assert_close(out, images * factors.view(-1, 1, 1, 1))
    out, _ = run(only("contrast", 0.6, 0.9), images)  # below 1: nothing reaches the range's clip
    factors = draws_of(only("contrast", 0.6, 0.9), 4)["contrast_value"]
    torch.testing.assert_close(out.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((1, 2, 3)), images.std((1, 2, 3)) * factors, rtol=1e-4, atol=0)
    wide, _ = run(only("contrast", 1.5, 1.5), images)  # above 1: clipped to the image's own range
    assert torch.equal(wide.amax((1, 2, 3)), images.amax((1, 2, 3)))
    assert torch.equal(wide.amin((1, 2, 3)), images.amin((1, 2, 3)))


@pytest.mark.parametrize("zoom", [0.5, 0.63, 0.77, 1.0])
def test_low_resolution_is_nnunets_nearest_exact_down_and_bilinear_up(zoom):
    images = torch.randn(2, 1, SIZE, SIZE)
    out, _ = run(only("lowres", zoom, zoom), images)
    size = round(SIZE * zoom)
    expected = F.interpolate(F.interpolate(images, (size, size), mode="nearest-exact"), (SIZE, SIZE),
                             mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if zoom < 1:
        assert (out.diff(dim=-1).abs().mean() < images.diff(dim=-1).abs().mean())
    matrix = resize_matrix(torch.tensor([zoom]), SIZE)
    torch.testing.assert_close(matrix.sum(2), torch.ones(1, SIZE))  # every row a weighted mean


def test_each_option_acts_on_about_p_of_the_images():
    images = torch.randn(400, 1, 16, 16)
    settings = {"elastic": ((50.0, 50.0), (2.0, 2.0)), "bias_field": ((0.1, 0.1), 3), "noise": ((0.5, 0.5), None),
                "rician": ((0.5, 0.5), None), "blur": ((0.5, 0.5), None), "lowres": ((0.5, 0.5), None)}
    for name in ALL:
        value, extra = settings.get(name, ((1.3, 1.3), None))  # one value that changes every image
        step = Step(name, 0.25, value, extra)
        out, _ = run(Augmentation(steps=(step,)), images)
        changed = (out - images).flatten(1).abs().amax(1) > 1e-4  # identity resampling: rounding only
        assert changed.float().mean().item() == pytest.approx(0.25, abs=0.07), name


# ---------------------------------------------------------------------------- labels with the geometry


@pytest.mark.parametrize("name, low, high, extra", [("scale", 0.7, 1.4, None), ("elastic", 200.0, 200.0, (9.0, 13.0)),
                                                    ("rotation", 0, 0, None)])
def test_labels_move_with_every_spatial_transform_and_never_become_new_classes(name, low, high, extra):
    labels = disk_labels()
    augmentation = (Augmentation(180.0, True, (Step("scale", 1.0, (0.7, 1.4)),
                                               Step("elastic", 1.0, (200.0, 200.0), (9.0, 13.0))))
                    if name == "rotation" else only(name, low, high, extra))
    for classes in ((0, 3), (0, 1, 2, 3)):  # two classes: an image pixel at a class value is that class
        source = labels if len(classes) == 4 else (labels > 1).to(torch.uint8) * 3
        images = source.float().unsqueeze(1)
        out_images, out_labels = run(augmentation, images, source)
        assert out_labels.dtype == torch.uint8 and set(out_labels.unique().tolist()) <= set(classes)
        assert not torch.equal(out_labels, source)
        if len(classes) == 2:
            for value in classes:
                at_value = (out_images[:, 0] - value).abs() < 1e-3
                assert at_value.any() and (out_labels[at_value] == value).all()
    if name == "scale":  # a zoom by s shows a field of view s times as wide: areas shrink by s^2
        scales = draws_of(augmentation, 4)["scale_value"]
        areas = (run(augmentation, labels.float().unsqueeze(1), labels)[1] > 0).flatten(1).sum(1).double()
        torch.testing.assert_close(areas / (labels > 0).flatten(1).sum(1), 1 / scales.double() ** 2, rtol=0.03, atol=0)


# ---------------------------------------------------------------------------- reproducibility and resume


def test_the_draws_are_reproducible_from_the_seed_and_differ_between_seeds():
    augmentation = augmentation_of(compose_train(*[f"data.augment.{name}.p=0.5" for name in ALL]).data.augment)
    images, labels = torch.randn(3, 1, 64, 64), disk_labels(3)[:, :64, :64]
    first, again, other = (run(augmentation, images, labels, seed) for seed in (1, 1, 2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_augmentations_as_an_uninterrupted_one(data_dir, tmp_path, monkeypatch):
    """Every batch's augmented images, recorded: a run stopped mid-epoch (its last.pt written) and resumed
    draws, after the stop, exactly what the uninterrupted run draws; the final weights are the same."""
    recorded: list = []
    stop_after: list = []
    original = loop.augment_batch

    def recording(images, labels, augmentation, **kwargs):
        out = original(images, labels, augmentation, **kwargs)
        if kwargs.get("generator") is not None and "shard" in kwargs:  # the training batches, not the panel
            recorded.append((out[0].clone(), out[1].clone()))
            if stop_after and len(recorded) == stop_after[0]:
                stop.requested = "SIGTERM"
        return out

    monkeypatch.setattr(loop, "augment_batch", recording)
    overrides = ["experiment=smoke", f"paths.data_dir={data_dir}", "data.augment.preset=nnunet",
                 "data.augment.flip=true", *[f"data.augment.{name}.p=0.5" for name in ALL],
                 "data.augment.elastic.sigma=[3,4]", "trainer.epochs=2", "trainer.batch_size=1",
                 "trainer.checkpoint_every_n_steps=3", "trainer.progress=false"]
    stop = StopSignals()
    loop.train(compose_train(*overrides), tmp_path / "whole", stop=stop)
    whole = list(recorded)
    recorded.clear()
    stop_after.append(len(whole) // 2 + 1)  # mid-epoch of the second epoch or the first
    stop = StopSignals()
    with pytest.raises(Interrupted):
        loop.train(compose_train(*overrides), tmp_path / "parts", stop=stop)
    stop_after.clear()
    stop = StopSignals()
    loop.train(compose_train(*overrides, "trainer.resume=true"), tmp_path / "parts", stop=stop)
    assert len(recorded) == len(whole)
    for (images, labels), (expected_images, expected_labels) in zip(recorded, whole):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    ours = torch.load(tmp_path / "parts" / "checkpoints" / "last.pt", weights_only=False)["model"]
    theirs = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    # the panel of augmented examples, at the start of the run (from a generator of its own)
    events = EventAccumulator(str(tmp_path / "whole"), size_guidance={"images": 0})
    events.Reload()
    (panel,) = events.Images("train/augmented")
    assert panel.step == 0 and panel.width == 5 * 64 and panel.height == 2 * 64  # smoke: 64 px, 2 examples
