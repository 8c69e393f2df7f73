"""Backward kernels of the fused grouped conv + BatchNorm + ReLU, and their launchers.

With z = conv(x, w) saved from the forward, scale = γ·invstd, shift = β − mean·scale and
g = dy·[z·scale + shift > 0] (the ReLU mask, recomputed from z):

* ``_bn_bwd_reduce_kernel``: float32 partials of dβ = Σ g and dγ = Σ g·x̂, x̂ = (z − mean)·invstd.
* BatchNorm's backward is then affine in (g, z) per channel:
  dz = scale·g + k1·z + k0, with k1 = −scale·invstd·dγ/M, k0 = −scale·dβ/M − k1·mean in training
  and k1 = k0 = 0 with frozen (eval-mode) statistics. On the GPU dz is never written to memory:
  the two conv kernels below rebuild it from (dy, z) as they load it. Under Triton's interpreter,
  where element-wise work rather than memory traffic is the cost, ``_bn_relu_bwd_kernel`` writes
  dz once instead (``kernels.common.TILES.materialize_dz``: rebuilding it in the conv kernels saves a
  pass over HBM on the GPU but repeats the element-wise work once per tap, which dominates under the
  interpreter); both paths are tested on the CPU.
* ``_bwd_dx_kernel``: dx = conv_transpose(dz, w), an implicit GEMM over input pixels with the
  packed weight tiles of ``kernels/conv3x3/weights.py``. With stride 2, each program takes the pixels
  of one (hi % 2, wi % 2) class and visits only the taps that link them to an output pixel.
* ``_bwd_dw_kernel``: dw = Σ_pixels x_tap ⊗ dz. One program loads dz (or rebuilds it from
  dy, z) once per block of pixels and multiplies it by all nine taps of x (three per kernel
  row, stacked along the MMA's M). Split over pixel ranges into float32 partials that a second
  reduction sums in a fixed order: deterministic, no atomics, the same bits whatever config
  autotuning picks (the pixels per dot and the split edges are fixed, not tuned).
"""

import torch
import triton
import triton.language as tl

from .._autotune import autotune
from ..batchnorm.stats import LOG2_STATS_CHUNK, STATS_CHUNK, STATS_ROWS, grad_sums_partials, relu_bn_grad_epilogue
from ..common import (TILES, bn_relu_grad, cdiv, dot_acc, dot_options, pixel_coords, reduction_splits, relu,
                      shape_bucket, sum_rows)
from ..configs import launch
from .tiles import (aligned, channel_tiles, conv_configs, even_groups, group_channel_range, prefer_l1_loads,
                    prune_configs, prune_wgrad_configs, wgrad_configs, wgrad_taps_per_program, wgrad_tiles)
from .weights import other_side_chunks, pack_weight, transposes


@triton.jit
def _load_dz(dz_ptr, dy_ptr, z_ptr, offs, valid, scale, shift, k1, k0, DZ_IN_MEMORY: tl.constexpr,
             CACHE: tl.constexpr = ""):
    """float32 dz at ``offs``: read, or rebuilt from (dy, z) with the per-channel coefficients.
    ``CACHE=".ca"`` where the nine taps re-read overlapping windows (dgrad), as in the forward."""
    if DZ_IN_MEMORY:
        dz = tl.load(dz_ptr + offs, mask=valid, other=0.0, cache_modifier=CACHE)
    else:
        dy = tl.load(dy_ptr + offs, mask=valid, other=0.0, cache_modifier=CACHE)
        z = tl.load(z_ptr + offs, mask=valid, other=0.0, cache_modifier=CACHE)
        dz = bn_relu_grad(dy, z, scale, shift, k1, k0, valid)
    return dz


@autotune(conv_configs, heuristic=prefer_l1_loads, prune_configs_by={"early_config_prune": prune_configs},
          key=["N_BUCKET", "H", "W", "C_in", "C_out", "CIN_G", "STRIDE", "PAD", "RELU_BN", "DZ_IN_MEMORY",
               "PRECISION"])
@triton.jit
def _bwd_dx_kernel(
    dy_ptr, z_ptr,  # (N, Ho, Wo, C_out) channels-last
    dz_ptr,  # (N, Ho, Wo, C_out) float32, read instead of (dy, z) when DZ_IN_MEMORY
    w_ptr,  # (CI_TILES, CO_CHUNKS, 9, BLOCK_CO, BLOCK_CI) packed block-diagonal (kernels/conv3x3/weights.py);
            # W_TRANSPOSED: the forward's (CO_TILES, 1, 9, BLOCK_CI, BLOCK_CO), read transposed
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C_out,) float32 coefficients of dz
    dx_ptr,  # (N, H, W, C_in) channels-last
    zin_ptr,  # (N, H, W, C_in) channels-last: x = relu(zin·in_scale + in_shift), read when RELU_BN
    in_scale_ptr, in_shift_ptr, in_mean_ptr, in_invstd_ptr,  # (C_in,) float32, read when RELU_BN
    sum_g_ptr, sum_gx_ptr,  # (STRIDE², ⌈N·HC·WC / STATS_ROWS⌉, C_in) float32, written when RELU_BN
    N, H, W, C_in, Ho, Wo, C_out, CIN_G, COUT_G,
    CO_CHUNKS: tl.constexpr,  # BLOCK_CO chunks of the widest tile's output channels (1 for ResNeXt)
    HC, WC,  # the input grid of one stride-parity class: ⌈H / STRIDE⌉ x ⌈W / STRIDE⌉
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # constexpr: divisions by the stride become shifts
    N_BUCKET,  # autotune key only
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    RELU_BN: tl.constexpr,  # epilogue: ReLU mask of the BN below, and its backward sums
    W_TRANSPOSED: tl.constexpr,  # w_ptr holds the forward's packing (weights.transposes)
    DZ_IN_MEMORY: tl.constexpr, EVEN_GROUPS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_M input pixels of one stride-parity class × BLOCK_CI input channels. Each
    # tap (kh, kw) links input pixel hi to the output pixel ho = (hi + PAD - kh) / STRIDE when that
    # divides exactly, which with STRIDE = 2 depends only on hi's parity: a class of pixels with
    # the same (hi % 2, wi % 2) visits only its 1, 2 or 4 linked taps (2.25 on average, not 9).
    cls = tl.program_id(1)  # (hi % STRIDE, wi % STRIDE) of every pixel of this program
    ph = cls // STRIDE
    pw = cls % STRIDE
    num_ci_tiles = tl.cdiv(C_in, BLOCK_CI)
    pid_m = tl.program_id(0) // num_ci_tiles
    pid_ci = tl.program_id(0) % num_ci_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, i, j = pixel_coords(offs_m, HC, WC)
    hi = i * STRIDE + ph
    wi = j * STRIDE + pw
    mask_m = (offs_m < N * HC * WC) & (hi < H) & (wi < W)
    ci_start = pid_ci * BLOCK_CI
    offs_ci = ci_start + tl.arange(0, BLOCK_CI)
    mask_ci = (offs_ci < C_in) | EVEN_GROUPS
    co_lo, co_hi = group_channel_range(ci_start, BLOCK_CI, C_in, CIN_G, COUT_G, BLOCK_CO, CO_CHUNKS,
                                       EVEN_GROUPS)
    if W_TRANSPOSED:  # the forward's tile is (BLOCK_CI, BLOCK_CO): loaded as it lies, transposed in registers
        w_tile = tl.arange(0, BLOCK_CI)[:, None] * BLOCK_CO + tl.arange(0, BLOCK_CO)[None, :]
    else:
        w_tile = tl.arange(0, BLOCK_CO)[:, None] * BLOCK_CI + tl.arange(0, BLOCK_CI)[None, :]
    # the linked taps: kh ≡ ph + PAD (mod STRIDE), and likewise kw
    kh0 = (ph + PAD) % STRIDE
    kw0 = (pw + PAD) % STRIDE
    num_kw = (3 - kw0 + STRIDE - 1) // STRIDE
    num_taps = (3 - kh0 + STRIDE - 1) // STRIDE * num_kw

    acc = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
    for co_start in range(co_lo, co_hi, BLOCK_CO):
        offs_co = aligned(co_start + tl.arange(0, BLOCK_CO), BLOCK_CO, EVEN_GROUPS)
        mask_co = (offs_co < co_hi) | EVEN_GROUPS
        scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
        shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
        k1 = tl.load(k1_ptr + offs_co, mask=mask_co, other=0.0)
        k0 = tl.load(k0_ptr + offs_co, mask=mask_co, other=0.0)
        w_chunk = w_ptr + ((pid_ci * CO_CHUNKS + (co_start - co_lo) // BLOCK_CO) * 9) * BLOCK_CO * BLOCK_CI
        for t in range(num_taps):  # a runtime loop, as in the forward: one buffer per load per stage
            kh = kh0 + t // num_kw * STRIDE
            kw = kw0 + t % num_kw * STRIDE
            ho_s = hi + PAD - kh  # = ho · STRIDE, exactly
            wo_s = wi + PAD - kw
            ho = ho_s // STRIDE
            wo = wo_s // STRIDE
            linked = mask_m & (ho_s >= 0) & (wo_s >= 0) & (ho < Ho) & (wo < Wo)
            pix = ((n * Ho + ho) * Wo + wo).to(tl.int64) * C_out
            valid = linked[:, None] & mask_co[None, :]
            offs = pix[:, None] + offs_co[None, :]
            dz = _load_dz(dz_ptr, dy_ptr, z_ptr, offs, valid, scale, shift, k1, k0, DZ_IN_MEMORY, ".ca")
            # dense, zeros off the diagonal
            b = tl.load(w_chunk + (kh * 3 + kw) * BLOCK_CO * BLOCK_CI + w_tile)
            if W_TRANSPOSED:
                b = tl.trans(b)
            acc = dot_acc(dz.to(w_ptr.dtype.element_ty), b, acc, UPCAST, PRECISION)

    dx_offs = (((n * H + hi) * W + wi).to(tl.int64) * C_in)[:, None] + offs_ci[None, :]
    valid = mask_m[:, None] & mask_ci[None, :]
    if RELU_BN:
        # chunks are runs of STATS_ROWS pixels of one parity class, in the class's own order
        class_chunks = tl.cdiv(N * HC * WC, STATS_CHUNK)
        acc = relu_bn_grad_epilogue(acc, zin_ptr, dx_offs, valid, offs_ci, mask_ci, in_scale_ptr, in_shift_ptr,
                                    in_mean_ptr, in_invstd_ptr, sum_g_ptr, sum_gx_ptr,
                                    cls * class_chunks + pid_m * (BLOCK_M // STATS_CHUNK),
                                    (cls + 1) * class_chunks, C_in, dx_ptr.dtype.element_ty, STATS_CHUNK,
                                    LOG2_STATS_CHUNK)
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _x_row_taps_t(x_ptr, n, ho, wo, mask_m, kh, offs_ci, mask_ci, H, W, C_in, in_scale, in_shift,
                  STRIDE: tl.constexpr, PAD: tl.constexpr, PROLOGUE: tl.constexpr):
    """The three taps (kh, 0..2) of x at BLOCK_K output pixels, as one (4·BLOCK_CI, BLOCK_K) dot
    operand: rows [kw·BLOCK_CI, (kw+1)·BLOCK_CI) hold tap (kh, kw); kw = 3 is zero padding.
    With PROLOGUE, of relu(x·in_scale + in_shift), zero outside the image (padding after it)."""
    kw = tl.arange(0, 4)
    hi = ho * STRIDE - PAD + kh
    wi = wo[:, None] * STRIDE - PAD + kw[None, :]  # (BLOCK_K, 4)
    inside = (mask_m & (hi >= 0) & (hi < H))[:, None] & (kw < 3)[None, :] & (wi >= 0) & (wi < W)
    pix = ((n * H + hi)[:, None] * W + wi).to(tl.int64) * C_in
    # ".ca": the three kw-shifted copies, and the rows neighbouring pixel blocks share, hit L1
    a = tl.load(x_ptr + pix[:, :, None] + offs_ci[None, None, :],
                mask=inside[:, :, None] & mask_ci[None, None, :], other=0.0, cache_modifier=".ca")
    if PROLOGUE:
        a = tl.where(inside[:, :, None] & mask_ci[None, None, :],
                     relu(a.to(tl.float32) * in_scale[None, None, :] + in_shift[None, None, :]),
                     0.0).to(x_ptr.dtype.element_ty)
    return tl.trans(tl.reshape(a, (a.shape[0], 4 * a.shape[2])))


@triton.jit
def _store_dw_row(dw_part_ptr, acc, pid_s, kh, offs_co, mask_co, offs_ci, mask_ci, C_out, CIN_G, COUT_G):
    """acc (4·BLOCK_CI, BLOCK_CO) holds taps (kh, 0..3): keep the block diagonal of taps 0..2,
    w[co, ci - group(co)·CIN_G, kh, kw], in split ``pid_s``'s float32 partial."""
    acc = tl.reshape(acc, (4, acc.shape[0] // 4, acc.shape[1]))
    kw = tl.arange(0, 4)[:, None, None]
    ci = offs_ci[None, :, None]
    co = offs_co[None, None, :]
    keep = ((kw < 3) & (ci // CIN_G == co // COUT_G) & mask_ci[None, :, None] & mask_co[None, None, :])
    # int32 offsets from the split's base: 64-bit pointers per element took 255 registers at
    # 64 channels per group (sm_90, triton 3.9)
    split_base = dw_part_ptr + pid_s.to(tl.int64) * C_out * CIN_G * 9
    tl.store(split_base + (co * (CIN_G * 9) + (ci - co // COUT_G * CIN_G) * 9 + kh * 3 + kw), acc, mask=keep)


@autotune(wgrad_configs, prune_configs_by={"early_config_prune": prune_wgrad_configs},
           key=["N_BUCKET", "H", "W", "C_in", "C_out", "CIN_G", "STRIDE", "PAD", "DZ_IN_MEMORY",
                "PROLOGUE", "PRECISION"])
@triton.jit
def _bwd_dw_kernel(
    x_ptr,  # (N, H, W, C_in) channels-last
    dy_ptr, z_ptr,  # (N, Ho, Wo, C_out) channels-last
    dz_ptr,  # (N, Ho, Wo, C_out) float32, read instead of (dy, z) when DZ_IN_MEMORY
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C_out,) float32 coefficients of dz
    dw_part_ptr,  # (S, C_out, CIN_G, 9) float32 partials, one slice per pixel split
    in_scale_ptr, in_shift_ptr,  # (C_in,) float32, read when PROLOGUE
    N, H, W, C_in, Ho, Wo, C_out, CIN_G, COUT_G,
    CI_CHUNKS: tl.constexpr,  # BLOCK_CI chunks of the widest tile's input channels
    ROWS_PER_SPLIT,  # a multiple of BLOCK_K
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # constexpr: divisions by the stride become shifts
    N_BUCKET,  # autotune key only
    # meta-parameters
    BLOCK_K: tl.constexpr,  # pixels per dot: fixed (TILES.wgrad_block_k), so the sums' order is too
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    KH_ROWS: tl.constexpr,  # kernel rows per program: 3 (all nine taps) or 1
    PROLOGUE: tl.constexpr,  # the conv read relu(x·in_scale + in_shift): recompute it as x is loaded
    DZ_IN_MEMORY: tl.constexpr, EVEN_GROUPS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: split s of the output pixels, BLOCK_CO output channels × one BLOCK_CI chunk of
    # their groups' input channels, KH_ROWS kernel rows: for each block of BLOCK_K pixels, dz is
    # loaded (or rebuilt from dy, z) once and multiplied by the x taps of every kernel row,
    # acc[kh][(kw, ci), co] += Σ_m x[pixel(m) + (kh, kw), ci] · dz[m, co]. The (kw, ci) rows make
    # the MMA's M extent 4·BLOCK_CI >= 64, so no warp duplicates another's work.
    row_groups = 3 // KH_ROWS
    tiles_per_split = tl.cdiv(C_out, BLOCK_CO) * CI_CHUNKS * row_groups
    pid_s = tl.program_id(0) // tiles_per_split
    r = tl.program_id(0) % tiles_per_split
    kh0 = r % row_groups * KH_ROWS
    chunk = r // row_groups % CI_CHUNKS
    pid_co = r // row_groups // CI_CHUNKS
    co_start = pid_co * BLOCK_CO
    offs_co = co_start + tl.arange(0, BLOCK_CO)
    mask_co = (offs_co < C_out) | EVEN_GROUPS
    ci_lo, ci_hi = group_channel_range(co_start, BLOCK_CO, C_out, COUT_G, CIN_G, BLOCK_CI, CI_CHUNKS,
                                       EVEN_GROUPS)
    offs_ci = aligned(ci_lo + chunk * BLOCK_CI + tl.arange(0, BLOCK_CI), BLOCK_CI, EVEN_GROUPS)
    mask_ci = (offs_ci < ci_hi) | EVEN_GROUPS
    scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
    shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
    k1 = tl.load(k1_ptr + offs_co, mask=mask_co, other=0.0)
    k0 = tl.load(k0_ptr + offs_co, mask=mask_co, other=0.0)
    in_scale = scale  # placeholders, unused without PROLOGUE
    in_shift = shift
    if PROLOGUE:
        in_scale = tl.load(in_scale_ptr + offs_ci, mask=mask_ci, other=0.0)
        in_shift = tl.load(in_shift_ptr + offs_ci, mask=mask_ci, other=0.0)

    M = N * Ho * Wo
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    acc0 = tl.zeros((4 * BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    acc1 = tl.zeros((4 * BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    acc2 = tl.zeros((4 * BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for m_start in range(row_start, row_end, BLOCK_K):
        offs_m = m_start + tl.arange(0, BLOCK_K)
        mask_m = offs_m < row_end
        n, ho, wo = pixel_coords(offs_m, Ho, Wo)
        offs = offs_m.to(tl.int64)[:, None] * C_out + offs_co[None, :]
        dz = _load_dz(dz_ptr, dy_ptr, z_ptr, offs, mask_m[:, None] & mask_co[None, :], scale, shift,
                      k1, k0, DZ_IN_MEMORY, "")
        dz = dz.to(x_ptr.dtype.element_ty)
        a = _x_row_taps_t(x_ptr, n, ho, wo, mask_m, kh0, offs_ci, mask_ci, H, W, C_in, in_scale,
                              in_shift, STRIDE, PAD, PROLOGUE)
        acc0 = dot_acc(a, dz, acc0, UPCAST, PRECISION)
        if KH_ROWS == 3:
            a = _x_row_taps_t(x_ptr, n, ho, wo, mask_m, 1, offs_ci, mask_ci, H, W, C_in, in_scale,
                              in_shift, STRIDE, PAD, PROLOGUE)
            acc1 = dot_acc(a, dz, acc1, UPCAST, PRECISION)
            a = _x_row_taps_t(x_ptr, n, ho, wo, mask_m, 2, offs_ci, mask_ci, H, W, C_in, in_scale,
                              in_shift, STRIDE, PAD, PROLOGUE)
            acc2 = dot_acc(a, dz, acc2, UPCAST, PRECISION)

    _store_dw_row(dw_part_ptr, acc0, pid_s, kh0, offs_co, mask_co, offs_ci, mask_ci, C_out, CIN_G, COUT_G)
    if KH_ROWS == 3:
        _store_dw_row(dw_part_ptr, acc1, pid_s, 1, offs_co, mask_co, offs_ci, mask_ci, C_out, CIN_G, COUT_G)
        _store_dw_row(dw_part_ptr, acc2, pid_s, 2, offs_co, mask_co, offs_ci, mask_ci, C_out, CIN_G, COUT_G)


def conv3x3_dgrad(dy, z, weight, coeffs, x_shape, groups, stride, padding, dz=None, config=None, relu_bn=None,
                  packed=None):
    """dx (channels-last, z's dtype) of the grouped conv; dz read from ``dz`` when given, else rebuilt
    from (dy, z). ``weight`` may be float32 with half-precision activations (autocast's master
    weights): it is packed in z's dtype.

    ``relu_bn = (z_in, scale, shift, mean, invstd)``: the conv read x = relu(z_in·scale + shift)
    (the fused bottleneck's BN1 + ReLU; z_in of x_shape, channels-last, the vectors float32
    (C_in,)). dx then carries that ReLU's mask and the call returns ``(dx, (Σg, Σg·x̂))``: the
    per-chunk partials, (chunks, C_in) float32 each, of BatchNorm's backward sums of z_in, which
    ``kernels.batchnorm.stats.bn_grad`` finishes.

    ``packed``: the forward's packing of ``weight`` (``forward.pack_for_forward``), read transposed
    where that is exactly dgrad's (``weights.transposes``: ResNeXt's layers), else ignored and the
    weight packed here."""
    n, c_in, h, w = x_shape
    _, c_out, ho, wo = z.shape
    cin_g, cout_g = c_in // groups, c_out // groups
    block_ci, block_co = channel_tiles(cout_g, cin_g)  # tiles the input side, loops the output side
    even = even_groups(c_in, cin_g, cout_g, block_ci, block_co)
    transposed = packed is not None and transposes(cin_g, cout_g, groups, block_co, block_ci, packed[1], even)
    if transposed:
        packed, co_chunks = packed
    else:
        packed, co_chunks = pack_weight(weight, groups, block_ci, block_co, tiled_is_out=False, dtype=z.dtype)
    dx = torch.empty((n, c_in, h, w), device=z.device, dtype=z.dtype,
                     memory_format=torch.channels_last)
    hc, wc = cdiv(h, stride), cdiv(w, stride)  # one stride-parity class's grid
    sums = None
    if relu_bn is not None:
        z_in, *vectors = relu_bn
        sums = grad_sums_partials(stride * stride * cdiv(n * hc * wc, STATS_ROWS), c_in, dx.device)
        epilogue = [z_in.contiguous(memory_format=torch.channels_last), *vectors, *sums]
    else:
        epilogue = [dx] + [coeffs[0]] * 6

    def grid(meta):  # axis 1: the stride-parity classes
        return cdiv(n * hc * wc, meta["BLOCK_M"]) * cdiv(c_in, block_ci), stride * stride
    launch(
        _bwd_dx_kernel, grid, config,
        dy, z, dz if dz is not None else dy, packed, *coeffs, dx, *epilogue,
        n, h, w, c_in, ho, wo, c_out, cin_g, cout_g, co_chunks, hc, wc, stride, padding, shape_bucket(n),
        BLOCK_CI=block_ci, BLOCK_CO=block_co, RELU_BN=relu_bn is not None, W_TRANSPOSED=transposed,
        DZ_IN_MEMORY=dz is not None, EVEN_GROUPS=even, **dot_options(packed.dtype),
    )
    return dx if sums is None else (dx, sums)


def conv3x3_wgrad(x, dy, z, weight, coeffs, groups, stride, padding, dz=None, config=None, in_scale=None,
                  in_shift=None):
    """dw (weight's shape and dtype) of the grouped conv; dz read from ``dz`` when given, else
    rebuilt from (dy, z). Float32 partials per pixel split, summed in a fixed order. With
    ``in_scale``/``in_shift`` the conv's input was relu(x·in_scale + in_shift) (the fused
    bottleneck's prologue, zero-padded after the transform), recomputed as x is loaded."""
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must both be given or both be None")
    n, c_in, h, w = x.shape
    _, c_out, ho, wo = z.shape
    cin_g, cout_g = c_in // groups, c_out // groups
    block_co, block_ci = wgrad_tiles(cin_g, cout_g)
    co_tiles = cdiv(c_out, block_co)
    ci_chunks = other_side_chunks(c_out, cout_g, cin_g, block_co, block_ci)
    kh_rows = wgrad_taps_per_program(block_co, block_ci)
    m = n * ho * wo
    splits = reduction_splits(m, x.device)
    block_k = TILES.wgrad_block_k
    rows = cdiv(cdiv(m, splits), block_k) * block_k
    splits = cdiv(m, rows)  # no empty split
    # every entry is written: each (co, ci) of a group lies in exactly one (tile, chunk)
    dw_part = torch.empty((splits, c_out, cin_g, 9), device=x.device, dtype=torch.float32)
    launch(
        _bwd_dw_kernel, (splits * co_tiles * ci_chunks * (3 // kh_rows),), config,
        x, dy, z, dz if dz is not None else dy, *coeffs, dw_part,
        in_scale if in_scale is not None else coeffs[0], in_shift if in_shift is not None else coeffs[0],
        n, h, w, c_in, ho, wo, c_out, cin_g, cout_g, ci_chunks, rows, stride, padding, shape_bucket(n),
        BLOCK_K=block_k, BLOCK_CO=block_co, BLOCK_CI=block_ci, KH_ROWS=kh_rows,
        PROLOGUE=in_scale is not None,
        DZ_IN_MEMORY=dz is not None, EVEN_GROUPS=even_groups(c_out, cout_g, cin_g, block_co, block_ci),
        **dot_options(x.dtype),
    )
    return sum_rows(dw_part, weight.dtype).view(c_out, cin_g, 3, 3)
