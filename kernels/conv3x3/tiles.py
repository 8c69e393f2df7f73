"""Shared pieces of the grouped 3x3 conv kernels: tile choice, autotune configs and their budgets,
the channel ranges of block-diagonal weight tiles.

All kernels work on channels-last (NHWC) activations and view the grouped convolution as an
implicit GEMM per filter tap: for tap (kh, kw), ``acc[m, co] += x[pixel(m) + tap, ci] · w[co, ci]``,
where ``w`` is *block-diagonal* over the groups a tile covers. Packing several groups into one
tile is what lets ``tl.dot`` see K, N ≥ 16 even at 4 channels per group (ResNeXt 32x4d stage 1):
the zeros off the diagonal multiply tensor-core work, which is cheap because every ResNeXt stage
is memory-bound (see ``shared/KERNEL-NOTES.md``).
"""

import triton
import triton.language as tl

from ..common import INTERPRET, MIN_DOT, TILES, next_power_of_2
from ..configs import triton_release

MAX_CHANNEL_TILE = 64


def channel_tiles(cin_per_group, cout_per_group):
    """(BLOCK_CO, BLOCK_CI) for a kernel that tiles output channels and loops over input ones.

    BLOCK_CO packs P = BLOCK_CO / cout_per_group whole groups when groups are narrow; BLOCK_CI
    then covers exactly those groups' input channels, so the loop over input channels runs once.
    """
    block_co = min(MAX_CHANNEL_TILE, max(MIN_DOT, next_power_of_2(cout_per_group)))
    groups_per_tile = max(1, block_co // cout_per_group)
    block_ci = min(MAX_CHANNEL_TILE, max(MIN_DOT, next_power_of_2(cin_per_group * groups_per_tile)))
    return block_co, block_ci


def conv_configs(interpret=INTERPRET):
    """Autotune configurations of the forward and dgrad kernels (pixel tile, warps, pipeline).

    The nine taps of a 3x3 conv read nine overlapping windows of the same activation rows, so
    where those loads are served from matters more than anything else here. Both ways are offered
    and the GPU picks:

    * ``num_stages > 1``: the tap loop is software-pipelined with ``cp.async`` copies into shared
      memory, which hide load latency. Triton 3.9 honours the loads' ``cache_modifier=".ca"`` and
      caches them in L1; Triton 3.6 ignores it and emits ``cp.async.cg``, which bypasses L1, so
      each tap re-reads its tile from L2 (seen in the sm_90 code of both versions).
    * ``num_stages = 1``: no pipeline; plain ``ld.global`` loads go through L1, where the taps'
      overlapping windows hit. Latency is hidden by more CTAs per SM instead (no pipeline
      buffers in shared memory).

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
            (64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3),  # pipelined
            (64, 4, 1), (128, 4, 1), (128, 8, 1), (256, 8, 1),  # through L1
        ]
    ]


# Whether pipelined loads (num_stages > 1) can go through L1: triton 3.9 honours the taps'
# cache_modifier=".ca" (cp.async.ca); 3.6 ignores it and emits cp.async.cg, which bypasses L1 (seen in
# the sm_90 code of both). Versions in between are not assumed to.
PIPELINED_LOADS_USE_L1 = triton_release() >= (3, 9)


def prefer_l1_loads(kept):
    """The heuristic config of the forward and the dgrad (``kernels.configs``): the first one pruning
    keeps, except where pipelined loads bypass L1 (``PIPELINED_LOADS_USE_L1``): then the first
    unpipelined one, whose plain loads go through L1, where the nine taps' overlapping windows hit."""
    if PIPELINED_LOADS_USE_L1:
        return kept[0]
    return next((c for c in kept if c.num_stages == 1), kept[0])


# Pixel tile × widest channel tile × element size a config may pipeline. From compiling every
# config for sm_90 (triton 3.9): past this, BLOCK_M=256 with 64-wide tiles overflowed H100's
# 227 KiB of shared memory, and in float32 from 32-wide tiles on, or spilled registers.
TILE_BYTES_BUDGET = 16 * 1024


# Float32 accumulator elements per thread a config may hold. Past it, 64-wide tiles spilled:
# dgrad at BLOCK_M=128 with 4 warps (64 per thread, plus dz rebuilt in float32), 255 registers and
# 48-144 bytes of spill stores and loads (sm_90, triton 3.9, benchmarks/results/compile-sm90-triton3.9.md).
ACC_PER_THREAD_BUDGET = 32


def config_fits(config, block_co, block_ci, elem_size):
    """Whether ``config`` is safe for channel tiles (block_co, block_ci) of elem_size-byte data."""
    block_m, tile = config.kwargs["BLOCK_M"], max(block_co, block_ci)
    return (block_m * tile * elem_size <= TILE_BYTES_BUDGET
            and block_m * tile <= ACC_PER_THREAD_BUDGET * 32 * config.num_warps)


def prune_configs(configs, named_args, **kwargs):
    """Autotune ``early_config_prune``: keep the configs that fit (BLOCK_M=64 always does)."""
    elem_size = next(v.element_size() for v in named_args.values() if hasattr(v, "element_size"))
    fits = [c for c in configs if config_fits(c, kwargs["BLOCK_CO"], kwargs["BLOCK_CI"], elem_size)]
    return fits or configs[:1]


# Shared memory a weight-gradient config may pipeline (x rows + dz tile per stage), in bytes.
WGRAD_STAGE_BUDGET = 160 * 1024


def wgrad_configs(interpret=INTERPRET):
    """Autotune configurations of the weight-gradient kernel: warps and pipeline depth only (its
    pixel extent is TILES.wgrad_block_k). ``num_stages=1`` loads through L1, where the 3 kw-shifted
    copies of each x row and the rows shared by consecutive pixel blocks hit (see conv_configs)."""
    if interpret:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


def wgrad_tiles(cin_per_group, cout_per_group):
    """(BLOCK_CO, BLOCK_CI) of the weight-gradient kernel: the forward's tiles, with the input
    channels in chunks of at most 2048 / BLOCK_CO. Its accumulator is (4·BLOCK_CI, BLOCK_CO) per
    kernel row; 64x64 took 190-255 registers and spilled, 64x32 takes 128 (sm_90, triton 3.9)."""
    block_co, block_ci = channel_tiles(cin_per_group, cout_per_group)
    return block_co, min(block_ci, max(MIN_DOT, 2048 // block_co))


def wgrad_taps_per_program(block_co, block_ci):
    """Kernel rows per weight-gradient program: 3 (all 9 taps) for 16-wide channel tiles, else 1.
    Three float32 accumulators of (4·BLOCK_CI, BLOCK_CO) took 255 registers and spilled from
    32x32 tiles on (sm_90, triton 3.9): 32-64 channels per group pay 3 dz loads per pixel instead."""
    return 3 if block_co * block_ci <= 16 * 16 else 1


def wgrad_stage_bytes(block_co, block_ci, rows, elem_size):
    return TILES.wgrad_block_k * (rows * 4 * block_ci + block_co) * elem_size


def prune_wgrad_configs(configs, named_args, **kwargs):
    """Keep the weight-gradient configs whose pipeline buffers fit (num_stages=1 always does) and
    whose accumulators, KH_ROWS x (4·BLOCK_CI, BLOCK_CO) float32, fit ACC_PER_THREAD_BUDGET."""
    elem_size = named_args["x_ptr"].element_size()
    block_co, block_ci, rows = kwargs["BLOCK_CO"], kwargs["BLOCK_CI"], kwargs["KH_ROWS"]
    per_stage = wgrad_stage_bytes(block_co, block_ci, rows, elem_size)
    acc = rows * 4 * block_ci * block_co
    fits = [c for c in configs if (c.num_stages == 1 or c.num_stages * per_stage <= WGRAD_STAGE_BUDGET)
            and acc <= ACC_PER_THREAD_BUDGET * 32 * c.num_warps]
    return fits or configs[-1:]


def even_groups(c_tiled, tiled_per_group, other_per_group, block_tiled, block_other):
    """Whether every channel tile holds whole groups whose channels on the other side fill a whole
    number of chunks (true for every ResNeXt width). Tile edges then need no masks and start on
    chunk boundaries, which lets the compiler vectorize the channel-contiguous loads."""
    return (block_tiled % tiled_per_group == 0 and c_tiled % block_tiled == 0
            and block_tiled // tiled_per_group * other_per_group % block_other == 0)


@triton.jit
def group_channel_range(tile_start, TILE: tl.constexpr, C_TILED, TILED_PER_GROUP, OTHER_PER_GROUP,
                        OTHER_TILE: tl.constexpr, OTHER_CHUNKS: tl.constexpr, EVEN_GROUPS: tl.constexpr):
    """The channels on the *other* side of the block-diagonal weight that a channel tile needs.

    A tile of TILE channels starting at ``tile_start`` (out of C_TILED, TILED_PER_GROUP per
    group) touches groups [g_first, g_last]; returns their channel range on the other side, which
    the kernels walk in OTHER_TILE chunks (at most OTHER_CHUNKS of them).
    """
    if EVEN_GROUPS:
        # exactly OTHER_CHUNKS chunks; from constexprs, so the compiler knows the range is aligned
        # (computed from TILED_PER_GROUP, a runtime value, the loads stopped vectorizing: sm_90,
        # triton 3.9)
        lo = tile_start // TILE * (OTHER_TILE * OTHER_CHUNKS)
        hi = lo + OTHER_TILE * OTHER_CHUNKS
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
