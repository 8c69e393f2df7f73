"""Edges a new user hits: the memory format of ambiguous tensors, and degenerate sizes.

* Layout: conv2d chooses its output's memory format from the *exact* strides of x and the weight
  (``suggest_memory_format``). A tensor with one channel, or 1x1 pixels, is "contiguous" in both
  formats by ``is_contiguous``, so deciding from that gives a channels_last y where conv2d gives
  NCHW (and ``y.view(N, -1)`` then fails). The op must give y conv2d's strides in every mode, and
  dx the layout x had.
* Degenerate sizes: an empty batch is computed as PyTorch computes it (empty y, zero gradients,
  running statistics untouched); no input channels, no output channels and an empty output are
  refused with a ValueError naming the argument before any kernel runs.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from _helpers import Shape, assert_close, grad_output, make_inputs, pre_activation, reference, run
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU, grouped_conv_bn_relu
from kernels.layout import suggest_memory_format

CL = torch.channels_last

LAYOUT_SHAPES = [  # (n, c_in, c_out, groups, h, w)
    pytest.param(Shape(2, 1, 8, 1, 5, 6), id="cin1"),       # x NCHW is also channels_last-contiguous
    pytest.param(Shape(2, 4, 1, 1, 5, 6), id="cout1"),      # y NCHW is also channels_last-contiguous
    pytest.param(Shape(2, 1, 1, 1, 5, 6), id="cin1-cout1"),
    pytest.param(Shape(6, 4, 8, 2, 1, 1), id="hw1"),        # 1x1 pixels: both formats at once
    pytest.param(Shape(1, 4, 8, 2, 5, 6), id="n1"),
    pytest.param(Shape(1, 1, 1, 1, 1, 1), id="all1"),
]
LAYOUTS = [  # (x layout, weight layout)
    pytest.param(torch.contiguous_format, torch.contiguous_format, id="x-nchw"),
    pytest.param(CL, torch.contiguous_format, id="x-cl"),
    pytest.param(torch.contiguous_format, CL, id="w-cl"),  # conv2d: channels_last if either is
]
MODES = [  # (training, with grad)
    pytest.param(False, False, id="inference"),
    pytest.param(False, True, id="frozen-bn-grad"),
    pytest.param(True, False, id="train-no-grad"),
    pytest.param(True, True, id="train-grad"),
]


def _strided_inputs(shape, x_format, w_format, device, requires_grad):
    inputs = make_inputs(shape, torch.float32, device, requires_grad=requires_grad)
    for k, fmt in (("x", x_format), ("weight", w_format)):
        # torch.empty(..., memory_format) gives the format's canonical strides even for size-1 dims
        # (``t.contiguous(memory_format)`` would keep the ambiguous tensor's strides as they are)
        t = torch.empty(inputs[k].shape, device=device, memory_format=fmt).copy_(inputs[k].detach())
        inputs[k] = t.requires_grad_(requires_grad)
    return inputs


@pytest.mark.parametrize("training, grad", MODES)
@pytest.mark.parametrize("x_format, w_format", LAYOUTS)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
def test_output_and_grad_layout_follow_conv2d(shape, x_format, w_format, training, grad, device):
    if training and shape.n * shape.h * shape.w == 1:
        pytest.skip("training BatchNorm needs more than one value per channel")
    inputs = _strided_inputs(shape, x_format, w_format, device, grad)
    expected = F.conv2d(inputs["x"].detach(), inputs["weight"].detach(), None, 1, 1, 1, shape.groups)
    dy = grad_output(pre_activation(inputs, shape, training)) if grad else None
    y = run(grouped_conv_bn_relu, inputs, shape, dy=dy, training=training)
    assert y.stride() == expected.stride(), (
        f"y strides {y.stride()} != conv2d's {expected.stride()} (x {inputs['x'].stride()}, "
        f"weight {inputs['weight'].stride()})")
    if expected.is_contiguous():
        y.view(shape.n, -1)  # what the user did: fails on channels_last strides
    y_ref, _, _, ref_grads = reference(inputs, shape, dy=dy, training=training)
    assert_close(y, y_ref, torch.float32, "y")
    if grad:
        dx = inputs["x"].grad
        assert dx.stride() == inputs["x"].stride(), f"dx strides {dx.stride()} != x's {inputs['x'].stride()}"
        assert_close(dx, ref_grads["x"], torch.float32, "dx")
        assert_close(inputs["weight"].grad, ref_grads["weight"], torch.float32, "dweight")


def test_dx_layout_through_autograd_grad(device):
    """``torch.autograd.grad`` returns dx as the op made it (no AccumulateGrad restriding)."""
    shape = Shape(2, 1, 8, 1, 5, 6)
    inputs = _strided_inputs(shape, torch.contiguous_format, torch.contiguous_format, device, True)
    y = grouped_conv_bn_relu(*inputs.values(), groups=1, training=True)
    (dx,) = torch.autograd.grad(y.sum(), inputs["x"])
    assert dx.stride() == inputs["x"].stride()


@pytest.mark.parametrize("strides, expected", [
    pytest.param((60, 30, 6, 1), torch.contiguous_format, id="nchw-c1-is-nchw"),  # (2, 1, 5, 6)
    pytest.param((30, 1, 6, 1), CL, id="nhwc-c1"),
    pytest.param((30, 30, 6, 1), torch.contiguous_format, id="nchw-c1-exact"),
])
def test_suggest_memory_format_matches_pytorch(strides, expected):
    t = torch.empty_strided((2, 1, 5, 6), strides)
    assert suggest_memory_format(t) == expected
    # PyTorch's own rule, as conv2d applies it on the CPU (the same rule as cuDNN's)
    out = F.conv2d(t.normal_(), torch.randn(4, 1, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=expected) and (
        expected == torch.contiguous_format) == out.is_contiguous()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("x_format", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_empty_batch_computes_what_pytorch_computes(training, x_format, device):
    shape = Shape(0, 6, 12, 3, 7, 8)
    inputs = make_inputs(shape, torch.float32, device, requires_grad=True)
    inputs["x"] = inputs["x"].detach().contiguous(memory_format=x_format).requires_grad_(True)
    before = inputs["running_mean"].clone(), inputs["running_var"].clone()
    y = run(grouped_conv_bn_relu, inputs, shape, training=training)
    y_ref, rm_ref, rv_ref, _ = reference(inputs, shape, dtype=None, training=training)
    assert y.shape == y_ref.shape == (0, 12, 7, 8)
    assert y.stride() == y_ref.stride()
    y.sum().backward()  # PyTorch's: dx empty; dweight, dgamma, dbeta zero (sums over no pixels)
    assert inputs["x"].grad.shape == inputs["x"].shape
    for k in ("weight", "bn_weight", "bn_bias"):
        g = inputs[k].grad
        assert g is not None and g.shape == inputs[k].shape and not g.any(), f"{k}: {g}"
    assert torch.equal(inputs["running_mean"], before[0]) and torch.equal(rm_ref.float(), before[0])
    assert torch.equal(inputs["running_var"], before[1]) and torch.equal(rv_ref.float(), before[1])


def test_empty_batch_module_counts_the_batch(device):
    """nn.BatchNorm2d counts every training call, an empty one too."""
    fused = GroupedConvBNReLU(6, 12, groups=3).to(device)
    ref = torch.nn.Sequential(fused.conv, fused.bn)  # same modules, eager
    fused(torch.randn(0, 6, 7, 8, device=device))
    assert int(fused.bn.num_batches_tracked) == 1
    ref(torch.randn(0, 6, 7, 8, device=device))
    assert int(fused.bn.num_batches_tracked) == 2


def names(arg):
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


@pytest.mark.parametrize("x_shape, w_shape, groups, padding, arg", [
    # PyTorch's own conv tests run this one: it returns an (N, 0, H, W) tensor, not 12 channels
    pytest.param((2, 0, 7, 8), (12, 0, 3, 3), 3, 1, "x", id="no-input-channels"),
    pytest.param((2, 6, 7, 8), (0, 2, 3, 3), 3, 1, "weight", id="no-output-channels"),
    pytest.param((2, 6, 0, 8), (12, 2, 3, 3), 3, 1, "x", id="zero-height"),
    pytest.param((2, 6, 7, 0), (12, 2, 3, 3), 3, 1, "x", id="zero-width"),
    pytest.param((2, 6, 2, 8), (12, 2, 3, 3), 3, 0, "padding", id="output-height-0"),
])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_degenerate_sizes_raise_before_any_kernel(x_shape, w_shape, groups, padding, arg, training,
                                                  device):
    x = torch.randn(x_shape, device=device, requires_grad=True)
    weight = torch.randn(w_shape, device=device, requires_grad=True)
    c = w_shape[0]
    running_mean, running_var = torch.zeros(c, device=device), torch.ones(c, device=device)
    with pytest.raises(ValueError, match=names(arg)):
        grouped_conv_bn_relu(x, weight, None, None, running_mean, running_var, padding=padding,
                             groups=groups, training=training)
    assert not running_mean.any() and torch.all(running_var == 1)
