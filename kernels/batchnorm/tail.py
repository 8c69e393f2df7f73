"""The tail of the fused ResNeXt bottleneck: y = relu(bn3(z3) + identity), forward and backward.

Both BatchNorms come folded into per-channel float32 scale/shift (scale = γ·invstd,
shift = β − mean·scale). The identity is the block input x, or, with a projection shortcut,
bn_d(z_d) of the shortcut conv's output z_d. Everything is computed in float32 and stored in the
activation dtype; tensors are channels-last (N, C, H, W), i.e. (M = N·H·W, C) row-major.

* ``_tail_fwd_kernel``: y = relu(z3·scale3 + shift3 + idn), idn = x, or z_d·scale_d + shift_d.
  One pass: reads z3 and the identity once, writes y once.
* ``_tail_bwd_kernel``: recomputes pre = z3·scale3 + shift3 + idn and writes
  g = dy·[pre > 0], the gradient at the final ReLU's input, which is at once the identity
  branch's gradient (no projection) and the gradient into BN3 and BN_d. In the same pass it
  reduces BatchNorm's backward sums per channel, float32:
  Σg, Σg·x̂3 with x̂3 = (z3 − mean3)·invstd3 and, with a projection, Σg·x̂_d.
  The sums use g in float32 before it is stored. That is the stored g exactly: g is either dy
  (already in the activation dtype) or 0, so rounding it changes nothing.
  The reduction is deterministic. Pixels are cut into a fixed number of splits (a function of M
  and the device's SM count only, as ``pointwise.bn_bwd_reduce``), each program sums its split in
  fixed BLOCK_M steps into FOLD float32 rows per channel and those into one partial per split.
  Nothing here is autotuned, so the results are bit-identical from run to run (and the same on
  every run of one device kind, not across kinds or against the interpreter).
* ``kernels.batchnorm.stats.bn_grad`` sums the partials in a fixed order and turns them into k1, k0
  with dz = scale·g + k1·z + k0, BatchNorm's input gradient. The next kernels rebuild dz from (g, z)
  as they load them, as ``kernels.common.bn_relu_grad`` does.

Limitations:
* No autotuning: the tiles are ``pointwise_tiles`` (64 pixels × up to 64 channels on the GPU)
  with 4 warps, and the splits are those of ``kernels.common.reduction_splits``. They are fixed so that the
  sums' order is fixed too. These kernels have not been timed on a GPU yet. Compiled for sm_90
  without one (triton 3.6 and 3.9, bfloat16, C = 256): 16-byte loads and stores, no spills;
  forward 64-70 registers, backward 126 (identity) and 175-181 (projection), i.e. 4 and 2
  CTAs of 4 warps per SM.
* Channel counts that are not a multiple of 16 compile to scalar 2-byte accesses (every
  ResNeXt width is a multiple of 64).
* Inputs must already be channels-last and contiguous: a silent layout copy would cost as much
  as the kernel itself, so other layouts raise ValueError.
* NaN follows PyTorch: y is NaN where pre is, and g passes dy on there (relu's backward,
  threshold_backward, zeroes only where pre <= 0).
"""

import torch
import triton
import triton.language as tl

from ..common import (DTYPES, cdiv, check_channel_vector, check_device, pointwise_tiles, reduction_splits, relu,
                      relu_grad)

NUM_WARPS = 4
# The backward's float32 sums keep FOLD partial rows per channel through the pixel loop and add
# them up once at the end. Summing each 64-pixel step down to one row instead took 12 barriers
# and 24 shuffles per step; 16 rows is what 4 warps of 4 threads per channel column span, so
# the fold stays in each thread's registers (sm_90, triton 3.9). It must divide BLOCK_M.
FOLD = 16


@triton.jit
def _tail_pre(z3, idn, scale3, shift3, scale_d, shift_d, PROJECT: tl.constexpr):
    """float32 input of the final ReLU, bn3(z3) + identity, for (BLOCK_M, BLOCK_C) tiles."""
    pre = z3.to(tl.float32) * scale3[None, :] + shift3[None, :]
    if PROJECT:
        pre += idn.to(tl.float32) * scale_d[None, :] + shift_d[None, :]
    else:
        pre += idn.to(tl.float32)
    return pre


@triton.jit
def _fold_rows(v, FOLD: tl.constexpr):
    """(FOLD, C) sums of the rows of ``v`` (BLOCK_M, C) that are equal modulo FOLD."""
    return tl.sum(tl.reshape(v, (v.shape[0] // FOLD, FOLD, v.shape[1])), axis=0)


@triton.jit
def _tail_fwd_kernel(
    z3_ptr,  # (M, C) channels-last: the input of BN3
    idn_ptr,  # (M, C) channels-last: the block input x, or z_d when PROJECT
    scale3_ptr, shift3_ptr,  # (C,) float32: folded BN3
    scale_d_ptr, shift_d_ptr,  # (C,) float32: folded BN_d, read when PROJECT
    y_ptr,  # (M, C) channels-last, the activation dtype
    M, C,
    # meta-parameters
    PROJECT: tl.constexpr,
    EVEN_C: tl.constexpr,  # C % BLOCK_C == 0: no channel masks
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: a (BLOCK_M, BLOCK_C) tile. The channel tiles of one pixel block are neighbours
    # in launch order, so programs running together read consecutive memory.
    num_c_tiles = tl.cdiv(C, BLOCK_C)
    pid_m = tl.program_id(0) // num_c_tiles
    pid_c = tl.program_id(0) % num_c_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = (offs_c < C) | EVEN_C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    scale3 = tl.load(scale3_ptr + offs_c, mask=mask_c, other=0.0)
    shift3 = tl.load(shift3_ptr + offs_c, mask=mask_c, other=0.0)
    scale_d = scale3  # placeholders, unused without PROJECT
    shift_d = shift3
    if PROJECT:
        scale_d = tl.load(scale_d_ptr + offs_c, mask=mask_c, other=0.0)
        shift_d = tl.load(shift_d_ptr + offs_c, mask=mask_c, other=0.0)
    z3 = tl.load(z3_ptr + offs, mask=mask, other=0.0)
    idn = tl.load(idn_ptr + offs, mask=mask, other=0.0)
    pre = _tail_pre(z3, idn, scale3, shift3, scale_d, shift_d, PROJECT)
    y = relu(pre)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tail_bwd_kernel(
    dy_ptr,  # (M, C) channels-last: gradient of y
    z3_ptr,  # (M, C) channels-last: the input of BN3
    idn_ptr,  # (M, C) channels-last: the block input x, or z_d when PROJECT
    scale3_ptr, shift3_ptr, mean3_ptr, invstd3_ptr,  # (C,) float32: BN3
    scale_d_ptr, shift_d_ptr, mean_d_ptr, invstd_d_ptr,  # (C,) float32: BN_d, read when PROJECT
    g_ptr,  # (M, C) channels-last, the activation dtype: dy·[pre > 0]
    part_ptr,  # (S, 3, C) float32 partials of split s: Σg, Σg·x̂3, Σg·x̂_d (row 2 when PROJECT)
    M, C, ROWS_PER_SPLIT,
    # meta-parameters
    PROJECT: tl.constexpr,
    EVEN_C: tl.constexpr,  # C % BLOCK_C == 0: no channel masks
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FOLD: tl.constexpr,
):
    # One program: BLOCK_C channels over the ROWS_PER_SPLIT consecutive pixels of one split.
    # Pixel r of each BLOCK_M step adds into partial row r % FOLD, in step order; the FOLD rows
    # are summed once at the end. The order depends only on (M, C, splits, BLOCK_M, FOLD), all
    # fixed for a given problem and device.
    num_c_tiles = tl.cdiv(C, BLOCK_C)
    pid_s = tl.program_id(0) // num_c_tiles
    offs_c = tl.program_id(0) % num_c_tiles * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = (offs_c < C) | EVEN_C
    scale3 = tl.load(scale3_ptr + offs_c, mask=mask_c, other=0.0)
    shift3 = tl.load(shift3_ptr + offs_c, mask=mask_c, other=0.0)
    mean3 = tl.load(mean3_ptr + offs_c, mask=mask_c, other=0.0)
    scale_d = scale3  # placeholders, unused without PROJECT
    shift_d = shift3
    mean_d = mean3
    if PROJECT:
        scale_d = tl.load(scale_d_ptr + offs_c, mask=mask_c, other=0.0)
        shift_d = tl.load(shift_d_ptr + offs_c, mask=mask_c, other=0.0)
        mean_d = tl.load(mean_d_ptr + offs_c, mask=mask_c, other=0.0)
    acc_g = tl.zeros((FOLD, BLOCK_C), dtype=tl.float32)
    acc_g3 = tl.zeros((FOLD, BLOCK_C), dtype=tl.float32)  # Σ g·(z3 − mean3); invstd3 applied once at the end
    acc_gd = tl.zeros((FOLD, BLOCK_C), dtype=tl.float32)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_c[None, :]
        offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
        z3 = tl.load(z3_ptr + offs, mask=mask, other=0.0)
        idn = tl.load(idn_ptr + offs, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        pre = _tail_pre(z3, idn, scale3, shift3, scale_d, shift_d, PROJECT)
        # dy·[pre > 0], written as PyTorch's threshold_backward so that a NaN pre passes dy on;
        # masked-off positions loaded dy = 0: g is 0 there and adds nothing to the sums
        g = relu_grad(dy, pre)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        acc_g += _fold_rows(g, FOLD)
        acc_g3 += _fold_rows(g * (z3.to(tl.float32) - mean3[None, :]), FOLD)
        if PROJECT:
            acc_gd += _fold_rows(g * (idn.to(tl.float32) - mean_d[None, :]), FOLD)
    acc_g = tl.sum(acc_g, axis=0)
    acc_g3 = tl.sum(acc_g3, axis=0)
    acc_gd = tl.sum(acc_gd, axis=0)
    part = part_ptr + pid_s * 3 * C + offs_c
    tl.store(part, acc_g, mask=mask_c)
    tl.store(part + C, acc_g3 * tl.load(invstd3_ptr + offs_c, mask=mask_c, other=0.0), mask=mask_c)
    if PROJECT:
        tl.store(part + 2 * C, acc_gd * tl.load(invstd_d_ptr + offs_c, mask=mask_c, other=0.0), mask=mask_c)


# ---------------------------------------------------------------------------------------------
# launchers


def _check_activation(t, name, like=None):
    """A channels-last (N, C, H, W) tensor of a supported dtype; the same as ``like`` if given."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if like is None:
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        check_device(name, t)
    else:
        if t.shape != like[1].shape:
            raise ValueError(f"{name} must have {like[0]}'s shape {tuple(like[1].shape)}, got {tuple(t.shape)}")
        if t.dtype != like[1].dtype:
            raise ValueError(f"{name} must have {like[0]}'s dtype {like[1].dtype}, got {t.dtype}")
        if t.device != like[1].device:
            raise ValueError(f"{name} is on {t.device} but {like[0]} is on {like[1].device}")
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name} must be channels-last contiguous "
                         f"(.contiguous(memory_format=torch.channels_last)), got strides {t.stride()}")


def _check_channel_vectors(vectors, z3, optional=()):
    """(C,) contiguous float32 tensors on z3's device; those named in ``optional`` may be None."""
    for name, t in vectors.items():
        if t is not None or name not in optional:
            check_channel_vector(name, t, z3.shape[1], "C", z3, "z3", contiguous=True)


def _check_projection(given):
    """The projection shortcut's BatchNorm tensors: all of them or none. Returns whether given."""
    present = [name for name, t in given.items() if t is not None]
    if present and len(present) != len(given):
        missing = [name for name in given if name not in present]
        raise ValueError(f"{', '.join(missing)} must be given with {', '.join(present)} "
                         f"(the projection shortcut's BatchNorm), or all of them left None")
    return bool(present)


def _tiles(c):
    """(BLOCK_M, BLOCK_C, EVEN_C) of both kernels."""
    block_m, block_c = pointwise_tiles(c)
    assert block_m % FOLD == 0, (block_m, FOLD)
    return block_m, block_c, c % block_c == 0


def tail_forward(z3, scale3, shift3, identity, scale_d=None, shift_d=None, check=True):
    """y = relu(z3·scale3 + shift3 + idn), idn = identity, or identity·scale_d + shift_d when the
    projection's folded BatchNorm is given (identity is then z_d). Channels-last, z3's dtype."""
    project = scale_d is not None
    if check:  # check=False: the fused bottleneck's launches, checked once at its entry
        _check_activation(z3, "z3")
        _check_activation(identity, "identity", like=("z3", z3))
        project = _check_projection({"scale_d": scale_d, "shift_d": shift_d})
        _check_channel_vectors({"scale3": scale3, "shift3": shift3, "scale_d": scale_d, "shift_d": shift_d}, z3,
                               optional=("scale_d", "shift_d"))
    n, c, h, w = z3.shape
    m = n * h * w
    y = torch.empty_like(z3, memory_format=torch.channels_last)
    if m * c == 0:
        return y
    block_m, block_c, even_c = _tiles(c)
    grid = (cdiv(m, block_m) * cdiv(c, block_c),)
    _tail_fwd_kernel[grid](
        z3, identity, scale3, shift3, scale_d if project else scale3, shift_d if project else shift3, y,
        m, c, PROJECT=project, EVEN_C=even_c, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return y


def tail_backward(dy, z3, scale3, shift3, mean3, invstd3, identity, scale_d=None, shift_d=None, mean_d=None,
                  invstd_d=None, check=True):
    """(g, partials) of y = tail_forward(z3, scale3, shift3, identity[, scale_d, shift_d]).

    g = dy·[pre > 0] in the activation dtype (channels-last); partials: (S, 3, C) float32, per pixel
    split the sums Σg, Σg·x̂3 and, with the projection's BatchNorm given, Σg·x̂_d (row 2, else left
    unwritten), x̂ = (z − mean)·invstd. ``kernels.batchnorm.stats.bn_grad(partials[:, 0],
    partials[:, 1], ...)`` finishes BN3's backward, ``(partials[:, 0], partials[:, 2], ...)`` BN_d's.
    Σg is summed from the float32 g before rounding, which equals the stored g exactly (g is dy
    or 0). Deterministic: the same bits from run to run.
    """
    project = scale_d is not None
    if check:  # check=False: the fused bottleneck's launches, checked once at its entry
        _check_activation(z3, "z3")
        _check_activation(dy, "dy", like=("z3", z3))
        _check_activation(identity, "identity", like=("z3", z3))
        project = _check_projection({"scale_d": scale_d, "shift_d": shift_d, "mean_d": mean_d, "invstd_d": invstd_d})
        _check_channel_vectors({"scale3": scale3, "shift3": shift3, "mean3": mean3, "invstd3": invstd3,
                                "scale_d": scale_d, "shift_d": shift_d, "mean_d": mean_d, "invstd_d": invstd_d}, z3,
                               optional=("scale_d", "shift_d", "mean_d", "invstd_d"))
    n, c, h, w = z3.shape
    m = n * h * w
    g = torch.empty_like(z3, memory_format=torch.channels_last)
    if m * c == 0:  # sums over no pixels
        part = torch.zeros((1, 3, c), device=z3.device, dtype=torch.float32)
    else:
        block_m, block_c, even_c = _tiles(c)
        splits = reduction_splits(m, z3.device)
        rows = cdiv(cdiv(m, splits), block_m) * block_m
        splits = cdiv(m, rows)  # no empty split
        # every entry a launch reads is written; row 2 is left empty without a projection
        part = torch.empty((splits, 3, c), device=z3.device, dtype=torch.float32)
        d = (scale_d, shift_d, mean_d, invstd_d) if project else (scale3, shift3, mean3, invstd3)
        _tail_bwd_kernel[(splits * cdiv(c, block_c),)](
            dy, z3, identity, scale3, shift3, mean3, invstd3, *d, g, part, m, c, rows,
            PROJECT=project, EVEN_C=even_c, BLOCK_M=block_m, BLOCK_C=block_c, FOLD=FOLD, num_warps=NUM_WARPS)
    return g, part
