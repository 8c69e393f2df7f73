"""The fused grouped conv + BatchNorm + ReLU composed from the kernels: what its forward and backward
launch, in order, on real tensors (``kernels/grouped_conv_bn_relu.py`` checks the inputs and
registers the op; ``kernels/_grouped_conv_bn_relu_sync.py`` adds SyncBatchNorm's collectives).

Training forward:  pack the weight → conv (z, per-chunk statistics) → merge (batch statistics,
running statistics, num_batches_tracked; one launch up to 4096 pixels, else two) → relu(bn(z)).
Backward:  BN sums per pixel split → ``bn_grad`` (the sums in a fixed order and BN's backward
coefficients, one launch) → dgrad (reading the forward's packed weight transposed) and wgrad, each
rebuilding dz = scale·g + k1·z + k0 as it loads (dy, z), → the weight gradient's split sums.
Inference: conv with the folded BatchNorm and ReLU in its epilogue: one launch, the packed weight
and the fold reused while the weight and the BatchNorm's tensors are unchanged (``VersionedCache``).
No per-channel arithmetic in PyTorch: every vector comes out of a kernel.
"""

import torch

from ..batchnorm import pointwise
from ..batchnorm.stats import bn_fold, bn_grad, bn_stats
from ..common import TILES, VersionedCache
from ..layout import grad_strides, output_strides, with_strides
from . import backward, forward
from .tiles import channel_tiles
from .weights import other_side_chunks

PACKED = VersionedCache()  # inference: the weight packed for the forward kernel
FOLDED = VersionedCache()  # inference: frozen BatchNorms folded into (mean, invstd, scale, shift)
_CONSTANT = {}  # (value, C, device) -> a (C,) float32 vector, for BatchNorms without affine parameters


def constant(value, c, device):
    """A (C,) float32 vector of ``value``, made once per (value, C, device): γ = 1 and β = 0 of a
    BatchNorm without affine parameters (never written to)."""
    key = (value, c, device)
    if key not in _CONSTANT:
        _CONSTANT[key] = torch.full((c,), value, device=device, dtype=torch.float32)
    return _CONSTANT[key]


def packed_weight(weight, groups, dtype, reuse):
    """``forward.pack_for_forward(weight, groups, dtype)``: reused while ``weight`` is unchanged when
    ``reuse`` (inference), else packed afresh (training: the weights change between steps, and the
    backward keeps this packing)."""
    if not reuse:
        return forward.pack_for_forward(weight, groups, dtype)
    return PACKED.get((weight,), (groups, dtype), lambda: forward.pack_for_forward(weight, groups, dtype))


def frozen_fold(gamma, beta, running_mean, running_var, eps, reuse):
    """``bn_fold`` of a BatchNorm with frozen statistics: reused while its tensors are unchanged when
    ``reuse`` (inference), else a tensor of this call's own (kept for a backward)."""
    if not reuse:
        return bn_fold(gamma, beta, running_mean, running_var, eps)
    return FOLDED.get((gamma, beta, running_mean, running_var), eps,
                      lambda: bn_fold(gamma, beta, running_mean, running_var, eps))


def out_shape(x, weight, stride, padding):
    ho, wo = (forward.out_size(size, stride, padding) for size in x.shape[2:])
    return x.shape[0], weight.shape[0], ho, wo


def new_output(x, weight, stride, padding):
    """An uninitialised y: (N, C_out, H_out, W_out) in x's dtype and conv2d's layout."""
    shape = out_shape(x, weight, stride, padding)
    return torch.empty_strided(shape, output_strides(x, weight, shape), dtype=x.dtype, device=x.device)


def new_saved(x, weight, groups, y):
    """Uninitialised tensors of what the backward reads: z (y's shape, channels-last), the (4, C_out)
    float32 rows mean, invstd, scale, shift, and the weight packed for the forward kernel."""
    z = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    c_out, cin_g = weight.shape[:2]
    cout_g = c_out // groups
    block_co, block_ci = channel_tiles(cin_g, cout_g)
    chunks = other_side_chunks(c_out, cout_g, cin_g, block_co, block_ci)
    packed = torch.empty((-(-c_out // block_co), chunks, 9, block_ci, block_co), dtype=x.dtype, device=x.device)
    return z, torch.empty((4, c_out), dtype=torch.float32, device=y.device), packed


def forward_pass(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding,
                 groups, eps, momentum, training, save):
    """(y, z, stats, packed): y, and when ``save`` what the backward reads (else None). Updates the
    running statistics and adds one to ``num_batches_tracked`` in place when ``training`` and they
    are given. Inputs already checked; ``weight`` in x's dtype or float32 (packed in x's dtype)."""
    n, c_out = x.shape[0], weight.shape[0]
    if n == 0:  # an empty batch: an empty output and zero gradients, as in PyTorch
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # nn.BatchNorm2d counts an empty batch too
        y = new_output(x, weight, stride, padding)
        z, stats, packed = new_saved(x, weight, groups, y) if save else (None, None, None)
        return y, z, stats if stats is None else stats.zero_(), packed
    _, _, ho, wo = out_shape(x, weight, stride, padding)
    y_strides = output_strides(x, weight, (n, c_out, ho, wo))
    gamma = bn_weight if bn_weight is not None else constant(1.0, c_out, x.device)
    beta = bn_bias if bn_bias is not None else constant(0.0, c_out, x.device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    packed = packed_weight(weight, groups, x.dtype, reuse=not save)
    z = None
    if training:
        store = forward.STORE_Z if save else forward.STORE_NOTHING
        z, partials = forward.conv3x3_forward(x_cl, weight, groups, stride, padding, store=store, compute_stats=True,
                                              packed=packed)
        stats = bn_stats(partials, n * ho * wo, gamma, beta, running_mean, running_var, eps, momentum,
                         num_batches_tracked)
    else:
        stats = frozen_fold(gamma, beta, running_mean, running_var, eps, reuse=not save)
    _, _, scale, shift = stats
    if not save:
        y, _ = forward.conv3x3_forward(x_cl, weight, groups, stride, padding, store=forward.STORE_BN_RELU,
                                       scale=scale, shift=shift, packed=packed)
        return with_strides(y, y_strides), None, None, None
    if z is None:
        z, _ = forward.conv3x3_forward(x_cl, weight, groups, stride, padding, store=forward.STORE_Z, packed=packed)
    y = pointwise.bn_relu(z, scale, shift)
    return with_strides(y, y_strides), z, stats, packed[0]


def backward_pass(dy, x, weight, z, stats, packed, stride, padding, groups, training, need_x, need_w,
                  all_reduce=None, count=None):
    """(dx, dweight, dγ, dβ); dx and dweight are empty (0,) tensors unless asked for. ``packed`` is
    the forward's packed weight. ``all_reduce(sum_g, sum_gx) -> (sum_g, sum_gx)`` makes BatchNorm's
    sums the global batch's (SyncBatchNorm; ``count``: the global batch's pixels); dγ and dβ stay
    this rank's, as in PyTorch's SyncBatchNorm."""
    c_out = weight.shape[0]
    dx, dw = x.new_empty(0), x.new_empty(0)  # distinct: a custom op's outputs may not alias
    if x.shape[0] == 0 or z.numel() == 0:  # every gradient is a sum over no pixels
        sum_g, sum_gx = stats.new_zeros(c_out), stats.new_zeros(c_out)
        if all_reduce is not None:
            all_reduce(sum_g.clone(), sum_gx.clone())  # an empty rank still takes part
        if need_x:
            dx = x.new_empty_strided(x.shape, grad_strides(x))
        if need_w:
            dw = weight.new_zeros(weight.shape)
        return dx, dw, sum_gx, sum_g
    mean, invstd, scale, shift = stats
    dy = dy.contiguous(memory_format=torch.channels_last)
    if dy.dtype != z.dtype:
        dy = dy.to(z.dtype)
    partial_g, partial_gx = pointwise.bn_bwd_reduce(dy, z, scale, shift, mean, invstd)
    count = count or z.shape[0] * z.shape[2] * z.shape[3]
    sum_g, sum_gx, k1, k0 = bn_grad(partial_g, partial_gx, scale, mean, invstd, count, training)
    if all_reduce is not None:  # BatchNorm's backward needs the global batch's sums
        glob_g, glob_gx = all_reduce(sum_g.clone(), sum_gx.clone())
        _, _, k1, k0 = bn_grad(glob_g[None], glob_gx[None], scale, mean, invstd, count, training)
    coeffs = (scale, shift, k1, k0)
    dz = pointwise.bn_relu_bwd(dy, z, coeffs) if TILES.materialize_dz and (need_x or need_w) else None
    if need_x:
        dx = backward.conv3x3_dgrad(dy, z, weight, coeffs, x.shape, groups, stride, padding, dz=dz,
                                    packed=(packed, packed.shape[1]))
        dx = with_strides(dx, grad_strides(x))
    if need_w:
        dw = backward.conv3x3_wgrad(x.contiguous(memory_format=torch.channels_last), dy, z, weight, coeffs, groups,
                                    stride, padding, dz=dz)
    # dγ = Σ g·x̂ and dβ = Σ g, exactly what the reduction produced
    return dx, dw, sum_gx, sum_g
