"""Forward kernels of the fused grouped conv + BatchNorm + ReLU, and their launchers.

Inference (BatchNorm folded):  one kernel, ``y = relu(conv(x) · scale + shift)``.
Training:  ``_fwd_kernel`` writes z = conv(x) and per-tile float32 (mean, M2) partials of z;
``_bn_stats_kernel`` merges them (Chan's parallel formula, no E[z²] − E[z]²), updates the running
statistics and emits the per-channel scale/shift; ``_bn_relu_kernel`` applies them to z.
"""

import torch
import triton
import triton.language as tl

from ._conv_tiles import (aligned, channel_tiles, conv_configs, dot_acc, dot_options,
                          even_groups, group_channel_range, launch, min_block_m, pixel_coords,
                          pointwise_tiles, prune_configs, shape_bucket)

STORE_NOTHING, STORE_Z, STORE_BN_RELU = 0, 1, 2


# Tuning runs write the partials of configs with other pixel tiles: zeroing the tile counts before
# every run (and before the final one) keeps their stale tiles out of the statistics.
@triton.autotune(configs=conv_configs(), prune_configs_by={"early_config_prune": prune_configs},
                 key=["N_BUCKET", "H", "W", "C_in", "C_out", "CIN_G", "STRIDE", "STORE", "COMPUTE_STATS"],
                 reset_to_zero=["count_part_ptr"])
@triton.jit
def _fwd_kernel(
    x_ptr,  # (N, H, W, C_in) channels-last
    w_ptr,  # (C_out, CIN_G, 3, 3) contiguous
    scale_ptr, shift_ptr,  # (C_out,) float32, read when STORE == STORE_BN_RELU
    y_ptr,  # (N, Ho, Wo, C_out) channels-last: z or relu(z·scale + shift)
    mean_part_ptr, m2_part_ptr,  # (T_max, C_out) float32, T_max ≥ cdiv(M, BLOCK_M)
    count_part_ptr,  # (T_max,) float32, zero-initialised
    N, H, W, C_in, Ho, Wo, C_out, CIN_G, COUT_G,
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # constexpr: divisions by the stride become shifts
    N_BUCKET,  # autotune key only
    # meta-parameters
    STORE: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    EVEN_GROUPS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_M output pixels × BLOCK_CO output channels (several whole groups when
    # groups are narrow), accumulating 9 taps × the groups' input channels in float32.
    # channel tiles vary fastest so that programs reading the same pixels run together (L2 hits)
    num_co_tiles = tl.cdiv(C_out, BLOCK_CO)
    pid_m = tl.program_id(0) // num_co_tiles
    pid_co = tl.program_id(0) % num_co_tiles
    M = N * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n, ho, wo = pixel_coords(offs_m, Ho, Wo)
    co_start = pid_co * BLOCK_CO
    offs_co = co_start + tl.arange(0, BLOCK_CO)
    mask_co = (offs_co < C_out) | EVEN_GROUPS
    g_co = offs_co // COUT_G
    ci_lo, ci_hi = group_channel_range(co_start, BLOCK_CO, C_out, COUT_G, CIN_G, BLOCK_CI, EVEN_GROUPS)

    acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
    for ci_start in range(ci_lo, ci_hi, BLOCK_CI):
        offs_ci = aligned(ci_start + tl.arange(0, BLOCK_CI), BLOCK_CI, EVEN_GROUPS)
        mask_ci = (offs_ci < ci_hi) | EVEN_GROUPS
        # block-diagonal weight tile (BLOCK_CI, BLOCK_CO): zero where ci and co are in different groups
        w_mask = (offs_ci[:, None] // CIN_G == g_co[None, :]) & mask_ci[:, None] & mask_co[None, :]
        w_offs = offs_co[None, :] * (CIN_G * 9) + (offs_ci[:, None] - g_co[None, :] * CIN_G) * 9
        # taps as a runtime loop, the one the compiler pipelines: it then buffers one x tile and
        # one w tile per stage (nine unrolled taps took nine each, past H100's shared memory
        # for 32-64 channels per group, seen compiling with triton 3.9 for sm_90)
        for tap in range(9):
            hi = ho * STRIDE - PAD + tap // 3
            wi = wo * STRIDE - PAD + tap % 3
            inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            pix = ((n * H + hi) * W + wi).to(tl.int64) * C_in
            a = tl.load(x_ptr + pix[:, None] + offs_ci[None, :],
                        mask=inside[:, None] & mask_ci[None, :], other=0.0)
            b = tl.load(w_ptr + w_offs + tap, mask=w_mask, other=0.0)
            acc = dot_acc(a, b, acc, UPCAST, PRECISION)

    if COMPUTE_STATS:
        if STORE == 1:
            # statistics of z as stored, so that normalising the stored z is self-consistent
            # (as in PyTorch); matters in half precision when few values share a channel
            acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        # rows past M hold exact zeros (all their loads were masked), so they add nothing to the sum
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean = tl.sum(acc, axis=0) / count
        dev = tl.where(mask_m[:, None], acc - tile_mean[None, :], 0.0)
        tl.store(mean_part_ptr + pid_m * C_out + offs_co, tile_mean, mask=mask_co)
        tl.store(m2_part_ptr + pid_m * C_out + offs_co, tl.sum(dev * dev, axis=0), mask=mask_co)
        if pid_co == 0:
            tl.store(count_part_ptr + pid_m, count)
    if STORE != 0:
        if STORE == 2:
            scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
            shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
            acc = tl.maximum(acc * scale[None, :] + shift[None, :], 0.0)
        y_offs = offs_m.to(tl.int64)[:, None] * C_out + offs_co[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_co[None, :])


@triton.jit
def _bn_stats_kernel(
    mean_part_ptr, m2_part_ptr,  # (T, C) float32 per-tile mean and sum of squared deviations
    count_part_ptr,  # (T,) float32 pixels per tile (0 for tiles that do not exist)
    bn_weight_ptr, bn_bias_ptr,  # (C,) float32
    running_mean_ptr, running_var_ptr,  # (C,) float32, updated in place when UPDATE_RUNNING
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,  # (C,) float32 outputs
    T, C, count, eps, momentum,
    # meta-parameters
    UPDATE_RUNNING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: BLOCK_C channels, two sweeps over the T partials (mean, then M2 about it).
    # Not autotuned, so it never runs twice on the live running statistics.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t_start in range(0, T, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        cnt = tl.load(count_part_ptr + offs_t, mask=offs_t < T, other=0.0)
        m = tl.load(mean_part_ptr + offs_t[:, None] * C + offs_c[None, :],
                    mask=(cnt[:, None] > 0) & mask_c[None, :], other=0.0)
        total += tl.sum(m * cnt[:, None], axis=0)
    mean = total / count
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t_start in range(0, T, BLOCK_T):
        offs_t = t_start + tl.arange(0, BLOCK_T)
        cnt = tl.load(count_part_ptr + offs_t, mask=offs_t < T, other=0.0)
        valid = (cnt[:, None] > 0) & mask_c[None, :]
        m = tl.load(mean_part_ptr + offs_t[:, None] * C + offs_c[None, :], mask=valid, other=0.0)
        q = tl.load(m2_part_ptr + offs_t[:, None] * C + offs_c[None, :], mask=valid, other=0.0)
        d = m - mean[None, :]
        m2 += tl.sum(tl.where(valid, q + cnt[:, None] * d * d, 0.0), axis=0)
    var = m2 / count
    invstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(bn_weight_ptr + offs_c, mask=mask_c, other=1.0)
    beta = tl.load(bn_bias_ptr + offs_c, mask=mask_c, other=0.0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(invstd_ptr + offs_c, invstd, mask=mask_c)
    tl.store(scale_ptr + offs_c, gamma * invstd, mask=mask_c)
    tl.store(shift_ptr + offs_c, beta - mean * gamma * invstd, mask=mask_c)
    if UPDATE_RUNNING:
        # nn.BatchNorm2d: running_var tracks the unbiased variance
        rm = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0)
        rv = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0)
        tl.store(running_mean_ptr + offs_c, (1.0 - momentum) * rm + momentum * mean, mask=mask_c)
        tl.store(running_var_ptr + offs_c, (1.0 - momentum) * rv + momentum * (m2 / (count - 1.0)),
                 mask=mask_c)


@triton.jit
def _bn_relu_kernel(
    z_ptr,  # (M, C) channels-last conv output
    scale_ptr, shift_ptr,  # (C,) float32
    y_ptr,  # (M, C) channels-last
    M, C,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    y = tl.maximum(z * scale[None, :] + shift[None, :], 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def out_size(size, stride, padding):
    return (size + 2 * padding - 3) // stride + 1


def conv_forward(x, weight, groups, stride, padding, *, store, scale=None, shift=None,
                 compute_stats=False, config=None):
    """Launch ``_fwd_kernel`` on channels-last ``x``; returns (out or None, stats partials or None).

    ``out`` is an (N, C_out, Ho, Wo) channels-last tensor of x's dtype. ``config`` forces one
    autotune config instead of tuning.
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = out_size(h, stride, padding), out_size(w, stride, padding)
    cin_g, cout_g = c_in // groups, c_out // groups
    block_co, block_ci = channel_tiles(cin_g, cout_g)
    m = n * ho * wo
    out = None
    if store != STORE_NOTHING:
        out = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
    # partials sized for the smallest pixel tile any autotune config may pick
    t_max = triton.cdiv(m, min_block_m(_fwd_kernel, config))
    stats = None
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    if compute_stats:
        stats = (torch.empty((t_max, c_out), device=x.device, dtype=torch.float32),
                 torch.empty((t_max, c_out), device=x.device, dtype=torch.float32),
                 torch.zeros((t_max,), device=x.device, dtype=torch.float32))
    mean_part, m2_part, count_part = stats if compute_stats else (dummy, dummy, dummy)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, block_co),)
    launch(
        _fwd_kernel, grid, config,
        x, weight, scale if scale is not None else dummy, shift if shift is not None else dummy,
        out if out is not None else dummy, mean_part, m2_part, count_part,
        n, h, w, c_in, ho, wo, c_out, cin_g, cout_g, stride, padding, shape_bucket(n),
        STORE=store, COMPUTE_STATS=compute_stats, BLOCK_CO=block_co, BLOCK_CI=block_ci,
        EVEN_GROUPS=even_groups(c_out, cout_g, cin_g, block_co, block_ci), **dot_options(x.dtype),
    )
    return out, stats


def bn_stats(stats, count, bn_weight, bn_bias, running_mean, running_var, eps, momentum):
    """Batch mean/invstd and the folded scale/shift; updates the running statistics in place."""
    mean_part, m2_part, count_part = stats
    t, c = mean_part.shape
    mean, invstd, scale, shift = torch.empty((4, c), device=mean_part.device, dtype=torch.float32)
    update = running_mean is not None
    # narrow channel blocks and long tile blocks: more programs, fewer dependent sweeps over T
    block_c = min(32, triton.next_power_of_2(c))
    _bn_stats_kernel[(triton.cdiv(c, block_c),)](
        mean_part, m2_part, count_part, bn_weight, bn_bias,
        running_mean if update else mean, running_var if update else invstd,
        mean, invstd, scale, shift, t, c, float(count), eps, momentum,
        UPDATE_RUNNING=update, BLOCK_T=256, BLOCK_C=block_c,
    )
    return mean, invstd, scale, shift


def bn_relu(z, scale, shift):
    """``relu(z · scale + shift)`` per channel on a channels-last (N, C, H, W) tensor."""
    n, c, h, w = z.shape
    y = torch.empty_like(z, memory_format=torch.channels_last)
    m = n * h * w
    block_m, block_c = pointwise_tiles(c)
    _bn_relu_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        z, scale, shift, y, m, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return y
