"""Fused grouped conv + BN + ReLU, inference (training=False: BatchNorm folded, frozen statistics).

Every case runs the fused op and PyTorch's eager ops (float64, same rounded inputs) and compares
the output, its dtype and memory format, and checks the running statistics stay bitwise
untouched. Shapes are tiny: on a CPU the kernels run in Triton's interpreter.
"""

import pytest
import torch

from _helpers import (DTYPES, HALF_DTYPES, Shape, assert_close, assert_within_2x_pytorch,
                      bf16_gpu_only, fresh, make_inputs, reference, run)
from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu

# (N, C_in, C_out, groups, H, W, stride); the id says what each case covers
SHAPES = [
    pytest.param(Shape(2, 8, 8, 8, 5, 5, 1), id="depthwise-cpg1"),
    pytest.param(Shape(2, 8, 8, 8, 7, 7, 2), id="depthwise-stride2-odd"),
    pytest.param(Shape(2, 16, 16, 4, 6, 6, 1), id="cpg4-32x4d-stage1"),
    pytest.param(Shape(1, 32, 32, 4, 7, 7, 2), id="cpg8-stride2"),
    pytest.param(Shape(2, 32, 32, 2, 9, 7, 2), id="cpg16-stride2-nonsquare"),
    pytest.param(Shape(1, 64, 64, 2, 5, 5, 1), id="cpg32"),
    pytest.param(Shape(1, 64, 64, 1, 4, 3, 1), id="cpg64-dense"),
    pytest.param(Shape(1, 96, 96, 1, 3, 3, 2), id="cpg96-wider-than-tile"),  # > 64-channel tile
    pytest.param(Shape(2, 12, 24, 3, 5, 5, 1), id="cin4-cout8"),  # C_out/groups != C_in/groups
    pytest.param(Shape(1, 16, 8, 4, 5, 5, 2), id="cin4-cout2"),
    pytest.param(Shape(1, 15, 25, 5, 5, 4, 1), id="cin3-cout5-ragged-tile"),  # groups straddle tiles
    pytest.param(Shape(2, 8, 8, 2, 1, 1, 1), id="1x1-spatial"),
    pytest.param(Shape(2, 8, 8, 2, 1, 1, 2), id="1x1-spatial-stride2"),
    pytest.param(Shape(1, 8, 16, 4, 3, 8, 2), id="wide-nonsquare"),
    pytest.param(Shape(2, 4, 8, 2, 13, 11, 1), id="pixels-gt-256"),  # several pixel tiles on a GPU
]
MEMORY_FORMATS = [pytest.param(torch.contiguous_format, id="nchw"),
                  pytest.param(torch.channels_last, id="nhwc")]


def check_inference(shape, dtype, device, memory_format, padding=1, eps=1e-5, seed=0):
    inputs = make_inputs(shape, dtype, device, channels_last=memory_format == torch.channels_last,
                         seed=seed)
    before = fresh(inputs)
    y = run(grouped_conv_bn_relu, inputs, shape, padding=padding, eps=eps, training=False)
    y_ref, *_ = reference(inputs, shape, padding=padding, eps=eps, training=False)

    assert y.dtype == dtype and y.device == inputs["x"].device
    assert y.is_contiguous(memory_format=memory_format), f"output not in {memory_format}"
    assert_close(y, y_ref, dtype, "y")
    if dtype in HALF_DTYPES:
        y_torch, *_ = reference(inputs, shape, dtype=None, padding=padding, eps=eps, training=False)
        assert_within_2x_pytorch(y, y_torch, y_ref, dtype, "y")
    for name, t in inputs.items():  # running statistics (and every other input) bitwise untouched
        assert torch.equal(t, before[name]), f"{name} was modified"


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_matches_pytorch(shape, dtype, memory_format, device):
    check_inference(shape, dtype, device, memory_format)


@bf16_gpu_only
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_inference_bfloat16(shape, memory_format, device):
    check_inference(shape, torch.bfloat16, device, memory_format)


@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("shape", [pytest.param(Shape(2, 8, 16, 4, 6, 5, 1), id="stride1"),
                                   pytest.param(Shape(1, 8, 8, 2, 7, 6, 2), id="stride2")])
def test_inference_other_padding(shape, padding, device):
    """The function accepts padding 0..2: any padding it accepts must be computed correctly."""
    check_inference(shape, torch.float32, device, torch.channels_last, padding=padding)


def test_inference_eps(device):
    """eps enters the folded scale: a large eps and small running_var make it visible."""
    check_inference(Shape(2, 8, 8, 2, 5, 5, 1), torch.float32, device, torch.contiguous_format,
                    eps=0.5)


def test_inference_under_no_grad_and_with_grad_agree(device):
    """The folded no-grad path and the z-storing autograd path give the same output."""
    shape = Shape(2, 16, 16, 4, 5, 5, 1)
    inputs = make_inputs(shape, torch.float32, device, requires_grad=True)
    with torch.no_grad():
        y_nograd = run(grouped_conv_bn_relu, inputs, shape)
    y_grad = run(grouped_conv_bn_relu, inputs, shape)
    assert y_grad.requires_grad and not y_nograd.requires_grad
    y_ref, *_ = reference(inputs, shape)
    assert_close(y_nograd, y_ref, torch.float32, "y (no_grad)")
    assert_close(y_grad.detach(), y_ref, torch.float32, "y (grad)")


@pytest.mark.parametrize("layout", ["weight-channels-last", "x-strided-view"])
def test_inference_noncontiguous_inputs(layout, device):
    """``model.to(memory_format=torch.channels_last)`` makes conv weights channels_last; sliced
    activations are strided views. Both are valid PyTorch inputs and must give the same result."""
    shape = Shape(2, 16, 16, 4, 5, 6, 1)
    inputs = make_inputs(shape, torch.float32, device)
    if layout == "weight-channels-last":
        inputs["weight"] = inputs["weight"].contiguous(memory_format=torch.channels_last)
        assert not inputs["weight"].is_contiguous()
    else:
        big = torch.randn(shape.n, shape.c_in, shape.h, 2 * shape.w, device=device)
        inputs["x"] = big[..., ::2]
        assert not inputs["x"].is_contiguous()
    y = run(grouped_conv_bn_relu, inputs, shape)
    y_ref, *_ = reference(inputs, shape)
    assert_close(y, y_ref, torch.float32, "y")


def test_inference_deterministic(device):
    shape = Shape(2, 32, 32, 4, 7, 7, 2)
    inputs = make_inputs(shape, torch.float16, device, channels_last=True)
    y1 = run(grouped_conv_bn_relu, inputs, shape)
    y2 = run(grouped_conv_bn_relu, inputs, shape)
    assert torch.equal(y1, y2)
