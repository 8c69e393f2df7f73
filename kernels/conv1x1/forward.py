"""1x1 convolution as a channels-last GEMM, forward only: the first building block of the fused
ResNeXt bottleneck (conv1x1 → BN → ReLU → grouped conv3x3 → BN → ReLU → conv1x1 → BN → add →
ReLU).

With M = N·Ho·Wo output pixels, ``z[m, co] = Σ_ci a[m, ci] · w[co, ci]``, where row m of ``a`` is
the input pixel (n, STRIDE·ho, STRIDE·wo) of output pixel (n, ho, wo): a GEMM whose A operand is
strided rows of the NHWC activation (contiguous rows at stride 1). Accumulation is float32
(``tl.dot``); z is stored channels-last in the activation dtype. Two optional fusions:

* prologue (PROLOGUE): ``a = relu(x · in_scale[ci] + in_shift[ci])`` as x is loaded, in float32,
  then rounded to the dot operand dtype: the previous layer's BatchNorm + ReLU, folded into a
  per-channel scale/shift by ``kernels.batchnorm.stats.bn_stats``, never written to memory;
* statistics epilogue (COMPUTE_STATS): float32 (mean, M2) of z per chunk of STATS_ROWS pixels and
  per channel (``kernels.batchnorm.stats.chunk_stats``; of z as stored, i.e. after rounding to half
  precision, as ``kernels.conv3x3.forward`` does), which ``bn_stats`` merges into this layer's BatchNorm.

The K tile (input channels per ``tl.dot``) is fixed by C_in, not tuned: it fixes the order in which
each z element's float32 sum is formed, so that z and its statistics do not depend on which
config autotuning picks (under the interpreter numpy's matmul sums each K tile as one block: 80
channels as one tile or as 64 + 16 differ in the last bits). Pixel and channel tiles leave each
sum's order alone: bit-identical under the interpreter, and on a GPU if its MMA chain over K steps
is (``test_every_shipped_config`` checks it there).

Limitations: forward only; 1x1 filters with no padding, groups or bias; stride 1 or 2; x is made
channels-last first (a copy when it is not).
"""

import torch
import triton
import triton.language as tl

from .._autotune import autotune
from ..batchnorm.stats import LOG2_STATS_CHUNK, STATS_CHUNK, STATS_ROWS, chunk_stats, partials
from ..common import (DTYPES, INTERPRET, MIN_DOT, cdiv, check_channel_vector, check_device, describe, dot_acc,
                      dot_options, next_power_of_2, pixel_coords, relu, shape_bucket)
from ..configs import launch


MAX_BLOCK_K = 64
# Shared memory a config may pipeline, (BLOCK_M + BLOCK_N) · BLOCK_K · element size per stage:
# H100 allows 227 KiB per CTA; the rest is left to the epilogue's layout conversions.
STAGE_BYTES_BUDGET = 160 * 1024
# Float32 accumulator elements per thread, BLOCK_M · BLOCK_N / (32 · num_warps), a config may hold.
# Compiled for sm_90 (C_in = 256, every dtype): at 128 per thread the statistics epilogue took 255
# registers and spilled 8-660 bytes (triton 3.9), 760-2170 (3.6); at 64 it took at most 254, no
# spills. Without statistics, 128 per thread took at most 252 registers, no spills (both).
ACC_PER_THREAD_BUDGET = {False: 128, True: 64}  # by COMPUTE_STATS


def k_tile(c_in):
    """Input channels per ``tl.dot`` (see the module docstring: fixed by the shape, not tuned)."""
    return min(MAX_BLOCK_K, max(MIN_DOT, next_power_of_2(c_in)))


def conv1x1_configs(interpret=INTERPRET):
    """Autotune configurations: pixel tile (a multiple of STATS_ROWS, so statistics chunks are
    whole), output-channel tile, warps, pipeline depth. The interpreter gets one large tile: it runs
    programs one after another at a fixed cost per block op (and one config means no tuning)."""
    if interpret:
        return [triton.Config({"BLOCK_M": 4096, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in [
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 4, 3),
            (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4),
        ]
    ]


def prune_configs(configs, named_args, **kwargs):
    """Autotune ``early_config_prune``: drop output-channel tiles wider than C_out needs,
    pipelines past STAGE_BYTES_BUDGET and accumulators past ACC_PER_THREAD_BUDGET; the first
    config (the smallest) always survives."""
    elem_size = named_args["x_ptr"].element_size()
    n_tile = max(MIN_DOT, next_power_of_2(named_args["C_out"]))
    block_k, acc_budget = kwargs["BLOCK_K"], ACC_PER_THREAD_BUDGET[bool(kwargs["COMPUTE_STATS"])]

    def fits(c):
        block_m, block_n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (block_n <= max(64, n_tile)
                and c.num_stages * (block_m + block_n) * block_k * elem_size <= STAGE_BYTES_BUDGET
                and block_m * block_n <= acc_budget * 32 * c.num_warps)

    return [c for c in configs if fits(c)] or configs[:1]


@autotune(conv1x1_configs, prune_configs_by={"early_config_prune": prune_configs},
          key=["M_BUCKET", "C_in", "C_out", "STRIDE", "PROLOGUE", "COMPUTE_STATS", "PRECISION"])
@triton.heuristics({"EVEN_K": lambda args: args["C_in"] % args["BLOCK_K"] == 0,
                    "EVEN_N": lambda args: args["C_out"] % args["BLOCK_N"] == 0})
@triton.jit
def _conv1x1_kernel(
    x_ptr,  # (N, H, W, C_in) channels-last
    w_ptr,  # (C_out, C_in)
    in_scale_ptr, in_shift_ptr,  # (C_in,) float32, read when PROLOGUE
    z_ptr,  # (N, Ho, Wo, C_out) channels-last, x's dtype
    mean_part_ptr, m2_part_ptr,  # (⌈M / STATS_ROWS⌉, C_out) float32 per-chunk statistics of z
    H, W, Ho, Wo, M, C_in, C_out,
    STRIDE: tl.constexpr,  # 1 or 2; constexpr so that stride 1 reads rows without index maths
    M_BUCKET,  # autotune key only
    # meta-parameters
    PROLOGUE: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_M output pixels × BLOCK_N output channels, over all C_in in BLOCK_K steps.
    # channel tiles vary fastest so that programs reading the same pixels run together (L2 hits)
    num_n_tiles = tl.cdiv(C_out, BLOCK_N)
    pid_m = tl.program_id(0) // num_n_tiles
    pid_n = tl.program_id(0) % num_n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if STRIDE == 1:
        pix = offs_m.to(tl.int64)
    else:
        n, ho, wo = pixel_coords(offs_m, Ho, Wo)
        pix = ((n * H + ho * STRIDE) * W + wo * STRIDE).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < C_out) | EVEN_N
    x_rows = x_ptr + pix[:, None] * C_in
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * C_in

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, C_in, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            offs_k = tl.max_contiguous(tl.multiple_of(offs_k, BLOCK_K), BLOCK_K)
        mask_k = (offs_k < C_in) | EVEN_K
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if PROLOGUE:
            # channels past C_in come out exactly 0 (scale = shift = 0); rows past M do not (relu
            # of the shift), which the statistics below mask
            scale = tl.load(in_scale_ptr + offs_k, mask=mask_k, other=0.0)
            shift = tl.load(in_shift_ptr + offs_k, mask=mask_k, other=0.0)
            a = relu(a.to(tl.float32) * scale[None, :] + shift[None, :])
            a = a.to(x_ptr.dtype.element_ty)
        b = tl.load(w_cols + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(a, b, acc, UPCAST, PRECISION)

    # z is stored before the statistics are formed: the other way round kept acc live through
    # chunk_stats, which spilled (255 registers at BLOCK_M=128, 8 warps: sm_90, triton 3.6)
    z = acc.to(z_ptr.dtype.element_ty)
    z_offs = offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    tl.store(z_ptr + z_offs, z, mask=mask_m[:, None] & mask_n[None, :])
    if COMPUTE_STATS:
        # statistics of z as stored, so that normalising the stored z is self-consistent (as in
        # PyTorch); rows past M must be exact zeros for chunk_stats
        zs = z.to(tl.float32)
        if PROLOGUE:
            zs = tl.where(mask_m[:, None], zs, 0.0)
        mean, m2 = chunk_stats(zs, mask_m, M - pid_m * BLOCK_M, STATS_CHUNK, LOG2_STATS_CHUNK)
        offs_t = pid_m * (BLOCK_M // STATS_CHUNK) + tl.arange(0, BLOCK_M // STATS_CHUNK)
        part = offs_t[:, None] * C_out + offs_n[None, :]
        keep = (offs_t * STATS_CHUNK < M)[:, None] & mask_n[None, :]
        tl.store(mean_part_ptr + part, mean, mask=keep)
        tl.store(m2_part_ptr + part, m2, mask=keep)


def _check_inputs(x, weight, stride, in_scale, in_shift, config):
    """Raise ValueError naming the argument for anything the kernel does not compute."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C_in, H, W), got {describe(x)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    check_device("x", x)
    c_in = x.shape[1]
    if c_in == 0:
        raise ValueError(f"x has no input channels (shape {tuple(x.shape)})")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != (c_in, 1, 1):
        raise ValueError(f"weight must be (C_out, C_in={c_in}, 1, 1), got {describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no output channels (C_out must be >= 1)")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together (the prologue needs both)")
    for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t is not None:
            check_channel_vector(name, t, c_in, "C_in", x, "x")
    if config is not None and not isinstance(config, triton.Config):
        raise ValueError(f"config must be a triton.Config or None, got {type(config).__name__}")
    if config is not None:
        block_m, block_n = config.kwargs.get("BLOCK_M"), config.kwargs.get("BLOCK_N")
        if not (isinstance(block_m, int) and block_m % STATS_ROWS == 0 and isinstance(block_n, int)):
            raise ValueError(f"config must set BLOCK_M (a multiple of {STATS_ROWS}) and BLOCK_N, "
                             f"got {config.kwargs}")


def conv1x1_forward(x, weight, stride=1, *, in_scale=None, in_shift=None, compute_stats=False, config=None,
                    check=True):
    """z = conv2d(a, weight, stride=stride) with a = x, or relu(x · in_scale + in_shift) per input
    channel when in_scale/in_shift are given. Returns (z, partials or None).

    x: (N, C_in, H, W), made channels-last if it is not; weight: (C_out, C_in, 1, 1), x's dtype.
    z: (N, C_out, Ho, Wo) channels-last in x's dtype, Ho = ⌈H / stride⌉. ``partials`` (when
    ``compute_stats``): the per-chunk (mean, M2) of z that ``kernels.batchnorm.stats.bn_stats`` merges, for
    ``count = N·Ho·Wo``. ``config`` forces one triton.Config instead of autotuning (tests).
    """
    if check:  # check=False: the fused bottleneck's launches, checked once at its entry
        _check_inputs(x, weight, stride, in_scale, in_shift, config)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    w2d = weight.reshape(c_out, c_in).contiguous()
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    m = n * ho * wo
    z = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    stats = partials(m, c_out, x.device) if compute_stats else None
    if m == 0:  # an empty batch: nothing to compute (its statistics have no rows)
        return z, stats
    prologue = in_scale is not None
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    mean_part, m2_part = stats if compute_stats else (dummy, dummy)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(c_out, meta["BLOCK_N"]),)  # noqa: E731
    launch(
        _conv1x1_kernel, grid, config,
        x, w2d, in_scale.contiguous() if prologue else dummy, in_shift.contiguous() if prologue else dummy,
        z, mean_part, m2_part, h, w, ho, wo, m, c_in, c_out, stride, shape_bucket(m),
        PROLOGUE=prologue, COMPUTE_STATS=bool(compute_stats), BLOCK_K=k_tile(c_in), **dot_options(x.dtype),
    )
    return z, stats
