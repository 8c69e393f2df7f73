"""Shared pieces of the fused-kernel tests: shapes, random inputs, the float64 reference, tolerances.

Import as ``from _helpers import ...`` (pytest puts ``tests/`` on ``sys.path``; there is no
``tests/__init__.py``). Every comparison is against PyTorch's eager ops
(``kernels.reference.conv_bn_relu_reference``) run in float64 on the *same* inputs, rounded to the
test's precision first, so the only differences left are the kernel's own rounding.
"""

import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

try:
    import kernels  # noqa: F401
except ImportError:  # plain `pytest` (not `python -m pytest`) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import interpreter_enabled  # noqa: E402
from kernels.reference import conv_bn_relu_reference  # noqa: E402

INTERPRET = interpreter_enabled()

gpu_only = pytest.mark.skipif(INTERPRET, reason="needs a CUDA GPU with Triton's interpreter off")
# Triton 3.9's interpreter computes bfloat16 tl.dot wrongly and truncates float32 -> bfloat16
# casts (twice round-to-nearest's error), so bfloat16 accuracy is only meaningful on a GPU.
bf16_gpu_only = pytest.mark.skipif(
    INTERPRET, reason="the interpreter miscomputes bfloat16 (tl.dot; float32->bfloat16 casts truncate)")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Norm-wise relative error bounds of the kernels against the float64 reference computed from the
# same (already rounded) inputs (``rel_errors``): checked per slice along dim 0 (a sample of y or
# dx, an output channel of dW, one element of dγ or of a running statistic), each against the larger
# of its own norm and the RMS of all slices' norms. An error in one small channel of dW, or in one
# dγ, cannot hide behind the tensor's largest element, as it could when tolerances scaled with it.
TOL = {
    # float32 accumulation of at most 9·64 products, and of up to a few thousand pixels in the
    # gradient reductions, in an order other than the reference's: ~1e-7-1e-6 relative; an indexing
    # or statistics bug (e.g. biased running_var, an error of ~1/(N·H·W)) is >= 1e-3.
    torch.float32: 2e-5,
    # half precision: x, weight, y, dx, dw are rounded to 11 significant bits (2^-11 ≈ 4.9e-4
    # relative each); training mode also rounds z = conv(x) before BatchNorm, as PyTorch does, and
    # normalising can amplify that by |gamma|·invstd. Also checked: at most 2x PyTorch's own error.
    torch.float16: 5e-3,
    # bfloat16 keeps 8 significant bits (2^-8 ≈ 3.9e-3 relative per rounding).
    torch.bfloat16: 4e-2,
}
# Running statistics are float32 in every case and come from the float32 accumulator, so they
# are as accurate as float32; in half precision z's rounding enters (of z as stored, as in PyTorch):
# relative to a batch mean near zero that reached 7e-4 (float16).
STATS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# BatchNorm over 2 values per channel amplifies every rounding of z by up to 1/sqrt(var): there the
# gradients' errors, PyTorch's own as much as ours, reach 1.9e-5 (float32) and 1.4e-2 (float16).
# Half precision is also held to 2x PyTorch's own error (assert_within_2x_pytorch).
ILL_CONDITIONED_TOL = {torch.float32: 5e-5, torch.float16: 3e-2, torch.bfloat16: 2e-1}


class Shape(NamedTuple):
    """One test problem: x is (n, c_in, h, w), weight (c_out, c_in / groups, 3, 3)."""

    n: int
    c_in: int
    c_out: int
    groups: int
    h: int
    w: int
    stride: int = 1


def make_inputs(shape, dtype=torch.float32, device="cpu", *, channels_last=False, seed=0,
                requires_grad=False, bn_requires_grad=None):
    """Random x, weight (in ``dtype``) and BatchNorm tensors (float32), on ``device``.

    The conv output z is about N(0, 1); gamma has both signs, beta, running_mean and
    running_var (positive) are random, so the ReLU clips roughly half of the outputs.
    Returns a dict in the fused function's argument order.
    """
    g = torch.Generator().manual_seed(seed)
    cin_g = shape.c_in // shape.groups
    x = torch.randn(shape.n, shape.c_in, shape.h, shape.w, generator=g)
    weight = torch.randn(shape.c_out, cin_g, 3, 3, generator=g) / (9 * cin_g) ** 0.5
    sign = torch.where(torch.rand(shape.c_out, generator=g) < 0.2, -1.0, 1.0)
    bn_weight = sign * (0.5 + torch.rand(shape.c_out, generator=g))
    bn_bias = 0.5 * torch.randn(shape.c_out, generator=g)
    running_mean = 0.3 * torch.randn(shape.c_out, generator=g)
    running_var = 0.5 + torch.rand(shape.c_out, generator=g)
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn_requires_grad = requires_grad if bn_requires_grad is None else bn_requires_grad
    return dict(
        x=x.requires_grad_(requires_grad),
        weight=weight.to(device=device, dtype=dtype).requires_grad_(requires_grad),
        bn_weight=bn_weight.to(device).requires_grad_(bn_requires_grad),
        bn_bias=bn_bias.to(device).requires_grad_(bn_requires_grad),
        running_mean=running_mean.to(device),
        running_var=running_var.to(device),
    )


def fresh(inputs, dtype=None):
    """Independent copies (same values, same requires_grad, optionally cast) of ``inputs``.

    Running statistics are cloned so that an in-place update in one run leaves the others alone;
    ``dtype`` casts x and weight only (BatchNorm tensors stay float32).
    """
    out = {}
    for name, t in inputs.items():
        c = t.detach().clone(memory_format=torch.preserve_format)
        if dtype is not None and name in ("x", "weight"):
            c = c.to(dtype)
        out[name] = c.requires_grad_(t.requires_grad)
    return out


def grads(inputs):
    """{name: .grad} of the differentiable inputs (None where no gradient was produced)."""
    return {k: inputs[k].grad for k in ("x", "weight", "bn_weight", "bn_bias")}


def run(fn, inputs, shape, dy=None, **kwargs):
    """y = fn(*inputs, stride=shape.stride, groups=shape.groups, **kwargs); backward with dy if given."""
    y = fn(*inputs.values(), stride=shape.stride, groups=shape.groups, **kwargs)
    if dy is not None:
        y.backward(dy)
    return y


def reference(inputs, shape, dy=None, dtype=torch.float64, **kwargs):
    """(y, running_mean, running_var, grads) of PyTorch's eager ops on copies of ``inputs``.

    ``dtype=torch.float64`` is the exact reference; ``dtype=None`` runs PyTorch at the inputs' own
    precision (its error is the yardstick for ours in half precision). BatchNorm tensors are cast
    to float64 only with the float64 reference (mixed half/float32 is what autocast produces).
    """
    ref = fresh(inputs, dtype)
    if dtype == torch.float64:
        for k in ("bn_weight", "bn_bias", "running_mean", "running_var"):
            ref[k] = ref[k].detach().double().requires_grad_(inputs[k].requires_grad)
    y = run(conv_bn_relu_reference, ref, shape,
            None if dy is None else dy.to(dtype or inputs["x"].dtype), **kwargs)
    return y, ref["running_mean"], ref["running_var"], grads(ref)


def grad_output(y_ref_pre, seed=1, margin=0.05):
    """A random upstream gradient that vanishes where the ReLU input is within ``margin`` of 0.

    In half precision the rounding of z can legitimately put such an element on the other side of
    the ReLU's kink than the float64 reference, which flips its gradient by O(1); zeroing dy there
    keeps the gradient tests about the kernel, not about which way a rounding went.
    """
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y_ref_pre.shape, generator=g, dtype=torch.float64).to(y_ref_pre.device)
    return torch.where(y_ref_pre.abs() > margin, dy, torch.zeros_like(dy))


def pre_activation(inputs, shape, training, eps=1e-5):
    """BatchNorm's output before the ReLU, in float64 (no running-statistics update)."""
    ref = fresh(inputs, torch.float64)
    z = torch.nn.functional.conv2d(ref["x"], ref["weight"], None, shape.stride, 1, 1, shape.groups)
    return torch.nn.functional.batch_norm(
        z, ref["running_mean"].double(), ref["running_var"].double(), ref["bn_weight"].double(),
        ref["bn_bias"].double(), training, 0.0, eps)


def rel_errors(actual, expected):
    """Norm-wise relative errors of ``actual`` against ``expected``, float64, one per slice along dim 0:
    ‖a_i − e_i‖ / max(‖e_i‖, RMS_j ‖e_j‖). A 0-d tensor is one slice."""
    a = actual.detach().double().cpu().reshape(max(1, actual.shape[0] if actual.dim() else 1), -1)
    e = expected.detach().double().cpu().reshape(a.shape)
    norms = e.norm(dim=1)
    floor = norms.pow(2).mean().sqrt() if norms.numel() else norms.new_zeros(())
    return (a - e).norm(dim=1) / torch.maximum(norms, floor).clamp_min(torch.finfo(torch.float64).tiny)


def assert_close(actual, expected, dtype, name, tol=None):
    """``actual`` (any precision) against the float64 ``expected``: every slice's ``rel_errors`` at most
    ``(tol or TOL)[dtype]``. A NaN or inf where the reference is finite fails."""
    assert actual is not None, f"{name}: no gradient / output"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return
    bound = (tol or TOL)[dtype]
    errors = rel_errors(actual, expected)
    worst = int(errors.nan_to_num(float("inf")).argmax())
    assert bool((errors <= bound).all()), (
        f"{name} ({dtype}): norm-wise relative error {errors[worst].item():.3g} > {bound:.3g} "
        f"(slice {worst} of {errors.numel()} along dim 0)")


def max_err(actual, expected):
    """The largest norm-wise relative error of any slice (``rel_errors``)."""
    return rel_errors(actual, expected).max().item()


def assert_within_2x_pytorch(ours, torch_lowp, expected, dtype, name):
    """Half precision: our error vs float64 (the largest slice's, ``rel_errors``) is at most twice
    PyTorch's own at ``dtype``, plus one unit in the last place (relative), so that a case where
    PyTorch happens to round luckily does not fail over a single rounding step.
    """
    ulp = torch.finfo(dtype).eps
    ours_err, torch_err = max_err(ours, expected), max_err(torch_lowp, expected)
    assert ours_err <= 2 * torch_err + ulp, (
        f"{name} ({dtype}): error {ours_err:.3g} > 2 x PyTorch's {torch_err:.3g} + ulp {ulp:.3g}")
