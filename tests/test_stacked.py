"""Stacked runs (seg/stacked): K runs trained as one computation compute what each run computes alone.

The reference is a plain single-run loop written here, step by step as seg/training/loop.py trains: the
model built after seeding with the run's seed, ``build_optimizer``/``build_schedule``, one
generator per run for ``epoch_order`` and ``augment_batch``, cross-entropy, SGD, BIN's clip after
each step, the schedule stepped at the run's epoch end. The runs differ in learning rate, seed
(initial weights, data order, augmentation draws) and fold (so their training sets, hence their
epochs, differ in length: 12 and 18 slices, batches of 4, so the 18-slice runs end each epoch with
a batch of 2 that steps apart). Everything is compared in float64 on real NIfTI data through the
real configuration: every step's loss, the final weights and buffers (BN's running statistics
included), the optimizer's momentum buffers and the Dice of each run, extracted as an ordinary
UNet and evaluated with ``seg.evaluation.dice.evaluate``.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from acdc_tree import make_acdc_tree
from conftest import ROOT, compose_train
from seg.training.augment import augment_batch
from seg.data import class_names, load_splits
from seg.data.augmentations import SPECS, augmentation_of
from seg.config.launch import register_configs
from seg.evaluation.dice import evaluate
from seg.model.build import build_model, norm_options
from seg.norms import make_norm, names, spec
from seg.training.optimizers import build_optimizer
from seg.training.ordering import epoch_order
from seg.training.schedules import build_schedule
from seg.training.stacked import (CONV_MODES, RunFeed, Stack, StackedUNet, StackError, augment_together, check_stackable,
                         conv_modes, draw_augmentation, stack_key)
from seg.model.unet import UNet

register_configs()
ALL_OPTIONS = [spec.name for spec in SPECS]

# lr, seed, fold of the stacked runs (runs 0 and 2 have 12 training slices, run 1 has 18)
RUNS = [(0.1, 0, 0), (0.05, 1, 1), (0.02, 2, 0)]
STACKED_NORMS = ["bn", "gn", "iln", "bin", "sn"]
CLOSE = dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def acdc7(tmp_path_factory):
    """7 patients (ED and ES, 3 slices each): two folds give 12 and 18 training slices."""
    return make_acdc_tree(tmp_path_factory.mktemp("acdc7"), num_patients=7, shape=(48, 40, 3))


def run_config(root, norm: str, lr: float, seed: int, fold: int, *extra: str):
    overrides = ["data=acdc", f"data.root={root}", "data.cache=false", "data.image_size=32", "model.depth=2",
                 "data.num_folds=2", f"data.fold={fold}", f"seed={seed}", f"lr={lr}", f"norm={norm}",
                 "trainer.batch_size=4", "trainer.epochs=2", "schedule=step", "schedule.milestones=[1]",
                 "data.augment.flip=true", "optim.weight_decay=0.0001", *extra]
    return compose_train(*overrides)


SPLITS: dict[tuple, tuple] = {}  # the data of a (root, fold, seed), loaded once for the module


def train_and_val(cfg):
    key = (cfg.data.root, cfg.data.fold, cfg.seed)
    if key not in SPLITS:
        splits = load_splits(cfg.data, cfg.seed, progress=False)
        for split in (splits["train"], splits["val"]):
            split.images = split.images.double()
        SPLITS[key] = splits["train"], splits["val"]
    return SPLITS[key]


class Run:
    """One run's objects, built as seg/training/loop.py builds them (float64)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train, self.val = train_and_val(cfg)
        torch.manual_seed(cfg.seed)  # the trainer's seed_everything: the initial weights
        self.model = build_model(cfg).double()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_schedule(self.optimizer, OmegaConf.to_container(cfg.schedule, resolve=True),
                                        cfg.trainer.epochs)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def feed(self) -> RunFeed:
        augment = self.cfg.data.augment
        return RunFeed(self.train.images, self.train.labels, batch_size=self.cfg.trainer.batch_size,
                       epochs=self.cfg.trainer.epochs, generator=self.generator,
                       shuffle_buffer=self.cfg.data.shuffle_buffer, augmentation=augmentation_of(augment))

    def dice(self) -> dict:
        classes = class_names(self.cfg.data.task)
        return evaluate(self.model, self.val, len(classes) + 1, classes)[0]


def train_alone(run: Run) -> dict:
    """The reference: the trainer's loop for one run. Returns its losses and, if a loss became non-finite,
    that step (the trainer ends such a run there: 'diverged')."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    post_step = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    losses = []
    for _ in range(cfg.trainer.epochs):
        model.train()
        order = epoch_order(len(run.train), run.generator, cfg.data.shuffle_buffer)
        for batch in order.split(cfg.trainer.batch_size):
            images, labels = augment_batch(run.train.images[batch], run.train.labels[batch],
                                           augmentation_of(cfg.data.augment), generator=run.generator)
            loss = F.cross_entropy(model(images), labels.long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            for layer in post_step:
                layer.after_optimizer_step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return {"losses": losses, "diverged_step": len(losses)}
        run.scheduler.step()
    return {"losses": losses, "diverged_step": None}


def train_stacked(runs: list[Run]) -> dict:
    """The same runs as one stack, as the launcher drives it; a run with a non-finite loss is frozen."""
    stack = Stack([r.model for r in runs], [r.optimizer for r in runs], norm_options=norm_options(runs[0].cfg),
                  grad_clip=[r.cfg.optim.grad_clip for r in runs])
    feeds = [r.feed() for r in runs]
    losses = [[] for _ in runs]
    epoch_ends = [[] for _ in runs]
    diverged = [None] * len(runs)
    while not stack.done(feeds):
        result = stack.train_step(feeds)
        values = result.losses.tolist()
        for k in result.runs:
            losses[k].append(values[k])
        for k in result.nonfinite():
            diverged[k] = len(losses[k])
            stack.freeze(k)
        for k in result.epoch_ended:
            if not stack.active[k]:
                continue
            runs[k].scheduler.step()
            epoch_ends[k].append(len(losses[k]))
    for k in range(len(runs)):
        stack.write_back(k)
    return {"stack": stack, "losses": losses, "epoch_ends": epoch_ends, "diverged": diverged}


def assert_same_state(actual: dict, expected: dict, label: str) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **CLOSE, msg=lambda m: f"{label} {key}: {m}")


def assert_same_momentum(actual: torch.optim.Optimizer, expected: torch.optim.Optimizer, label: str) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in e["param_groups"]]
    assert [g["lr"] for g in a["param_groups"]] == pytest.approx([g["lr"] for g in e["param_groups"]])
    for index, state in e["state"].items():
        torch.testing.assert_close(a["state"][index]["momentum_buffer"], state["momentum_buffer"], **CLOSE,
                                   msg=lambda m: f"{label} momentum of parameter {index}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("norm", STACKED_NORMS)
def test_a_stack_of_runs_equals_the_runs_trained_alone(acdc7, norm):
    configs = [run_config(acdc7, norm, *run) for run in RUNS]
    alone = [Run(cfg) for cfg in configs]
    stacked = [Run(cfg) for cfg in configs]
    assert [len(r.train) for r in alone] == [12, 18, 12]  # epochs of different lengths
    references = [train_alone(run) for run in alone]
    result = train_stacked(stacked)

    for k, (reference, run, twin) in enumerate(zip(references, alone, stacked)):
        label = f"norm={norm} run {k}"
        assert len(result["losses"][k]) == len(reference["losses"]) == 2 * math.ceil(len(run.train) / 4)
        assert result["losses"][k] == pytest.approx(reference["losses"], rel=1e-9), label
        assert result["epoch_ends"][k] == [len(reference["losses"]) // 2, len(reference["losses"])]
        assert_same_state(twin.model.state_dict(), run.model.state_dict(), label)
        assert_same_momentum(twin.optimizer, run.optimizer, label)
        dice, reference_dice = twin.dice(), run.dice()
        assert dice == pytest.approx(reference_dice, rel=1e-9, nan_ok=True), label
    if spec(norm).batch_statistics and norm != "sn":  # BN's counter, per run (12- and 18-slice runs differ)
        counters = {k: v for k, v in stacked[1].model.state_dict().items() if k.endswith("num_batches_tracked")}
        assert counters and all(int(v) == 10 for v in counters.values())
    # the learning rate followed each run's own schedule: lr, then lr/5 after its first epoch
    assert [r.optimizer.param_groups[0]["lr"] for r in stacked] == pytest.approx([lr * 0.2 for lr, _, _ in RUNS])


def test_a_diverging_run_is_frozen_and_the_others_train_on_as_alone(acdc7):
    """Run 1's rate is far too high: its loss becomes non-finite at the same step as alone, the launcher
    freezes it there (its state made finite again, no further step), and runs 0 and 2 -- which shared
    every stacked operation with it, NaNs included -- end exactly as alone."""
    runs = [(0.1, 0, 0), (1e6, 1, 1), (0.02, 2, 0)]
    configs = [run_config(acdc7, "none", *run, "model.init=kaiming", "optim.weight_decay=0") for run in runs]
    alone = [Run(cfg) for cfg in configs]
    stacked = [Run(cfg) for cfg in configs]
    references = [train_alone(run) for run in alone]
    bad = references[1]["diverged_step"]
    assert bad is not None and references[0]["diverged_step"] is None and references[2]["diverged_step"] is None
    assert bad < len(references[0]["losses"])  # the others train on after it
    result = train_stacked(stacked)
    assert result["diverged"] == [None, bad, None]
    assert len(result["losses"][1]) == bad and not math.isfinite(result["losses"][1][-1])
    assert result["losses"][1][:bad - 1] == pytest.approx(references[1]["losses"][:bad - 1], rel=1e-9)
    frozen = stacked[1].model.state_dict()
    assert all(torch.isfinite(t).all() for t in frozen.values() if t.is_floating_point())
    for k in (0, 2):
        assert result["losses"][k] == pytest.approx(references[k]["losses"], rel=1e-9)
        assert_same_state(stacked[k].model.state_dict(), alone[k].model.state_dict(), f"run {k}")
        assert_same_momentum(stacked[k].optimizer, alone[k].optimizer, f"run {k}")
        assert stacked[k].dice() == pytest.approx(alone[k].dice(), rel=1e-9, nan_ok=True)


def test_gradient_clipping_and_nesterov_per_run(acdc7):
    """optim.grad_clip clips each run's gradient by its own norm; nesterov momentum as torch's SGD."""
    configs = [run_config(acdc7, "gn", *run, "optim.grad_clip=0.5", "optim.nesterov=true") for run in RUNS[:2]]
    alone, stacked = [Run(cfg) for cfg in configs], [Run(cfg) for cfg in configs]
    references = [train_alone(run) for run in alone]
    result = train_stacked(stacked)
    for k in range(2):
        assert result["losses"][k] == pytest.approx(references[k]["losses"], rel=1e-9)
        assert_same_state(stacked[k].model.state_dict(), alone[k].model.state_dict(), f"run {k}")


# ---------------------------------------------------------------------------- the parts


@pytest.mark.parametrize("name", names(can_stack=True))
def test_a_layer_with_runs_computes_each_run_on_its_own_channels(name):
    """``runs=R`` over R*C channels = R layers over C channels (outputs, gradients, running statistics)."""
    runs, channels = 3, 16
    options = {"channels_per_group": 4, "window": 5} if name == "lcn" else {}
    layers = [make_norm(name, channels, **options).double() for _ in range(runs)]
    for layer in layers:
        with torch.no_grad():
            for param in layer.parameters():
                param.copy_(torch.rand_like(param) * 0.8 + 0.6)
    stacked = make_norm(name, runs * channels, runs=runs, **options).double()
    with torch.no_grad():
        for key, tensor in stacked.state_dict(keep_vars=True).items():
            if tensor.ndim:
                tensor.copy_(torch.cat([layer.state_dict()[key] for layer in layers]))
    xs = [(torch.randn(2, channels, 6, 5, dtype=torch.float64) * (k + 1) + k).requires_grad_() for k in range(runs)]
    x = torch.cat([t.detach() for t in xs], 1).requires_grad_()
    for mode in ("train", "eval"):
        for module in (*layers, stacked):
            module.train(mode == "train")
        outputs = [layer(t) for layer, t in zip(layers, xs)]
        output = stacked(x)
        torch.testing.assert_close(output, torch.cat(outputs, 1), **CLOSE)
        weights = torch.randn_like(output)
        output.mul(weights).sum().backward()
        sum(o.mul(w).sum() for o, w in zip(outputs, weights.chunk(runs, 1))).backward()
        torch.testing.assert_close(x.grad, torch.cat([t.grad for t in xs], 1), **CLOSE)
        for key, param in stacked.named_parameters():
            torch.testing.assert_close(param.grad, torch.cat([dict(l.named_parameters())[key].grad for l in layers]),
                                       **CLOSE)
        for key, buffer in stacked.named_buffers():
            if buffer.ndim:
                torch.testing.assert_close(buffer, torch.cat([dict(l.named_buffers())[key] for l in layers]), **CLOSE)


def test_the_registry_says_which_layers_stack():
    assert set(STACKED_NORMS) <= set(names(can_stack=True))
    assert names(can_stack=True) == ["bin", "bn", "frn", "gn", "iln", "in", "lcn", "ln", "none", "pn", "sn"]
    assert set(names(can_stack=True)) <= set(names("post_conv"))
    with pytest.raises(StackError, match="norm=kn cannot be stacked; the layers that can: bin, bn"):
        StackedUNet([UNet(norm="kn", depth=1)] * 2)
    with pytest.raises(ValueError, match="gn: 48 channels cannot hold 5 stacked runs"):
        make_norm("gn", 48, runs=5)


@pytest.mark.parametrize("preset", ["none", "nnunet"])
def test_the_augmentation_of_many_runs_at_once_is_augment_batch_per_run(preset):
    """Each run's draws from its own generator, applied together: the same as each run's ``augment_batch``,
    with the ILN protocol's rotation and flips and with every option of the nnunet preset (p = 1: all act)."""
    images, labels = torch.randn(6, 1, 32, 32), torch.randint(0, 3, (6, 32, 32), dtype=torch.uint8)
    seeds = [3, 4, 5]
    overrides = ["data.augment.flip=true"] + ([f"data.augment.{name}.p=1" for name in ALL_OPTIONS]
                                             if preset == "nnunet" else [])
    augmentation = augmentation_of(compose_train(*overrides).data.augment)
    expected = [augment_batch(images[2 * k:2 * k + 2], labels[2 * k:2 * k + 2], augmentation,
                              generator=torch.Generator().manual_seed(s)) for k, s in enumerate(seeds)]
    draws = [draw_augmentation(2, (1, 32, 32), torch.Generator().manual_seed(s), "cpu", augmentation) for s in seeds]
    got_images, got_labels = augment_together(images, labels, draws, augmentation)
    torch.testing.assert_close(got_images, torch.cat([e[0] for e in expected]))
    assert torch.equal(got_labels, torch.cat([e[1] for e in expected]))


@pytest.mark.parametrize("up", ["transpose2", "transpose3"])
def test_every_convolution_mode_computes_the_same(up):
    torch.manual_seed(0)
    models = [UNet(norm="gn", norm_options={"groups": 4}, depth=2, up=up).double() for _ in range(3)]
    stacked = StackedUNet(models, {"groups": 4})
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = torch.cat([m(x[:, k:k + 1]) for k, m in enumerate(models)], 1)
    for mode in CONV_MODES:
        for module in stacked.modules():
            if hasattr(module, "mode"):
                module.mode = mode if mode in module.modes else "grouped"
        assert mode in set(conv_modes(stacked).values())
        torch.testing.assert_close(stacked(x), expected, **CLOSE)
    for k, model in enumerate(models):
        assert_same_state(stacked.run_state_dict(k), model.state_dict(), f"run {k}")


def test_stacked_runs_must_share_the_architecture_the_norm_and_sgd(acdc7):
    base = run_config(acdc7, "bn", 0.1, 0, 0)
    check_stackable([base, run_config(acdc7, "bn", 0.5, 3, 1, "trainer.epochs=3", "model.init=kaiming")])
    assert stack_key(base) == stack_key(run_config(acdc7, "bn", 0.5, 1, 1))
    for extra, message in [(("norm=gn",), "differ in norm.name"), (("model.depth=1",), "differ in model.depth"),
                           (("trainer.batch_size=2",), "differ in trainer.batch_size")]:
        with pytest.raises(StackError, match=message):
            check_stackable([base, run_config(acdc7, "bn", 0.1, 0, 0, *extra)])
    with pytest.raises(StackError, match="optim.name='adam' cannot be stacked"):
        check_stackable([run_config(acdc7, "bn", 0.1, 0, 0, "optim.name=adam")])
    with pytest.raises(StackError, match="norm=kn cannot be stacked"):
        check_stackable([run_config(acdc7, "kn", 0.1, 0, 0)])
    model = UNet(norm="bn", depth=1)
    with pytest.raises(StackError, match="Adam; a stack trains with SGD"):
        Stack([model], [torch.optim.Adam(model.parameters())])
    with pytest.raises(StackError, match="run 1's U-Net differs from run 0's"):
        StackedUNet([UNet(norm="bn", depth=1), UNet(norm="bn", depth=2)])
    with pytest.raises(StackError, match="not the layer that norm=gn with {'groups': 8} builds"):
        StackedUNet([UNet(norm="gn", depth=1)] * 2, {"groups": 8})


def test_a_run_taken_out_of_the_stack_and_put_back_continues_unchanged():
    """``write_back`` gives an ordinary UNet state_dict and optimizer state; ``read_back`` restores them
    (what resuming a stacked run from its checkpoint does)."""
    torch.manual_seed(0)
    models = [UNet(norm="bin", depth=1, base_channels=4).double() for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    stack = Stack(models, optimizers)
    x, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randint(0, 2, (2, 2, 8, 8))
    stack.step(x, y)
    saved = copy.deepcopy(stack.write_back(1).state_dict()), copy.deepcopy(optimizers[1].state_dict())
    stack.step(x, y)
    models[1].load_state_dict(saved[0])
    optimizers[1].load_state_dict(saved[1])
    stack.read_back(1)
    assert_same_state(stack.model.run_state_dict(1), saved[0], "run 1 put back")
    restored = stack.optimizer.write_back(1).state_dict()["state"]
    for index, state in saved[1]["state"].items():
        assert torch.equal(restored[index]["momentum_buffer"], state["momentum_buffer"])


@pytest.mark.slow
def test_the_benchmark_runs_and_writes_its_page(tmp_path):
    """scripts/bench_stacked.py at tiny sizes (its figures mean nothing here): the page it writes has its
    stamp and every section."""
    out = tmp_path / "stacked.md"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_stacked.py"), "--smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    for part in ("- command: `python scripts/bench_stacked.py --smoke", "- commit: `", "- torch: ",
                 "## The two designs at K = 2", "## Stacked against sequential", "| 2 | ", "measured twice"):
        assert part in page, part


def test_a_stack_of_channels_last_models_trains_as_the_contiguous_one():
    """The trainer keeps its models channels-last (trainer.channels_last, the default): a stack built from them
    takes its weights as they are and steps them exactly as from contiguous models."""
    torch.manual_seed(0)
    models = [UNet(norm="bn", depth=1, base_channels=4).double() for _ in range(2)]
    twins = [copy.deepcopy(m).to(memory_format=torch.channels_last) for m in models]
    stacks = [Stack(ms, [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in ms]) for ms in (models, twins)]
    x, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randint(0, 2, (2, 2, 8, 8))
    for stack in stacks:
        stack.step(x, y)
        stack.step(x, y)
    for k in range(2):
        assert_same_state(stacks[1].model.run_state_dict(k), stacks[0].model.run_state_dict(k), f"run {k}")
