"""The 1x1 conv GEMM (``kernels.conv1x1.forward``): z, the BN+ReLU prologue and the statistics epilogue
against PyTorch in float64 on the same (already rounded) inputs."""

import re

import pytest
import torch
import torch.nn.functional as F
import triton

from _helpers import STATS_TOL, assert_close, assert_within_2x_pytorch, bf16_gpu_only, gpu_only
from kernels.conv1x1.forward import conv1x1_configs, conv1x1_forward, k_tile, prune_configs
from kernels.batchnorm.stats import bn_stats

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=bf16_gpu_only)]

SHAPES = [  # (N, C_in, C_out, H, W, stride)
    pytest.param((2, 24, 40, 5, 7, 1), id="ragged"),  # channels off the tiles, M = 70 not a multiple of 64
    pytest.param((2, 24, 40, 7, 9, 2), id="stride2-odd"),  # odd H, W: Ho, Wo = 4, 5
    pytest.param((3, 80, 16, 6, 6, 2), id="two-k-tiles"),  # C_in = 64 + 16: a ragged second K tile
    pytest.param((2, 64, 64, 8, 8, 1), id="even"),  # every tile whole: no masks on K or N
]
EPS, MOMENTUM = 1e-5, 0.1


def make(shape, dtype, device, seed=0):
    """x, weight in ``dtype`` (z ~ N(0, 1)), and float32 prologue / BatchNorm vectors."""
    n, c_in, c_out, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g) / c_in ** 0.5
    sign = torch.where(torch.rand(c_in, generator=g) < 0.2, -1.0, 1.0)
    in_scale = sign * (0.5 + torch.rand(c_in, generator=g))  # a folded BatchNorm: gamma of both signs
    in_shift = 0.5 * torch.randn(c_in, generator=g)
    gamma = 0.5 + torch.rand(c_out, generator=g)
    beta = 0.5 * torch.randn(c_out, generator=g)
    running_mean = 0.3 * torch.randn(c_out, generator=g)
    running_var = 0.5 + torch.rand(c_out, generator=g)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return dict(x=x, weight=weight.to(device=device, dtype=dtype), in_scale=in_scale.to(device),
                in_shift=in_shift.to(device), gamma=gamma.to(device), beta=beta.to(device),
                running_mean=running_mean.to(device), running_var=running_var.to(device))


def reference_z(t, stride, prologue, dtype=torch.float64):
    """z = conv2d(relu(x·scale + shift) or x) from the same (rounded) x and weight: exact in float64;
    with ``dtype`` a half type, PyTorch at that precision (the prologue's output rounded to it)."""
    a = t["x"].double()
    if prologue:
        scale, shift = (t[k].double()[None, :, None, None] for k in ("in_scale", "in_shift"))
        a = torch.relu(a * scale + shift)
    return F.conv2d(a.to(dtype), t["weight"].to(dtype), stride=stride)


def run(t, stride, prologue, **kwargs):
    scale_shift = dict(in_scale=t["in_scale"], in_shift=t["in_shift"]) if prologue else {}
    return conv1x1_forward(t["x"], t["weight"], stride, **scale_shift, **kwargs)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_output_and_statistics(shape, dtype, prologue, device):
    t = make(shape, dtype, device)
    stride = shape[-1]
    z, stats = run(t, stride, prologue, compute_stats=True)
    z_ref = reference_z(t, stride, prologue)
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    assert_close(z, z_ref, dtype, "z")
    if dtype != torch.float32:  # at most about twice PyTorch's own error at this precision
        assert_within_2x_pytorch(z, reference_z(t, stride, prologue, dtype), z_ref, dtype, "z")
    # the statistics epilogue changes nothing in z
    z_plain, none = run(t, stride, prologue)
    assert none is None and torch.equal(z_plain, z)

    count = z.shape[0] * z.shape[2] * z.shape[3]
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    mean, invstd, scale, shift = bn_stats(stats, count, t["gamma"], t["beta"], rm, rv, EPS, MOMENTUM)
    rm_ref, rv_ref = t["running_mean"].double(), t["running_var"].double()
    F.batch_norm(z_ref, rm_ref, rv_ref, None, None, True, MOMENTUM, EPS)  # updates rm_ref, rv_ref
    mean_ref = z_ref.mean(dim=(0, 2, 3))
    invstd_ref = (z_ref.var(dim=(0, 2, 3), unbiased=False) + EPS).rsqrt()
    gamma, beta = t["gamma"].double(), t["beta"].double()
    for name, got, want in [("mean", mean, mean_ref), ("invstd", invstd, invstd_ref),
                            ("scale", scale, gamma * invstd_ref),
                            ("shift", shift, beta - mean_ref * gamma * invstd_ref),
                            ("running_mean", rm, rm_ref), ("running_var", rv, rv_ref)]:
        assert_close(got, want, dtype, name, tol=STATS_TOL)
    # of z as stored (rounded to dtype), to float32 accuracy: the convention of kernels/conv3x3/forward.py
    z_stored = z.double()
    assert_close(mean, z_stored.mean(dim=(0, 2, 3)), torch.float32, "mean of stored z", tol=STATS_TOL)
    assert_close(invstd, (z_stored.var(dim=(0, 2, 3), unbiased=False) + EPS).rsqrt(), torch.float32,
                 "invstd of stored z", tol=STATS_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("fixed_order_dot")
def test_statistics_do_not_depend_on_the_config(dtype, device):
    """Two forced configs (different pixel and channel tiles: 2x3 programs vs one) give the same
    bits: the K tile, hence each float32 sum's order, is fixed by C_in, and chunks by STATS_ROWS."""
    shape = (2, 24, 40, 7, 9, 1)  # M = 126: two 64-pixel tiles, the second ragged
    t = make(shape, dtype, device, seed=1)
    configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    (z0, (mean0, m20)), (z1, (mean1, m21)) = (
        run(t, 1, True, compute_stats=True, config=c) for c in configs)
    assert_close(z0, reference_z(t, 1, True), dtype, "z")
    assert torch.equal(z0, z1) and torch.equal(mean0, mean1) and torch.equal(m20, m21)


def test_nchw_input_is_made_channels_last(device):
    t = make((2, 24, 40, 5, 7, 2), torch.float32, device)
    z_cl, _ = run(t, 2, True)
    z_nchw, _ = conv1x1_forward(t["x"].contiguous(), t["weight"], 2, in_scale=t["in_scale"],
                                in_shift=t["in_shift"])
    assert torch.equal(z_nchw, z_cl)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue, compute_stats", [(False, False), (True, True)], ids=["plain", "fused"])
def test_every_shipped_config(dtype, prologue, compute_stats, device):
    """Every config autotuning may launch at a ResNeXt-like shape: right z, the same statistics."""
    shape = (4, 256, 128, 14, 14, 1)
    t = make(shape, dtype, device)
    configs = prune_configs(conv1x1_configs(interpret=False), {"x_ptr": t["x"], "C_out": shape[2]},
                            BLOCK_K=k_tile(shape[1]), COMPUTE_STATS=compute_stats)
    z_ref = reference_z(t, 1, prologue)
    first = None
    for config in configs:
        z, stats = run(t, 1, prologue, compute_stats=compute_stats, config=config)
        assert_close(z, z_ref, dtype, f"z {config}")
        if compute_stats:
            first = first or stats
            assert torch.equal(stats[0], first[0]) and torch.equal(stats[1], first[1]), str(config)


def names(arg):
    """A ``match`` pattern: the message names ``arg`` as a word."""
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


BAD = [  # (id, changes, argument the message must name)
    ("x-3d", dict(x=lambda t: t["x"][0]), "x"),
    ("x-int", dict(x=lambda t: t["x"].to(torch.int32)), "x"),
    ("x-float64", dict(x=lambda t: t["x"].double(), weight=lambda t: t["weight"].double()), "x"),
    ("weight-3x3", dict(weight=lambda t: torch.randn(40, 24, 3, 3, device=t["x"].device)), "weight"),
    ("weight-c_in", dict(weight=lambda t: t["weight"][:, :8].contiguous()), "weight"),
    ("weight-dtype", dict(weight=lambda t: t["weight"].half()), "weight"),
    ("stride-3", dict(stride=3), "stride"),
    ("stride-tuple", dict(stride=(2, 2)), "stride"),
    ("in_scale-alone", dict(in_scale=lambda t: t["in_scale"]), "in_scale"),
    ("in_shift-alone", dict(in_shift=lambda t: t["in_shift"]), "in_shift"),
    ("in_scale-length", dict(in_scale=lambda t: t["in_scale"][:-1], in_shift=lambda t: t["in_shift"]),
     "in_scale"),
    ("in_shift-half", dict(in_scale=lambda t: t["in_scale"], in_shift=lambda t: t["in_shift"].half()),
     "in_shift"),
    ("config-dict", dict(config={"BLOCK_M": 64}), "config"),
    ("config-block_m", dict(config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})), "config"),
    ("config-no-block_n", dict(config=triton.Config({"BLOCK_M": 64})), "config"),
]


@pytest.mark.parametrize("changes, arg", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_raises_naming_the_argument(changes, arg, device):
    t = make((2, 24, 40, 5, 7, 1), torch.float32, device)
    args = dict(x=t["x"], weight=t["weight"], stride=1)
    for k, v in changes.items():
        args[k] = v(t) if callable(v) else v
    with pytest.raises(ValueError, match=names(arg)):
        conv1x1_forward(**args)
