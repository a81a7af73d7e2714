"""The ILN author's protocol (experiment=iln_paper): the network of the published code (depth 5, 3x3
stride-2 transposed convolutions with TensorFlow's 'same' geometry, its initialisation), the shuffle
buffer of 500, and the foreground threshold softmax >= 0.5 against the project's arg-max."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_train
from seg.evaluation.dice import predict
from seg.training.ordering import epoch_order
from seg.model.unet import TransposeConv3, UNet, initialize

# ---------------------------------------------------------------------------- the up-convolution


def tf_same_conv3_stride2(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TensorFlow's conv2d(kernel 3, strides 2, padding='same') of an even-sized input: one row and column
    of zeros at the bottom/right only (pad_top = pad_needed // 2 = 0)."""
    return F.conv2d(F.pad(y, (0, 1, 0, 1)), weight, stride=2)


def test_transpose3_is_the_adjoint_of_tensorflows_same_convolution():
    """TF's conv2d_transpose(strides=2, padding='same') is, by definition, the gradient (adjoint) of that
    convolution: <T x, y> = <x, C y> for all x, y. PyTorch's padding=1, output_padding=1 is not."""
    torch.manual_seed(0)
    up = TransposeConv3(5, 3).double()
    nn.init.zeros_(up.bias)
    x, y = torch.randn(2, 5, 4, 6, dtype=torch.float64), torch.randn(2, 3, 8, 12, dtype=torch.float64)
    out = up(x)
    assert out.shape == (2, 3, 8, 12)
    adjoint = tf_same_conv3_stride2(y, up.weight.detach())  # (C_in, C_out, k, k): a conv from C_out to C_in
    assert (out * y).sum().item() == pytest.approx((x * adjoint).sum().item(), rel=1e-12)

    shifted = nn.ConvTranspose2d(5, 3, 3, stride=2, padding=1, output_padding=1, bias=False).double()
    shifted.weight.data.copy_(up.weight)
    assert shifted(x).shape == out.shape
    assert (shifted(x) * y).sum().item() != pytest.approx((x * adjoint).sum().item(), rel=1e-6)


def test_transpose3_sits_between_a_norm_and_relu_like_every_conv():
    model = UNet(depth=2, norm="gn", norm_options={"groups": 4}, up="transpose3")
    for block in model.upsample:
        assert isinstance(block.conv_norm.conv, TransposeConv3) and isinstance(block.conv_norm.norm, nn.GroupNorm)
        assert block.conv_norm.conv.kernel_size == (3, 3) and block.conv_norm.conv.stride == (2, 2)
    assert model(torch.randn(1, 1, 16, 20)).shape == (1, 2, 16, 20)


@pytest.mark.parametrize("norm", ["kn", "wn", "bkn"])
def test_transpose3_is_refused_for_layers_that_replace_the_conv(norm):
    with pytest.raises(ValueError, match=f"model.up=transpose3 is not available for norm={norm}"):
        UNet(depth=1, norm=norm, up="transpose3")


def author_parameter_count(depth: int = 5, base: int = 16, classes: int = 2) -> int:
    """The weights and biases of the published code's network (N_BLOCK = depth + 1 levels, N_CONV = 2,
    CONV_SIZE = 3, no normalization layer in the published file), counted from its loops."""
    widths = [base * 2**level for level in range(depth + 1)]
    total, previous = 0, 1
    for width in widths:  # the way down: two 3x3 convs per level
        total += 9 * previous * width + width + 9 * width * width + width
        previous = width
    for level in range(depth - 1, -1, -1):  # the way up: 3x3 transposed conv, then two 3x3 convs on the concat
        width = widths[level]
        total += 9 * widths[level + 1] * width + width
        total += 9 * 2 * width * width + width + 9 * width * width + width
    return total + widths[0] * classes + classes  # the 1x1 logits conv


@pytest.mark.slow
def test_depth5_transpose3_is_the_published_network():
    model = UNet(depth=5, norm="none", up="transpose3", init="author")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert sorted({m.out_channels for m in convs if m.kernel_size == (3, 3)}) == [16, 32, 64, 128, 256, 512]
    assert sum(p.numel() for p in model.parameters()) == author_parameter_count()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


# ---------------------------------------------------------------------------- initialisation

# TensorFlow's truncated_normal(stddev=s) re-draws values beyond 2 s: its std is s * sqrt(1 - 2 * 2 phi(2) /
# (2 Phi(2) - 1)) with phi, Phi the standard normal density and distribution function
PHI2 = math.exp(-2) / math.sqrt(2 * math.pi)
TF_STD_FACTOR = math.sqrt(1 - 4 * PHI2 / math.erf(2 / math.sqrt(2)))


def test_paper_init_is_tensorflows_truncated_normal():
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3)  # 147456 weights
    initialize(conv, "paper", 0.1)
    s = math.sqrt(2 / (9 * 128))
    assert TF_STD_FACTOR == pytest.approx(0.8796, abs=1e-4)
    assert conv.weight.std().item() == pytest.approx(s * TF_STD_FACTOR, rel=0.01)
    assert conv.weight.abs().max().item() <= 2 * s and conv.weight.abs().max().item() > 1.99 * s  # bounds at 2 s
    assert torch.all(conv.bias == 0.1)
    up = TransposeConv3(256, 128)  # the transposed conv: C_out = filters, as in the code
    initialize(up, "paper", 0.1)
    assert up.weight.std().item() == pytest.approx(s * TF_STD_FACTOR, rel=0.01)


def test_author_init_draws_the_output_conv_with_the_last_3x3_std():
    torch.manual_seed(0)
    author, paper = UNet(depth=1, norm="none", init="author"), UNet(depth=1, norm="none", init="paper")
    last_3x3 = math.sqrt(2 / (9 * 16))  # stddev of the loop's last level (16 features), reused for the logits
    assert author.head.weight.abs().max().item() <= 2 * last_3x3
    assert paper.head.weight.abs().max().item() > 2 * last_3x3  # paper: sqrt(2 / (1 * 2)) = 1
    assert torch.all(author.head.bias == 0.1)


# ---------------------------------------------------------------------------- the shuffle buffer


def test_no_buffer_is_torchs_permutation():
    """data.shuffle_buffer=null keeps the trainer's order bit for bit (same generator state, same order)."""
    order = epoch_order(50, torch.Generator().manual_seed(3))
    assert torch.equal(order, torch.randperm(50, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("n, buffer", [(1, 500), (7, 1), (30, 4), (30, 30), (200, 500), (1000, 17)])
def test_buffer_order_is_a_permutation_that_cannot_run_ahead(n, buffer):
    order = epoch_order(n, torch.Generator().manual_seed(n + buffer), buffer)
    assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(n))
    # item i enters the buffer at step i - buffer + 1: it cannot come out before
    assert all(item <= step + buffer - 1 for step, item in enumerate(order.tolist()))
    again = epoch_order(n, torch.Generator().manual_seed(n + buffer), buffer)
    assert torch.equal(order, again)  # a pure function of the generator's state


def test_buffer_of_one_keeps_the_stored_order():
    assert epoch_order(9, torch.Generator().manual_seed(0), 1).tolist() == list(range(9))


def test_buffer_draws_uniformly_from_its_contents():
    """TF's shuffle emits a uniform draw of the buffer: the first item is one of the first B, each with
    probability 1/B; the last B items come out as a uniform permutation of what is left."""
    draws, buffer = 3000, 4
    first = torch.zeros(buffer)
    for seed in range(draws):
        order = epoch_order(12, torch.Generator().manual_seed(seed), buffer)
        first[order[0]] += 1
    assert first.sum() == draws and torch.all((first / draws - 1 / buffer).abs() < 0.035)


@pytest.mark.slow
def test_bad_shuffle_buffer_is_refused_at_start(tmp_path):
    result = run_train("experiment=smoke", f"paths.data_dir={tmp_path}", "data.shuffle_buffer=0",
                       f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "data.shuffle_buffer must be at least 1" in result.stderr
    result = run_train("experiment=smoke", f"paths.data_dir={tmp_path}", "model.up=transpose4",
                       f"hydra.run.dir={tmp_path / 'run2'}", check=False)
    assert result.returncode == 1 and "model.up='transpose4' is not valid; choose one of: transpose2, transpose3" \
        in result.stderr


# ---------------------------------------------------------------------------- the foreground threshold


class FixedLogits(nn.Module):
    """A 'model' that returns given logits: the input to the project's real ``predict``."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, domain=None):
        return self.logits[: x.shape[0]]


def test_softmax_threshold_equals_argmax_except_on_exact_ties():
    """The author's foreground is softmax(logits)[1] >= 0.5; the project's is the arg-max. For two classes
    these agree on the logits of a real U-Net, and differ only where both logits are equal (to float
    precision): the threshold then says foreground, the arg-max (first maximum) background."""
    torch.manual_seed(0)
    model = UNet(depth=2, norm="gn", norm_options={"groups": 4}).eval()
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        threshold = (model(images).softmax(1)[:, 1] >= 0.5).long()
    assert torch.equal(predict(model, images, batch_size=2), threshold)
    assert 0 < threshold.float().mean() < 1  # both classes occur: the comparison is not trivial

    logits = torch.tensor([[0.3, 0.3, 2.0, -1.0, 1.0], [0.3, 0.3 + 1e-9, 1.0, 0.5, 1.0 + 2e-7]])
    logits = logits.view(1, 2, 1, 5)  # five pixels: tie, tie to float precision, bg, fg, just fg
    threshold = (logits.softmax(1)[:, 1] >= 0.5).long()
    arg_max = predict(FixedLogits(logits), torch.zeros(1, 1, 1, 5), batch_size=1)
    assert threshold.tolist() == [[[1, 1, 0, 1, 1]]]
    assert arg_max.tolist() == [[[0, 0, 0, 1, 1]]]
