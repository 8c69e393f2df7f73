"""Backward of the 1x1 convolution (``kernels.conv1x1.forward``) inside the fused ResNeXt bottleneck.

The gradient w.r.t. the conv output z is never stored. BatchNorm's backward is affine per output
channel, so it is rebuilt in float32 as g (the incoming gradient) and z are loaded:

    dz = scale[c]·g' + k1[c]·z + k0[c],   g' = g·[z·scale[c] + shift[c] > 0] with MASK (a ReLU
                                          followed the BN), else g' = g;

(``kernels.common.bn_relu_grad``; frozen BN has k1 = k0 = 0), then rounded to the operand
dtype of the MMA. With M = N·Ho·Wo output pixels and row m of ``a`` the input pixel
(n, STRIDE·ho, STRIDE·wo) of output pixel m (as in the forward):

* ``_dgrad_kernel``: dA[pixel(m), ci] = Σ_co dz[m, co]·w[co, ci], a GEMM over output pixels with
  K = C_out. With stride 2 the input pixels the conv did not read get exactly 0: the programs take
  the pixels of one (hi % 2, wi % 2) class each, and the three classes the conv skipped only store
  zeros, so every element of dA is written once and no memset pass is needed. dA is the gradient
  w.r.t. the conv's input ``a``; the caller applies the previous layer's ReLU / BN backward.
* ``_wgrad_kernel``: dW[co, ci] = Σ_m dz[m, co]·a[m, ci], with ``a = relu(x·in_scale + in_shift)``
  recomputed from x when PROLOGUE (the forward's prologue), else a = x. Deterministic: float32
  partials over fixed pixel splits, each summed by tl.dot over TILES.wgrad_block_k pixels at a time
  in order, then the splits summed in order (``kernels.common.sum_rows``). The pixels per dot and the
  split edges depend on the shape and the device only, never on the tuned config, so every config
  gives the same bits.

The dgrad's K tile (output channels per ``tl.dot``) is fixed by C_out for the same reason as the
forward's (``kernels.conv1x1.forward.k_tile``): dA does not depend on the config either.

Limitations: 1x1 filters with no padding, groups or bias; stride 1 or 2; g, z and x are made
channels-last first (a copy when they are not). dz is rebuilt once per input-channel tile (dA:
⌈C_in / BLOCK_N⌉ reads of g and z; dW: ⌈C_in / BLOCK_CI⌉, and x ⌈C_out / BLOCK_CO⌉ times), which
L2 absorbs at ResNeXt's widths but is not one pass. The weight gradient's partials are float32,
C_out·C_in per split (about 2 splits per SM on the GPU), summed by torch outside the kernel.
Untimed: tiles and budgets come from compiling for sm_90, not from a GPU run.
"""

import torch
import triton
import triton.language as tl

from .._autotune import autotune
from ..batchnorm.stats import LOG2_STATS_CHUNK, STATS_CHUNK, STATS_ROWS, grad_sums_partials, relu_bn_grad_epilogue
from ..common import (DTYPES, INTERPRET, MIN_DOT, TILES, bn_relu_grad, cdiv, check_channel_vector, check_device,
                      describe, dot_acc, dot_options, multiprocessors, next_power_of_2, pixel_coords, relu,
                      shape_bucket, sum_rows)
from ..configs import launch
from .forward import k_tile

# Shared memory a config may pipeline per CTA, estimated as num_stages x (the g, z and w or x
# tiles of one K step). Triton allocates num_stages - 1 such buffers plus the MMA operand staging;
# compiled for sm_90 (triton 3.6, 3.9), configs within this estimate took at most 179 KiB of
# H100's 227 KiB.
STAGE_BYTES_BUDGET = 200 * 1024
# Float32 tile elements per thread a config may hold live: the accumulator plus dz as it is rebuilt
# (and, in the weight gradient with PROLOGUE, a as it is recomputed). Compiled for sm_90 (triton 3.6
# and 3.9, 256 <-> 64/128/512 channels, every dtype), no config within them spilled (the most: 255
# registers, dW with PROLOGUE at 128x128, 8 warps); past them dA at 128 per thread (128 pixels x 64
# channels, 4 warps) and dW at 160 (128x64 with PROLOGUE, 4 warps) took 255 and spilled 8-272 bytes.
# float32 dW at 128 (128x64, 4 warps) spilled too, but its pipeline is past STAGE_BYTES_BUDGET.
DGRAD_LIVE_PER_THREAD = 96
WGRAD_LIVE_PER_THREAD = 128


def dgrad_configs(interpret=INTERPRET):
    """Autotune configurations of dA: pixel tile, input-channel tile, warps, pipeline depth."""
    if interpret:
        return [triton.Config({"BLOCK_M": 4096, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in [
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
            (128, 128, 8, 4), (64, 256, 8, 3),
        ]
    ]


def wgrad_configs(interpret=INTERPRET):
    """Autotune configurations of dW: output- and input-channel tiles, warps, pipeline depth (the
    pixels per dot are TILES.wgrad_block_k, not tuned)."""
    if interpret:
        return [triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_CO": block_co, "BLOCK_CI": block_ci}, num_warps=warps, num_stages=stages)
        for block_co, block_ci, warps, stages in [
            (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
            (128, 128, 8, 4), (64, 256, 8, 3),
        ]
    ]


def _fits(configs, limits, stage_bytes, live, budget):
    """The configs whose channel tiles are no wider than ``limits``, whose pipeline buffers fit
    STAGE_BYTES_BUDGET and whose live float32 elements per thread fit ``budget``; the first
    config (the smallest) always survives."""
    def fits(c):
        k = c.kwargs
        return (all(k[name] <= lim for name, lim in limits.items())
                and c.num_stages * stage_bytes(k) <= STAGE_BYTES_BUDGET
                and live(k) <= budget * 32 * c.num_warps)
    return [c for c in configs if fits(c)] or configs[:1]


def _tile_limit(c):
    """Widest useful channel tile for c channels (64 at least: narrower tiles are not offered)."""
    return max(64, next_power_of_2(c))


def prune_dgrad_configs(configs, named_args, **kwargs):
    """Autotune ``early_config_prune`` of dA: per stage, g and z (BLOCK_M x BLOCK_K) and w."""
    elem, bk = named_args["g_ptr"].element_size(), kwargs["BLOCK_K"]
    return _fits(configs, {"BLOCK_N": _tile_limit(named_args["C_in"])},
                 lambda k: (2 * k["BLOCK_M"] + k["BLOCK_N"]) * bk * elem,
                 lambda k: k["BLOCK_M"] * (k["BLOCK_N"] + bk), DGRAD_LIVE_PER_THREAD)


def prune_wgrad_configs(configs, named_args, **kwargs):
    """Autotune ``early_config_prune`` of dW: per stage, g and z (BLOCK_K x BLOCK_CO) and x."""
    elem, bk, prologue = named_args["x_ptr"].element_size(), kwargs["BLOCK_K"], kwargs["PROLOGUE"]
    limits = {"BLOCK_CO": _tile_limit(named_args["C_out"]), "BLOCK_CI": _tile_limit(named_args["C_in"])}
    return _fits(configs, limits, lambda k: (2 * k["BLOCK_CO"] + k["BLOCK_CI"]) * bk * elem,
                 lambda k: (k["BLOCK_CO"] * (k["BLOCK_CI"] + bk) + bool(prologue) * bk * k["BLOCK_CI"]),
                 WGRAD_LIVE_PER_THREAD)


@triton.jit
def _load_dz(g_ptr, z_ptr, offs, valid, scale, shift, k1, k0, MASK: tl.constexpr):
    """float32 dz at ``offs`` rebuilt from (g, z); exactly 0 where not ``valid``."""
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    z = tl.load(z_ptr + offs, mask=valid, other=0.0)
    if MASK:
        dz = bn_relu_grad(g, z, scale, shift, k1, k0, valid)
    else:
        dz = tl.where(valid, g.to(tl.float32) * scale[None, :] + z.to(tl.float32) * k1[None, :] + k0[None, :],
                      0.0)
    return dz


@autotune(dgrad_configs, prune_configs_by={"early_config_prune": prune_dgrad_configs},
          key=["M_BUCKET", "C_in", "C_out", "STRIDE", "MASK", "RESIDUAL", "RELU_BN", "PRECISION"])
@triton.heuristics({"EVEN_K": lambda args: args["C_out"] % args["BLOCK_K"] == 0,
                    "EVEN_N": lambda args: args["C_in"] % args["BLOCK_N"] == 0})
@triton.jit
def _dgrad_kernel(
    g_ptr, z_ptr,  # (N, Ho, Wo, C_out) channels-last
    w_ptr,  # (C_out, C_in)
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C_out,) float32 coefficients of dz
    da_ptr,  # (N, H, W, C_in) channels-last, w's dtype
    res_ptr,  # (N, H, W, C_in) channels-last, added to dA when RESIDUAL
    zin_ptr,  # (N, H, W, C_in) channels-last: a = relu(zin·in_scale + in_shift), read when RELU_BN
    in_scale_ptr, in_shift_ptr, in_mean_ptr, in_invstd_ptr,  # (C_in,) float32, read when RELU_BN
    sum_g_ptr, sum_gx_ptr,  # (⌈M / STATS_ROWS⌉, C_in) float32 partials, written when RELU_BN
    H, W, Ho, Wo, M, C_in, C_out,
    STRIDE: tl.constexpr,  # 1 or 2
    M_BUCKET,  # autotune key only
    # meta-parameters
    MASK: tl.constexpr, RESIDUAL: tl.constexpr,
    RELU_BN: tl.constexpr,  # epilogue: ReLU mask of the BN below, and its backward sums (stride 1)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_M pixels of one stride class × BLOCK_N input channels. Class 0 (every
    # pixel at stride 1) is the set of pixels the conv read: pixel (n, i, j) of the Ho x Wo grid is
    # input pixel (n, STRIDE·i, STRIDE·j) and output pixel m; classes 1-3 (stride 2) store zeros.
    cls = tl.program_id(1)
    num_n_tiles = tl.cdiv(C_in, BLOCK_N)
    pid_m = tl.program_id(0) // num_n_tiles
    pid_n = tl.program_id(0) % num_n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < C_in) | EVEN_N
    if STRIDE == 1:
        mask_m = offs_m < M
        pix = offs_m.to(tl.int64)
        num_k = tl.cdiv(C_out, BLOCK_K)
    else:
        n, i, j = pixel_coords(offs_m, Ho, Wo)
        hi = i * STRIDE + cls // STRIDE
        wi = j * STRIDE + cls % STRIDE
        mask_m = (offs_m < M) & (hi < H) & (wi < W)
        pix = ((n * H + hi) * W + wi).to(tl.int64)
        num_k = tl.cdiv(C_out, BLOCK_K) * (cls == 0).to(tl.int32)  # no K steps: zeros
    dz_rows = offs_m.to(tl.int64)[:, None] * C_out
    w_cols = w_ptr + offs_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, num_k):
        offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            offs_k = tl.max_contiguous(tl.multiple_of(offs_k, BLOCK_K), BLOCK_K)
        mask_k = (offs_k < C_out) | EVEN_K
        # channels past C_out: every coefficient is 0, so dz is 0 there
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
        k1 = tl.load(k1_ptr + offs_k, mask=mask_k, other=0.0)
        k0 = tl.load(k0_ptr + offs_k, mask=mask_k, other=0.0)
        dz = _load_dz(g_ptr, z_ptr, dz_rows + offs_k[None, :], mask_m[:, None] & mask_k[None, :],
                      scale, shift, k1, k0, MASK)
        b = tl.load(w_cols + offs_k[:, None].to(tl.int64) * C_in, mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        acc = dot_acc(dz.to(w_ptr.dtype.element_ty), b, acc, UPCAST, PRECISION)

    da_offs = pix[:, None] * C_in + offs_n[None, :]
    valid = mask_m[:, None] & mask_n[None, :]
    if RESIDUAL:  # the other branch's gradient w.r.t. the same input (the bottleneck's shortcut)
        acc += tl.load(res_ptr + da_offs, mask=valid, other=0.0).to(tl.float32)
    if RELU_BN:  # STRIDE == 1: output pixel m is input pixel m, so chunks are runs of STATS_ROWS pixels
        acc = relu_bn_grad_epilogue(acc, zin_ptr, da_offs, valid, offs_n, mask_n, in_scale_ptr, in_shift_ptr,
                                    in_mean_ptr, in_invstd_ptr, sum_g_ptr, sum_gx_ptr,
                                    pid_m * (BLOCK_M // STATS_CHUNK), tl.cdiv(M, STATS_CHUNK), C_in,
                                    da_ptr.dtype.element_ty, STATS_CHUNK, LOG2_STATS_CHUNK)
    tl.store(da_ptr + da_offs, acc.to(da_ptr.dtype.element_ty), mask=valid)


@autotune(wgrad_configs, prune_configs_by={"early_config_prune": prune_wgrad_configs},
          key=["M_BUCKET", "C_in", "C_out", "STRIDE", "MASK", "PROLOGUE", "PRECISION"])
@triton.heuristics({"EVEN_CO": lambda args: args["C_out"] % args["BLOCK_CO"] == 0,
                    "EVEN_CI": lambda args: args["C_in"] % args["BLOCK_CI"] == 0})
@triton.jit
def _wgrad_kernel(
    x_ptr,  # (N, H, W, C_in) channels-last
    g_ptr, z_ptr,  # (N, Ho, Wo, C_out) channels-last
    scale_ptr, shift_ptr, k1_ptr, k0_ptr,  # (C_out,) float32 coefficients of dz
    in_scale_ptr, in_shift_ptr,  # (C_in,) float32, read when PROLOGUE
    dw_part_ptr,  # (S, C_out, C_in) float32 partials, one slice per pixel split
    H, W, Ho, Wo, M, C_in, C_out,
    ROWS_PER_SPLIT,  # a multiple of BLOCK_K
    STRIDE: tl.constexpr,  # 1 or 2
    M_BUCKET,  # autotune key only
    # meta-parameters
    MASK: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_K: tl.constexpr,  # pixels per dot: fixed (TILES.wgrad_block_k), so the sums' order is too
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    EVEN_CO: tl.constexpr, EVEN_CI: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: pixel split s × BLOCK_CO output channels × BLOCK_CI input channels,
    # acc[co, ci] = Σ_m dz[m, co]·a[m, ci] over the split in BLOCK_K steps. Channel tiles vary
    # fastest, so programs reading the same pixels run together (L2 hits).
    num_ci_tiles = tl.cdiv(C_in, BLOCK_CI)
    tiles = tl.cdiv(C_out, BLOCK_CO) * num_ci_tiles
    pid_s = tl.program_id(0) // tiles
    pid_co = tl.program_id(0) % tiles // num_ci_tiles
    pid_ci = tl.program_id(0) % num_ci_tiles
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    if EVEN_CO:
        offs_co = tl.max_contiguous(tl.multiple_of(offs_co, BLOCK_CO), BLOCK_CO)
    if EVEN_CI:
        offs_ci = tl.max_contiguous(tl.multiple_of(offs_ci, BLOCK_CI), BLOCK_CI)
    mask_co = (offs_co < C_out) | EVEN_CO
    mask_ci = (offs_ci < C_in) | EVEN_CI
    scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0)
    shift = tl.load(shift_ptr + offs_co, mask=mask_co, other=0.0)
    k1 = tl.load(k1_ptr + offs_co, mask=mask_co, other=0.0)
    k0 = tl.load(k0_ptr + offs_co, mask=mask_co, other=0.0)
    if PROLOGUE:
        in_scale = tl.load(in_scale_ptr + offs_ci, mask=mask_ci, other=0.0)
        in_shift = tl.load(in_shift_ptr + offs_ci, mask=mask_ci, other=0.0)

    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for m_start in range(row_start, row_end, BLOCK_K):
        offs_m = m_start + tl.arange(0, BLOCK_K)
        mask_m = offs_m < row_end
        # dz is 0 on rows past the split, so a's rows there need no masking after the prologue
        dz = _load_dz(g_ptr, z_ptr, offs_m.to(tl.int64)[:, None] * C_out + offs_co[None, :],
                      mask_m[:, None] & mask_co[None, :], scale, shift, k1, k0, MASK)
        if STRIDE == 1:
            pix = offs_m.to(tl.int64)
        else:
            n, ho, wo = pixel_coords(offs_m, Ho, Wo)
            pix = ((n * H + ho * STRIDE) * W + wo * STRIDE).to(tl.int64)
        a = tl.load(x_ptr + pix[:, None] * C_in + offs_ci[None, :], mask=mask_m[:, None] & mask_ci[None, :],
                    other=0.0)
        if PROLOGUE:  # as the forward: in float32, rounded to the operand dtype
            a = relu(a.to(tl.float32) * in_scale[None, :] + in_shift[None, :])
            a = a.to(x_ptr.dtype.element_ty)
        acc = dot_acc(tl.trans(dz.to(x_ptr.dtype.element_ty)), a, acc, UPCAST, PRECISION)

    part = dw_part_ptr + pid_s.to(tl.int64) * C_out * C_in
    tl.store(part + offs_co[:, None] * C_in + offs_ci[None, :], acc, mask=mask_co[:, None] & mask_ci[None, :])


def wgrad_splits(m, c_out, c_in, device):
    """Pixel splits of the weight gradient: about two programs per SM at the widest channel tile
    (128 x 128), each split at least TILES.min_split_rows pixels. A function of the problem and the
    device only, so results are bit-identical from run to run and config to config."""
    if not TILES.gpu_configs:  # the interpreter's programs run one after another
        target = 4
    else:
        target = max(1, 2 * multiprocessors(device) // (cdiv(c_out, 128) * cdiv(c_in, 128)))
    return max(1, min(target, cdiv(m, TILES.min_split_rows)))


def _check_activation(name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor, got {describe(t)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    check_device(name, t)


def _check_like(name, t, ref, ref_name, shape=None):
    """``t`` is a tensor of ``ref``'s dtype and device, and of ``shape`` when given."""
    if not isinstance(t, torch.Tensor) or (shape is not None and tuple(t.shape) != tuple(shape)):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {describe(t)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_common(g, z, coeffs, stride, mask, config, tiles):
    """Checks shared by both launchers: g, z, coeffs, stride, mask, config."""
    _check_activation("g", g)
    if g.shape[1] == 0:
        raise ValueError(f"g has no channels (shape {tuple(g.shape)})")
    _check_like("z", z, g, "g", g.shape)
    if not isinstance(coeffs, (tuple, list)) or len(coeffs) != 4:
        raise ValueError(f"coeffs must be (scale, shift, k1, k0), got {describe(coeffs)}")
    for name, t in zip(("scale", "shift", "k1", "k0"), coeffs):
        check_channel_vector(f"coeffs ({name})", t, g.shape[1], "C_out", g, "g")
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if not isinstance(mask, bool):
        raise ValueError(f"mask must be a bool, got {type(mask).__name__}")
    def tile_ok(v):  # tl.arange needs a power of two, the GPU's tl.dot at least MIN_DOT
        return isinstance(v, int) and v >= MIN_DOT and v & (v - 1) == 0
    if config is not None and not (isinstance(config, triton.Config)
                                   and all(tile_ok(config.kwargs.get(k)) for k in tiles)):
        raise ValueError(f"config must be None or a triton.Config setting {' and '.join(tiles)} (powers "
                         f"of two >= {MIN_DOT}), got {getattr(config, 'kwargs', type(config).__name__)}")


def _check_spatial(x_shape, g, stride, name):
    """g's (N, Ho, Wo) are what a stride-``stride`` 1x1 conv makes of input ``x_shape``."""
    n, _, h, w = x_shape
    expected = (n, g.shape[1], (h - 1) // stride + 1, (w - 1) // stride + 1)
    if h < 1 or w < 1 or tuple(g.shape) != expected:
        raise ValueError(f"{name} {tuple(x_shape)} does not match g {tuple(g.shape)} at stride {stride}: "
                         f"g must be {expected}")


def _channels_last(*ts):
    return [t.contiguous(memory_format=torch.channels_last) for t in ts]


def _check_dgrad(g, z, weight, coeffs, x_shape, stride, mask, residual, relu_bn, config):
    _check_common(g, z, coeffs, stride, mask, config, ("BLOCK_M", "BLOCK_N"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[0] != g.shape[1] \
            or tuple(weight.shape[2:]) != (1, 1) or weight.shape[1] == 0:
        raise ValueError(f"weight must be (C_out={g.shape[1]}, C_in >= 1, 1, 1), got {describe(weight)}")
    _check_like("weight", weight, g, "g")
    if not (isinstance(x_shape, (tuple, list, torch.Size)) and len(x_shape) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in x_shape)):
        raise ValueError(f"x_shape must be 4 ints (N, C_in, H, W), got {x_shape!r}")
    if x_shape[1] != weight.shape[1]:
        raise ValueError(f"x_shape has C_in={x_shape[1]} but weight has C_in={weight.shape[1]}")
    _check_spatial(x_shape, g, stride, "x_shape")
    c_in = x_shape[1]
    if residual is not None:
        _check_like("residual", residual, g, "g", x_shape)
    if relu_bn is not None:
        if stride != 1:
            raise ValueError(f"relu_bn needs stride 1 (its sums run over output pixels), got stride {stride}")
        if not isinstance(relu_bn, (tuple, list)) or len(relu_bn) != 5:
            raise ValueError(f"relu_bn must be (z_in, scale, shift, mean, invstd), got {describe(relu_bn)}")
        _check_like("relu_bn (z_in)", relu_bn[0], g, "g", x_shape)
        for name, t in zip(("scale", "shift", "mean", "invstd"), relu_bn[1:]):
            check_channel_vector(f"relu_bn ({name})", t, c_in, "C_in", g, "g")


def conv1x1_dgrad(g, z, weight, coeffs, x_shape, stride=1, *, mask=True, residual=None, relu_bn=None,
                  config=None, check=True):
    """dA (N, C_in, H, W), channels-last in weight's dtype: the gradient w.r.t. the input ``a`` of
    z = conv2d(a, weight, stride=stride), dz rebuilt from (g, z) and ``coeffs = (scale, shift, k1,
    k0)`` (float32, (C_out,)) as in the module docstring, with the ReLU mask when ``mask``.

    g, z: (N, C_out, Ho, Wo), one dtype; weight: (C_out, C_in, 1, 1) of that dtype; x_shape:
    (N, C_in, H, W). Input pixels the conv did not read (stride 2) get 0. ``config`` forces one
    triton.Config (BLOCK_M, BLOCK_N) instead of autotuning (tests).

    Epilogues, in float32 before dA is rounded:
    * ``residual`` (N, C_in, H, W) of g's dtype is added (the bottleneck's shortcut gradient);
    * ``relu_bn = (z_in, scale, shift, mean, invstd)`` says the conv read a = relu(z_in·scale +
      shift), BatchNorm + ReLU of z_in (N, C_in, H, W) with batch ``mean``/``invstd`` (float32,
      (C_in,)); stride 1 only. dA then carries that ReLU's mask, and the call returns
      ``(dA, (Σg, Σg·x̂))``: the per-chunk partials, (chunks, C_in) float32 each, of BatchNorm's
      backward sums (``kernels.batchnorm.stats.relu_bn_grad_epilogue``), which
      ``kernels.batchnorm.stats.bn_grad`` finishes.

    ``check=False`` skips the input checks (the fused bottleneck's launches, checked once at its entry).
    """
    if check:
        _check_dgrad(g, z, weight, coeffs, x_shape, stride, mask, residual, relu_bn, config)
    n, c_in, h, w = x_shape
    _, c_out, ho, wo = g.shape
    da = torch.empty((n, c_in, h, w), device=g.device, dtype=weight.dtype, memory_format=torch.channels_last)
    m = n * ho * wo
    sums = grad_sums_partials(cdiv(m, STATS_ROWS), c_in, g.device) if relu_bn is not None else None
    if m == 0:
        return da if sums is None else (da, sums)
    g, z = _channels_last(g, z)
    w2d = weight.reshape(c_out, c_in).contiguous()
    res = _channels_last(residual)[0] if residual is not None else da
    if relu_bn is not None:
        z_in, *vectors = relu_bn
        epilogue = [_channels_last(z_in)[0], *(v.contiguous() for v in vectors), *sums]
    else:
        epilogue = [da] + [coeffs[0]] * 6

    def grid(meta):  # axis 1: the stride classes (hi % 2, wi % 2)
        return cdiv(m, meta["BLOCK_M"]) * cdiv(c_in, meta["BLOCK_N"]), stride * stride
    launch(
        _dgrad_kernel, grid, config,
        g, z, w2d, *(c.contiguous() for c in coeffs), da, res, *epilogue, h, w, ho, wo, m, c_in, c_out, stride,
        shape_bucket(m), MASK=mask, RESIDUAL=residual is not None, RELU_BN=relu_bn is not None,
        BLOCK_K=k_tile(c_out), **dot_options(weight.dtype),
    )
    return da if sums is None else (da, sums)


def _check_wgrad(x, g, z, coeffs, weight_shape, stride, mask, in_scale, in_shift, config):
    _check_activation("x", x)
    _check_common(g, z, coeffs, stride, mask, config, ("BLOCK_CO", "BLOCK_CI"))
    _check_like("g", g, x, "x")
    c_in, c_out = x.shape[1], g.shape[1]
    if c_in == 0:
        raise ValueError(f"x has no input channels (shape {tuple(x.shape)})")
    if not (isinstance(weight_shape, (tuple, list, torch.Size))
            and tuple(weight_shape) == (c_out, c_in, 1, 1)):
        raise ValueError(f"weight_shape must be (C_out={c_out}, C_in={c_in}, 1, 1), got {weight_shape!r}")
    _check_spatial(x.shape, g, stride, "x of shape")
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together (the prologue needs both)")
    if in_scale is not None:
        check_channel_vector("in_scale", in_scale, c_in, "C_in", x, "x")
        check_channel_vector("in_shift", in_shift, c_in, "C_in", x, "x")


def conv1x1_wgrad(x, g, z, coeffs, weight_shape, stride=1, *, mask=True, in_scale=None, in_shift=None,
                  config=None, check=True):
    """dW (C_out, C_in, 1, 1) in x's dtype of z = conv2d(a, W, stride=stride), with a = x, or
    relu(x · in_scale + in_shift) per input channel when in_scale/in_shift are given (recomputed,
    as the forward's prologue), and dz rebuilt from (g, z, coeffs) as in ``conv1x1_dgrad``.

    x: (N, C_in, H, W); g, z: (N, C_out, Ho, Wo) of x's dtype. Float32 partials per fixed pixel
    split, summed in a fixed order: the same bits whatever ``config`` (BLOCK_CO, BLOCK_CI) runs.
    ``check=False`` skips the input checks (as ``conv1x1_dgrad``'s).
    """
    if check:
        _check_wgrad(x, g, z, coeffs, weight_shape, stride, mask, in_scale, in_shift, config)
    n, c_in, h, w = x.shape
    c_out = g.shape[1]
    prologue = in_scale is not None
    ho, wo = g.shape[2:]
    m = n * ho * wo
    if m == 0:  # a sum over no pixels
        return torch.zeros((c_out, c_in, 1, 1), device=x.device, dtype=x.dtype)
    x, g, z = _channels_last(x, g, z)
    splits = wgrad_splits(m, c_out, c_in, x.device)
    block_k = TILES.wgrad_block_k
    rows = cdiv(cdiv(m, splits), block_k) * block_k
    splits = cdiv(m, rows)  # no empty split
    # every entry is written: each split covers every (co, ci) tile
    dw_part = torch.empty((splits, c_out, c_in), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (splits * cdiv(c_out, meta["BLOCK_CO"]) * cdiv(c_in, meta["BLOCK_CI"]),)
    coeffs = [c.contiguous() for c in coeffs]
    launch(
        _wgrad_kernel, grid, config,
        x, g, z, *coeffs, in_scale.contiguous() if prologue else coeffs[0],
        in_shift.contiguous() if prologue else coeffs[0], dw_part,
        h, w, ho, wo, m, c_in, c_out, rows, stride, shape_bucket(m),
        MASK=mask, PROLOGUE=prologue, BLOCK_K=block_k, **dot_options(x.dtype),
    )
    return sum_rows(dw_part, x.dtype).view(c_out, c_in, 1, 1)
