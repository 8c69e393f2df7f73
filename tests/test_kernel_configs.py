"""Every autotune config we ship computes the right thing, not just the one that wins.

KERNEL-NOTES: a Triton conv template in Inductor was silently wrong for some num_warps only, so
each GPU config is forced in turn. On the CPU the interpreter ignores warps and stages but still
exercises each config's pixel tile (and the partial buffers sized for it).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from kernels import _bwd, _fwd
from kernels._conv_tiles import channel_tiles, config_fits, conv_configs

CONFIGS = conv_configs(interpret=False)

# (N, C_in, H, W, C_out, groups, stride): ResNeXt-like 4 per group, a ragged case whose groups
# straddle channel tiles, and wide groups that loop over input-channel chunks.
SHAPES = [
    (2, 16, 9, 9, 16, 4, 1),
    (2, 15, 7, 5, 30, 5, 2),  # ragged tile
    (1, 96, 5, 5, 96, 1, 2),  # wide group: 96 input channels in 64-wide chunks
]


def _config_id(cfg):
    return f"M{cfg.kwargs['BLOCK_M']}-w{cfg.num_warps}-s{cfg.num_stages}"


def _skip_unless_shipped(cfg, c_in, c_out, groups, dtype=torch.float32):
    """Autotuning prunes configs too big for the tiles (``prune_configs``): never launched there."""
    cin_g, cout_g = c_in // groups, c_out // groups
    tiles = [channel_tiles(cin_g, cout_g), channel_tiles(cout_g, cin_g)]  # forward/wgrad, dgrad
    elem = torch.empty((), dtype=dtype).element_size()
    if not all(config_fits(cfg, a, b, elem) for a, b in tiles):
        pytest.skip("config pruned for these channel tiles (over the shared-memory budget)")


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
    z, stats = _fwd.conv_forward(x, weight, groups, stride, 1, store=_fwd.STORE_Z,
                                 compute_stats=True, config=cfg)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    count = z_ref.numel() // c_out
    beta = torch.randn(c_out, device=device)
    mean, invstd, scale, shift = _fwd.bn_stats(stats, count, torch.ones(c_out, device=device), beta,
                                               None, None, 1e-5, 0.1)
    torch.testing.assert_close(mean, z_ref.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    var = z_ref.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd, torch.rsqrt(var + 1e-5), atol=1e-4, rtol=1e-4)
    y, _ = _fwd.conv_forward(x, weight, groups, stride, 1, store=_fwd.STORE_BN_RELU, scale=scale,
                             shift=shift, config=cfg)
    torch.testing.assert_close(y, F.relu(z_ref * scale[:, None, None] + shift[:, None, None]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dz_in_memory", [False, True], ids=["dz-rebuilt", "dz-in-memory"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_every_config(cfg, shape, dz_in_memory, device):
    """dgrad and wgrad, with dz rebuilt from (dy, z) in the kernels (the GPU path) or written
    once by ``bn_relu_bwd`` (the interpreter path)."""
    n, c_in, h, w, c_out, groups, stride = shape
    _skip_unless_shipped(cfg, c_in, c_out, groups)
    x, weight = _inputs(device, n, c_in, h, w, c_out, groups, seed=1)
    z = F.conv2d(x, weight, None, stride, 1, 1, groups).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(z)
    scale, shift, k1, k0 = (torch.randn(c_out, device=device) for _ in range(4))
    coeffs = (scale, shift, k1, k0)
    per_c = lambda v: v[:, None, None]  # noqa: E731
    dz = torch.where(z * per_c(scale) + per_c(shift) > 0, dy, 0) * per_c(scale) + z * per_c(k1) + per_c(k0)
    dz_kernel = _bwd.bn_relu_bwd(dy, z, coeffs) if dz_in_memory else None
    if dz_in_memory:
        torch.testing.assert_close(dz_kernel, dz, atol=1e-5, rtol=1e-5)
    dx = _bwd.conv_dx(dy, z, weight, coeffs, x.shape, groups, stride, 1, dz=dz_kernel, config=cfg)
    torch.testing.assert_close(dx, conv2d_input(x.shape, weight, dz, stride, 1, 1, groups),
                               atol=1e-4, rtol=1e-4)
    dw = _bwd.conv_dw(x, dy, z, weight, coeffs, groups, stride, 1, dz=dz_kernel, config=cfg)
    torch.testing.assert_close(dw, conv2d_weight(x, weight.shape, dz, stride, 1, 1, groups),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("splits", [2, 3])
def test_weight_grad_pixel_splits(splits, device, monkeypatch):
    """The float32 partials of several pixel splits sum to the weight gradient (large inputs
    split on the GPU; the CPU tests are too small to split unless told to)."""
    n, c_in, h, w, c_out, groups, stride = 2, 16, 9, 7, 16, 4, 1
    x, weight = _inputs(device, n, c_in, h, w, c_out, groups, seed=2)
    z = F.conv2d(x, weight, None, stride, 1, 1, groups).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(z)
    ones, zeros = torch.ones(c_out, device=device), torch.zeros(c_out, device=device)
    monkeypatch.setattr(_bwd, "_num_splits", lambda m, dev: splits)
    dw = _bwd.conv_dw(x, dy, z, weight, (ones, torch.full_like(ones, 1e3), zeros, zeros), groups,
                      stride, 1)
    torch.testing.assert_close(dw, conv2d_weight(x, weight.shape, dy, stride, 1, 1, groups),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_group", [4, 32, 64])
def test_prune_keeps_a_config_within_budget(per_group, dtype):
    """Every tile keeps at least one config, and only configs within the budget survive."""
    from kernels._conv_tiles import prune_configs

    block_co, block_ci = channel_tiles(per_group, per_group)
    x = torch.empty(1, dtype=dtype)
    kept = prune_configs(CONFIGS, {"x_ptr": x}, BLOCK_CO=block_co, BLOCK_CI=block_ci)
    assert kept and all(config_fits(c, block_co, block_ci, x.element_size()) for c in kept)
