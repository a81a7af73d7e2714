"""Batched data augmentation on the training device, in one pass over the batch, per image.

Two phases: ``draw_augmentation`` draws every random number of n images from the run's generator, in a
fixed order (the ILN protocol's rotation angle and mirrorings, then each active option of
seg/data/augmentations.py in its order), each with the image as its first dimension; ``apply_augmentation``
applies them. An option whose probability is 0 draws nothing, so the ILN protocol (rotation only) draws
and computes what it always has. Every option draws its parameters for every image and applies them where
its draw ``u < p``: the number of draws never depends on their values, so a resumed run (the generator's
state is in last.pt) and a run split over ranks or stacked with others draw the same numbers.

Geometry (labels move with it): rotation, mirroring, ``scale`` and ``elastic`` make one sampling grid per
image, applied once with ``grid_sample`` -- bilinear with border padding for images, nearest with zeros for
labels, so a label is always one of its image's classes. Then the intensity options, in this order: bias
field, Rician noise, Gaussian noise, blur, brightness, contrast, low resolution, inverted gamma, gamma
(nnU-Net v2's order of its own; the MRI ones first, as the scanner makes them).

Sources and departures (docs/configuration.md): nnU-Net (Isensee et al., Nature Methods 2021; its
batchgenerators transforms) for scale, elastic (v1's alpha/sigma form), noise, blur, brightness, contrast,
low resolution and gamma; MONAI's RandBiasField (Legendre polynomial of log(field), coefficients of
``numpy.tril_indices``, as MONAI) and RandRicianNoise (sqrt((x + n1)^2 + n2^2)). Departures: one probability
per image (nnU-Net's apply probability times its per-channel probability, for one channel); Rician noise
is added to the image shifted to a minimum of 0 and shifted back (the images are z-scored, the Rician model
needs magnitudes); blur pads by replicating the border; low resolution is nnU-Net's nearest-exact down, bilinear
up, written as one matrix per axis so that every image has its own zoom in one batched product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.augmentations import Augmentation, Step

Draws = dict  # name -> tensor with the image as first dimension


def augment_batch(images: torch.Tensor, labels: torch.Tensor, augmentation: Augmentation, *,
                  generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (N, C, H, W) float and labels (N, H, W) uint8 as ``augmentation`` says.

    ``shard=(rank, size)``: the batch is rows rank, rank + size, ... of a global batch of size x N
    samples (data-parallel training). The random numbers are drawn for the whole global batch and
    this shard's rows taken, so the ranks' generators stay in step and together augment exactly as
    one process with the global batch would.
    """
    if not augmentation.active:
        return images, labels
    rank, size = shard
    n, *shape = images.shape
    draws = draw_augmentation(n * size, tuple(shape), generator, images.device, augmentation)
    return apply_augmentation(images, labels, {k: v[rank::size] for k, v in draws.items()}, augmentation)


# ---------------------------------------------------------------------------- drawing


def uniform(n: int, generator: torch.Generator, device, low: float, high: float) -> torch.Tensor:
    return low + torch.rand(n, generator=generator, device=device) * (high - low)


def two_sided(n: int, generator: torch.Generator, device, low: float, high: float) -> torch.Tensor:
    """nnU-Net's ``BGContrast`` draw: where the range holds 1, half the draws uniform in [low, 1], half in
    [1, high]; otherwise uniform in the range (nnU-Net would then leave the range; this does not)."""
    below = torch.rand(n, generator=generator, device=device) < 0.5
    u = torch.rand(n, generator=generator, device=device)
    if not low < 1 < high:
        below = torch.full_like(below, high <= 1)
    lower = low + u * (min(high, 1.0) - low)
    upper = max(low, 1.0) + u * (high - max(low, 1.0))
    return torch.where(below, lower, upper)


def draw_step(step: Step, n: int, shape: tuple, generator: torch.Generator, device) -> Draws:
    """One option's draws: whether each image gets it (``<name>``), its parameter, and its fields."""
    c, h, w = shape
    applied = torch.rand(n, generator=generator, device=device) < step.p
    low, high = step.range
    value = (two_sided if step.two_sided else uniform)(n, generator, device, low, high)
    draws = {step.name: applied, f"{step.name}_value": value}
    if step.name == "elastic":
        draws["elastic_sigma"] = uniform(n, generator, device, *step.extra)
        draws["elastic_field"] = torch.rand(n, 2, h, w, generator=generator, device=device) * 2 - 1
    elif step.name == "bias_field":
        terms = (step.extra + 1) * (step.extra + 2) // 2
        draws["bias_field_value"] = low + torch.rand(n, terms, generator=generator, device=device) * (high - low)
    elif step.name == "rician":
        draws["rician_field"] = torch.randn(n, 2, c, h, w, generator=generator, device=device)
    elif step.name == "noise":
        draws["noise_field"] = torch.randn(n, c, h, w, generator=generator, device=device)
    return draws


def draw_augmentation(n: int, shape: tuple, generator: torch.Generator, device, augmentation: Augmentation) -> Draws:
    """Every random number of n images of ``shape`` (C, H, W), in the order ``augment_batch`` draws them: the
    rotation's (cos, sin) and the mirrorings (sx, sy) in {-1, 1} (the ILN protocol's draws, when it rotates or
    mirrors), then each step's. Nothing at all when ``augmentation`` is not active."""
    draws: Draws = {}
    if augmentation.geometry:
        angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(augmentation.rotate_deg)
        draws["cos"], draws["sin"] = torch.cos(angle), torch.sin(angle)
        draws["sx"] = draws["sy"] = torch.ones(n, device=device)
        if augmentation.flip:
            draws["sx"] = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
            draws["sy"] = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    for step in augmentation.steps:
        draws.update(draw_step(step, n, shape, generator, device))
    return draws


def concat_draws(parts: list[Draws]) -> Draws:
    """The draws of several groups of images as one (the stacked runs: each run's from its own generator)."""
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------- applying


def apply_augmentation(images: torch.Tensor, labels: torch.Tensor, draws: Draws,
                       augmentation: Augmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``draws`` (one row per image) to images (N, C, H, W) and labels (N, H, W) uint8."""
    if augmentation.geometry or any(step.name in ("scale", "elastic") for step in augmentation.steps):
        images, labels = resample(images, labels, draws, augmentation)
    for step in augmentation.steps:
        if step.name in INTENSITY:
            changed = INTENSITY[step.name](images, draws, step)
            images = torch.where(draws[step.name].view(-1, 1, 1, 1), changed, images)
    return images, labels


def resample(images: torch.Tensor, labels: torch.Tensor, draws: Draws, augmentation: Augmentation):
    """Rotation, mirroring, scale and elastic deformation as one sampling grid per image."""
    n = images.shape[0]
    one = torch.ones(n, device=images.device)
    cos, sin = draws.get("cos", one), draws.get("sin", one * 0)
    sx, sy = draws.get("sx", one), draws.get("sy", one)
    zero = torch.zeros(n, device=images.device)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, zero], 1), torch.stack([sin * sx, cos * sy, zero], 1)], 1)
    if "scale" in draws:  # the sampled coordinates scaled: > 1 shows a wider field of view
        theta = theta * torch.where(draws["scale"], draws["scale_value"], one).view(-1, 1, 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    if "elastic" in draws:
        grid = grid + elastic_displacement(draws, augmentation.step("elastic"), images.shape).to(grid.dtype)
    return sample(images, labels, grid)


def sample(images: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor):
    """Images bilinear with border padding, labels nearest with zeros, at ``grid``."""
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels.unsqueeze(1).to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return images, labels[:, 0].to(torch.uint8)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 2 radius + 1) normalized Gaussian kernels of per-image ``sigma`` (n,)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (x / sigma.unsqueeze(1)) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def smooth(x: torch.Tensor, sigma: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """Gaussian smoothing of x (n, C, H, W), each image by its own sigma (separable, one grouped convolution
    per axis); ``padding``: 'constant' (zeros) or 'replicate'."""
    n, c, h, w = x.shape
    kernel = gaussian_kernels(sigma.to(x.dtype), radius).repeat_interleave(c, 0)  # (n*C, K)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode=padding), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode=padding), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def elastic_displacement(draws: Draws, step: Step, shape) -> torch.Tensor:
    """batchgenerators' elastic deformation: a uniform field in [-1, 1] per pixel and axis, Gaussian-smoothed
    (sigma pixels, zeros outside, truncated at 4 sigma of the range's upper end, as scipy's default) and scaled
    by alpha pixels; as (n, H, W, 2) in ``grid_sample``'s coordinates, zero for images that do not get it."""
    n, _, h, w = shape
    field = smooth(draws["elastic_field"], draws["elastic_sigma"], math.ceil(4 * step.extra[1]), "constant")
    field = field * (draws["elastic_value"] * draws["elastic"]).view(-1, 1, 1, 1)
    return torch.stack([field[:, 0] * 2 / w, field[:, 1] * 2 / h], dim=-1)


def per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def legendre(degree: int, size: int, device, dtype) -> torch.Tensor:
    """(degree + 1, size): the Legendre polynomials P_0..P_degree on ``size`` points of [-1, 1]."""
    x = torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)
    rows = [torch.ones_like(x), x]
    for k in range(1, degree):
        rows.append(((2 * k + 1) * x * rows[k] - k * rows[k - 1]) / (k + 1))
    return torch.stack(rows[:degree + 1])


def bias_field(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    """MONAI's RandBiasField: the image times exp(sum c_ij P_i(y) P_j(x)) over j <= i <= degree."""
    degree, (n, _, h, w) = step.extra, images.shape
    rows, cols = torch.tril_indices(degree + 1, degree + 1, device=images.device)
    coefficients = images.new_zeros(n, degree + 1, degree + 1)
    coefficients[:, rows, cols] = draws["bias_field_value"].to(images.dtype)
    log_field = torch.einsum("ih,nij,jw->nhw", legendre(degree, h, images.device, images.dtype), coefficients,
                             legendre(degree, w, images.device, images.dtype))
    return images * torch.exp(log_field).unsqueeze(1)


def rician(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    """MONAI's RandRicianNoise, sqrt((x + s n1)^2 + (s n2)^2), on the image shifted to a minimum of 0."""
    low = images.amin((1, 2, 3), keepdim=True)
    std = per_image(draws["rician_value"])
    field = draws["rician_field"]
    return torch.sqrt((images - low + std * field[:, 0]) ** 2 + (std * field[:, 1]) ** 2) + low


def noise(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    """nnU-Net's Gaussian noise: the drawn value is the standard deviation."""
    return images + per_image(draws["noise_value"]) * draws["noise_field"]


def blur(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    """nnU-Net's Gaussian blur, sigma pixels (the same on both axes), the border replicated."""
    return smooth(images, draws["blur_value"], math.ceil(4 * step.range[1]), "replicate")


def brightness(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    return images * per_image(draws["brightness_value"])


def contrast(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    """nnU-Net's contrast: about the image's mean, clipped to the image's range (preserve_range)."""
    mean = images.mean((1, 2, 3), keepdim=True)
    low, high = images.amin((1, 2, 3), keepdim=True), images.amax((1, 2, 3), keepdim=True)
    return torch.minimum(torch.maximum((images - mean) * per_image(draws["contrast_value"]) + mean, low), high)


def resize_matrix(zoom: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size, size): per image, nearest-exact to round(size * zoom) points, then bilinear back to ``size``
    (``F.interpolate``'s arithmetic, align_corners False), as one matrix."""
    n, device = zoom.shape[0], zoom.device
    m = torch.clamp(torch.round(size * zoom.double()), min=1).unsqueeze(1)  # the low resolution, per image
    position = ((torch.arange(size, device=device, dtype=torch.float64) + 0.5) * m / size - 0.5).clamp(min=0)
    first = position.floor()
    weight = (position - first).float()
    second = torch.minimum(first + 1, m - 1)
    first = torch.minimum(first, m - 1)

    def source(i):  # the full-resolution pixel a low-resolution point took (nearest-exact)
        return torch.clamp(torch.floor((i + 0.5) * size / m), max=size - 1).long()

    matrix = torch.zeros(n, size, size, device=device)
    matrix.scatter_add_(2, source(first).unsqueeze(2), (1 - weight).unsqueeze(2))
    matrix.scatter_add_(2, source(second).unsqueeze(2), weight.unsqueeze(2))
    return matrix


def lowres(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    """nnU-Net's simulated low resolution: the image down to zoom x its size (nearest-exact) and back up
    (bilinear), both axes by the same zoom."""
    n, c, h, w = images.shape
    zoom = draws["lowres_value"]
    rows, cols = resize_matrix(zoom, h).to(images.dtype), resize_matrix(zoom, w).to(images.dtype)
    return (rows.unsqueeze(1) @ images @ cols.transpose(1, 2).unsqueeze(1))


def gamma_of(images: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma (retaining the image's mean and std): x rescaled to [0, 1] by its range, raised to
    gamma, scaled back; on -x and negated back when ``invert``."""
    x = -images if invert else images
    dims = (1, 2, 3)
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    low = x.amin(dims, keepdim=True)
    spread = x.amax(dims, keepdim=True) - low + 1e-7
    x = ((x - low) / spread).clamp(min=0) ** per_image(gamma) * spread + low
    x = (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-8) * std + mean
    return -x if invert else x


def gamma(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    return gamma_of(images, draws["gamma_value"], invert=False)


def gamma_inverted(images: torch.Tensor, draws: Draws, step: Step) -> torch.Tensor:
    return gamma_of(images, draws["gamma_inverted_value"], invert=True)


# the intensity options by name (the geometric ones, scale and elastic, are in ``resample``)
INTENSITY = {"bias_field": bias_field, "rician": rician, "noise": noise, "blur": blur, "brightness": brightness,
             "contrast": contrast, "lowres": lowres, "gamma_inverted": gamma_inverted, "gamma": gamma}
