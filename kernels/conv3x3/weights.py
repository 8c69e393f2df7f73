"""Grouped 3x3 weights packed into the dense block-diagonal tiles the conv kernels consume.

The forward and dgrad kernels multiply each activation tile by a block-diagonal (other side ×
tiled side) weight tile per filter tap: zero where the two channels are in different groups.
Building that tile inside the conv kernels took a masked 2-byte gather per element at every tap
(``LDG.U16``, then a shared-memory store and a barrier, in the pipelined loop). Packed once per
call here instead (one small launch; C_out·C_in/groups·9 weights in, a few times that out), the
kernels read each tap's tile as one dense, aligned, unmasked block: vector loads, no index math.

Layout: ``packed[tile, chunk, tap, o, t]`` (contiguous), where ``t`` indexes the BLOCK_T channels
of a tile of the side the kernel tiles (C_out for the forward, C_in for dgrad) and ``o`` the
BLOCK_O channels of one chunk of the other side's channels that the tile's groups read.
"""

import torch
import triton
import triton.language as tl

from ..common import cdiv


@triton.jit
def _pack_weight_kernel(
    w_ptr,  # (C_out, CIN_G, 3, 3), any strides (NCHW or channels_last parameters)
    packed_ptr,  # (T, CHUNKS, 9, BLOCK_O, BLOCK_T) contiguous, the kernels' dtype
    C_T, T_PER_GROUP, O_PER_GROUP, CIN_G, CHUNKS,
    stride_co, stride_ci, stride_kh, stride_kw,
    # meta-parameters
    TILED_IS_OUT: tl.constexpr,  # the tiled side is C_out (forward) or C_in (dgrad)
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # One program: one (tile, chunk), all 9 taps.
    tile = tl.program_id(0) // CHUNKS
    chunk = tl.program_id(0) % CHUNKS
    tile_start = tile * BLOCK_T
    offs_t = tile_start + tl.arange(0, BLOCK_T)
    group_t = offs_t // T_PER_GROUP
    o_lo = tile_start // T_PER_GROUP * O_PER_GROUP
    o_hi = ((tl.minimum(tile_start + BLOCK_T, C_T) - 1) // T_PER_GROUP + 1) * O_PER_GROUP
    offs_o = o_lo + chunk * BLOCK_O + tl.arange(0, BLOCK_O)
    keep = ((offs_o[:, None] // O_PER_GROUP == group_t[None, :]) & (offs_o < o_hi)[:, None]
            & (offs_t < C_T)[None, :])
    if TILED_IS_OUT:
        co, ci = offs_t[None, :], offs_o[:, None]
    else:
        co, ci = offs_o[:, None], offs_t[None, :]
    src = co * stride_co + (ci % CIN_G) * stride_ci  # w[co, ci - group(ci)·CIN_G, tap]
    dst = (tile * CHUNKS + chunk) * 9 * BLOCK_O * BLOCK_T + tl.arange(0, BLOCK_O)[:, None] * BLOCK_T \
        + tl.arange(0, BLOCK_T)[None, :]
    for tap in tl.static_range(9):
        w = tl.load(w_ptr + src + (tap // 3) * stride_kh + (tap % 3) * stride_kw, mask=keep, other=0.0)
        tl.store(packed_ptr + dst + tap * BLOCK_O * BLOCK_T, w.to(packed_ptr.dtype.element_ty))


def other_side_chunks(c_tiled, tiled_per_group, other_per_group, block_tiled, block_other):
    """BLOCK_O chunks of the other side's channels that the widest tile's groups span."""
    spans = [(min(t + block_tiled, c_tiled) - 1) // tiled_per_group - t // tiled_per_group + 1
             for t in range(0, c_tiled, block_tiled)]
    return cdiv(max(spans) * other_per_group, block_other)


def pack_weight(weight, groups, block_tiled, block_other, *, tiled_is_out, dtype=None):
    """Pack ``weight`` (C_out, C_in/groups, 3, 3) for a kernel that tiles C_out (``tiled_is_out``,
    the forward) or C_in (dgrad) by ``block_tiled`` and loops over the other side in
    ``block_other`` chunks. Returns (packed, chunks); ``dtype`` defaults to the weight's."""
    c_out, cin_g = weight.shape[:2]
    cout_g = c_out // groups
    if tiled_is_out:
        c_tiled, t_per_group, o_per_group = c_out, cout_g, cin_g
    else:
        c_tiled, t_per_group, o_per_group = cin_g * groups, cin_g, cout_g
    tiles = cdiv(c_tiled, block_tiled)
    chunks = other_side_chunks(c_tiled, t_per_group, o_per_group, block_tiled, block_other)
    packed = torch.empty((tiles, chunks, 9, block_other, block_tiled), device=weight.device,
                         dtype=dtype or weight.dtype)
    _pack_weight_kernel[(tiles * chunks,)](
        weight, packed, c_tiled, t_per_group, o_per_group, cin_g, chunks, *weight.stride(),
        TILED_IS_OUT=tiled_is_out, BLOCK_T=block_tiled, BLOCK_O=block_other)
    return packed, chunks


def transposes(c_in, c_out, groups, block_co, block_ci, chunks, even):
    """Whether the forward's packing, read transposed, is exactly dgrad's: the same channels per group
    on both sides (ResNeXt's), square tiles of whole groups, one chunk. dgrad then needs no packing."""
    return c_in == c_out and block_co == block_ci and chunks == 1 and even
