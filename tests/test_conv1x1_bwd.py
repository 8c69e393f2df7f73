"""The 1x1 conv backward (``kernels.conv1x1.backward``): dA and dW with dz rebuilt from (g, z) as they
are loaded, against PyTorch autograd of conv2d in float64 on the same (already rounded) inputs."""

import re

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels.conv1x1.backward as bwd
from kernels.common import TILES
from _helpers import assert_close, assert_within_2x_pytorch, bf16_gpu_only, gpu_only
from kernels.conv1x1.backward import (conv1x1_dgrad, conv1x1_wgrad, dgrad_configs, prune_dgrad_configs,
                                  prune_wgrad_configs, wgrad_configs)
from kernels.conv1x1.forward import k_tile

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=bf16_gpu_only)]

SHAPES = [  # (N, C_in, C_out, H, W, stride)
    pytest.param((2, 24, 40, 5, 7, 1), id="ragged"),  # channels off the tiles, M = 70 not a multiple of 64
    pytest.param((2, 24, 40, 7, 9, 2), id="stride2-odd"),  # odd H, W: Ho, Wo = 4, 5; 3/4 of dA is 0
    pytest.param((3, 80, 16, 6, 6, 2), id="two-ci-tiles"),  # C_in = 64 + 16: dW's second tile ragged
    pytest.param((2, 40, 80, 6, 5, 1), id="two-k-tiles"),  # C_out = 64 + 16: dA's second K tile ragged
    pytest.param((2, 64, 64, 8, 8, 1), id="even"),  # every tile whole: no masks on the channels
]
MARGIN = 0.05  # |BN output| below which g is zeroed (see make)


def make(shape, dtype, device, seed=0):
    """x, weight, g, z in ``dtype``; float32 dz coefficients and prologue scale/shift.

    scale has both signs; g is zeroed where the BN output z·scale + shift lies within MARGIN of
    the ReLU's kink, where float32 and float64 could legitimately disagree on the mask."""
    n, c_in, c_out, h, w, stride = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen)
    weight = torch.randn(c_out, c_in, 1, 1, generator=gen) / c_in ** 0.5
    g = torch.randn(n, c_out, ho, wo, generator=gen)
    z = torch.randn(n, c_out, ho, wo, generator=gen)
    sign = torch.where(torch.rand(c_out, generator=gen) < 0.2, -1.0, 1.0)
    coeffs = (sign * (0.5 + torch.rand(c_out, generator=gen)), 0.5 * torch.randn(c_out, generator=gen),
              0.3 * torch.randn(c_out, generator=gen), 0.3 * torch.randn(c_out, generator=gen))
    in_sign = torch.where(torch.rand(c_in, generator=gen) < 0.2, -1.0, 1.0)
    in_scale = in_sign * (0.5 + torch.rand(c_in, generator=gen))  # a folded BatchNorm, as the forward's
    in_shift = 0.5 * torch.randn(c_in, generator=gen)
    x, weight, g, z = (t.to(dtype) for t in (x, weight, g, z))
    pre = z.double() * coeffs[0].double()[:, None, None] + coeffs[1].double()[:, None, None]
    g = torch.where(pre.abs() > MARGIN, g, torch.zeros_like(g))
    cl = dict(memory_format=torch.channels_last)
    return dict(x=x.to(device).contiguous(**cl), weight=weight.to(device), g=g.to(device).contiguous(**cl),
                z=z.to(device).contiguous(**cl), coeffs=tuple(c.to(device) for c in coeffs),
                in_scale=in_scale.to(device), in_shift=in_shift.to(device))


def reference_dz(g, z, coeffs, mask):
    """dz = scale·g' + k1·z + k0 in float64, g' = g·[z·scale + shift > 0] with ``mask``."""
    scale, shift, k1, k0 = (c.double()[:, None, None] for c in coeffs)
    g, z = g.double(), z.double()
    if mask:
        g = torch.where(z * scale + shift > 0, g, torch.zeros_like(g))
    return scale * g + k1 * z + k0


def reference(t, stride, dz, prologue, dtype=torch.float64):
    """(dA, dW) by autograd of conv2d(a, w) with a = x or relu(x·in_scale + in_shift): exact in
    float64; with ``dtype`` a half type, PyTorch at that precision (a and dz rounded to it)."""
    a = t["x"].double()
    if prologue:
        a = torch.relu(a * t["in_scale"].double()[:, None, None] + t["in_shift"].double()[:, None, None])
    a = a.to(dtype).requires_grad_()
    w = t["weight"].to(dtype).requires_grad_()
    F.conv2d(a, w, stride=stride).backward(dz.to(dtype))
    return a.grad, w.grad


def run_dgrad(t, stride, mask, **kwargs):
    return conv1x1_dgrad(t["g"], t["z"], t["weight"], t["coeffs"], t["x"].shape, stride, mask=mask, **kwargs)


def run_wgrad(t, stride, mask, prologue, **kwargs):
    scale_shift = dict(in_scale=t["in_scale"], in_shift=t["in_shift"]) if prologue else {}
    return conv1x1_wgrad(t["x"], t["g"], t["z"], t["coeffs"], t["weight"].shape, stride, mask=mask,
                         **scale_shift, **kwargs)


def _half_pytorch(t, stride, dz, prologue, dtype):
    """PyTorch's own (dA, dW) at ``dtype``, or None where this device has no such conv backward."""
    try:
        return reference(t, stride, dz, prologue, dtype)
    except RuntimeError:  # e.g. no half-precision conv backward on this CPU build
        return None


@pytest.mark.parametrize("mask", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dgrad(shape, dtype, mask, device):
    t = make(shape, dtype, device)
    stride = shape[-1]
    dz = reference_dz(t["g"], t["z"], t["coeffs"], mask)
    da_ref, _ = reference(t, stride, dz, prologue=False)
    da = run_dgrad(t, stride, mask)
    assert da.dtype == dtype and da.is_contiguous(memory_format=torch.channels_last)
    assert_close(da, da_ref, dtype, "dA")
    if stride == 2:  # the pixels the conv did not read: exactly 0
        assert not da[:, :, 1::2].any() and not da[:, :, :, 1::2].any()
    if dtype != torch.float32 and (lowp := _half_pytorch(t, stride, dz, False, dtype)) is not None:
        assert_within_2x_pytorch(da, lowp[0], da_ref, dtype, "dA")


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("mask", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_wgrad(shape, dtype, mask, prologue, device):
    t = make(shape, dtype, device)
    stride = shape[-1]
    dz = reference_dz(t["g"], t["z"], t["coeffs"], mask)
    _, dw_ref = reference(t, stride, dz, prologue)
    dw = run_wgrad(t, stride, mask, prologue)
    assert dw.dtype == dtype and dw.shape == t["weight"].shape
    assert_close(dw, dw_ref, dtype, "dW")
    if dtype != torch.float32 and (lowp := _half_pytorch(t, stride, dz, prologue, dtype)) is not None:
        assert_within_2x_pytorch(dw, lowp[1], dw_ref, dtype, "dW")


@pytest.mark.parametrize("dtype", DTYPES)
def test_coefficients_of_a_real_batchnorm_backward(dtype, device):
    """z = conv2d(relu(x·in_scale + in_shift), w) stored in ``dtype``, then BatchNorm (training)
    and ReLU: the closed-form (scale, shift, k1, k0) of BN's backward, fed to both kernels, give
    autograd's dA and dW through the whole chain."""
    shape = (2, 24, 40, 7, 9, 2)
    t = make(shape, dtype, device, seed=3)
    eps = 1e-5
    a = torch.relu(t["x"].double() * t["in_scale"].double()[:, None, None] + t["in_shift"].double()[:, None, None])
    a = a.to(dtype).double().requires_grad_()  # the kernel's dot operand is a rounded to dtype
    w = t["weight"].double().requires_grad_()
    z_conv = F.conv2d(a, w, stride=2)
    z = z_conv.detach().to(dtype)  # as the forward stores it
    gamma = torch.linspace(-1.5, 1.5, shape[2], dtype=torch.float64, device=device)
    gamma = torch.where(gamma.abs() > 0.2, gamma, 0.7)  # both signs, none near 0
    beta = torch.linspace(-0.5, 0.5, shape[2], dtype=torch.float64, device=device)
    z64 = z.double().requires_grad_()
    y_pre = F.batch_norm(z64, None, None, gamma, beta, True, 0.0, eps)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(y_pre.shape, generator=gen, dtype=torch.float64).to(device)
    g = torch.where(y_pre.detach().abs() > MARGIN, g, torch.zeros_like(g)).to(dtype)
    torch.relu(y_pre).backward(g.double())
    dz_ref = z64.grad

    zd = z.double()
    mean = zd.mean(dim=(0, 2, 3))
    invstd = (zd.var(dim=(0, 2, 3), unbiased=False) + eps).rsqrt()
    scale, shift = gamma * invstd, beta - mean * gamma * invstd
    gm = torch.where(zd * scale[:, None, None] + shift[:, None, None] > 0, g.double(), torch.zeros_like(zd))
    xhat = (zd - mean[:, None, None]) * invstd[:, None, None]
    k1 = -scale * invstd * (gm * xhat).mean(dim=(0, 2, 3))
    k0 = -scale * gm.mean(dim=(0, 2, 3)) - k1 * mean
    coeffs = tuple(c.float().to(device) for c in (scale, shift, k1, k0))
    z_conv.backward(dz_ref)

    g, z = (v.to(device).contiguous(memory_format=torch.channels_last) for v in (g, z))
    da = conv1x1_dgrad(g, z, t["weight"], coeffs, t["x"].shape, 2)
    dw = conv1x1_wgrad(t["x"], g, z, coeffs, t["weight"].shape, 2, in_scale=t["in_scale"],
                       in_shift=t["in_shift"])
    assert_close(da, a.grad, dtype, "dA")
    assert_close(dw, w.grad, dtype, "dW")


# Two forced configs with different tiles: dA over 2 x 3 programs of 64 pixels x 16 channels vs
# one program; dW over (16, 16) channel tiles vs one (64, 64) tile.
DGRAD_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1),
                 triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
WGRAD_CONFIGS = [triton.Config({"BLOCK_CO": 16, "BLOCK_CI": 16}, num_warps=4, num_stages=1),
                 triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64}, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("fixed_order_dot")
def test_results_do_not_depend_on_the_config(dtype, stride, device):
    """The dA K tile and the dW pixels per dot are fixed by the shape: the same bits either way."""
    shape = (2, 24, 40, 7, 9, stride)  # M = 126 (stride 1): two 64-pixel tiles, the second ragged
    t = make(shape, dtype, device, seed=1)
    da0, da1 = (run_dgrad(t, stride, True, config=c) for c in DGRAD_CONFIGS)
    dw0, dw1 = (run_wgrad(t, stride, True, True, config=c) for c in WGRAD_CONFIGS)
    dz = reference_dz(t["g"], t["z"], t["coeffs"], True)
    assert_close(da0, reference(t, stride, dz, False)[0], dtype, "dA")
    assert_close(dw0, reference(t, stride, dz, True)[1], dtype, "dW")
    assert torch.equal(da0, da1) and torch.equal(dw0, dw1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("fixed_order_dot")
def test_wgrad_over_several_splits(dtype, device, monkeypatch):
    """The GPU's 64 pixels per dot and several pixel splits (2 full ones of 2 dots each and a
    ragged last) under the interpreter: right, and the same bits for both configs."""
    monkeypatch.setattr(TILES, "wgrad_block_k", 64)
    monkeypatch.setattr(TILES, "min_split_rows", 64)
    shape = (5, 24, 40, 13, 17, 2)  # M = 5·7·9 = 315 pixels: 4 (interpreter) or 5 splits asked
    assert bwd.wgrad_splits(315, 40, 24, device) >= 4
    t = make(shape, dtype, device, seed=2)
    dz = reference_dz(t["g"], t["z"], t["coeffs"], True)
    dw0, dw1 = (run_wgrad(t, 2, True, True, config=c) for c in WGRAD_CONFIGS)
    assert_close(dw0, reference(t, 2, dz, True)[1], dtype, "dW")
    assert torch.equal(dw0, dw1)


def test_nchw_inputs_are_made_channels_last(device):
    t = make((2, 24, 40, 7, 9, 2), torch.float32, device)
    nchw = dict(t, **{k: t[k].contiguous() for k in ("x", "g", "z")})
    assert torch.equal(run_dgrad(nchw, 2, True), run_dgrad(t, 2, True))
    assert torch.equal(run_wgrad(nchw, 2, True, True), run_wgrad(t, 2, True, True))


def test_empty_batch(device):
    t = make((2, 24, 40, 5, 7, 1), torch.float32, device)
    empty = dict(t, **{k: t[k][:0] for k in ("x", "g", "z")})
    assert run_dgrad(empty, 1, True).shape == (0, 24, 5, 7)
    dw = run_wgrad(empty, 1, True, True)
    assert dw.shape == (40, 24, 1, 1) and not dw.any()


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_shipped_config(dtype, device):
    """Every config autotuning may launch at a ResNeXt-like shape: right dA and dW, and dW the
    same bits for all (its pixels per dot and split edges are fixed)."""
    shape = (4, 128, 256, 14, 14, 1)
    t = make(shape, dtype, device)
    dz = reference_dz(t["g"], t["z"], t["coeffs"], True)
    da_ref, _ = reference(t, 1, dz, False)
    _, dw_ref = reference(t, 1, dz, True)
    da_configs = prune_dgrad_configs(dgrad_configs(interpret=False), {"g_ptr": t["g"], "C_in": shape[1]},
                                     BLOCK_K=k_tile(shape[2]))
    dw_configs = prune_wgrad_configs(wgrad_configs(interpret=False),
                                     {"x_ptr": t["x"], "C_in": shape[1], "C_out": shape[2]},
                                     BLOCK_K=TILES.wgrad_block_k, PROLOGUE=True)
    for config in da_configs:
        assert_close(run_dgrad(t, 1, True, config=config), da_ref, dtype, f"dA {config}")
    first = None
    for config in dw_configs:
        dw = run_wgrad(t, 1, True, True, config=config)
        assert_close(dw, dw_ref, dtype, f"dW {config}")
        first = dw if first is None else first
        assert torch.equal(dw, first), str(config)


def names(arg):
    """A ``match`` pattern: the message names ``arg`` as a word."""
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


def _coeffs(i, f):
    return lambda t: tuple(f(c) if j == i else c for j, c in enumerate(t["coeffs"]))


COMMON_BAD = [  # (id, changes, argument the message must name): both launchers
    ("g-3d", dict(g=lambda t: t["g"][0]), "g"),
    ("g-int", dict(g=lambda t: t["g"].to(torch.int32)), "g"),
    ("z-shape", dict(z=lambda t: t["z"][:, :-1]), "z"),
    ("z-dtype", dict(z=lambda t: t["z"].half()), "z"),
    ("coeffs-three", dict(coeffs=lambda t: t["coeffs"][:3]), "coeffs"),
    ("coeffs-length", dict(coeffs=_coeffs(2, lambda c: c[:-1])), "coeffs"),
    ("coeffs-float64", dict(coeffs=_coeffs(3, lambda c: c.double())), "coeffs"),
    ("stride-3", dict(stride=3), "stride"),
    ("stride-tuple", dict(stride=(2, 2)), "stride"),
    ("mask-int", dict(mask=1), "mask"),
    ("config-dict", dict(config={"BLOCK_M": 64}), "config"),
]
DGRAD_BAD = COMMON_BAD + [
    ("weight-3x3", dict(weight=lambda t: torch.randn(40, 24, 3, 3, device=t["g"].device)), "weight"),
    ("weight-c_out", dict(weight=lambda t: t["weight"][:-1]), "weight"),
    ("weight-dtype", dict(weight=lambda t: t["weight"].half()), "weight"),
    ("x_shape-c_in", dict(x_shape=(2, 25, 5, 7)), "x_shape"),
    ("x_shape-spatial", dict(x_shape=(2, 24, 7, 7)), "x_shape"),
    ("x_shape-stride", dict(stride=2), "x_shape"),  # g is what stride 1 makes of 5 x 7
    ("x_shape-floats", dict(x_shape=(2.0, 24, 5, 7)), "x_shape"),
    ("config-no-block_n", dict(config=triton.Config({"BLOCK_M": 64})), "config"),
    ("config-block_m-48", dict(config=triton.Config({"BLOCK_M": 48, "BLOCK_N": 16})), "config"),
]
WGRAD_BAD = COMMON_BAD + [
    ("x-3d", dict(x=lambda t: t["x"][0]), "x"),
    ("x-float64", dict(x=lambda t: t["x"].double()), "x"),
    ("g-dtype", dict(g=lambda t: t["g"].half(), z=lambda t: t["z"].half()), "g"),
    ("g-stride", dict(stride=2), "g"),  # g is what stride 1 makes of x
    ("weight_shape-c_in", dict(weight_shape=(40, 23, 1, 1)), "weight_shape"),
    ("weight_shape-3x3", dict(weight_shape=(40, 24, 3, 3)), "weight_shape"),
    ("in_scale-alone", dict(in_scale=lambda t: t["in_scale"]), "in_scale"),
    ("in_shift-alone", dict(in_shift=lambda t: t["in_shift"]), "in_shift"),
    ("in_scale-length", dict(in_scale=lambda t: t["in_scale"][:-1], in_shift=lambda t: t["in_shift"]), "in_scale"),
    ("in_shift-half", dict(in_scale=lambda t: t["in_scale"], in_shift=lambda t: t["in_shift"].half()), "in_shift"),
    ("config-no-block_ci", dict(config=triton.Config({"BLOCK_CO": 64})), "config"),
    ("config-block_ci-8", dict(config=triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 8})), "config"),
]


def _bad_args(t, defaults, changes):
    args = dict(defaults)
    for k, v in changes.items():
        args[k] = v(t) if callable(v) else v
    return args


@pytest.mark.parametrize("changes, arg", [pytest.param(*b[1:], id=b[0]) for b in DGRAD_BAD])
def test_dgrad_bad_input_raises_naming_the_argument(changes, arg, device):
    t = make((2, 24, 40, 5, 7, 1), torch.float32, device)
    defaults = dict(g=t["g"], z=t["z"], weight=t["weight"], coeffs=t["coeffs"], x_shape=tuple(t["x"].shape),
                    stride=1)
    with pytest.raises(ValueError, match=names(arg)):
        conv1x1_dgrad(**_bad_args(t, defaults, changes))


@pytest.mark.parametrize("changes, arg", [pytest.param(*b[1:], id=b[0]) for b in WGRAD_BAD])
def test_wgrad_bad_input_raises_naming_the_argument(changes, arg, device):
    t = make((2, 24, 40, 5, 7, 1), torch.float32, device)
    defaults = dict(x=t["x"], g=t["g"], z=t["z"], coeffs=t["coeffs"], weight_shape=tuple(t["weight"].shape),
                    stride=1)
    with pytest.raises(ValueError, match=names(arg)):
        conv1x1_wgrad(**_bad_args(t, defaults, changes))


def test_kernels_are_autotuned_through_the_project_wrapper():
    """Both kernels go through ``kernels._autotune.autotune`` (results kept on disk on the GPU)."""
    from kernels import _autotune
    assert bwd._dgrad_kernel in _autotune.MADE and bwd._wgrad_kernel in _autotune.MADE
