"""Forward kernels of the fused grouped conv + BatchNorm + ReLU, and their launchers.

Inference (BatchNorm folded):  one kernel, ``y = relu(conv(x) · scale + shift)``.
Training:  ``_fwd_kernel`` writes z = conv(x) and float32 (mean, M2) statistics of z per chunk of
64 pixels (``kernels/batchnorm/stats.py``); ``bn_stats`` merges them (Chan's parallel formula, no
E[z²] − E[z]²), updates the running statistics and emits the per-channel scale/shift;
``_bn_relu_kernel`` applies them to z.
"""

import torch
import triton
import triton.language as tl

from .._autotune import autotune
from ..batchnorm.stats import LOG2_STATS_CHUNK, STATS_CHUNK, chunk_stats, partials
from ..common import cdiv, dot_acc, dot_options, pixel_coords, relu, shape_bucket
from ..configs import launch
from .tiles import (aligned, channel_tiles, conv_configs, even_groups, group_channel_range, prefer_l1_loads,
                    prune_configs)
from .weights import pack_weight


STORE_NOTHING, STORE_Z, STORE_BN_RELU = 0, 1, 2


@autotune(conv_configs, heuristic=prefer_l1_loads, prune_configs_by={"early_config_prune": prune_configs},
          key=["N_BUCKET", "H", "W", "C_in", "C_out", "CIN_G", "STRIDE", "PAD", "STORE",
               "COMPUTE_STATS", "PROLOGUE", "PRECISION"])
@triton.jit
def _fwd_kernel(
    x_ptr,  # (N, H, W, C_in) channels-last
    w_ptr,  # (CO_TILES, CI_CHUNKS, 9, BLOCK_CI, BLOCK_CO) packed block-diagonal (kernels/conv3x3/weights.py)
    scale_ptr, shift_ptr,  # (C_out,) float32, read when STORE == STORE_BN_RELU
    y_ptr,  # (N, Ho, Wo, C_out) channels-last: z or relu(z·scale + shift)
    mean_part_ptr, m2_part_ptr,  # (⌈M / STATS_ROWS⌉, C_out) float32 per-chunk statistics of z
    in_scale_ptr, in_shift_ptr,  # (C_in,) float32, read when PROLOGUE
    N, H, W, C_in, Ho, Wo, C_out, CIN_G, COUT_G,
    CI_CHUNKS: tl.constexpr,  # BLOCK_CI chunks of the widest tile's input channels (1 for ResNeXt)
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # constexpr: divisions by the stride become shifts
    N_BUCKET,  # autotune key only
    # meta-parameters
    STORE: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    PROLOGUE: tl.constexpr,  # convolve relu(x·in_scale + in_shift) (the previous BN + ReLU), padded after
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
    ci_lo, ci_hi = group_channel_range(co_start, BLOCK_CO, C_out, COUT_G, CIN_G, BLOCK_CI, CI_CHUNKS,
                                       EVEN_GROUPS)
    w_tile = tl.arange(0, BLOCK_CI)[:, None] * BLOCK_CO + tl.arange(0, BLOCK_CO)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
    for ci_start in range(ci_lo, ci_hi, BLOCK_CI):
        offs_ci = aligned(ci_start + tl.arange(0, BLOCK_CI), BLOCK_CI, EVEN_GROUPS)
        mask_ci = (offs_ci < ci_hi) | EVEN_GROUPS
        if PROLOGUE:
            in_scale = tl.load(in_scale_ptr + offs_ci, mask=mask_ci, other=0.0)
            in_shift = tl.load(in_shift_ptr + offs_ci, mask=mask_ci, other=0.0)
        w_chunk = w_ptr + ((pid_co * CI_CHUNKS + (ci_start - ci_lo) // BLOCK_CI) * 9) * BLOCK_CI * BLOCK_CO
        # taps as a runtime loop, the one the compiler pipelines: it then buffers one x tile and
        # one w tile per stage (nine unrolled taps took nine each, past H100's shared memory
        # for 32-64 channels per group, seen compiling with triton 3.9 for sm_90)
        for tap in range(9):
            hi = ho * STRIDE - PAD + tap // 3
            wi = wo * STRIDE - PAD + tap % 3
            inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            pix = ((n * H + hi) * W + wi).to(tl.int64) * C_in
            # ".ca": keep the taps' overlapping windows in L1 (triton 3.9; 3.6 ignores it)
            a = tl.load(x_ptr + pix[:, None] + offs_ci[None, :],
                        mask=inside[:, None] & mask_ci[None, :], other=0.0, cache_modifier=".ca")
            if PROLOGUE:
                # the zero padding pads the activation relu(x·s + t), not x: re-zero outside
                a = tl.where(inside[:, None] & mask_ci[None, :],
                             relu(a.to(tl.float32) * in_scale[None, :] + in_shift[None, :]),
                             0.0).to(x_ptr.dtype.element_ty)
            b = tl.load(w_chunk + tap * BLOCK_CI * BLOCK_CO + w_tile)  # dense, zeros off the diagonal
            acc = dot_acc(a, b, acc, UPCAST, PRECISION)

    if COMPUTE_STATS:
        if STORE == 1:
            # statistics of z as stored, so that normalising the stored z is self-consistent
            # (as in PyTorch); matters in half precision when few values share a channel
            acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        # rows past M hold exact zeros (all their loads were masked), so they add nothing to the sums
        mean, m2 = chunk_stats(acc, mask_m, M - pid_m * BLOCK_M, STATS_CHUNK, LOG2_STATS_CHUNK)
        offs_t = pid_m * (BLOCK_M // STATS_CHUNK) + tl.arange(0, BLOCK_M // STATS_CHUNK)
        part = offs_t[:, None] * C_out + offs_co[None, :]
        keep = (offs_t * STATS_CHUNK < M)[:, None] & mask_co[None, :]
        tl.store(mean_part_ptr + part, mean, mask=keep)
        tl.store(m2_part_ptr + part, m2, mask=keep)
    if STORE != 0:
        if STORE == 2:
            scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
            shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
            acc = relu(acc * scale[None, :] + shift[None, :])
        y_offs = offs_m.to(tl.int64)[:, None] * C_out + offs_co[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_co[None, :])


def out_size(size, stride, padding):
    return (size + 2 * padding - 3) // stride + 1


def pack_for_forward(weight, groups, dtype):
    """``(packed, chunks)``: ``weight`` packed as the forward kernel reads it, in ``dtype`` (one launch;
    ``conv3x3_forward(packed=...)`` takes it, and ``kernels.conv3x3.backward.conv3x3_dgrad`` reads it
    transposed where the channels per group match)."""
    c_out, cin_g = weight.shape[:2]
    block_co, block_ci = channel_tiles(cin_g, c_out // groups)
    return pack_weight(weight, groups, block_co, block_ci, tiled_is_out=True, dtype=dtype)


def conv3x3_forward(x, weight, groups, stride, padding, *, store, scale=None, shift=None,
                    compute_stats=False, in_scale=None, in_shift=None, config=None, packed=None):
    """Launch ``_fwd_kernel`` on channels-last ``x``; returns (out or None, stats partials or None).

    ``out`` is an (N, C_out, Ho, Wo) channels-last tensor of x's dtype; the partials are what
    ``kernels.batchnorm.stats.bn_stats`` merges. With ``in_scale``/``in_shift`` ((C_in,) float32) the conv
    reads relu(x·in_scale + in_shift) — the previous layer's BatchNorm + ReLU, applied as x is
    loaded (the fused bottleneck) — zero-padded after that transform, as conv2d pads its input.
    ``config`` forces one autotune config instead of tuning; ``packed`` is ``pack_for_forward``'s
    result for ``weight`` (packed here otherwise).
    """
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must both be given or both be None")
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = out_size(h, stride, padding), out_size(w, stride, padding)
    cin_g, cout_g = c_in // groups, c_out // groups
    block_co, block_ci = channel_tiles(cin_g, cout_g)
    packed, ci_chunks = packed if packed is not None else pack_for_forward(weight, groups, x.dtype)
    m = n * ho * wo
    out = None
    if store != STORE_NOTHING:
        out = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    stats = partials(m, c_out, x.device) if compute_stats else None
    mean_part, m2_part = stats if compute_stats else (dummy, dummy)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(c_out, block_co),)  # noqa: E731
    launch(
        _fwd_kernel, grid, config,
        x, packed, scale if scale is not None else dummy, shift if shift is not None else dummy,
        out if out is not None else dummy, mean_part, m2_part,
        in_scale if in_scale is not None else dummy, in_shift if in_shift is not None else dummy,
        n, h, w, c_in, ho, wo, c_out, cin_g, cout_g, ci_chunks, stride, padding, shape_bucket(n),
        STORE=store, COMPUTE_STATS=compute_stats, PROLOGUE=in_scale is not None, BLOCK_CO=block_co, BLOCK_CI=block_ci,
        EVEN_GROUPS=even_groups(c_out, cout_g, cin_g, block_co, block_ci), **dot_options(x.dtype),
    )
    return out, stats
