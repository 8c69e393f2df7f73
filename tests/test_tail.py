"""The bottleneck's tail, y = relu(bn3(z3) + identity), forward and backward (``kernels/batchnorm/tail.py``).

The reference is PyTorch's float64 autograd through the unfused ops, run on the same inputs
rounded to the test's precision first: relu(batch_norm(z3) + batch_norm(z_d)) with a projection
shortcut, relu(batch_norm(z3) + x) without one. It is compared with y, with g (the gradient at the
final ReLU's input), with the BatchNorm input gradients rebuilt from the kernel's sums
(dz = scale·g + k1·z + k0), and with dγ = Σg·x̂ and dβ = Σg.
"""

import pytest
import torch
import torch.nn.functional as F

from _helpers import TOL, assert_close, assert_within_2x_pytorch, bf16_gpu_only, grad_output
from kernels.batchnorm.stats import bn_grad
from kernels.batchnorm.tail import tail_backward, tail_forward

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")

EPS = 1e-5
CL = torch.channels_last

SHAPES = [
    pytest.param((2, 24, 9, 9), id="c24"),  # ragged tile: C < BLOCK_C, masked channels; 162 pixels
    pytest.param((3, 80, 7, 7), id="c80"),  # ragged tile: second channel tile partial; 147 pixels
    pytest.param((2, 64, 8, 8), id="c64-even"),  # C divides the tile (EVEN_C, no channel masks)
    pytest.param((2, 16, 130, 130), id="splits"),  # 33,800 pixels: several splits, the last ragged
]
ALL_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16", marks=bf16_gpu_only)]
# Σ over pixels of float32 products against the float64 reference: float32 accuracy whatever the
# activation dtype. g is dy or 0, so it is exact in every dtype and the sums see no rounding of it.
SUM_TOL = {dtype: TOL[torch.float32] for dtype in TOL}


def _activation(gen, shape, dtype, device):
    """Per-channel offset and spread, so that batch statistics are far from (0, 1)."""
    n, c, h, w = shape
    loc = torch.randn(1, c, 1, 1, generator=gen)
    spread = 0.5 + torch.rand(1, c, 1, 1, generator=gen)
    t = loc + spread * torch.randn(shape, generator=gen)
    return t.to(dtype).to(device).contiguous(memory_format=CL)


def _bn(gen, z):
    """BatchNorm of z: γ (both signs), β, and z's float64 batch mean, biased variance, invstd."""
    c = z.shape[1]
    sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
    gamma = (sign * (0.5 + torch.rand(c, generator=gen))).double()
    beta = (0.5 * torch.randn(c, generator=gen)).double()
    z64 = z.double().cpu()
    mean, var = z64.mean((0, 2, 3)), z64.var((0, 2, 3), unbiased=False)
    return dict(gamma=gamma, beta=beta, mean=mean, var=var, invstd=1.0 / torch.sqrt(var + EPS))


def _folded(bn, device):
    """float32 (scale, shift, mean, invstd) on ``device``, as the fused forward hands them on."""
    scale = bn["gamma"] * bn["invstd"]
    shift = bn["beta"] - bn["mean"] * scale
    return [t.float().to(device) for t in (scale, shift, bn["mean"], bn["invstd"])]


def _problem(shape, dtype, project, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z3 = _activation(gen, shape, dtype, device)
    bn3 = _bn(gen, z3)
    identity = _activation(gen, shape, dtype, device)  # z_d when projecting, else the block input x
    bn_d = _bn(gen, identity) if project else None
    return z3, bn3, identity, bn_d


def _reference(z3, bn3, identity, bn_d, dy=None, training=True, dtype=torch.float64):
    """y, the ReLU's input and (with dy) autograd's gradients, in ``dtype`` on the CPU."""
    def batch_norm(z, bn):
        p = {k: v.to(torch.float64 if dtype == torch.float64 else torch.float32) for k, v in bn.items()}
        gamma, beta = p["gamma"].requires_grad_(), p["beta"].requires_grad_()
        # training: batch statistics (recomputed by PyTorch); frozen: the same numbers as running stats
        rm, rv = (None, None) if training else (p["mean"], p["var"])
        return F.batch_norm(z, rm, rv, gamma, beta, training, 0.0, EPS), gamma, beta

    z3 = z3.cpu().to(dtype).requires_grad_()
    idn = identity.cpu().to(dtype).requires_grad_()
    out3, gamma3, beta3 = batch_norm(z3, bn3)
    if bn_d is not None:
        out_d, gamma_d, beta_d = batch_norm(idn, bn_d)
    else:
        out_d, gamma_d, beta_d = idn, None, None
    pre = out3 + out_d
    pre.retain_grad()
    y = torch.relu(pre)
    grads = {}
    if dy is not None:
        y.backward(dy.cpu().to(dtype))
        grads = dict(g=pre.grad, dz3=z3.grad, dgamma3=gamma3.grad, dbeta3=beta3.grad, didentity=idn.grad,
                     dgamma_d=None if gamma_d is None else gamma_d.grad,
                     dbeta_d=None if beta_d is None else beta_d.grad)
    return y.detach(), pre.detach(), grads


def _run(z3, bn3, identity, bn_d, dy, device, training=True):
    """y, g and each BatchNorm's (Σg, Σg·x̂, k1, k0) from the tail's partials (``bn_grad``)."""
    scale3, shift3, mean3, invstd3 = _folded(bn3, device)
    d = _folded(bn_d, device) if bn_d is not None else [None] * 4
    y = tail_forward(z3, scale3, shift3, identity, d[0], d[1])
    g, part = tail_backward(dy, z3, scale3, shift3, mean3, invstd3, identity, *d)
    count = z3.shape[0] * z3.shape[2] * z3.shape[3]
    grads3 = bn_grad(part[:, 0], part[:, 1], scale3, mean3, invstd3, count, training)
    grads_d = bn_grad(part[:, 0], part[:, 2], d[0], d[2], d[3], count, training) if bn_d is not None else None
    return y, g, grads3, grads_d


def _dz(g, z, grads, bn, device):
    """BatchNorm's input gradient from the kernel's g and ``bn_grad``'s k1, k0, in float64."""
    scale = _folded(bn, device)[0]
    k1, k0 = grads[2:]
    assert k1.dtype == k0.dtype == torch.float32
    per_c = [t.double().cpu().view(1, -1, 1, 1) for t in (scale, k1, k0)]
    return per_c[0] * g.double().cpu() + per_c[1] * z.double().cpu() + per_c[2]


def _grad_y(pre, dtype, device):
    """Upstream gradient, zero where the ReLU's input is within 0.05 of its kink (see grad_output)."""
    return grad_output(pre).to(dtype).to(device).contiguous(memory_format=CL)


@pytest.mark.parametrize("project", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_tail_matches_autograd(shape, dtype, project, device):
    z3, bn3, identity, bn_d = _problem(shape, dtype, project, device)
    _, pre, _ = _reference(z3, bn3, identity, bn_d)
    dy = _grad_y(pre, dtype, device)
    y_ref, _, ref = _reference(z3, bn3, identity, bn_d, dy)
    y, g, sums3, sums_d = _run(z3, bn3, identity, bn_d, dy, device)

    for name, t in (("y", y), ("g", g)):
        assert t.dtype == dtype and t.shape == z3.shape and t.is_contiguous(memory_format=CL), name
    assert_close(y.cpu(), y_ref, dtype, "y")
    if dtype != torch.float32:  # half precision: at most about twice PyTorch's own error
        y_lowp, _, _ = _reference(z3, bn3, identity, bn_d, dtype=dtype)
        assert_within_2x_pytorch(y.cpu(), y_lowp, y_ref, dtype, "y")
    assert_close(g.cpu(), ref["g"], dtype, "g")

    assert_close(sums3[1].cpu(), ref["dgamma3"], dtype, "dgamma3 = sum g*xhat3", SUM_TOL)
    assert_close(sums3[0].cpu(), ref["dbeta3"], dtype, "dbeta3 = sum g", SUM_TOL)
    # Σg is taken from the float32 g before rounding, which is the stored g exactly
    assert_close(sums3[0].cpu(), g.double().sum((0, 2, 3)).cpu(), dtype, "sum g vs stored g", SUM_TOL)
    assert_close(_dz(g, z3, sums3, bn3, device), ref["dz3"], dtype, "dz3", SUM_TOL)
    if project:
        assert sums_d is not None and torch.equal(sums_d[0], sums3[0])
        assert_close(sums_d[1].cpu(), ref["dgamma_d"], dtype, "dgamma_d = sum g*xhat_d", SUM_TOL)
        assert_close(sums_d[0].cpu(), ref["dbeta_d"], dtype, "dbeta_d = sum g", SUM_TOL)
        assert_close(_dz(g, identity, sums_d, bn_d, device), ref["didentity"], dtype, "dz_d", SUM_TOL)
    else:
        assert sums_d is None
        assert_close(g.cpu(), ref["didentity"], dtype, "dx (identity branch) = g")


@pytest.mark.parametrize("project", [False, True], ids=["identity", "projection"])
def test_tail_frozen_bn(project, device):
    """Eval-mode BatchNorm: k1 = k0 = 0, dz = scale·g; dγ, dβ as in training."""
    shape, dtype = (2, 24, 9, 9), torch.float32
    z3, bn3, identity, bn_d = _problem(shape, dtype, project, device, seed=1)
    _, pre, _ = _reference(z3, bn3, identity, bn_d, training=False)
    dy = _grad_y(pre, dtype, device)
    y_ref, _, ref = _reference(z3, bn3, identity, bn_d, dy, training=False)
    y, g, sums3, sums_d = _run(z3, bn3, identity, bn_d, dy, device, training=False)
    assert_close(y.cpu(), y_ref, dtype, "y")
    assert not sums3[2].any() and not sums3[3].any()  # k1 = k0 = 0
    assert_close(_dz(g, z3, sums3, bn3, device), ref["dz3"], dtype, "dz3")
    assert_close(sums3[1].cpu(), ref["dgamma3"], dtype, "dgamma3")
    assert_close(sums3[0].cpu(), ref["dbeta3"], dtype, "dbeta3")
    if project:
        assert_close(_dz(g, identity, sums_d, bn_d, device), ref["didentity"], dtype, "dz_d")


@pytest.mark.parametrize("project", [False, True], ids=["identity", "projection"])
def test_tail_deterministic(project, device):
    """Two runs, the same bits: fixed splits and a fixed summation order."""
    dtype = torch.float16
    z3, bn3, identity, bn_d = _problem((2, 16, 130, 130), dtype, project, device, seed=2)
    _, pre, _ = _reference(z3, bn3, identity, bn_d)
    dy = _grad_y(pre, dtype, device)
    first = _run(z3, bn3, identity, bn_d, dy, device)
    second = _run(z3, bn3, identity, bn_d, dy, device)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2] + (first[3] or ()), second[2] + (second[3] or ())):
        assert torch.equal(a, b)


def test_tail_nan_as_pytorch(device):
    """A NaN input of the final ReLU: y is NaN and g = dy there, as torch.relu's autograd gives."""
    z3 = torch.tensor([float("nan"), 1.0, -1.0, 2.0], device=device).view(1, 4, 1, 1).contiguous(memory_format=CL)
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    dy = torch.full_like(z3, 3.0)
    y = tail_forward(z3, ones, zeros, torch.zeros_like(z3))
    g, _ = tail_backward(dy, z3, ones, zeros, zeros, ones, torch.zeros_like(z3))
    ref = z3.detach().double().cpu().requires_grad_()
    torch.relu(ref).backward(dy.double().cpu())
    torch.testing.assert_close(y.cpu(), torch.relu(z3.cpu()), equal_nan=True)
    torch.testing.assert_close(g.double().cpu(), ref.grad)


def test_tail_empty_batch(device):
    """N = 0: empty outputs, and sums over no pixels are zeros."""
    z3 = torch.empty((0, 8, 4, 4), device=device).contiguous(memory_format=CL)
    v = torch.ones(8, device=device)
    y = tail_forward(z3, v, v, z3, v, v)
    g, part = tail_backward(z3, z3, v, v, v, v, z3, v, v, v, v)
    assert y.shape == g.shape == z3.shape
    for t in bn_grad(part[:, 0], part[:, 1], v, v, v, 1, True) + bn_grad(part[:, 0], part[:, 2], v, v, v, 1, True):
        assert t.shape == (8,) and not t.any()


def _bad_inputs(device):
    """(label, forward kwargs or None, backward kwargs or None, argument the error must name)."""
    n, c = 2, 8
    z = torch.randn(n, c, 3, 3, device=device).contiguous(memory_format=CL)
    v = torch.ones(c, device=device)
    fwd = dict(z3=z, scale3=v, shift3=v, identity=z)
    bwd = dict(dy=z, z3=z, scale3=v, shift3=v, mean3=v, invstd3=v, identity=z)
    cases = [
        ("z3 3-D", dict(fwd, z3=z[0]), dict(bwd, z3=z[0]), "z3"),
        ("z3 float64", dict(fwd, z3=z.double()), dict(bwd, z3=z.double()), "z3"),
        ("z3 NCHW", dict(fwd, z3=z.contiguous()), dict(bwd, z3=z.contiguous()), "z3"),
        ("identity shape", dict(fwd, identity=z[:1]), dict(bwd, identity=z[:1]), "identity"),
        ("identity dtype", dict(fwd, identity=z.half()), dict(bwd, identity=z.half()), "identity"),
        ("dy dtype", None, dict(bwd, dy=z.half()), "dy"),
        ("dy shape", None, dict(bwd, dy=z[:, :4]), "dy"),
        ("scale3 size", dict(fwd, scale3=v[:4]), dict(bwd, scale3=v[:4]), "scale3"),
        ("shift3 float64", dict(fwd, shift3=v.double()), dict(bwd, shift3=v.double()), "shift3"),
        ("invstd3 missing", None, dict(bwd, invstd3=None), "invstd3"),
        ("scale_d without shift_d", dict(fwd, scale_d=v), dict(bwd, scale_d=v), "shift_d"),
        ("mean_d missing", None, dict(bwd, scale_d=v, shift_d=v, invstd_d=v), "mean_d"),
        ("scale_d size", dict(fwd, scale_d=v[:3], shift_d=v), None, "scale_d"),
    ]
    return cases


@pytest.mark.parametrize("case", range(13))
def test_tail_bad_inputs(case, device):
    label, fwd, bwd, name = _bad_inputs(device)[case]
    if fwd is not None:
        with pytest.raises(ValueError, match=name):
            tail_forward(**fwd)
    if bwd is not None:
        with pytest.raises(ValueError, match=name):
            tail_backward(**bwd)
