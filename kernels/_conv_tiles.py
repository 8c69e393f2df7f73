"""Shared pieces of the grouped 3x3 conv kernels: tile choice, autotune configs, Triton helpers.

All kernels work on channels-last (NHWC) activations and view the grouped convolution as an
implicit GEMM per filter tap: for tap (kh, kw), ``acc[m, co] += x[pixel(m) + tap, ci] · w[co, ci]``,
where ``w`` is *block-diagonal* over the groups a tile covers. Packing several groups into one
tile is what lets ``tl.dot`` see K, N ≥ 16 even at 4 channels per group (ResNeXt 32x4d stage 1):
the zeros off the diagonal multiply tensor-core work, which is cheap because every ResNeXt stage
is memory-bound (see ``shared/KERNEL-NOTES.md``).
"""

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated; the launchers read this copy.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

if INTERPRET:
    from . import _interpreter_speedups  # noqa: F401  (patches Triton's interpreter on import)

# Smallest tl.dot extent the GPU compiler accepts for 16-bit operands (the interpreter accepts
# anything, which is why every tile below is clamped to it explicitly).
MIN_DOT = 16
MAX_CHANNEL_TILE = 64
# Pixel tile of the pointwise and reduction kernels. The interpreter runs programs one after
# another at a fixed Python cost per block op, so it gets far fewer, larger programs.
POINTWISE_BLOCK_M = 4096 if INTERPRET else 64


def channel_tiles(cin_per_group, cout_per_group):
    """(BLOCK_CO, BLOCK_CI) for a kernel that tiles output channels and loops over input ones.

    BLOCK_CO packs P = BLOCK_CO / cout_per_group whole groups when groups are narrow; BLOCK_CI
    then covers exactly those groups' input channels, so the loop over input channels runs once.
    """
    block_co = min(MAX_CHANNEL_TILE, max(MIN_DOT, triton.next_power_of_2(cout_per_group)))
    groups_per_tile = max(1, block_co // cout_per_group)
    block_ci = min(MAX_CHANNEL_TILE, max(MIN_DOT, triton.next_power_of_2(cin_per_group * groups_per_tile)))
    return block_co, block_ci


def pointwise_tiles(c):
    """(BLOCK_M, BLOCK_C) of the pointwise and reduction kernels over (pixels, C) tensors."""
    return POINTWISE_BLOCK_M, min(64, triton.next_power_of_2(c))


def dot_options(dtype):
    """The ``UPCAST`` and ``PRECISION`` meta-parameters of ``dot_acc`` for operands of ``dtype``.

    float32 convs use TF32 exactly when cuDNN would (``torch.backends.cudnn.allow_tf32``).
    """
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return dict(UPCAST=INTERPRET and dtype == torch.bfloat16, PRECISION="tf32" if tf32 else "ieee")


def conv_configs(interpret=INTERPRET):
    """Autotune configurations of the conv-like kernels (pixel tile, warps, pipeline stages).

    The interpreter gets a single large pixel tile: it runs programs one after another, so fewer,
    larger programs are much faster there, and one config means no benchmarking.
    """
    if interpret:
        return [triton.Config({"BLOCK_M": 8192}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
        # (256, 4, 2) was dropped: 182-255 registers and spills from 32 channels per group up
        # (triton 3.9 AOT-compiled for sm_90)
        for block_m, warps, stages in [
            (64, 4, 3), (128, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 3),
        ]
    ]


# Pixel tile × widest channel tile × element size a config may pipeline. From compiling every
# config for sm_90 (triton 3.9): past this, BLOCK_M=256 with 64-wide tiles overflowed H100's
# 227 KiB of shared memory in wgrad, and in float32 from 32-wide tiles on, or spilled registers.
TILE_BYTES_BUDGET = 16 * 1024


def config_fits(config, block_co, block_ci, elem_size):
    """Whether ``config`` is safe for channel tiles (block_co, block_ci) of elem_size-byte data."""
    return config.kwargs["BLOCK_M"] * max(block_co, block_ci) * elem_size <= TILE_BYTES_BUDGET


def prune_configs(configs, named_args, **kwargs):
    """Autotune ``early_config_prune``: keep the configs that fit (BLOCK_M=64 always does)."""
    elem_size = next(v.element_size() for v in named_args.values() if hasattr(v, "element_size"))
    fits = [c for c in configs if config_fits(c, kwargs["BLOCK_CO"], kwargs["BLOCK_CI"], elem_size)]
    return fits or configs[:1]


def shape_bucket(n):
    """Bucket the batch size for autotune keys: bounded recompiles and re-tunes across batch sizes."""
    return triton.next_power_of_2(max(int(n), 1))


def launch(kernel, grid, config, *args, **meta):
    """Launch an autotuned kernel, or force one of its configs (tests run every shipped config)."""
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                        num_stages=config.num_stages)


def min_block_m(kernel, config):
    """The pixel tile a launch will use at the smallest: sizes per-tile partial buffers."""
    if config is not None:
        return config.kwargs["BLOCK_M"]
    return min(c.kwargs["BLOCK_M"] for c in kernel.configs)


@triton.jit
def pixel_coords(offs_m, H, W):
    """(n, h, w) of flat pixel indices into an (N, H, W) grid."""
    return offs_m // (H * W), (offs_m // W) % H, offs_m % W


def even_groups(c_tiled, tiled_per_group, other_per_group, block_tiled, block_other):
    """Whether every channel tile holds whole groups whose channels on the other side fill exactly
    one tile (true for every ResNeXt width). Tile edges then need no masks and start on tile
    boundaries, which lets the compiler vectorize the channel-contiguous loads."""
    return (block_tiled % tiled_per_group == 0 and c_tiled % block_tiled == 0
            and block_tiled // tiled_per_group * other_per_group == block_other)


@triton.jit
def group_channel_range(tile_start, TILE: tl.constexpr, C_TILED, TILED_PER_GROUP, OTHER_PER_GROUP,
                        OTHER_TILE: tl.constexpr, EVEN_GROUPS: tl.constexpr):
    """The channels on the *other* side of the block-diagonal weight that a channel tile needs.

    A tile of TILE channels starting at ``tile_start`` (out of C_TILED, TILED_PER_GROUP per
    group) touches groups [g_first, g_last]; returns their channel range on the other side.
    """
    if EVEN_GROUPS:
        lo = tile_start // TILE * OTHER_TILE
        hi = lo + OTHER_TILE
    else:
        g_first = tile_start // TILED_PER_GROUP
        g_last = (tl.minimum(tile_start + TILE, C_TILED) - 1) // TILED_PER_GROUP
        lo = g_first * OTHER_PER_GROUP
        hi = (g_last + 1) * OTHER_PER_GROUP
    return lo, hi


@triton.jit
def aligned(offs, BLOCK: tl.constexpr, EVEN_GROUPS: tl.constexpr):
    """Channel offsets of a tile; with EVEN_GROUPS, promise they start on a BLOCK boundary."""
    if EVEN_GROUPS:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return offs


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += a @ b`` in float32.

    UPCAST works around Triton's interpreter, whose bfloat16 ``tl.dot`` returns garbage
    (seen with triton 3.6-3.9): there the operands are widened to float32 first, which is exact.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def bn_relu_grad(dy, z, scale, shift, k1, k0, valid):
    """Gradient w.r.t. the conv output z of ``relu(z·scale + shift)`` with BatchNorm's backward.

    Per channel, dz = scale·g + k1·z + k0 with g = dy·[z·scale + shift > 0]; k1 = k0 = 0 for
    frozen (eval-mode) BatchNorm. All float32; positions outside the tensor give exactly 0.
    """
    z = z.to(tl.float32)
    g = tl.where(z * scale[None, :] + shift[None, :] > 0, dy.to(tl.float32), 0.0)
    dz = g * scale[None, :] + z * k1[None, :] + k0[None, :]
    return tl.where(valid, dz, 0.0)
