"""The grouped 3x3 conv with the fused bottleneck's prologue: the conv reads relu(x·s + t) — the
previous layer's BatchNorm + ReLU, folded into per-channel s, t and applied as x is loaded — and
its zero padding pads that activation, not x (with t > 0, padding x first would add relu(t) at the
borders). Forward (z and its statistics) and the weight gradient, which recomputes the activation
on load, against PyTorch in float64 on the materialised activation."""

import pytest
import torch
import torch.nn.functional as F

from _helpers import DTYPES, TOL, assert_close, max_err
from kernels.batchnorm import stats as bn_statistics
from kernels.conv3x3 import backward as conv_bwd, forward as conv_fwd
from kernels.conv3x3.tiles import conv_configs, wgrad_configs

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")

# (n, c_in, c_out, groups, h, w, stride): narrow groups (several per tile), wide groups, stride 2 on
# odd sizes, channel counts off the tiles
SHAPES = [
    pytest.param((2, 16, 16, 4, 7, 6, 1), id="4-per-group"),
    pytest.param((2, 32, 32, 1, 5, 5, 1), id="one-group-32"),
    pytest.param((3, 24, 40, 8, 7, 9, 2), id="stride2-odd"),
]


def _problem(shape, dtype, device, seed=0):
    n, c_in, c_out, groups, h, w, stride = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in // groups, 3, 3, generator=g) / (9 * c_in / groups) ** 0.5).to(dtype)
    s = torch.rand(c_in, generator=g) + 0.5
    s[::5] *= -1  # γ of either sign
    t = torch.rand(c_in, generator=g) * 0.8 + 0.1  # positive: padding before the transform would show
    return x.to(device), weight.to(device), s.to(device), t.to(device), groups, stride


def _activation(x, s, t):
    return torch.relu(x.double() * s.double()[None, :, None, None] + t.double()[None, :, None, None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_reads_the_activation_padded_after_the_transform(shape, dtype, device):
    x, weight, s, t, groups, stride = _problem(shape, dtype, device)
    z, parts = conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_Z, compute_stats=True,
                                 in_scale=s, in_shift=t)
    ref = F.conv2d(_activation(x, s, t), weight.double(), None, stride, 1, 1, groups)
    assert_close(z, ref, dtype, "z")
    # the statistics are of z as stored, like the forward without a prologue
    mean, m2 = bn_statistics.local_stats(parts, z.shape[0] * z.shape[2] * z.shape[3])
    zs = z.double()
    torch.testing.assert_close(mean.double(), zs.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2.double(), ((zs - zs.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3)),
                               atol=1e-4, rtol=1e-4)
    # and a padding applied before the transform would differ: the test can see it
    wrong = F.conv2d(_activation(F.pad(x.double(), (1, 1, 1, 1)), s, t), weight.double(), None, stride, 0, 1,
                     groups)
    assert max_err(wrong, ref) > 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_weight_gradient_recomputes_the_activation(shape, dtype, device):
    x, weight, s, t, groups, stride = _problem(shape, dtype, device)
    z = conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_Z, in_scale=s, in_shift=t)[0]
    g = torch.Generator().manual_seed(1)
    c_out = weight.shape[0]
    dy = torch.randn(z.shape, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(c_out, generator=g) + 0.5, torch.randn(c_out, generator=g) * 0.2
    k1, k0 = torch.randn(c_out, generator=g) * 0.1, torch.randn(c_out, generator=g) * 0.1
    scale, shift, k1, k0 = (v.to(device) for v in (scale, shift, k1, k0))
    dw = conv_bwd.conv3x3_wgrad(x, dy, z, weight, (scale, shift, k1, k0), groups, stride, 1, in_scale=s, in_shift=t)
    zd = z.double()
    gate = (zd * scale.double()[None, :, None, None] + shift.double()[None, :, None, None]) > 0
    dz = (torch.where(gate, dy.double(), 0.0) * scale.double()[None, :, None, None]
          + zd * k1.double()[None, :, None, None] + k0.double()[None, :, None, None])
    a = _activation(x, s, t).requires_grad_(False)
    w64 = weight.double().requires_grad_()
    F.conv2d(a, w64, None, stride, 1, 1, groups).backward(dz)
    assert_close(dw, w64.grad, dtype, "dweight")


@pytest.mark.usefixtures("fixed_order_dot")
def test_every_config_gives_the_same_bits_with_the_prologue(device):
    """Forced configs of both kernels agree bit for bit with the prologue on, as without it."""
    x, weight, s, t, groups, stride = _problem((2, 16, 16, 4, 7, 6, 1), torch.float32, device)
    # the GPU's configs (the interpreter ships one): the smallest and the largest pixel tile, and
    # two weight-gradient configs (they differ in warps and stages only, which the GPU honours)
    conv = conv_configs(interpret=False)
    zs = [conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_Z, in_scale=s, in_shift=t,
                            config=c)[0] for c in (conv[0], conv[-1])]
    assert conv[0].kwargs["BLOCK_M"] != conv[-1].kwargs["BLOCK_M"]
    assert torch.equal(zs[0], zs[1])
    coeffs = tuple(torch.full((16,), v, device=device) for v in (1.0, 0.1, 0.01, -0.01))
    wgrad = wgrad_configs(interpret=False)
    dws = [conv_bwd.conv3x3_wgrad(x, zs[0], zs[0], weight, coeffs, groups, stride, 1, in_scale=s, in_shift=t, config=c)
           for c in (wgrad[0], wgrad[-1])]
    assert torch.equal(dws[0], dws[1])


def test_prologue_needs_both_vectors(device):
    x, weight, s, t, groups, stride = _problem((2, 16, 16, 4, 7, 6, 1), torch.float32, device)
    with pytest.raises(ValueError, match="in_scale and in_shift"):
        conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_Z, in_scale=s)
    with pytest.raises(ValueError, match="in_scale and in_shift"):
        conv_bwd.conv3x3_wgrad(x, x, x, weight, (s, s, s, s), groups, stride, 1, in_shift=t)
