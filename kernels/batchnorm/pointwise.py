"""BatchNorm's pointwise and reduction kernels around the convolutions, and BN's backward algebra.

With z the conv output, scale = γ·invstd, shift = β − mean·scale (float32, per channel):

* ``_bn_relu_kernel``: y = relu(z·scale + shift), where the forward conv could not apply it in its
  own epilogue (training: the batch statistics are known only after the conv has run).
* ``_bn_bwd_reduce_kernel``: float32 partials of dβ = Σ g and dγ = Σ g·x̂, g = dy·[z·scale + shift > 0],
  x̂ = (z − mean)·invstd, over fixed pixel splits, which ``kernels.batchnorm.stats.bn_grad`` sums
  in a fixed order (deterministic) into BatchNorm's backward coefficients: dz = scale·g + k1·z + k0
  per channel. The conv kernels rebuild dz from (dy, z) as they load it; ``_bn_relu_bwd_kernel``
  writes dz once instead, for Triton's interpreter (``kernels.common.TILES.materialize_dz``).

The batch statistics themselves come from the conv epilogues (``kernels.batchnorm.stats``); the
bottleneck's final BN + add + ReLU is ``kernels.batchnorm.tail``.
"""

import torch
import triton
import triton.language as tl

from ..common import bn_relu_grad, cdiv, pointwise_tiles, reduction_splits, relu, relu_grad


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
    y = relu(z * scale[None, :] + shift[None, :])
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


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
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    dz = bn_relu_grad(dy, z, scale, shift, k1, k0, mask)
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
        g = tl.where(mask, relu_grad(dy, z * scale[None, :] + shift[None, :]), 0.0)
        acc_g += tl.sum(g, axis=0)
        acc_gx += tl.sum(g * (z - mean[None, :]) * invstd[None, :], axis=0)
    tl.store(sum_g_ptr + pid_s * C + offs_c, acc_g, mask=mask_c)
    tl.store(sum_gx_ptr + pid_s * C + offs_c, acc_gx, mask=mask_c)


def bn_bwd_reduce(dy, z, scale, shift, mean, invstd):
    """(Σ g, Σ g·x̂) partials, float32 (splits, C) each, of fixed pixel splits (``bn_grad`` sums them)."""
    n, c, h, w = z.shape
    m = n * h * w
    splits = reduction_splits(m, z.device)
    block_m, block_c = pointwise_tiles(c)
    rows = cdiv(cdiv(m, splits), block_m) * block_m
    sum_g = torch.empty((splits, c), device=z.device, dtype=torch.float32)
    sum_gx = torch.empty((splits, c), device=z.device, dtype=torch.float32)
    _bn_bwd_reduce_kernel[(splits, cdiv(c, block_c))](
        dy, z, scale, shift, mean, invstd, sum_g, sum_gx, m, c, rows,
        BLOCK_M=block_m, BLOCK_C=block_c)
    return sum_g, sum_gx


def bn_relu_bwd(dy, z, coeffs):
    """dz (float32, channels-last) of relu(BN(z)) from dy, where it is written once
    (``kernels.common.TILES.materialize_dz``: under the interpreter)."""
    n, c, h, w = z.shape
    m = n * h * w
    dz = torch.empty(z.shape, device=z.device, dtype=torch.float32, memory_format=torch.channels_last)
    block_m, block_c = pointwise_tiles(c)
    _bn_relu_bwd_kernel[(cdiv(m, block_m), cdiv(c, block_c))](
        dy, z, *coeffs, dz, m, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return dz


def bn_relu(z, scale, shift):
    """``relu(z · scale + shift)`` per channel on a channels-last (N, C, H, W) tensor."""
    n, c, h, w = z.shape
    y = torch.empty_like(z, memory_format=torch.channels_last)
    m = n * h * w
    block_m, block_c = pointwise_tiles(c)
    _bn_relu_kernel[(cdiv(m, block_m), cdiv(c, block_c))](
        z, scale, shift, y, m, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return y
