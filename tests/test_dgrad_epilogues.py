"""The dgrad epilogues of the fused bottleneck's backward (issue 13), 1x1 and grouped 3x3.

A dgrad whose conv read a = relu(bn(z_in)) applies that ReLU's mask to dA and emits BatchNorm's
backward sums (Σg, Σg·x̂) of z_in (``relu_bn=``); the 1x1 dgrad can also add the shortcut's
gradient (``residual=``). Checked against PyTorch autograd in float64 on the same rounded inputs:

* dA (masked, plus the residual) within the dtype's tolerance of the float64 reference;
* the sums against float64 sums of the kernel's own stored dA (the kernel sums what it stores, so
  BatchNorm's rebuilt dz sums to zero over the batch): only float32 summation error is left, which
  is at most ~log2(M)·2^-24 of Σ|terms| for pairwise chunk sums; 1e-5 of Σ|terms| allows for it
  while a missing chunk, a wrong mask or x̂ is ≥ 1e-2;
* two forced pixel tiles: bit-identical dA and sums (chunks, not tiles, fix the summation order).
"""

import pytest
import torch
import torch.nn.functional as F
import triton

from _helpers import DTYPES, assert_close
from kernels.batchnorm.stats import bn_grad
from kernels.conv3x3 import backward as conv_bwd
from kernels.conv1x1.backward import conv1x1_dgrad

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")

MARGIN = 0.05  # |bn(z_in)| is kept at least this far from the ReLU's kink (float32 vs float64 mask)


def _relu_bn(c, n, h, w, dtype, device, gen):
    """z_in (N, C, H, W) in dtype, channels-last, and (scale, shift, mean, invstd) float32 with
    scale of either sign, z_in drawn so that z_in·scale + shift stays MARGIN away from 0."""
    scale = torch.rand(c, generator=gen) + 0.5
    scale[::3] *= -1
    shift = 0.5 * torch.randn(c, generator=gen)
    pre = torch.randn(n, c, h, w, generator=gen)
    pre = torch.where(pre.abs() < 2 * MARGIN, pre.sign() * 2 * MARGIN + pre, pre)
    z_in = ((pre - shift[:, None, None]) / scale[:, None, None]).to(dtype)
    mean, invstd = 0.3 * torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    z_in = z_in.to(device).contiguous(memory_format=torch.channels_last)
    return z_in, tuple(v.to(device) for v in (scale, shift, mean, invstd))


def _upstream(c, n, h, w, dtype, device, gen):
    """(g, z, coeffs) of the conv's own output: what dz = scale·g·mask + k1·z + k0 is rebuilt from."""
    g = torch.randn(n, c, h, w, generator=gen).to(dtype)
    z = torch.randn(n, c, h, w, generator=gen).to(dtype)
    coeffs = (torch.rand(c, generator=gen) + 0.5, 0.5 * torch.randn(c, generator=gen),
              0.1 * torch.randn(c, generator=gen), 0.1 * torch.randn(c, generator=gen))
    cl = dict(memory_format=torch.channels_last)
    return g.to(device).contiguous(**cl), z.to(device).contiguous(**cl), tuple(v.to(device) for v in coeffs)


def _dz(g, z, coeffs, mask):
    scale, shift, k1, k0 = (v.double()[:, None, None] for v in coeffs)
    g, z = g.double(), z.double()
    if mask:
        g = torch.where(z * scale + shift > 0, g, 0.0)
    return scale * g + k1 * z + k0


def _reference_da(conv, a_shape, dz):
    """Gradient of conv(a) w.r.t. a (float64) for the incoming gradient dz."""
    a = torch.zeros(a_shape, dtype=torch.float64, device=dz.device, requires_grad=True)
    conv(a).backward(dz)
    return a.grad


def _check(da, partials, da_ref, z_in, bn, dtype):
    """The masked dA, and the sums the epilogue's partials give once ``bn_grad`` finishes them."""
    count = z_in.shape[0] * z_in.shape[2] * z_in.shape[3]
    sums = bn_grad(*partials, bn[0], bn[2], bn[3], count, True)[:2]
    scale, shift, mean, invstd = (v.double()[:, None, None] for v in bn)
    gate = z_in.double() * scale + shift > 0
    assert_close(da, torch.where(gate, da_ref, 0.0), dtype, "dA (masked)")
    stored = da.double()
    xhat = (z_in.double() - mean) * invstd
    for name, terms, got in (("Σg", stored, sums[0]), ("Σg·x̂", stored * xhat, sums[1])):
        assert got.dtype == torch.float32 and got.shape == (da.shape[1],)
        expected = terms.sum((0, 2, 3))
        bound = 1e-5 * terms.abs().sum((0, 2, 3)) + 1e-30
        err = (got.double() - expected).abs()
        assert (err <= bound).all(), f"{name}: error {err.max().item():.3g} past {bound.min().item():.3g}"


SHAPES_1X1 = [  # (N, C_in, C_out, H, W)
    pytest.param((2, 24, 40, 5, 7), id="ragged"),  # M = 70: a part-filled statistics chunk
    pytest.param((2, 64, 64, 9, 8), id="even"),  # whole channel tiles, M = 144
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_1X1)
def test_1x1_dgrad_relu_bn_epilogue(shape, dtype, device):
    n, c_in, c_out, h, w = shape
    gen = torch.Generator().manual_seed(0)
    z_in, bn = _relu_bn(c_in, n, h, w, dtype, device, gen)
    g, z, coeffs = _upstream(c_out, n, h, w, dtype, device, gen)
    weight = (torch.randn(c_out, c_in, 1, 1, generator=gen) / c_in ** 0.5).to(dtype).to(device)
    da, sums = conv1x1_dgrad(g, z, weight, coeffs, z_in.shape, 1, mask=True, relu_bn=(z_in, *bn))
    assert da.dtype == dtype and da.is_contiguous(memory_format=torch.channels_last)
    da_ref = _reference_da(lambda a: F.conv2d(a, weight.double()), z_in.shape, _dz(g, z, coeffs, True))
    _check(da, sums, da_ref, z_in, bn, dtype)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_1x1_dgrad_adds_the_residual(dtype, stride, device):
    n, c_in, c_out, h, w = 2, 24, 40, 7, 9
    gen = torch.Generator().manual_seed(1)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g, z, coeffs = _upstream(c_out, n, ho, wo, dtype, device, gen)
    weight = (torch.randn(c_out, c_in, 1, 1, generator=gen) / c_in ** 0.5).to(dtype).to(device)
    residual = torch.randn(n, c_in, h, w, generator=gen).to(dtype).to(device)  # NCHW: made channels-last
    da = conv1x1_dgrad(g, z, weight, coeffs, (n, c_in, h, w), stride, mask=False, residual=residual)
    da_ref = _reference_da(lambda a: F.conv2d(a, weight.double(), stride=stride), (n, c_in, h, w),
                           _dz(g, z, coeffs, False))
    assert_close(da, da_ref + residual.double(), dtype, "dA + residual")


SHAPES_3X3 = [  # (N, C_in, C_out, groups, H, W, stride)
    pytest.param((2, 16, 16, 4, 7, 6, 1), id="4-per-group"),
    pytest.param((3, 24, 40, 8, 7, 9, 2), id="stride2-odd"),  # parity classes of 16, 12, 12, 9 pixels
    pytest.param((2, 32, 32, 1, 12, 11, 2), id="one-group-stride2"),  # classes past one chunk (66 pixels)
]


def _grouped_problem(shape, dtype, device, seed=0):
    n, c_in, c_out, groups, h, w, stride = shape
    gen = torch.Generator().manual_seed(seed)
    z_in, bn = _relu_bn(c_in, n, h, w, dtype, device, gen)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy, z, coeffs = _upstream(c_out, n, ho, wo, dtype, device, gen)
    weight = (torch.randn(c_out, c_in // groups, 3, 3, generator=gen) / (9 * c_in / groups) ** 0.5)
    return z_in, bn, dy, z, coeffs, weight.to(dtype).to(device), groups, stride


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_3X3)
def test_grouped_dgrad_relu_bn_epilogue(shape, dtype, device):
    z_in, bn, dy, z, coeffs, weight, groups, stride = _grouped_problem(shape, dtype, device)
    dx, sums = conv_bwd.conv3x3_dgrad(dy, z, weight, coeffs, z_in.shape, groups, stride, 1, relu_bn=(z_in, *bn))
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last)
    dx_ref = _reference_da(lambda a: F.conv2d(a, weight.double(), None, stride, 1, 1, groups), z_in.shape,
                           _dz(dy, z, coeffs, True))
    _check(dx, sums, dx_ref, z_in, bn, dtype)


def _configs(**tiles):
    return [triton.Config({k: v for k, v in zip(tiles, values)}, num_warps=4, num_stages=1)
            for values in zip(*tiles.values())]


@pytest.mark.usefixtures("fixed_order_dot")
def test_epilogue_sums_do_not_depend_on_the_pixel_tile(device):
    """Two forced pixel tiles (64 and 128 pixels, both whole statistics chunks): the same bits."""
    z_in, bn, dy, z, coeffs, weight, groups, stride = _grouped_problem((2, 32, 32, 1, 12, 11, 2),
                                                                       torch.float32, device, seed=2)
    runs = [conv_bwd.conv3x3_dgrad(dy, z, weight, coeffs, z_in.shape, groups, stride, 1, relu_bn=(z_in, *bn), config=c)
            for c in _configs(BLOCK_M=[64, 128])]
    gen = torch.Generator().manual_seed(3)
    z1, bn1 = _relu_bn(16, 2, 12, 11, torch.float32, device, gen)
    g, zc, cc = _upstream(32, 2, 12, 11, torch.float32, device, gen)
    w1 = torch.randn(32, 16, 1, 1, generator=gen).to(device)
    runs_1x1 = [conv1x1_dgrad(g, zc, w1, cc, z1.shape, 1, relu_bn=(z1, *bn1), config=c)
                for c in _configs(BLOCK_M=[64, 128], BLOCK_N=[16, 32])]
    for (a, (s0, s1)), (b, (t0, t1)) in (runs, runs_1x1):
        assert torch.equal(a, b) and torch.equal(s0, t0) and torch.equal(s1, t1)


def test_relu_bn_epilogue_bad_input_names_the_argument(device):
    gen = torch.Generator().manual_seed(4)
    z_in, bn = _relu_bn(16, 2, 6, 6, torch.float32, device, gen)
    g, z, coeffs = _upstream(32, 2, 3, 3, torch.float32, device, gen)
    w = torch.randn(32, 16, 1, 1, generator=gen).to(device)
    with pytest.raises(ValueError, match="relu_bn needs stride 1"):
        conv1x1_dgrad(g, z, w, coeffs, z_in.shape, 2, relu_bn=(z_in, *bn))
    g, z, coeffs = _upstream(32, 2, 6, 6, torch.float32, device, gen)
    with pytest.raises(ValueError, match=r"relu_bn must be \(z_in, scale, shift, mean, invstd\)"):
        conv1x1_dgrad(g, z, w, coeffs, z_in.shape, 1, relu_bn=(z_in, *bn[:3]))
    with pytest.raises(ValueError, match=r"relu_bn \(mean\) must be a 1-D tensor of C_in=16"):
        conv1x1_dgrad(g, z, w, coeffs, z_in.shape, 1, relu_bn=(z_in, bn[0], bn[1], bn[2][:8], bn[3]))
    with pytest.raises(ValueError, match="residual must be a tensor of shape"):
        conv1x1_dgrad(g, z, w, coeffs, z_in.shape, 1, residual=z_in[:, :8])
