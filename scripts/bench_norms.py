"""Forward + backward time of every normalization layer, as a ratio to torch's GroupNorm, in one run.

    python scripts/bench_norms.py                       # CPU, (8, 16, 256, 256)
    python scripts/bench_norms.py --device cuda
    python scripts/bench_norms.py --channels-last       # the trainer's memory format
    python scripts/bench_norms.py --threads 1           # steadier on a machine shared with other jobs
    python scripts/bench_norms.py --layers bin iln sn   # some layers only (GroupNorm is always timed)

Two tables. "Layer alone": every layer that sits after a convolution, on the same input tensor,
against ``torch.nn.GroupNorm(16, 16)``; a straightforward ILN (three separate
normalizations, then the mix and a group norm, all through autograd) is listed for comparison
with our one-pass ILN. "Convolution + layer": the 3x3 conv + norm pair as the U-Net builds it
(``make_conv_norm``), so that the layers that replace the pair (kn, wn, bkn) are timed too,
against conv + GroupNorm; a single bkn pair has no preceding BKN layer, so it runs on batch
statistics (the prior adds only (C,)-sized work).

Conditional layers (cin, adain, spade, sean) are timed with a fixed ``Condition`` for the batch:
an image of the tensor's size, 4 domain ids, 64-wide style codes, soft masks of 4 regions at
1/4 resolution with their codes. Their time includes each layer's own modulation network (for
spade and sean the 128-channel 3x3 convs, at the full resolution of the tensor), not the
conditioner the U-Net runs once per forward pass for all layers. Those convolutions are the methods'
own cost, so a third table gives spade and sean against that 128-wide conv pair alone (plain torch
convolutions from the image to (gamma, beta), timed in the same rounds), and sean against spade
(the cost of its region path).

A step is forward, then the gradients of a fixed upstream gradient with respect to the input
and every parameter (``torch.autograd.grad``, nothing accumulates). Candidates are timed in
interleaved rounds and the median round is reported, so drift of the machine affects all alike.
The median and its ratio are the result; the ratio of the best rounds is printed beside it
because on a shared machine other load inflates some rounds. Compare numbers within one run only.

These layers are memory-bound, so the "Layer alone" table also gives each layer's achieved memory
bandwidth against the machine's measured copy bandwidth (``Tensor.copy_`` of a buffer of at least
1 GiB on a GPU, well beyond its L2 cache; of the input's size on a CPU; bytes read plus bytes
written per second), the physical limit for them. A layer's bytes are the least any implementation
of a step must move: five passes over the input's size (forward: read x, write y; backward: read x
and the upstream gradient, write the input's gradient); the parameters and statistics are (C,)-sized
and not counted. A fraction near 1 means nothing is left to gain; extra passes show as a lower one.
Writes docs/results/bench_norms.md (``--out``: elsewhere; ``--json``: the figures as JSON too).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness import interleaved_times, markdown_table, write_json, write_result
from seg.norms import Condition, context_options, make_conv_norm, make_norm, names, spec


class UnfusedILN(nn.Module):
    """ILN computed the straightforward way: IN, LN and GN each as its own normalization."""

    def __init__(self, num_channels: int, groups: int = 16, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.rho = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.weight = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x):
        var_in, mean_in = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        out_in = (x - mean_in) / torch.sqrt(var_in + self.eps)
        var_ln, mean_ln = torch.var_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)
        out_ln = (x - mean_ln) / torch.sqrt(var_ln + self.eps)
        s = torch.sigmoid(self.rho)
        mixed = s * out_in + (1 - s) * out_ln
        return F.group_norm(mixed, self.groups, eps=self.eps) * self.weight + self.bias


class WithCondition(nn.Module):
    """A conditional layer (or pair) applied with a fixed condition, so it is timed like the others."""

    def __init__(self, module: nn.Module, cond: Condition):
        super().__init__()
        self.module, self.cond = module, cond

    def forward(self, x):
        return self.module(x, self.cond)


class ModulationConvs(nn.Module):
    """The cost that SPADE and SEAN cannot shed: the 128-wide pair of 3x3 convolutions that maps the image to
    (gamma, beta), as plain torch convolutions (1 -> 128 channels, ReLU, 128 -> 2 C), without any normalization."""

    def __init__(self, num_channels: int, image: torch.Tensor, hidden: int = 128):
        super().__init__()
        self.image = image
        self.convs = nn.Sequential(nn.Conv2d(image.shape[1], hidden, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden, 2 * num_channels, 3, padding=1))

    def forward(self, x):
        return self.convs(self.image)


MODULATION = "128-wide conv pair (spade's modulation convs alone)"


def conditional_table(figures: dict) -> str:
    """spade and sean against the 128-wide conv pair they are built on, and sean's region path against spade."""
    reference = figures[MODULATION]["ms"]
    rows = [[name, f"{figures[name]['ms']:.1f}", f"{figures[name]['ms'] / reference:.2f}",
             f"{figures[name]['ms'] / figures['spade']['ms']:.2f}" if name == "sean" and "spade" in figures else ""]
            for name in ("spade", "sean") if name in figures]
    text = ("## Conditional layers against their modulation convolutions\n\n"
            + markdown_table(["layer", "ms fwd+bwd (median)", "ratio to the 128-wide conv pair", "ratio to spade"],
                             rows))
    print("\n" + text, flush=True)
    return text


def bench_condition(x: torch.Tensor, num_domains: int = 4, style_dim: int = 64, regions: int = 4) -> Condition:
    """A condition of the shapes the U-Net gives its layers at the resolution of ``x``."""
    n, _, h, w = x.shape
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, regions, max(h // 4, 1), max(w // 4, 1), generator=generator)
    return Condition(image=torch.randn(n, 1, h, w, generator=generator).to(x.device),
                     domain=torch.arange(n).remainder(num_domains).to(x.device),
                     style=torch.randn(n, style_dim, generator=generator).to(x.device),
                     regions=torch.softmax(logits, 1).to(x.device),
                     region_codes=torch.randn(n, regions, style_dim, generator=generator).to(x.device))


def build(name: str, make, cond: Condition, *args) -> nn.Module:
    """``make(name, *args)``, wrapped with ``cond`` if the layer is conditional (4 domains, 4 regions)."""
    if spec(name).kind != "conditional":
        return make(name, *args)
    return WithCondition(make(name, *args, **context_options(name, num_domains=4, num_regions=4)), cond)


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]

    def step():
        torch.autograd.grad(module(x), inputs, grad, allow_unused=True)  # the conv pair does not read x

    return step


def run(candidates: dict, x: torch.Tensor, grad_for, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of every candidate in each round; the candidates are interleaved per round."""
    steps = {}
    for name, module in candidates.items():
        module.to(x.device).train()
        probe = module(x)
        steps[name] = step_fn(module, x, grad_for(probe))
        steps[name]()  # warm-up
    return interleaved_times(steps, rounds, repeats, x.device)


PASSES = 5  # the least a forward + backward step moves, in input-sized tensors: x, y; x, grad y, grad x


def copy_bandwidth(device: torch.device, nbytes: int, rounds: int) -> float:
    """Bytes per second that ``Tensor.copy_`` moves (read + written) between two float32 buffers of ``nbytes``
    on ``device``: the median of ``rounds`` interleaved rounds."""
    source = torch.randn(max(nbytes // 4, 1), device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    seconds = statistics.median(interleaved_times({"copy": lambda: target.copy_(source)}, rounds, 10,
                                                  device)["copy"])
    return 2 * source.numel() * source.element_size() / seconds


def table(title: str, times: dict[str, list[float]], reference: str, step_bytes: int | None = None,
          copy_bytes_per_s: float | None = None) -> tuple[str, dict]:
    """Median time and its ratio to the reference; the ratio of the best rounds too (less sensitive
    to other load on the machine); with ``step_bytes`` (the least bytes a step moves) and
    ``copy_bytes_per_s``, the achieved bandwidth and its fraction of the copy bandwidth. The table and
    its figures per layer."""
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    figures = {name: {"ms": 1000 * median[name], "ratio": median[name] / median[reference],
                      "ratio_best": best[name] / best[reference]} for name in times}
    header = ["layer", "ms fwd+bwd (median)", f"ratio to {reference}", "ratio, best rounds"]
    if step_bytes is not None and copy_bytes_per_s is not None:
        header += [f"GB/s ({PASSES} passes of the input)", "fraction of copy bandwidth"]
        for name in times:
            figures[name]["gb_per_s"] = step_bytes / median[name] / 1e9
            figures[name]["copy_fraction"] = step_bytes / median[name] / copy_bytes_per_s
    rows = [[name, f"{f['ms']:.1f}", f"{f['ratio']:.2f}", f"{f['ratio_best']:.2f}"]
            + ([f"{f['gb_per_s']:.3g}", f"{f['copy_fraction']:.2f}"] if "gb_per_s" in f else [])
            for name, f in figures.items()]
    text = f"## {title}\n\n" + markdown_table(header, rows)
    print("\n" + text, flush=True)
    return text, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 16, 256, 256], metavar=("N", "C", "H", "W"))
    parser.add_argument("--channels-last", action="store_true", help="channels_last tensors and modules")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="steps per round, layer alone")
    parser.add_argument("--pair-repeats", type=int, default=3, help="steps per round, conv + layer")
    parser.add_argument("--skip-pairs", action="store_true", help="only the layer-alone table")
    parser.add_argument("--layers", nargs="+", choices=names(), help="only these layers (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="the result page (default: docs/results/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    n, c, h, w = args.shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt).requires_grad_()

    about = (f"Forward + backward of each normalization layer on a ({n}, {c}, {h}, {w}) float32 tensor"
             f"{', channels_last' if args.channels_last else ''} on {device}, as a ratio to torch's GroupNorm; then "
             f"each layer with its 3x3 convolution (`make_conv_norm`, the U-Net's pair). Median of {args.rounds} "
             f"interleaved rounds of {args.repeats} steps (layer alone) / {args.pair_repeats} (pairs).")
    print(about)

    gn = "GroupNorm(16, 16) (torch)"
    layers = {gn: nn.GroupNorm(16, c)}
    cond = bench_condition(x)
    chosen = sorted(args.layers or names())
    layers.update({name: build(name, make_norm, cond, c) for name in chosen if spec(name).kind != "conv_pair"})
    if "iln" in chosen:
        layers["iln, unfused (3 separate norms)"] = UnfusedILN(c)
    if {"spade", "sean"} & set(chosen):
        layers[MODULATION] = ModulationConvs(c, cond.image)
    layers = {name: m.to(memory_format=fmt) for name, m in layers.items()}
    same_shape = torch.randn_like(x)
    copy_bytes = max(x.numel() * x.element_size(), 2**30 if device.type == "cuda" else 0)
    copy_rate = copy_bandwidth(device, copy_bytes, args.rounds)
    about += (f" Copy bandwidth on {device}: {copy_rate / 1e9:.3g} GB/s (read + written, {copy_bytes / 2**20:.3g} MiB "
              f"buffers); a layer's bandwidth counts {PASSES} passes of the input ({PASSES} x "
              f"{x.numel() * x.element_size() / 2**20:.3g} MiB per step).")
    upstream = (lambda probe: same_shape if probe.shape == same_shape.shape else torch.randn_like(probe))
    alone, alone_figures = table("Layer alone", run(layers, x, upstream, args.rounds, args.repeats),
                                 gn, PASSES * x.numel() * x.element_size(), copy_rate)
    tables, figures = [alone], {"layer_alone": alone_figures}
    if MODULATION in alone_figures:
        tables.append(conditional_table(alone_figures))

    if not args.skip_pairs:
        conv_gn = "conv 3x3 + GroupNorm(16, 16)"
        pairs = {conv_gn: make_conv_norm("gn", c, c, 3)}
        pairs.update({f"conv 3x3 + {name}": build(name, make_conv_norm, cond, c, c, 3) for name in chosen})
        pairs = {name: m.to(memory_format=fmt) for name, m in pairs.items()}
        pair_table, figures["pairs"] = table(
            "Convolution + layer (the U-Net's pair, make_conv_norm)",
            run(pairs, x, lambda probe: torch.randn_like(probe), args.rounds, args.pair_repeats), conv_gn)
        tables.append(pair_table)
    write_result("bench_norms", "Normalization layers: forward + backward against GroupNorm", "\n".join(tables),
                 about, args.out)
    if args.json:
        write_json(args.json, {"device": str(device), "shape": [n, c, h, w], "channels_last": args.channels_last,
                               "copy_bytes_per_s": copy_rate, "reference": gn, **figures})


if __name__ == "__main__":
    main()
