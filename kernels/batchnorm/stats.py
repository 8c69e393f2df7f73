"""BatchNorm batch statistics of the conv output, reduced in an order no tuning choice can change.

The forward conv kernel's epilogue calls ``chunk_stats`` on its accumulator: for every chunk of
STATS_ROWS consecutive output pixels it emits the float32 mean and M2 (sum of squared deviations
from that mean) per channel. Chunks, not tiles: a pixel tile of any autotuned size holds whole
chunks, and each chunk is summed by a fixed pairwise tree (float addition of two numbers is
commutative, so the tree's result does not depend on which thread holds which row). Two
processes, or two DDP ranks, that tune differently therefore get bit-identical statistics.

``bn_stats`` then merges the T = ⌈M / STATS_ROWS⌉ chunks with Chan's parallel formula (never
E[z²] − E[z]²): ``_merge_kernel`` over groups of MERGE_GROUP chunks, in parallel, then once more
over the groups, which also folds the statistics into the per-channel scale/shift, updates the
running statistics and counts the batch (num_batches_tracked); one launch when the chunks fit one group.

The backward: the dgrad epilogues (``relu_bn_grad_epilogue``) and the pointwise or tail kernels
leave per-chunk or per-split partials of Σg and Σg·x̂; ``bn_grad`` sums them in a fixed order and
forms BatchNorm's backward coefficients, in one launch.
"""

import torch
import triton
import triton.language as tl

from ..common import cdiv, next_power_of_2, relu_grad

STATS_ROWS = 64  # pixels per statistics chunk: divides every autotuned pixel tile (BLOCK_M >= 64)
# the same as constexprs, which the kernels of every family pass to chunk_stats and
# relu_bn_grad_epilogue (jit functions may read only globals declared so)
STATS_CHUNK = tl.constexpr(STATS_ROWS)
LOG2_STATS_CHUNK = tl.constexpr(STATS_ROWS.bit_length() - 1)
MERGE_GROUP = 64  # chunks merged by one program of the first merge
MERGE_BLOCK_C = 32
# the backward sums' finish (bn_grad): channels per program, partial rows per block
GRAD_BLOCK_C = 16
GRAD_BLOCK_S = 64


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
    tracked_ptr,  # () int64 num_batches_tracked, incremented once when COUNT_BATCH
    out_mean_ptr, out_m2_ptr,  # (G, C) merged partials; when FINALIZE: (C,) batch mean, invstd
    scale_ptr, shift_ptr,  # (C,) float32, written when FINALIZE
    T, C, M, CHUNK_ROWS, GROUP, eps, momentum,
    # meta-parameters
    FINALIZE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
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
        if COUNT_BATCH:  # nn.BatchNorm2d's num_batches_tracked += 1, by one program
            if tl.program_id(1) == 0:
                tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)


def partials(m, c, device):
    """Empty (mean, M2) partial buffers for M output pixels of C channels, one row per chunk."""
    t = cdiv(m, STATS_ROWS)
    return (torch.empty((t, c), device=device, dtype=torch.float32),
            torch.empty((t, c), device=device, dtype=torch.float32))


def _merge_groups(stats, count):
    """The chunk partials merged in groups of MERGE_GROUP, all groups and channel blocks in parallel:
    (group means, group M2s, pixels per group). With one group only, the chunk partials as they are."""
    mean_part, m2_part = stats
    t, c = mean_part.shape
    if t <= MERGE_GROUP:  # one group: the final merge reads the chunks themselves (one launch, not two)
        return mean_part, m2_part, STATS_ROWS
    block_c = min(MERGE_BLOCK_C, next_power_of_2(c))
    groups = cdiv(t, MERGE_GROUP)
    group_mean = torch.empty((groups, c), device=mean_part.device, dtype=torch.float32)
    group_m2 = torch.empty((groups, c), device=mean_part.device, dtype=torch.float32)
    _merge_kernel[(groups, cdiv(c, block_c))](
        mean_part, m2_part, group_mean, group_mean, group_mean, group_mean, group_mean, group_mean, group_m2,
        group_mean, group_mean, t, c, count, STATS_ROWS, MERGE_GROUP, 1.0, 0.0,
        FINALIZE=False, UPDATE_RUNNING=False, COUNT_BATCH=False, BLOCK_T=MERGE_GROUP, BLOCK_C=block_c)
    return group_mean, group_m2, STATS_ROWS * MERGE_GROUP


def bn_stats(stats, count, bn_weight, bn_bias, running_mean, running_var, eps, momentum, num_batches_tracked=None):
    """(4, C) float32 rows mean, invstd, scale, shift of the batch, from the chunk partials of ``count``
    pixels; updates the running statistics in place (when given), and adds one to
    ``num_batches_tracked`` (when given), as nn.BatchNorm2d's forward does. One launch when the
    partials fit one merge group (``count`` <= STATS_ROWS·MERGE_GROUP pixels), else two."""
    group_mean, group_m2, group_rows = _merge_groups(stats, count)
    groups, c = group_mean.shape
    block_c = min(MERGE_BLOCK_C, next_power_of_2(c))
    out = torch.empty((4, c), device=group_mean.device, dtype=torch.float32)
    mean, invstd, scale, shift = out
    update = running_mean is not None
    # then the groups, one program per channel block, which also finalizes
    _merge_kernel[(1, cdiv(c, block_c))](
        group_mean, group_m2, bn_weight, bn_bias, running_mean if update else mean,
        running_var if update else invstd, num_batches_tracked if num_batches_tracked is not None else mean,
        mean, invstd, scale, shift, groups, c, count, group_rows, groups, eps, momentum,
        FINALIZE=True, UPDATE_RUNNING=update, COUNT_BATCH=num_batches_tracked is not None, BLOCK_T=256,
        BLOCK_C=block_c)
    return out


def local_stats(stats, count):
    """(mean, M2) per channel, float32 (C,) each, over the ``count`` pixels of the chunk partials:
    ``bn_stats``'s merges without the finalize (SyncBatchNorm merges these across ranks)."""
    group_mean, group_m2, group_rows = _merge_groups(stats, count)
    groups, c = group_mean.shape
    block_c = min(MERGE_BLOCK_C, next_power_of_2(c))
    mean, m2 = torch.empty((2, c), device=group_mean.device, dtype=torch.float32)
    _merge_kernel[(1, cdiv(c, block_c))](
        group_mean, group_m2, mean, mean, mean, mean, mean, mean, m2, mean, mean,
        groups, c, count, group_rows, groups, 1.0, 0.0,
        FINALIZE=False, UPDATE_RUNNING=False, COUNT_BATCH=False, BLOCK_T=256, BLOCK_C=block_c)
    return mean, m2


@triton.jit
def _bn_grad_kernel(
    g_ptr, gx_ptr,  # (S, ...) float32 partials of Σg and Σg·x̂, row r at ptr + r·ROW_STRIDE
    scale_ptr, mean_ptr, invstd_ptr,  # (C,) float32: the BatchNorm's fold and batch statistics
    sum_g_ptr, sum_gx_ptr,  # (C,) float32: Σg, Σg·x̂
    k_ptr,  # (2, C) float32: k1, k0
    S, C, ROW_STRIDE, count,
    # meta-parameters
    TRAINING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: BLOCK_C channels, every partial row in order (BLOCK_S at a time, each block by
    # tl.sum's fixed tree): the same bits from run to run.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s_start in range(0, S, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        valid = (offs_s < S)[:, None] & mask_c[None, :]
        offs = offs_s.to(tl.int64)[:, None] * ROW_STRIDE + offs_c[None, :]
        sum_g += tl.sum(tl.load(g_ptr + offs, mask=valid, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(gx_ptr + offs, mask=valid, other=0.0), axis=0)
    tl.store(sum_g_ptr + offs_c, sum_g, mask=mask_c)
    tl.store(sum_gx_ptr + offs_c, sum_gx, mask=mask_c)
    k1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    k0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TRAINING:  # the batch statistics depend on z too (frozen statistics: k1 = k0 = 0)
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        k1 = tl.div_rn(-scale * invstd * sum_gx, count)
        k0 = tl.div_rn(-scale * sum_g, count) - k1 * mean
    tl.store(k_ptr + offs_c, k1, mask=mask_c)
    tl.store(k_ptr + C + offs_c, k0, mask=mask_c)


def bn_grad(partial_g, partial_gx, scale, mean, invstd, count, training):
    """BatchNorm's backward from the partial sums of its input gradient: ``(Σg, Σg·x̂, k1, k0)``,
    float32 (C,) each (Σg = dβ and Σg·x̂ = dγ; k1 and k0 rows of one tensor), so that
    dz = scale·g + k1·z + k0 is the gradient of its input z (``kernels.common.bn_relu_grad``):
    k1 = −scale·invstd·Σg·x̂/count, k0 = −scale·Σg/count − k1·mean in training, 0 with frozen
    statistics. One launch.

    ``partial_g``, ``partial_gx``: (S, C) float32 row partials (or views whose rows are equally
    strided, e.g. two rows of the tail's (S, 3, C)); ``scale``, ``mean``, ``invstd``: (C,) float32,
    the forward's; ``count``: the pixels the batch statistics were taken over."""
    s, c = partial_g.shape
    if training and count < 1:
        raise ValueError(f"count must be a positive number of pixels in training, got {count!r}")
    if partial_gx.shape != (s, c) or partial_g.stride() != partial_gx.stride() or partial_g.stride(1) != 1:
        raise ValueError(f"partial_g {tuple(partial_g.shape)} and partial_gx {tuple(partial_gx.shape)} must be "
                         "(S, C) rows of one stride")
    sum_g = torch.empty(c, device=partial_g.device, dtype=torch.float32)
    sum_gx, k = torch.empty_like(sum_g), torch.empty((2, c), device=partial_g.device, dtype=torch.float32)
    block_c = min(GRAD_BLOCK_C, next_power_of_2(c))
    _bn_grad_kernel[(cdiv(c, block_c),)](
        partial_g, partial_gx, scale, mean, invstd, sum_g, sum_gx, k, s, c, partial_g.stride(0) if s > 1 else c,
        float(max(count, 1)), TRAINING=bool(training), BLOCK_S=GRAD_BLOCK_S, BLOCK_C=block_c)
    return sum_g, sum_gx, k[0], k[1]


@triton.jit
def _fold_kernel(
    gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,  # (C,) float32
    out_ptr,  # (4, C) float32: mean, invstd, scale, shift
    C, eps,
    # meta-parameters
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0)
    var = tl.load(running_var_ptr + offs_c, mask=mask_c, other=1.0)
    gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=1.0)
    beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    scale = gamma * invstd
    tl.store(out_ptr + offs_c, mean, mask=mask_c)
    tl.store(out_ptr + C + offs_c, invstd, mask=mask_c)
    tl.store(out_ptr + 2 * C + offs_c, scale, mask=mask_c)
    tl.store(out_ptr + 3 * C + offs_c, beta - mean * scale, mask=mask_c)


def bn_fold(gamma, beta, running_mean, running_var, eps):
    """Frozen (eval-mode) BatchNorm folded: (4, C) float32 rows mean, invstd, scale = γ·invstd and
    shift = β − mean·scale, with invstd = 1/√(running_var + eps). One launch."""
    c = running_mean.shape[0]
    out = torch.empty((4, c), device=running_mean.device, dtype=torch.float32)
    block_c = min(256, next_power_of_2(c))
    _fold_kernel[(cdiv(c, block_c),)](gamma, beta, running_mean, running_var, out, c, float(eps),
                                             BLOCK_C=block_c)
    return out
