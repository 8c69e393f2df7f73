"""Every autotune config we ship computes the right thing, not just the one that wins, and every
config computes the same bits.

KERNEL-NOTES: a Triton conv template in Inductor was silently wrong for some num_warps only, so
each GPU config is forced in turn. On the CPU the interpreter ignores warps and stages but still
exercises each config's pixel tile. Results must not depend on the config autotuning picks
(another process, another DDP rank may pick another): ``test_configs_agree_bitwise``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from _helpers import INTERPRET
from kernels.batchnorm.pointwise import bn_relu_bwd
from kernels.batchnorm.stats import bn_stats
from kernels.conv3x3 import backward as conv_bwd, forward as conv_fwd
from kernels.conv3x3.tiles import (channel_tiles, config_fits, conv_configs, prune_wgrad_configs,
                                 wgrad_configs, wgrad_taps_per_program, wgrad_tiles)

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")

CONFIGS = conv_configs(interpret=False)  # forward and dgrad
WGRAD_CONFIGS = wgrad_configs(interpret=False)

# (N, C_in, H, W, C_out, groups, stride): ResNeXt-like 4 per group, a ragged case whose groups
# straddle channel tiles, and wide groups that loop over input-channel chunks.
SHAPES = [
    (2, 16, 9, 9, 16, 4, 1),
    (2, 15, 7, 5, 30, 5, 2),  # ragged tile
    (1, 96, 5, 5, 96, 1, 2),  # wide group: 96 input channels in 64-wide chunks
    (1, 128, 5, 4, 128, 2, 1),  # 64 per group (ResNeXt-101 32x8d stage 4): wgrad in 2 aligned chunks
    (1, 256, 4, 4, 32, 2, 1),  # 128 inputs, 16 outputs per group: aligned chunks in every kernel
]


def _config_id(cfg):
    block_m = f"M{cfg.kwargs['BLOCK_M']}-" if "BLOCK_M" in cfg.kwargs else ""
    return f"{block_m}w{cfg.num_warps}-s{cfg.num_stages}"


def _shipped(configs, c_in, c_out, groups, dtype=torch.float32):
    """The configs autotuning keeps for these channel tiles (it prunes those past the budgets)."""
    cin_g, cout_g = c_in // groups, c_out // groups
    elem = torch.empty((), dtype=dtype).element_size()
    if configs is CONFIGS:  # forward and dgrad
        tiles = [channel_tiles(cin_g, cout_g), channel_tiles(cout_g, cin_g)]
        return [c for c in configs if all(config_fits(c, a, b, elem) for a, b in tiles)]
    return _kept_wgrad_configs(c_in, c_out, groups, dtype)


def _skip_unless_shipped(cfg, c_in, c_out, groups, dtype=torch.float32):
    """Skip a config autotuning never launches for these channel tiles, and under the interpreter,
    which ignores warps and stages, one whose tile an earlier shipped config already ran."""
    shipped = _shipped(CONFIGS if "BLOCK_M" in cfg.kwargs else WGRAD_CONFIGS, c_in, c_out, groups, dtype)
    if cfg not in shipped:
        pytest.skip("config pruned for these channel tiles (over the shared-memory budget)")
    twin = next(c for c in shipped if c.kwargs == cfg.kwargs)
    if INTERPRET and twin is not cfg:
        pytest.skip(f"the interpreter ignores warps and stages: the same tile runs as {_config_id(twin)}")


def _kept_wgrad_configs(c_in, c_out, groups, dtype):
    block_co, block_ci = wgrad_tiles(c_in // groups, c_out // groups)
    return prune_wgrad_configs(WGRAD_CONFIGS, {"x_ptr": torch.empty(1, dtype=dtype)}, BLOCK_CO=block_co,
                               BLOCK_CI=block_ci, KH_ROWS=wgrad_taps_per_program(block_co, block_ci))


def _inputs(device, n, c_in, h, w, c_out, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in // groups, 3, 3, generator=gen) / 3).to(device)
    return x, weight


@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_every_config(cfg, shape, device):
    n, c_in, h, w, c_out, groups, stride = shape
    _skip_unless_shipped(cfg, c_in, c_out, groups)
    x, weight = _inputs(device, n, c_in, h, w, c_out, groups)
    z_ref = F.conv2d(x, weight, None, stride, 1, 1, groups)
    z, stats = conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_Z,
                                 compute_stats=True, config=cfg)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    count = z_ref.numel() // c_out
    beta = torch.randn(c_out, device=device)
    mean, invstd, scale, shift = bn_stats(stats, count, torch.ones(c_out, device=device), beta,
                                               None, None, 1e-5, 0.1)
    torch.testing.assert_close(mean, z_ref.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    var = z_ref.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd, torch.rsqrt(var + 1e-5), atol=1e-4, rtol=1e-4)
    y, _ = conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_BN_RELU, scale=scale,
                             shift=shift, config=cfg)
    torch.testing.assert_close(y, F.relu(z_ref * scale[:, None, None] + shift[:, None, None]),
                               atol=1e-4, rtol=1e-4)


def _backward_inputs(device, shape, seed=1):
    n, c_in, h, w, c_out, groups, stride = shape
    x, weight = _inputs(device, n, c_in, h, w, c_out, groups, seed=seed)
    z = F.conv2d(x, weight, None, stride, 1, 1, groups).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(z)
    coeffs = tuple(torch.randn(c_out, device=device) for _ in range(4))  # scale, shift, k1, k0
    scale, shift, k1, k0 = (v[:, None, None] for v in coeffs)
    dz = torch.where(z * scale + shift > 0, dy, 0) * scale + z * k1 + k0
    return x, weight, z, dy, coeffs, dz


@pytest.mark.parametrize("dz_in_memory", [False, True], ids=["dz-rebuilt", "dz-in-memory"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dgrad_every_config(cfg, shape, dz_in_memory, device):
    """dgrad, with dz rebuilt from (dy, z) in the kernel (the GPU path) or written once by
    ``bn_relu_bwd`` (the interpreter path)."""
    n, c_in, h, w, c_out, groups, stride = shape
    _skip_unless_shipped(cfg, c_in, c_out, groups)
    x, weight, z, dy, coeffs, dz = _backward_inputs(device, shape)
    dz_kernel = bn_relu_bwd(dy, z, coeffs) if dz_in_memory else None
    if dz_in_memory:
        torch.testing.assert_close(dz_kernel, dz, atol=1e-5, rtol=1e-5)
    dx = conv_bwd.conv3x3_dgrad(dy, z, weight, coeffs, x.shape, groups, stride, 1, dz=dz_kernel, config=cfg)
    torch.testing.assert_close(dx, conv2d_input(x.shape, weight, dz, stride, 1, 1, groups),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dz_in_memory", [False, True], ids=["dz-rebuilt", "dz-in-memory"])
@pytest.mark.parametrize("cfg", WGRAD_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wgrad_every_config(cfg, shape, dz_in_memory, device):
    n, c_in, h, w, c_out, groups, stride = shape
    _skip_unless_shipped(cfg, c_in, c_out, groups)
    x, weight, z, dy, coeffs, dz = _backward_inputs(device, shape)
    dz_kernel = bn_relu_bwd(dy, z, coeffs) if dz_in_memory else None
    dw = conv_bwd.conv3x3_wgrad(x, dy, z, weight, coeffs, groups, stride, 1, dz=dz_kernel, config=cfg)
    torch.testing.assert_close(dw, conv2d_weight(x, weight.shape, dz, stride, 1, 1, groups),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (8, 6), (5, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_stride2_dgrad_parity_classes(hw, padding, device):
    """Stride-2 dgrad visits only the taps that link each (hi, wi) parity class: every class, odd
    and even sizes, every padding (which shifts which taps link)."""
    shape = (2, 8, *hw, 16, 2, 2)
    n, c_in, h, w, c_out, groups, stride = shape
    x, weight = _inputs(device, n, c_in, h, w, c_out, groups, seed=3)
    z = F.conv2d(x, weight, None, stride, padding, 1, groups).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(z)
    ones, zeros = torch.ones(c_out, device=device), torch.zeros(c_out, device=device)
    coeffs = (ones, torch.full_like(ones, 1e3), zeros, zeros)  # dz = dy
    dx = conv_bwd.conv3x3_dgrad(dy, z, weight, coeffs, x.shape, groups, stride, padding)
    torch.testing.assert_close(dx, conv2d_input(x.shape, weight, dy, stride, padding, 1, groups),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [2, 3])
def test_weight_grad_pixel_splits(splits, device, monkeypatch):
    """The float32 partials of several pixel splits sum to the weight gradient (large inputs
    split on the GPU; the CPU tests are too small to split unless told to)."""
    n, c_in, h, w, c_out, groups, stride = 2, 16, 9, 7, 16, 4, 1
    x, weight = _inputs(device, n, c_in, h, w, c_out, groups, seed=2)
    z = F.conv2d(x, weight, None, stride, 1, 1, groups).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(z)
    ones, zeros = torch.ones(c_out, device=device), torch.zeros(c_out, device=device)
    monkeypatch.setattr(conv_bwd, "reduction_splits", lambda m, dev: splits)
    dw = conv_bwd.conv3x3_wgrad(x, dy, z, weight, (ones, torch.full_like(ones, 1e3), zeros, zeros), groups,
                      stride, 1)
    torch.testing.assert_close(dw, conv2d_weight(x, weight.shape, dy, stride, 1, 1, groups),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_group", [4, 32, 64])
def test_prune_keeps_a_config_within_budget(per_group, dtype):
    """Every tile keeps at least one config, and only configs within the budget survive."""
    from kernels.conv3x3.tiles import prune_configs

    block_co, block_ci = channel_tiles(per_group, per_group)
    x = torch.empty(1, dtype=dtype)
    kept = prune_configs(CONFIGS, {"x_ptr": x}, BLOCK_CO=block_co, BLOCK_CI=block_ci)
    assert kept and all(config_fits(c, block_co, block_ci, x.element_size()) for c in kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 13, 11, 16, 4, 1), (2, 15, 9, 7, 30, 5, 2)], ids=str)
@pytest.mark.usefixtures("fixed_order_dot")
def test_configs_agree_bitwise(shape, dtype, device):
    """Whatever config autotuning picks, every kernel gives the same bits: the statistics are
    reduced per fixed 64-pixel chunk by a fixed tree, the weight gradient in fixed pixel blocks
    and split edges, and no sum runs in an order a config chooses. Compared: the first and the
    last shipped config that autotuning keeps for the shape, which differ in pixel tile, warps
    and stages. (286 and 80 output pixels: several pixel tiles for the small configs.)"""
    n, c_in, h, w, c_out, groups, stride = shape
    elem = torch.empty((), dtype=dtype).element_size()
    tiles = [channel_tiles(c_in // groups, c_out // groups), channel_tiles(c_out // groups, c_in // groups)]
    kept = [c for c in CONFIGS if all(config_fits(c, a, b, elem) for a, b in tiles)]
    kept_wgrad = _kept_wgrad_configs(c_in, c_out, groups, dtype)
    pairs = [(kept[0], kept_wgrad[0]), (kept[-1], kept_wgrad[-1])]
    assert kept[0].kwargs["BLOCK_M"] != kept[-1].kwargs["BLOCK_M"]
    assert kept_wgrad[0].num_warps != kept_wgrad[-1].num_warps
    x, weight, z, dy, coeffs, _ = _backward_inputs(device, shape)
    x, weight, z, dy = (t.to(dtype) for t in (x, weight, z, dy))
    ones = torch.ones(c_out, device=device)
    results = []
    for conv_cfg, wgrad_cfg in pairs:
        z_k, stats = conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_Z,
                                       compute_stats=True, config=conv_cfg)
        bn = bn_stats(stats, z_k.numel() // c_out, ones, coeffs[1], None, None, 1e-5, 0.1)
        y, _ = conv_fwd.conv3x3_forward(x, weight, groups, stride, 1, store=conv_fwd.STORE_BN_RELU, scale=bn[2],
                                 shift=bn[3], config=conv_cfg)
        dx = conv_bwd.conv3x3_dgrad(dy, z, weight, coeffs, x.shape, groups, stride, 1, config=conv_cfg)
        dw = conv_bwd.conv3x3_wgrad(x, dy, z, weight, coeffs, groups, stride, 1, config=wgrad_cfg)
        results.append(dict(z=z_k, mean_part=stats[0], m2_part=stats[1], mean=bn[0], invstd=bn[1],
                            y=y, dx=dx, dw=dw))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), f"{name} differs between configs"
