"""The pieces the conv kernels are built from, each against a plain PyTorch reference: the packed
block-diagonal weight tiles, and the BatchNorm statistics reduction (chunk partials and their
two-level merge)."""

import pytest
import torch

from kernels.batchnorm import stats as bn_statistics
from kernels.conv3x3 import forward as conv_fwd
from kernels.conv3x3.tiles import channel_tiles
from kernels.conv3x3.weights import pack_weight

# every test twice: with the interpreter's tiles and with the GPU's (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("tiles")


def _packed_reference(weight, groups, block_t, block_o, tiled_is_out):
    """packed[tile, chunk, tap, o, t] built element by element from the definition."""
    c_out, cin_g = weight.shape[:2]
    cout_g = c_out // groups
    c_t, t_per_g, o_per_g = (c_out, cout_g, cin_g) if tiled_is_out else (cin_g * groups, cin_g, cout_g)
    tiles = -(-c_t // block_t)
    rows = []
    for tile in range(tiles):
        first, last = tile * block_t, min(tile * block_t + block_t, c_t) - 1
        o_lo, o_hi = first // t_per_g * o_per_g, (last // t_per_g + 1) * o_per_g
        rows.append((o_lo, o_hi))
    chunks = max(-(-(hi - lo) // block_o) for lo, hi in rows)
    ref = torch.zeros(tiles, chunks, 9, block_o, block_t, dtype=weight.dtype)
    w = weight.reshape(c_out, cin_g, 9)
    for tile, (o_lo, o_hi) in enumerate(rows):
        for t_l in range(block_t):
            a = tile * block_t + t_l
            if a >= c_t:
                continue
            for b in range(o_lo, o_hi):
                if b // o_per_g != a // t_per_g:
                    continue
                co, ci = (a, b) if tiled_is_out else (b, a)
                k, o_l = divmod(b - o_lo, block_o)
                ref[tile, k, :, o_l, t_l] = w[co, ci % cin_g]
    return ref


@pytest.mark.parametrize("tiled_is_out", [True, False], ids=["forward", "dgrad"])
@pytest.mark.parametrize("c_in, c_out, groups", [
    (128, 128, 32),  # ResNeXt 32x4d stage 1: four groups per tile
    (12, 24, 3),  # C_out/groups != C_in/groups
    (15, 25, 5),  # ragged: groups straddle tiles
    (96, 96, 1),  # one wide group: several chunks
])
def test_pack_weight(c_in, c_out, groups, tiled_is_out, device):
    weight = torch.randn(c_out, c_in // groups, 3, 3)
    cin_g, cout_g = c_in // groups, c_out // groups
    if tiled_is_out:
        block_t, block_o = channel_tiles(cin_g, cout_g)
    else:
        block_t, block_o = channel_tiles(cout_g, cin_g)
    packed, chunks = pack_weight(weight.to(device), groups, block_t, block_o, tiled_is_out=tiled_is_out)
    ref = _packed_reference(weight, groups, block_t, block_o, tiled_is_out)
    assert chunks == ref.shape[1]
    assert torch.equal(packed.cpu(), ref)


def test_pack_weight_casts():
    """Packing casts to the kernels' dtype (e.g. a float32 parameter for a float16 conv)."""
    weight = torch.randn(16, 4, 3, 3)
    packed, _ = pack_weight(weight, 4, 16, 16, tiled_is_out=True, dtype=torch.float16)
    ref = _packed_reference(weight, 4, 16, 16, True)
    assert packed.dtype == torch.float16 and torch.equal(packed.cpu(), ref.half())


@pytest.mark.parametrize("m", [1, 63, 64, 65, 4096, 4097, 64 * 64 * 3 + 5])
def test_bn_stats_merges_chunks(m, device):
    """Chunk partials of any count (one chunk, a ragged last chunk, more than one merge group)
    merge to the batch mean and biased variance of float64, and update the running statistics
    with the unbiased variance."""
    c = 5
    g = torch.Generator().manual_seed(m)
    z = (3.0 + torch.randn(m, c, generator=g, dtype=torch.float64) * torch.rand(c, generator=g, dtype=torch.float64))
    t = -(-m // bn_statistics.STATS_ROWS)
    padded = torch.zeros(t * bn_statistics.STATS_ROWS, c, dtype=torch.float64)
    padded[:m] = z
    chunks = padded.view(t, bn_statistics.STATS_ROWS, c)
    counts = (m - torch.arange(t) * bn_statistics.STATS_ROWS).clamp(max=bn_statistics.STATS_ROWS).double()[:, None]
    mean_part = chunks.sum(1) / counts
    valid = (torch.arange(t * bn_statistics.STATS_ROWS) < m).view(t, bn_statistics.STATS_ROWS, 1)
    m2_part = torch.where(valid, chunks - mean_part[:, None], 0.0).pow(2).sum(1)
    stats = (mean_part.float().to(device), m2_part.float().to(device))
    gamma, beta = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    mean, invstd, scale, shift = bn_statistics.bn_stats(stats, m, gamma, beta, rm if m > 1 else None,
                                                 rv if m > 1 else None, 1e-5, 0.1)
    var = z.var(0, unbiased=False)
    torch.testing.assert_close(mean.cpu().double(), z.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(invstd.cpu().double(), (var + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scale.cpu(), (gamma * invstd).cpu())
    torch.testing.assert_close(shift.cpu(), (beta - mean * gamma * invstd).cpu())
    if m > 1:
        torch.testing.assert_close(rm.cpu().double(), 0.1 * z.mean(0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rv.cpu().double(), 0.9 + 0.1 * z.var(0, unbiased=True), atol=1e-6, rtol=1e-5)


def test_forward_chunk_partials(device):
    """The forward kernel's per-chunk partials are the mean and M2 of each 64-pixel chunk of z."""
    n, c, h, w, groups = 2, 16, 9, 11, 4  # 198 pixels: three full chunks and a ragged one
    x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c // groups, 3, 3, device=device) / 3
    z, (mean_part, m2_part) = conv_fwd.conv3x3_forward(x, weight, groups, 1, 1, store=conv_fwd.STORE_Z,
                                                       compute_stats=True)
    rows = z.permute(0, 2, 3, 1).reshape(-1, c).double()
    assert mean_part.shape == (4, c)
    for t in range(4):
        chunk = rows[t * 64:(t + 1) * 64]
        torch.testing.assert_close(mean_part[t].double(), chunk.mean(0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m2_part[t].double(), (chunk - chunk.mean(0)).pow(2).sum(0), atol=1e-5, rtol=1e-5)
