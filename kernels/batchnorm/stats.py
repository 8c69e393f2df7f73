"""BatchNorm batch statistics of the conv output, reduced in an order no tuning choice can change.

The forward conv kernel's epilogue calls ``chunk_stats`` on its accumulator: for every chunk of
STATS_ROWS consecutive output pixels it emits the float32 mean and M2 (sum of squared deviations
from that mean) per channel. Chunks, not tiles: a pixel tile of any autotuned size holds whole
chunks, and each chunk is summed by a fixed pairwise tree (float addition of two numbers is
commutative, so the tree's result does not depend on which thread holds which row). Two
processes, or two DDP ranks, that tune differently therefore get bit-identical statistics.

``bn_stats`` then merges the T = ⌈M / STATS_ROWS⌉ chunks with Chan's parallel formula (never
E[z²] − E[z]²) in two launches: ``_merge_kernel`` over groups of MERGE_GROUP chunks, in parallel,
then once more over the groups, which also folds the statistics into the per-channel scale/shift
and updates the running statistics.
"""

import torch
import triton
import triton.language as tl

from ..common import relu_grad

STATS_ROWS = 64  # pixels per statistics chunk: divides every autotuned pixel tile (BLOCK_M >= 64)
# the same as constexprs, which the kernels of every family pass to chunk_stats and
# relu_bn_grad_epilogue (jit functions may read only globals declared so)
STATS_CHUNK = tl.constexpr(STATS_ROWS)
LOG2_STATS_CHUNK = tl.constexpr(STATS_ROWS.bit_length() - 1)
MERGE_GROUP = 64  # chunks merged by one program of the first merge
MERGE_BLOCK_C = 32


@triton.jit
def _pairwise_row_sums(v, LEVELS: tl.constexpr):
    """Sums of consecutive 2**LEVELS-row chunks of ``v`` (rows, C), by a fixed pairwise tree."""
    for _ in tl.static_range(LEVELS):
        v = tl.sum(tl.reshape(v, (v.shape[0] // 2, 2, v.shape[1])), axis=1)
    return v


@triton.jit
def chunk_stats(acc, valid_rows, rows_left, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr):
    """Per-chunk (mean, M2) of ``acc`` (BLOCK_M, C) float32, chunks of CHUNK rows.

    ``valid_rows`` (BLOCK_M,) masks pixels past the end (their rows must hold zeros);
    ``rows_left`` = pixels from the tile's first row to the end. Returns two (BLOCK_M/CHUNK, C).
    """
    BLOCK_M: tl.constexpr = acc.shape[0]
    C: tl.constexpr = acc.shape[1]
    offs_chunk = tl.arange(0, BLOCK_M // CHUNK)
    count = tl.minimum(tl.maximum(rows_left - offs_chunk * CHUNK, 0), CHUNK).to(tl.float32)
    mean = tl.div_rn(_pairwise_row_sums(acc, LOG2_CHUNK), tl.maximum(count, 1.0)[:, None])
    mean_rows = tl.reshape(tl.broadcast_to(mean[:, None, :], (BLOCK_M // CHUNK, CHUNK, C)), (BLOCK_M, C))
    dev = tl.where(valid_rows[:, None], acc - mean_rows, 0.0)
    return mean, _pairwise_row_sums(dev * dev, LOG2_CHUNK)


@triton.jit
def relu_bn_grad_epilogue(da, zin_ptr, offs, valid, offs_c, mask_c, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                          sum_g_ptr, sum_gx_ptr, first_chunk, end_chunk, C, OUT_DTYPE: tl.constexpr,
                          CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr):
    """The epilogue of a dgrad whose conv read a = relu(bn(z)): the ReLU's mask and BatchNorm's
    backward sums per chunk of CHUNK rows.

    ``da`` (BLOCK_M, C) float32 is the gradient w.r.t. a at element offsets ``offs`` of z
    (``zin_ptr``), ``valid`` (BLOCK_M, C) where they exist; channels ``offs_c`` (``mask_c``) index the
    BN's (C,) float32 scale, shift, batch mean and invstd. Returns g = da·[z·scale + shift > 0]
    (``relu_grad``: a NaN passes da on, as PyTorch's ReLU backward does)
    rounded to OUT_DTYPE (what the kernel stores; the sums are of the stored values, so that the
    rebuilt dz sums to zero over the batch as BatchNorm's does) in float32. Stores Σ g and Σ g·x̂,
    x̂ = (z − mean)·invstd, of the tile's chunks at rows first_chunk, first_chunk + 1, ... (those
    below end_chunk) of the (chunks, C) partials, each summed by the fixed pairwise tree of
    ``chunk_stats``: the same bits whatever the pixel tile. Rows past the data must be invalid.
    """
    BLOCK_M: tl.constexpr = da.shape[0]
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    z = tl.load(zin_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.where(valid, relu_grad(da.to(OUT_DTYPE), z * scale[None, :] + shift[None, :]), 0.0)
    gx = g * ((z - mean[None, :]) * invstd[None, :])
    rows = first_chunk + tl.arange(0, BLOCK_M // CHUNK)
    part = rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    keep = (rows < end_chunk)[:, None] & mask_c[None, :]
    tl.store(sum_g_ptr + part, _pairwise_row_sums(g, LOG2_CHUNK), mask=keep)
    tl.store(sum_gx_ptr + part, _pairwise_row_sums(gx, LOG2_CHUNK), mask=keep)
    return g


def grad_sums_partials(chunks, c, device):
    """Empty (Σg, Σg·x̂) partial buffers of ``relu_bn_grad_epilogue``, one row per chunk."""
    return (torch.empty((chunks, c), device=device, dtype=torch.float32),
            torch.empty((chunks, c), device=device, dtype=torch.float32))


@triton.jit
def _merge_kernel(
    mean_ptr, m2_ptr,  # (T, C) float32 partials, each over CHUNK_ROWS pixels (fewer for the last)
    bn_weight_ptr, bn_bias_ptr,  # (C,) float32, read when FINALIZE
    running_mean_ptr, running_var_ptr,  # (C,) float32, updated in place when UPDATE_RUNNING
    out_mean_ptr, out_m2_ptr,  # (G, C) merged partials; when FINALIZE: (C,) batch mean, invstd
    scale_ptr, shift_ptr,  # (C,) float32, written when FINALIZE
    T, C, M, CHUNK_ROWS, GROUP, eps, momentum,
    # meta-parameters
    FINALIZE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: BLOCK_C channels of the GROUP partials [g·GROUP, (g+1)·GROUP), in two sweeps
    # (their mean, then their M2 about it). Not autotuned: fixed tiles, one order, and it never
    # runs twice on the live running statistics.
    g = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    t_lo = g * GROUP
    t_hi = tl.minimum(t_lo + GROUP, T)
    n = tl.minimum(M - t_lo * CHUNK_ROWS, GROUP * CHUNK_ROWS).to(tl.float32)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t_start in range(t_lo, t_hi, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        cnt = tl.minimum(tl.maximum(M - offs_t * CHUNK_ROWS, 0), CHUNK_ROWS).to(tl.float32)
        valid = (offs_t < t_hi)[:, None] & mask_c[None, :]
        m = tl.load(mean_ptr + offs_t[:, None] * C + offs_c[None, :], mask=valid, other=0.0)
        total += tl.sum(m * cnt[:, None], axis=0)
    # correctly rounded division and square root (the GPU's defaults are approximate), so that the
    # statistics agree with PyTorch's on the GPU as closely as under the interpreter
    mean = tl.div_rn(total, n)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t_start in range(t_lo, t_hi, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        cnt = tl.minimum(tl.maximum(M - offs_t * CHUNK_ROWS, 0), CHUNK_ROWS).to(tl.float32)
        valid = (offs_t < t_hi)[:, None] & mask_c[None, :]
        m = tl.load(mean_ptr + offs_t[:, None] * C + offs_c[None, :], mask=valid, other=0.0)
        q = tl.load(m2_ptr + offs_t[:, None] * C + offs_c[None, :], mask=valid, other=0.0)
        d = m - mean[None, :]
        m2 += tl.sum(tl.where(valid, q + cnt[:, None] * d * d, 0.0), axis=0)
    if not FINALIZE:
        tl.store(out_mean_ptr + g * C + offs_c, mean, mask=mask_c)
        tl.store(out_m2_ptr + g * C + offs_c, m2, mask=mask_c)
    else:
        var = tl.div_rn(m2, n)
        invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        gamma = tl.load(bn_weight_ptr + offs_c, mask=mask_c, other=1.0)
        beta = tl.load(bn_bias_ptr + offs_c, mask=mask_c, other=0.0)
        tl.store(out_mean_ptr + offs_c, mean, mask=mask_c)
        tl.store(out_m2_ptr + offs_c, invstd, mask=mask_c)
        tl.store(scale_ptr + offs_c, gamma * invstd, mask=mask_c)
        tl.store(shift_ptr + offs_c, beta - mean * gamma * invstd, mask=mask_c)
        if UPDATE_RUNNING:
            # nn.BatchNorm2d: running_var tracks the unbiased variance
            rm = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0)
            rv = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0)
            tl.store(running_mean_ptr + offs_c, (1.0 - momentum) * rm + momentum * mean, mask=mask_c)
            tl.store(running_var_ptr + offs_c, (1.0 - momentum) * rv + momentum * tl.div_rn(m2, n - 1.0),
                     mask=mask_c)


def partials(m, c, device):
    """Empty (mean, M2) partial buffers for M output pixels of C channels, one row per chunk."""
    t = triton.cdiv(m, STATS_ROWS)
    return (torch.empty((t, c), device=device, dtype=torch.float32),
            torch.empty((t, c), device=device, dtype=torch.float32))


def _merge_groups(stats, count):
    """First merge: the chunk partials in groups of MERGE_GROUP, all groups and channel blocks in
    parallel. Returns (group_mean, group_m2, block_c)."""
    mean_part, m2_part = stats
    t, c = mean_part.shape
    block_c = min(MERGE_BLOCK_C, triton.next_power_of_2(c))
    groups = triton.cdiv(t, MERGE_GROUP)
    group_mean = torch.empty((groups, c), device=mean_part.device, dtype=torch.float32)
    group_m2 = torch.empty((groups, c), device=mean_part.device, dtype=torch.float32)
    _merge_kernel[(groups, triton.cdiv(c, block_c))](
        mean_part, m2_part, group_mean, group_mean, group_mean, group_mean, group_mean, group_m2,
        group_mean, group_mean, t, c, count, STATS_ROWS, MERGE_GROUP, 1.0, 0.0,
        FINALIZE=False, UPDATE_RUNNING=False, BLOCK_T=MERGE_GROUP, BLOCK_C=block_c)
    return group_mean, group_m2, block_c


def bn_stats(stats, count, bn_weight, bn_bias, running_mean, running_var, eps, momentum):
    """Batch mean/invstd and the folded scale/shift from the chunk partials of ``count`` pixels;
    updates the running statistics in place (when given)."""
    group_mean, group_m2, block_c = _merge_groups(stats, count)
    groups, c = group_mean.shape
    mean, invstd, scale, shift = torch.empty((4, c), device=group_mean.device, dtype=torch.float32)
    update = running_mean is not None
    # then the groups, one program per channel block, which also finalizes
    _merge_kernel[(1, triton.cdiv(c, block_c))](
        group_mean, group_m2, bn_weight, bn_bias, running_mean if update else mean,
        running_var if update else invstd, mean, invstd, scale, shift,
        groups, c, count, STATS_ROWS * MERGE_GROUP, groups, eps, momentum,
        FINALIZE=True, UPDATE_RUNNING=update, BLOCK_T=256, BLOCK_C=block_c)
    return mean, invstd, scale, shift


def local_stats(stats, count):
    """(mean, M2) per channel, float32 (C,) each, over the ``count`` pixels of the chunk partials:
    ``bn_stats``'s two merges without the finalize (SyncBatchNorm merges these across ranks)."""
    group_mean, group_m2, block_c = _merge_groups(stats, count)
    groups, c = group_mean.shape
    mean, m2 = torch.empty((2, c), device=group_mean.device, dtype=torch.float32)
    _merge_kernel[(1, triton.cdiv(c, block_c))](
        group_mean, group_m2, mean, mean, mean, mean, mean, m2, mean, mean,
        groups, c, count, STATS_ROWS * MERGE_GROUP, groups, 1.0, 0.0,
        FINALIZE=False, UPDATE_RUNNING=False, BLOCK_T=256, BLOCK_C=block_c)
    return mean, m2
