"""The fused grouped conv + BatchNorm + ReLU with SyncBatchNorm: batch statistics of the global batch.

What ``nn.SyncBatchNorm`` computes, with the same kernels as the single-process op
(``kernels/grouped_conv_bn_relu.py``) and two collectives on the process group:

* Forward: each rank's conv kernel emits its chunk statistics and ``stats.local_stats`` merges
  them into the rank's (count, mean, M2) per channel. ``all_gather`` brings every rank's triple to
  every rank, which combines them with Chan's formula in rank order (float64, so counts stay exact
  and every rank gets the same bits):  n = Σ n_r,  mean = Σ n_r·mean_r / n,
  M2 = Σ (M2_r + n_r·(mean_r − mean)²). Ranks may hold different batch sizes, an empty one too.
  The running statistics update from the global mean and unbiased variance M2 / (n − 1).
* Backward: each rank reduces (Σg, Σg·x̂) over its pixels, ``all_reduce`` sums them, and dz is
  formed from the global sums and count. dγ and dβ are the rank's own sums, as in PyTorch's
  SyncBatchNorm (DistributedDataParallel then averages the parameter gradients).

Unlike PyTorch's SyncBatchNorm, which refuses CPU tensors, this runs on CPU with gloo too (the
kernels through Triton's interpreter), as well as on CUDA with NCCL.

Not a registered op: collectives inside an opaque op would hide them from the compiler's
distributed passes, so ``torch.compile`` graph-breaks around this function (``torch.compiler.disable``).
Single-process and eval-mode calls never come here: they run the registered op.
"""

import torch
import torch.distributed as dist

from .batchnorm import pointwise
from .batchnorm.stats import local_stats
from .common import TILES, on_device
from .conv3x3 import backward, forward
from .grouped_conv_bn_relu import _grad_strides, _output_strides, _with_strides


def _gather_stats(count, mean, m2, group):
    """Every rank's (count, mean, M2): float64 (R,), (R, C), (R, C), in rank order."""
    c = mean.numel()
    mine = torch.cat((mean.new_full((1,), float(count)), mean, m2)).to(torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every)
    return every[:, 0], every[:, 1:1 + c], every[:, 1 + c:]


def merge_rank_stats(counts, means, m2s):
    """Chan's parallel formula over ranks (rows, in order): the (n, mean, M2) of their union."""
    n = counts.sum()
    w = counts[:, None]
    mean = (w * means).sum(0) / n
    m2 = (m2s + w * (means - mean) ** 2).sum(0)
    return n, mean, m2


class SyncGroupedConvBNReLU(torch.autograd.Function):
    """relu(sync_batch_norm(conv2d(x))) in training mode; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, groups, eps,
                momentum, group):
        n, c_out = x.shape[0], weight.shape[0]
        ho, wo = (forward.out_size(s, stride, padding) for s in x.shape[2:])
        local = n * ho * wo
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w = weight.contiguous()
        if local:
            z, partials = forward.conv_forward(x_cl, w, groups, stride, padding, store=forward.STORE_Z,
                                            compute_stats=True)
            mean_l, m2_l = local_stats(partials, local)
        else:  # an empty rank still takes part in the collectives
            z = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
            mean_l = m2_l = torch.zeros(c_out, device=x.device, dtype=torch.float32)
        counts, means, m2s = _gather_stats(local, mean_l, m2_l, group)
        total, mean, m2 = merge_rank_stats(counts, means, m2s)
        if total <= 1:
            raise ValueError(f"training SyncBatchNorm needs more than 1 value per channel over all ranks, "
                             f"got {int(total)}")
        invstd = torch.rsqrt(m2 / total + eps)
        gamma = bn_weight.double() if bn_weight is not None else torch.ones_like(mean)
        beta = bn_bias.double() if bn_bias is not None else torch.zeros_like(mean)
        scale = gamma * invstd
        stats = torch.stack((mean, invstd, scale, beta - mean * scale)).float()
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.float(), alpha=momentum)
            running_var.mul_(1 - momentum).add_((m2 / (total - 1)).float(), alpha=momentum)
        y = pointwise.bn_relu(z, stats[2], stats[3]) if local else torch.empty_like(z)
        y = _with_strides(y, _output_strides(x, weight, y.shape))
        ctx.save_for_backward(x, weight, z, stats)
        ctx.conf = (stride, padding, groups, float(total), group)
        return y

    @staticmethod
    def backward(ctx, dy):
        with on_device(dy):  # the autograd engine may run this on another thread
            x, weight, z, stats = ctx.saved_tensors
            stride, padding, groups, total, group = ctx.conf
            need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
            mean, invstd, scale, shift = stats.unbind()
            dy = dy.contiguous(memory_format=torch.channels_last).to(z.dtype)
            if x.shape[0]:
                sum_g, sum_gx = pointwise.bn_bwd_reduce(dy, z, scale, shift, mean, invstd)
            else:
                sum_g = sum_gx = torch.zeros_like(mean)
            sums = torch.cat((sum_g, sum_gx))
            dist.all_reduce(sums, group=group)
            coeffs = (scale, shift, *pointwise.bn_backward_coeffs(sums.chunk(2), scale, mean, invstd, total))
            dx = dw = None
            if x.shape[0]:
                dz = pointwise.bn_relu_bwd(dy, z, coeffs) if TILES.materialize_dz and (need_x or need_w) else None
                if need_x:
                    dx = backward.conv_dx(dy, z, weight, coeffs, x.shape, groups, stride, padding, dz=dz)
                    dx = _with_strides(dx, _grad_strides(x))
                if need_w:
                    dw = backward.conv_dw(x.contiguous(memory_format=torch.channels_last), dy, z, weight, coeffs,
                                      groups, stride, padding, dz=dz)
            else:
                dx = x.new_empty_strided(x.shape, _grad_strides(x)) if need_x else None
                dw = torch.zeros_like(weight) if need_w else None
            return (dx, dw, sum_gx if need_gamma else None, sum_g if need_beta else None, *[None] * 8)


@torch.compiler.disable
def sync_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride, padding,
                              groups, eps, momentum, group):
    """Training-mode fused op with the batch statistics of every rank of ``group`` (checked inputs)."""
    with on_device(x):
        return SyncGroupedConvBNReLU.apply(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                                           padding, groups, eps, momentum, group)
