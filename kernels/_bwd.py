"""Backward kernels of the fused grouped conv + BatchNorm + ReLU, and their launchers.

With z = conv(x, w) saved from the forward, scale = γ·invstd, shift = β − mean·scale and
g = dy·[z·scale + shift > 0] (the ReLU mask, recomputed from z):

* ``_bn_bwd_reduce_kernel``: float32 partials of dβ = Σ g and dγ = Σ g·x̂, x̂ = (z − mean)·invstd.
* BatchNorm's backward is then affine in (g, z) per channel:
  dz = scale·g + k1·z + k0, with k1 = −scale·invstd·dγ/M, k0 = −scale·dβ/M − k1·mean in training
  and k1 = k0 = 0 with frozen (eval-mode) statistics. On the GPU dz is never written to memory:
  the two conv kernels below rebuild it from (dy, z) as they load it. Under Triton's interpreter,
  where element-wise work rather than memory traffic is the cost, ``_bn_relu_bwd_kernel`` writes
  dz once instead (``MATERIALIZE_DZ``); both paths are tested on the CPU.
* ``_bwd_dx_kernel``: dx = conv_transpose(dz, w), an implicit GEMM over input pixels.
* ``_bwd_dw_kernel``: dw = Σ_pixels x_tap ⊗ dz, split over pixel ranges into float32 partials
  that a second reduction sums in a fixed order (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from ._conv_tiles import (INTERPRET, aligned, bn_relu_grad, channel_tiles, conv_configs, dot_acc,
                          dot_options, even_groups, group_channel_range, launch, pixel_coords,
                          pointwise_tiles, prune_configs, shape_bucket)

# Rebuilding dz from (dy, z) inside the conv kernels saves a pass over HBM on the GPU but repeats
# the element-wise work 9 times (once per tap), which dominates under the interpreter.
MATERIALIZE_DZ = INTERPRET


@triton.jit
def _load_dz(dz_ptr, dy_ptr, z_ptr, offs, valid, scale, shift, k1, k0, DZ_IN_MEMORY: tl.constexpr):
    """float32 dz at ``offs``: read, or rebuilt from (dy, z) with the per-channel coefficients."""
    if DZ_IN_MEMORY:
        dz = tl.load(dz_ptr + offs, mask=valid, other=0.0)
    else:
        dy = tl.load(dy_ptr + offs, mask=valid, other=0.0)
        z = tl.load(z_ptr + offs, mask=valid, other=0.0)
        dz = bn_relu_grad(dy, z, scale, shift, k1, k0, valid)
    return dz


@triton.jit
def _bn_relu_bwd_kernel(
    dy_ptr, z_ptr,  # (M, C) channels-last
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C,) float32 coefficients of dz
    dz_ptr,  # (M, C) float32
    M, C,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    k1 = tl.load(k1_ptr + offs_c, mask=mask_c, other=0.0)
    k0 = tl.load(k0_ptr + offs_c, mask=mask_c, other=0.0)
    dz = _load_dz(dz_ptr, dy_ptr, z_ptr, offs, mask, scale, shift, k1, k0, False)
    tl.store(dz_ptr + offs, dz, mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(
    dy_ptr, z_ptr,  # (M, C) channels-last
    scale_ptr, shift_ptr, mean_ptr, invstd_ptr,  # (C,) float32
    sum_g_ptr, sum_gx_ptr,  # (S, C) float32 partials
    M, C, ROWS_PER_PROGRAM,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: BLOCK_C channels over ROWS_PER_PROGRAM consecutive pixels.
    pid_s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid_s * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_c[None, :]
        offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(mask & (z * scale[None, :] + shift[None, :] > 0), dy, 0.0)
        acc_g += tl.sum(g, axis=0)
        acc_gx += tl.sum(g * (z - mean[None, :]) * invstd[None, :], axis=0)
    tl.store(sum_g_ptr + pid_s * C + offs_c, acc_g, mask=mask_c)
    tl.store(sum_gx_ptr + pid_s * C + offs_c, acc_gx, mask=mask_c)


@triton.autotune(configs=conv_configs(), prune_configs_by={"early_config_prune": prune_configs},
                 key=["N_BUCKET", "H", "W", "C_in", "C_out", "CIN_G", "STRIDE", "DZ_IN_MEMORY"])
@triton.jit
def _bwd_dx_kernel(
    dy_ptr, z_ptr,  # (N, Ho, Wo, C_out) channels-last
    dz_ptr,  # (N, Ho, Wo, C_out) float32, read instead of (dy, z) when DZ_IN_MEMORY
    w_ptr,  # (C_out, CIN_G, 3, 3) contiguous
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C_out,) float32 coefficients of dz
    dx_ptr,  # (N, H, W, C_in) channels-last
    N, H, W, C_in, Ho, Wo, C_out, CIN_G, COUT_G,
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # constexpr: divisions by the stride become shifts
    N_BUCKET,  # autotune key only
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    DZ_IN_MEMORY: tl.constexpr, EVEN_GROUPS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_M input pixels × BLOCK_CI input channels; for each tap, the output pixel
    # that read this input pixel through that tap (if any) contributes dz[pixel] · w[tap].
    num_ci_tiles = tl.cdiv(C_in, BLOCK_CI)
    pid_m = tl.program_id(0) // num_ci_tiles
    pid_ci = tl.program_id(0) % num_ci_tiles
    M = N * H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n, hi, wi = pixel_coords(offs_m, H, W)
    ci_start = pid_ci * BLOCK_CI
    offs_ci = ci_start + tl.arange(0, BLOCK_CI)
    mask_ci = (offs_ci < C_in) | EVEN_GROUPS
    g_ci = offs_ci // CIN_G
    co_lo, co_hi = group_channel_range(ci_start, BLOCK_CI, C_in, CIN_G, COUT_G, BLOCK_CO, EVEN_GROUPS)

    acc = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
    for co_start in range(co_lo, co_hi, BLOCK_CO):
        offs_co = aligned(co_start + tl.arange(0, BLOCK_CO), BLOCK_CO, EVEN_GROUPS)
        mask_co = (offs_co < co_hi) | EVEN_GROUPS
        scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
        shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
        k1 = tl.load(k1_ptr + offs_co, mask=mask_co, other=0.0)
        k0 = tl.load(k0_ptr + offs_co, mask=mask_co, other=0.0)
        # block-diagonal weight tile (BLOCK_CO, BLOCK_CI)
        w_mask = (offs_co[:, None] // COUT_G == g_ci[None, :]) & mask_co[:, None] & mask_ci[None, :]
        w_offs = offs_co[:, None] * (CIN_G * 9) + (offs_ci[None, :] - g_ci[None, :] * CIN_G) * 9
        for tap in range(9):  # a runtime loop, as in the forward: one buffer per load per stage
            ho_s = hi + PAD - tap // 3  # = ho · STRIDE when this tap links (ho, hi)
            wo_s = wi + PAD - tap % 3
            ho = ho_s // STRIDE
            wo = wo_s // STRIDE
            linked = (mask_m & (ho_s >= 0) & (wo_s >= 0) & (ho_s % STRIDE == 0)
                      & (wo_s % STRIDE == 0) & (ho < Ho) & (wo < Wo))
            pix = ((n * Ho + ho) * Wo + wo).to(tl.int64) * C_out
            valid = linked[:, None] & mask_co[None, :]
            offs = pix[:, None] + offs_co[None, :]
            dz = _load_dz(dz_ptr, dy_ptr, z_ptr, offs, valid, scale, shift, k1, k0, DZ_IN_MEMORY)
            b = tl.load(w_ptr + w_offs + tap, mask=w_mask, other=0.0)
            acc = dot_acc(dz.to(w_ptr.dtype.element_ty), b, acc, UPCAST, PRECISION)

    dx_offs = offs_m.to(tl.int64)[:, None] * C_in + offs_ci[None, :]
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


@triton.autotune(configs=conv_configs(), prune_configs_by={"early_config_prune": prune_configs},
                 key=["N_BUCKET", "H", "W", "C_in", "C_out", "CIN_G", "STRIDE", "DZ_IN_MEMORY"])
@triton.jit
def _bwd_dw_kernel(
    x_ptr,  # (N, H, W, C_in) channels-last
    dy_ptr, z_ptr,  # (N, Ho, Wo, C_out) channels-last
    dz_ptr,  # (N, Ho, Wo, C_out) float32, read instead of (dy, z) when DZ_IN_MEMORY
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C_out,) float32 coefficients of dz
    dw_part_ptr,  # (S, C_out, CIN_G, 9) float32 partials, one slice per pixel split
    N, H, W, C_in, Ho, Wo, C_out, CIN_G, COUT_G,
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # constexpr: divisions by the stride become shifts
    CI_CHUNKS, SPLITS,
    N_BUCKET,  # autotune key only
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    DZ_IN_MEMORY: tl.constexpr, EVEN_GROUPS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: split s of the output pixels, one tap, BLOCK_CO output channels ×
    # one BLOCK_CI chunk of the input channels of their groups: acc = Σ_m dz[m]ᵀ · x_tap[m].
    # (tap, channel tile) vary fastest: programs over the same pixel split run together
    tiles_per_split = tl.cdiv(C_out, BLOCK_CO) * CI_CHUNKS * 9
    pid_s = tl.program_id(0) // tiles_per_split
    tap = tl.program_id(0) % 9
    pid_co = (tl.program_id(0) % tiles_per_split) // 9 // CI_CHUNKS
    chunk = (tl.program_id(0) % tiles_per_split) // 9 % CI_CHUNKS
    kh = tap // 3
    kw = tap % 3
    co_start = pid_co * BLOCK_CO
    offs_co = co_start + tl.arange(0, BLOCK_CO)
    mask_co = (offs_co < C_out) | EVEN_GROUPS
    g_co = offs_co // COUT_G
    ci_lo, ci_hi = group_channel_range(co_start, BLOCK_CO, C_out, COUT_G, CIN_G, BLOCK_CI, EVEN_GROUPS)
    offs_ci = aligned(ci_lo + chunk * BLOCK_CI + tl.arange(0, BLOCK_CI), BLOCK_CI, EVEN_GROUPS)
    mask_ci = (offs_ci < ci_hi) | EVEN_GROUPS
    scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
    shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
    k1 = tl.load(k1_ptr + offs_co, mask=mask_co, other=0.0)
    k0 = tl.load(k0_ptr + offs_co, mask=mask_co, other=0.0)

    M = N * Ho * Wo
    rows = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_M) * BLOCK_M
    row_start = pid_s * rows
    row_end = tl.minimum(row_start + rows, M)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        n, ho, wo = pixel_coords(offs_m, Ho, Wo)
        valid = mask_m[:, None] & mask_co[None, :]
        offs = offs_m.to(tl.int64)[:, None] * C_out + offs_co[None, :]
        dz = _load_dz(dz_ptr, dy_ptr, z_ptr, offs, valid, scale, shift, k1, k0, DZ_IN_MEMORY)
        dz = dz.to(x_ptr.dtype.element_ty)
        hi = ho * STRIDE - PAD + kh
        wi = wo * STRIDE - PAD + kw
        inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        pix = ((n * H + hi) * W + wi).to(tl.int64) * C_in
        a = tl.load(x_ptr + pix[:, None] + offs_ci[None, :], mask=inside[:, None] & mask_ci[None, :],
                    other=0.0)
        acc = dot_acc(tl.trans(dz), a, acc, UPCAST, PRECISION)

    # keep the block diagonal only: w[co, ci - group(co)·CIN_G, kh, kw]
    keep = (offs_ci[None, :] // CIN_G == g_co[:, None]) & mask_co[:, None] & mask_ci[None, :]
    part = (dw_part_ptr + pid_s.to(tl.int64) * C_out * CIN_G * 9 + offs_co[:, None] * (CIN_G * 9)
            + (offs_ci[None, :] - g_co[:, None] * CIN_G) * 9 + tap)
    tl.store(part, acc, mask=keep)


def _num_splits(m, device):
    """How many pixel ranges the reductions split into: a fixed function of the problem and
    the device, so results are bit-identical from run to run."""
    if INTERPRET:
        return max(1, min(4, triton.cdiv(m, 16384)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(2 * sms, triton.cdiv(m, 2048)))


def bn_bwd_reduce(dy, z, scale, shift, mean, invstd):
    """(Σ g, Σ g·x̂) per channel, float32, reduced in a fixed order."""
    n, c, h, w = z.shape
    m = n * h * w
    splits = _num_splits(m, z.device)
    block_m, block_c = pointwise_tiles(c)
    rows = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    sum_g = torch.empty((splits, c), device=z.device, dtype=torch.float32)
    sum_gx = torch.empty((splits, c), device=z.device, dtype=torch.float32)
    _bn_bwd_reduce_kernel[(splits, triton.cdiv(c, block_c))](
        dy, z, scale, shift, mean, invstd, sum_g, sum_gx, m, c, rows,
        BLOCK_M=block_m, BLOCK_C=block_c)
    return sum_g.sum(0), sum_gx.sum(0)


def bn_relu_bwd(dy, z, coeffs):
    """dz (float32, channels-last) of relu(BN(z)) from dy, for the MATERIALIZE_DZ path."""
    n, c, h, w = z.shape
    m = n * h * w
    dz = torch.empty(z.shape, device=z.device, dtype=torch.float32, memory_format=torch.channels_last)
    block_m, block_c = pointwise_tiles(c)
    _bn_relu_bwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        dy, z, *coeffs, dz, m, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return dz


def conv_dx(dy, z, weight, coeffs, x_shape, groups, stride, padding, dz=None, config=None):
    """dx (channels-last, weight's dtype) of the grouped conv; dz read from ``dz`` when given,
    else rebuilt from (dy, z)."""
    n, c_in, h, w = x_shape
    _, c_out, ho, wo = z.shape
    cin_g, cout_g = c_in // groups, c_out // groups
    block_ci, block_co = channel_tiles(cout_g, cin_g)  # tiles the input side, loops the output side
    dx = torch.empty((n, c_in, h, w), device=z.device, dtype=weight.dtype,
                     memory_format=torch.channels_last)
    grid = lambda meta: (triton.cdiv(n * h * w, meta["BLOCK_M"]) * triton.cdiv(c_in, block_ci),)
    launch(
        _bwd_dx_kernel, grid, config,
        dy, z, dz if dz is not None else dy, weight, *coeffs, dx,
        n, h, w, c_in, ho, wo, c_out, cin_g, cout_g, stride, padding, shape_bucket(n),
        BLOCK_CI=block_ci, BLOCK_CO=block_co, DZ_IN_MEMORY=dz is not None,
        EVEN_GROUPS=even_groups(c_in, cin_g, cout_g, block_ci, block_co), **dot_options(weight.dtype),
    )
    return dx


def conv_dw(x, dy, z, weight, coeffs, groups, stride, padding, dz=None, config=None):
    """dw (weight's shape and dtype) of the grouped conv; dz read from ``dz`` when given, else
    rebuilt from (dy, z)."""
    n, c_in, h, w = x.shape
    _, c_out, ho, wo = z.shape
    cin_g, cout_g = c_in // groups, c_out // groups
    block_co, block_ci = channel_tiles(cin_g, cout_g)
    co_tiles = triton.cdiv(c_out, block_co)
    # the widest input-channel range any output-channel tile needs, in BLOCK_CI chunks
    spans = [(min(t * block_co + block_co, c_out) - 1) // cout_g - (t * block_co) // cout_g + 1
             for t in range(co_tiles)]
    ci_chunks = triton.cdiv(max(spans) * cin_g, block_ci)
    splits = _num_splits(n * ho * wo, x.device)
    dw_part = torch.zeros((splits, c_out, cin_g, 9), device=x.device, dtype=torch.float32)
    launch(
        _bwd_dw_kernel, (splits * co_tiles * ci_chunks * 9,), config,
        x, dy, z, dz if dz is not None else dy, *coeffs, dw_part,
        n, h, w, c_in, ho, wo, c_out, cin_g, cout_g, stride, padding, ci_chunks, splits, shape_bucket(n),
        BLOCK_CO=block_co, BLOCK_CI=block_ci, DZ_IN_MEMORY=dz is not None,
        EVEN_GROUPS=even_groups(c_out, cout_g, cin_g, block_co, block_ci), **dot_options(x.dtype),
    )
    return dw_part.sum(0).view(c_out, cin_g, 3, 3).to(weight.dtype)
