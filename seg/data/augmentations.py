"""The augmentation options (``data.augment.*``): what each one is, its allowed values, its preset
probabilities and where its defaults come from; the resolved ``Augmentation`` a run trains with.

``data.augment.rotate_deg`` and ``data.augment.flip`` are the ILN study's rotation (applied to every image)
and optional mirroring. The others are applied per image with a probability ``p``, a parameter drawn
from ``range`` (and, for two of them, a second option):

    scale           zoom factor of the sampled coordinates (> 1: a wider field of view)  nnU-Net v2
    elastic         range: displacement magnitude alpha (pixels), sigma: its smoothing   nnU-Net v1 / batchgenerators
    bias_field      Legendre coefficients of log(field); degree                          MONAI RandBiasField
    rician          standard deviation of the two Gaussian components                    MONAI RandRicianNoise (range: ours)
    noise           standard deviation of additive Gaussian noise                        nnU-Net v2
    blur            Gaussian sigma (pixels)                                              nnU-Net v2
    brightness      multiplier                                                           nnU-Net v2
    contrast        factor about the image mean, clipped to the image's range            nnU-Net v2
    lowres          zoom of the simulated low resolution                                 nnU-Net v2
    gamma_inverted  gamma of the inverted image, mean and std kept                       nnU-Net v2
    gamma           gamma, mean and std kept                                             nnU-Net v2

``data.augment.p`` of each defaults to null: the preset's probability (``data.augment.preset``): ``none`` (the
ILN protocol: all 0, and nothing is drawn for them) or ``nnunet`` (nnU-Net v2's trainer for the nine it
applies, with its probability per image and channel multiplied out for one channel; elastic 0 as nnU-Net
v1's and v2's trainers have it; bias field and Rician noise at MONAI's 0.1). An explicit ``p`` overrides the preset.
The preset sets no rotation or mirroring: those stay ``rotate_deg`` and ``flip``. docs/configuration.md has
the table with every range and its source. The operations are in seg/training/augment.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .volumes import DataError

INF = float("inf")


@dataclass(frozen=True)
class Spec:
    """One augmentation option: the bounds of its ``range`` values, its probability in each preset, whether
    its draw is nnU-Net's two-sided one (``BGContrast``: half the draws below 1, half above, where the range
    holds 1), and where its defaults come from."""

    name: str
    low: float  # the smallest allowed value of the range (inclusive unless low_open)
    high: float  # the largest (inclusive)
    low_open: bool
    presets: dict
    two_sided: bool
    source: str


SPECS = (
    Spec("scale", 0.0, 10.0, True, {"nnunet": 0.2}, False, "nnU-Net v2 SpatialTransform: p_scaling 0.2, scaling (0.7, 1.4)"),
    Spec("elastic", 0.0, 10000.0, False, {"nnunet": 0.0}, False,
         "nnU-Net v1 default_2D_augmentation_params: elastic_deform_alpha (0, 200), sigma (9, 13), p_eldef 0.2; "
         "off in nnU-Net v1's and v2's trainers (do_elastic False, p_elastic_deform 0)"),
    Spec("bias_field", -10.0, 10.0, False, {"nnunet": 0.1}, False,
         "MONAI RandBiasField: prob 0.1, coeff_range (0, 0.1), degree 3"),
    Spec("rician", 0.0, 100.0, False, {"nnunet": 0.1}, False,
         "MONAI RandRicianNoise: prob 0.1, std drawn in [0, std]; range [0, 0.1] of the z-scored image is ours "
         "(MONAI's std 1.0 would equal the signal's spread), as nnU-Net's Gaussian noise"),
    Spec("noise", 0.0, 100.0, False, {"nnunet": 0.1}, False,
         "nnU-Net v2 GaussianNoiseTransform: apply_probability 0.1, noise_variance (0, 0.1) used as the std"),
    Spec("blur", 0.0, 20.0, True, {"nnunet": 0.1}, False,
         "nnU-Net v2 GaussianBlurTransform: apply_probability 0.2 x p_per_channel 0.5, blur_sigma (0.5, 1)"),
    Spec("brightness", 0.0, 100.0, True, {"nnunet": 0.15}, True,
         "nnU-Net v2 MultiplicativeBrightnessTransform: apply_probability 0.15, BGContrast (0.75, 1.25)"),
    Spec("contrast", 0.0, 100.0, True, {"nnunet": 0.15}, True,
         "nnU-Net v2 ContrastTransform: apply_probability 0.15, BGContrast (0.75, 1.25), preserve_range"),
    Spec("lowres", 0.0, 1.0, True, {"nnunet": 0.125}, False,
         "nnU-Net v2 SimulateLowResolutionTransform: apply_probability 0.25 x p_per_channel 0.5, scale (0.5, 1)"),
    Spec("gamma_inverted", 0.0, 100.0, True, {"nnunet": 0.1}, True,
         "nnU-Net v2 GammaTransform, p_invert_image 1: apply_probability 0.1, BGContrast (0.7, 1.5), retain stats"),
    Spec("gamma", 0.0, 100.0, True, {"nnunet": 0.3}, True,
         "nnU-Net v2 GammaTransform, p_invert_image 0: apply_probability 0.3, BGContrast (0.7, 1.5), retain stats"),
)
SPEC = {spec.name: spec for spec in SPECS}
PRESETS = ("none", "nnunet")
SPATIAL = ("scale", "elastic")  # folded into the rotation's sampling grid: labels move with them
DEGREE_MAX = 10  # bias_field.degree
SIGMA_MAX = 50.0  # elastic.sigma (pixels)


@dataclass(frozen=True)
class Step:
    """One augmentation a run applies: its probability per image, the range its parameter is drawn from, and
    its second option (elastic: ``sigma`` range; bias_field: ``degree``), else None."""

    name: str
    p: float
    range: tuple[float, float]
    extra: object = None

    @property
    def two_sided(self) -> bool:
        return SPEC[self.name].two_sided


@dataclass(frozen=True)
class Augmentation:
    """What a run's training batches get: the rotation and mirroring, and the ``steps`` with p > 0 in the order
    they are drawn and applied (``SPECS``'s). Hashable: the runs of a stack must have equal ones."""

    rotate_deg: float = 0.0
    flip: bool = False
    steps: tuple[Step, ...] = ()

    @property
    def geometry(self) -> bool:
        """Whether the rotation and mirroring draw (the ILN protocol's draws, unchanged)."""
        return self.rotate_deg > 0 or self.flip

    @property
    def active(self) -> bool:
        return self.geometry or bool(self.steps)

    def step(self, name: str) -> Step | None:
        return next((step for step in self.steps if step.name == name), None)


def probability(augment, name: str) -> float:
    """``data.augment.<name>.p``, or the preset's probability when it is null."""
    value = (augment.get(name) or {}).get("p")
    return float(value) if value is not None else SPEC[name].presets.get(augment.get("preset") or "none", 0.0)


def augmentation_of(augment) -> Augmentation:
    """The resolved ``Augmentation`` of a run's ``data.augment`` node (checked by ``check_augment`` first)."""
    if augment is None:
        return Augmentation()
    steps = []
    for spec in SPECS:
        p = probability(augment, spec.name)
        if p <= 0:
            continue
        node = augment.get(spec.name)
        extra = (tuple(float(v) for v in node.get("sigma")) if spec.name == "elastic" else
                 int(node.get("degree")) if spec.name == "bias_field" else None)
        steps.append(Step(spec.name, p, tuple(float(v) for v in node.get("range")), extra))
    return Augmentation(float(augment.get("rotate_deg") or 0.0), bool(augment.get("flip")), tuple(steps))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != INF


def check_pair(key: str, value, low: float, high: float, low_open: bool) -> None:
    """A [low, high] pair of finite numbers, low <= high, within the option's bounds."""
    if value is None or len(value) != 2 or not all(is_number(v) for v in value):
        raise DataError(f"{key}={None if value is None else list(value)} must be two numbers [low, high]")
    a, b = value
    below = a <= low if low_open else a < low
    if a > b or below or b > high:
        bound = ("(" if low_open else "[") + f"{low:g}, {high:g}]"
        raise DataError(f"{key}=[{a:g}, {b:g}] must satisfy low <= high, both in {bound}")


def check_augment(augment) -> None:
    """Every ``data.augment.*`` value: the rotation in [0, 180] degrees, a known preset, each probability in
    [0, 1] (or null: the preset's), each range within its option's bounds."""
    if augment is None:
        return
    rotate = augment.get("rotate_deg")
    if not is_number(rotate) or not 0 <= rotate <= 180:
        raise DataError(f"data.augment.rotate_deg={rotate} must be between 0 and 180 (degrees; 0: no rotation)")
    preset = augment.get("preset")
    if preset not in PRESETS:
        raise DataError(f"data.augment.preset={preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    for spec in SPECS:
        node = augment.get(spec.name)
        key = f"data.augment.{spec.name}"
        if node is None:
            raise DataError(f"{key} is missing; it needs p and range (configs/data: the schema's defaults)")
        p = node.get("p")
        if p is not None and (not is_number(p) or not 0 <= p <= 1):
            raise DataError(f"{key}.p={p} must be between 0 and 1 (a probability per image; null: the preset's)")
        check_pair(f"{key}.range", node.get("range"), spec.low, spec.high, spec.low_open)
        if spec.name == "elastic":
            check_pair(f"{key}.sigma", node.get("sigma"), 0.0, SIGMA_MAX, True)
        if spec.name == "bias_field":
            degree = node.get("degree")
            if not isinstance(degree, int) or isinstance(degree, bool) or not 1 <= degree <= DEGREE_MAX:
                raise DataError(f"{key}.degree={degree} must be an integer between 1 and {DEGREE_MAX}")
