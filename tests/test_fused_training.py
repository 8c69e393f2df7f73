"""Fused grouped conv + BN + ReLU: training-mode forward, running statistics, and the backward.

The backward is checked in both BatchNorm modes: training (batch statistics) and frozen
(training=False, as in fine-tuning with frozen BN). Gradients of x, weight, bn_weight, bn_bias are
compared with PyTorch autograd through the unfused ops in float64 on the same rounded inputs.
"""

import pytest
import torch

from _helpers import (DTYPES, HALF_DTYPES, ILL_CONDITIONED_TOL, STATS_TOL, Shape, assert_close,
                      assert_within_2x_pytorch, bf16_gpu_only, fresh, grad_output, grads,
                      make_inputs, pre_activation, reference, run)
from kernels.common import gpu_tiles
from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu
from kernels.reference import conv_bn_relu_reference

SHAPES = [
    pytest.param(Shape(2, 8, 8, 8, 5, 5, 1), id="depthwise-cpg1"),
    pytest.param(Shape(2, 16, 16, 4, 7, 7, 2), id="cpg4-stride2-odd"),
    pytest.param(Shape(2, 16, 16, 2, 5, 6, 1), id="cpg8-nonsquare"),
    pytest.param(Shape(1, 64, 64, 2, 5, 5, 2), id="cpg32-stride2"),
    pytest.param(Shape(2, 12, 24, 3, 5, 5, 1), id="cin4-cout8"),  # C_out/groups != C_in/groups
    pytest.param(Shape(1, 15, 25, 5, 5, 4, 1), id="cin3-cout5-ragged-tile"),  # groups straddle tiles
    pytest.param(Shape(2, 8, 8, 2, 1, 1, 1), id="1x1-spatial"),  # 2 values per channel
    # 286 output pixels: several pixel tiles on the GPU, so the statistics merge over tiles (the
    # interpreter uses one large tile; tests/test_kernel_configs.py forces the GPU tiles there)
    pytest.param(Shape(2, 4, 8, 2, 13, 11, 1), id="pixels-gt-256"),
]
MEMORY_FORMATS = [pytest.param(torch.contiguous_format, id="nchw"),
                  pytest.param(torch.channels_last, id="nhwc")]
# The backward runs each shape once per dtype, float32 and float16 in opposite memory formats,
# so every shape and every dtype sees both formats without doubling the (slow) interpreter time.
BACKWARD_CASES = [
    pytest.param(s.values[0], dtype, fmt, id=f"{s.id}-{dtype_id}-{fmt_id}")
    for i, s in enumerate(SHAPES)
    for j, (dtype, dtype_id) in enumerate([(torch.float32, "fp32"), (torch.float16, "fp16")])
    for fmt, fmt_id in [[(torch.contiguous_format, "nchw"), (torch.channels_last, "nhwc")][(i + j) % 2]]
]


def check_forward(inputs, shape, dtype, memory_format, y, rm, rv, **kwargs):
    """y, its format, and the running statistics (updated in place) against the references."""
    y_ref, rm_ref, rv_ref, _ = reference(inputs, shape, **kwargs)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format), f"output not in {memory_format}"
    assert_close(y.detach(), y_ref, dtype, "y")
    assert_close(rm, rm_ref, dtype, "running_mean", STATS_TOL)
    assert_close(rv, rv_ref, dtype, "running_var", STATS_TOL)
    if dtype in HALF_DTYPES:
        y_torch, *_ = reference(inputs, shape, dtype=None, **kwargs)
        assert_within_2x_pytorch(y.detach(), y_torch, y_ref, dtype, "y")


def check_train_step(shape, dtype, device, memory_format, training, seed=0):
    """Forward + backward of one step; compares y, running statistics and all four gradients."""
    inputs = make_inputs(shape, dtype, device, channels_last=memory_format == torch.channels_last,
                         seed=seed, requires_grad=True)
    dy = grad_output(pre_activation(inputs, shape, training), seed=seed + 1)
    ours = fresh(inputs)
    y = run(grouped_conv_bn_relu, ours, shape, dy.to(dtype), training=training)
    check_forward(inputs, shape, dtype, memory_format, y, ours["running_mean"],
                  ours["running_var"], training=training)
    if not training:
        assert torch.equal(ours["running_mean"], inputs["running_mean"])
        assert torch.equal(ours["running_var"], inputs["running_var"])

    *_, g_ref = reference(inputs, shape, dy, training=training)
    g = grads(ours)
    values_per_channel = y.shape[0] * y.shape[2] * y.shape[3]
    tol = ILL_CONDITIONED_TOL if training and values_per_channel <= 2 else None
    for name in g_ref:
        assert g[name] is not None, f"no gradient for {name}"
        assert g[name].dtype == inputs[name].dtype, f"{name}.grad dtype {g[name].dtype}"
        assert_close(g[name], g_ref[name], dtype, f"d{name}", tol)
    if dtype in HALF_DTYPES:
        *_, g_torch = reference(inputs, shape, dy, dtype=None, training=training)
        for name in g_ref:
            assert_within_2x_pytorch(g[name], g_torch[name], g_ref[name], dtype, f"d{name}")


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_no_grad(shape, dtype, memory_format, device):
    """Without autograd the op takes its statistics-only path: batch statistics, in-place
    running-statistics update (unbiased variance) and the folded BN + ReLU."""
    inputs = make_inputs(shape, dtype, device, channels_last=memory_format == torch.channels_last)
    ours = fresh(inputs)
    y = run(grouped_conv_bn_relu, ours, shape, training=True)
    assert not y.requires_grad
    check_forward(inputs, shape, dtype, memory_format, y, ours["running_mean"],
                  ours["running_var"], training=True)


@pytest.mark.parametrize("training", [pytest.param(True, id="train-bn"),
                                      pytest.param(False, id="frozen-bn")])
@pytest.mark.parametrize("shape, dtype, memory_format", BACKWARD_CASES)
def test_backward(shape, dtype, memory_format, training, device):
    check_train_step(shape, dtype, device, memory_format, training)


@pytest.mark.parametrize("training", [pytest.param(True, id="train-bn"), pytest.param(False, id="frozen-bn")])
@pytest.mark.parametrize("shape, dtype", [
    pytest.param(SHAPES[1].values[0], torch.float32, id="cpg4-stride2-odd-fp32"),
    pytest.param(SHAPES[5].values[0], torch.float32, id="cin3-cout5-ragged-tile-fp32"),
    pytest.param(SHAPES[3].values[0], torch.float16, id="cpg32-stride2-fp16"),
    pytest.param(SHAPES[7].values[0], torch.float16, id="pixels-gt-256-fp16"),
])
def test_backward_gpu_tiles(shape, dtype, training, device):
    """The op as the GPU composes it, run here too (``kernels.common.gpu_tiles``): 64-pixel tiles and
    the first GPU config each kernel keeps, so pixel tiles loop and end ragged, and dz rebuilt in the
    dgrad and wgrad kernels instead of written once."""
    with gpu_tiles():
        check_train_step(shape, dtype, device, torch.channels_last, training)


def test_backward_split_reductions(device):
    """Enough output pixels (2·92·92 = 16928) that the BN and weight-gradient reductions are split
    over several pixel ranges, summed in a second pass, on a GPU and in the interpreter alike."""
    check_train_step(Shape(2, 4, 4, 2, 92, 92, 1), torch.float32, device, torch.channels_last, True)


@bf16_gpu_only
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:6])
def test_backward_bfloat16(shape, training, device):
    check_train_step(shape, torch.bfloat16, device, torch.channels_last, training)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_momentum(momentum, device):
    shape = Shape(2, 16, 16, 4, 5, 5, 1)
    inputs = make_inputs(shape, torch.float32, device)
    ours = fresh(inputs)
    y = run(grouped_conv_bn_relu, ours, shape, training=True, momentum=momentum)
    check_forward(inputs, shape, torch.float32, torch.contiguous_format, y,
                  ours["running_mean"], ours["running_var"], training=True, momentum=momentum)


def test_without_running_stats(device):
    """running_mean = running_var = None with training=True (``track_running_stats=False``)."""
    shape = Shape(2, 16, 16, 4, 5, 5, 2)
    inputs = make_inputs(shape, torch.float32, device, requires_grad=True)
    dy = grad_output(pre_activation(inputs, shape, True))
    ours = fresh(inputs)
    ours["running_mean"] = ours["running_var"] = None
    y = run(grouped_conv_bn_relu, ours, shape, dy.float(), training=True)
    ref = fresh(inputs, torch.float64)
    ref["running_mean"] = ref["running_var"] = None
    ref["bn_weight"] = ref["bn_weight"].detach().double().requires_grad_()
    ref["bn_bias"] = ref["bn_bias"].detach().double().requires_grad_()
    y_ref = run(conv_bn_relu_reference, ref, shape, dy, training=True)
    assert_close(y.detach(), y_ref.detach(), torch.float32, "y")
    for name, g in grads(ours).items():
        assert_close(g, ref[name].grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("frozen", ["x", "bn", "x+weight", "all"])
@pytest.mark.parametrize("training", [pytest.param(True, id="train-bn"),
                                      pytest.param(False, id="frozen-bn")])
def test_needs_input_grad(frozen, training, device):
    """Inputs that do not require grad get no gradient; the others still get the right one."""
    shape = Shape(2, 16, 16, 4, 5, 5, 1)
    no_grad = {"x": ["x"], "bn": ["bn_weight", "bn_bias"], "x+weight": ["x", "weight"],
               "all": ["x", "weight", "bn_weight", "bn_bias"]}[frozen]
    inputs = make_inputs(shape, torch.float32, device, requires_grad=True)
    for name in no_grad:
        inputs[name].requires_grad_(False)
    dy = grad_output(pre_activation(inputs, shape, training))
    ours = fresh(inputs)
    y = run(grouped_conv_bn_relu, ours, shape, training=training)
    if frozen == "all":
        assert not y.requires_grad
    else:
        y.backward(dy.float())
    y_ref, rm_ref, rv_ref, g_ref = reference(inputs, shape, None if frozen == "all" else dy,
                                             training=training)
    assert_close(y.detach(), y_ref.detach(), torch.float32, "y")
    assert_close(ours["running_var"], rv_ref, torch.float32, "running_var", STATS_TOL)
    for name, g in grads(ours).items():
        if name in no_grad:
            assert g is None, f"{name} does not require grad but got one"
        else:
            assert_close(g, g_ref[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("case", ["dy-other-memory-format", "dy-expanded-by-sum", "x-non-leaf"])
def test_backward_input_layouts(case, device):
    """Upstream gradients arrive in any layout (``y.sum()`` gives an expanded, stride-0 one) and
    x may be an intermediate whose gradient flows further back."""
    shape = Shape(2, 16, 16, 4, 5, 6, 1)
    inputs = make_inputs(shape, torch.float32, device, requires_grad=True,
                         channels_last=case != "dy-other-memory-format")
    if case == "dy-expanded-by-sum":
        dy = torch.ones(shape.n, shape.c_out, shape.h, shape.w, dtype=torch.float64, device=device)
    else:
        dy = grad_output(pre_activation(inputs, shape, True))
    ours = fresh(inputs)
    if case == "x-non-leaf":
        leaf = ours["x"]
        ours["x"] = leaf * 1.0
    y = run(grouped_conv_bn_relu, ours, shape, training=True)
    if case == "dy-expanded-by-sum":
        y.sum().backward()
    elif case == "dy-other-memory-format":
        y.backward(dy.float().contiguous(memory_format=torch.channels_last))
    else:
        y.backward(dy.float())
    if case == "x-non-leaf":
        ours["x"] = leaf
    *_, g_ref = reference(inputs, shape, dy, training=True)
    for name, g in grads(ours).items():
        assert_close(g, g_ref[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("training", [pytest.param(True, id="train-bn"),
                                      pytest.param(False, id="frozen-bn")])
def test_deterministic(training, device):
    """Two identical steps give bitwise-identical outputs, gradients and running statistics."""
    shape = Shape(2, 16, 32, 4, 9, 7, 1)
    inputs = make_inputs(shape, torch.float16, device, channels_last=True, requires_grad=True)
    dy = grad_output(pre_activation(inputs, shape, training)).half()
    runs = []
    for _ in range(2):
        ours = fresh(inputs)
        y = run(grouped_conv_bn_relu, ours, shape, dy, training=training)
        runs.append((y, ours["running_mean"], ours["running_var"], *grads(ours).values()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


AUTOCAST_DTYPES = [pytest.param(torch.float16, id="fp16"),
                   pytest.param(torch.bfloat16, id="bf16", marks=bf16_gpu_only)]


@pytest.mark.parametrize("x_dtype", [pytest.param("float32", id="fp32-x"),
                                     pytest.param("autocast", id="half-x")])
@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
def test_autocast(amp_dtype, x_dtype, device):
    """Under torch.autocast the fused op behaves like conv2d + batch_norm + relu there: the conv
    runs in the autocast dtype with float32 parameters and BatchNorm tensors, the output is in the
    autocast dtype, and the float32 parameters get float32 gradients. ``half-x``: x arrives already
    in half precision from the previous autocast layer (as in a ResNeXt bottleneck), weight is
    float32."""
    shape = Shape(2, 16, 16, 4, 5, 5, 1)
    inputs = make_inputs(shape, torch.float32, device, channels_last=True, requires_grad=True)
    if x_dtype == "autocast":
        inputs["x"] = inputs["x"].detach().to(amp_dtype).requires_grad_()
    dy = grad_output(pre_activation(fresh(inputs, amp_dtype), shape, True))

    def step(fn):
        args = fresh(inputs)
        with torch.autocast(device_type=device, dtype=amp_dtype):
            y = run(fn, args, shape, training=True)
        y.backward(dy.to(y.dtype))
        return y, args

    y, ours = step(grouped_conv_bn_relu)
    y_amp, amp = step(conv_bn_relu_reference)
    assert y.dtype == y_amp.dtype == amp_dtype, f"output {y.dtype}, autocast reference {y_amp.dtype}"
    # exact reference: float64 from the inputs rounded to the autocast dtype
    y_ref, rm_ref, rv_ref, g_ref = reference(fresh(inputs, amp_dtype), shape, dy, training=True)
    assert_close(y.detach(), y_ref, amp_dtype, "y")
    assert_close(ours["running_var"], rv_ref, amp_dtype, "running_var", STATS_TOL)
    for name, g in grads(ours).items():
        assert g.dtype == inputs[name].dtype == grads(amp)[name].dtype, f"d{name} dtype {g.dtype}"
        assert_close(g, g_ref[name], amp_dtype, f"d{name}")
