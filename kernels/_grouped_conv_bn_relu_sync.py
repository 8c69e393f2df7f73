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
from .common import on_device
from .conv3x3 import forward
from .conv3x3.compose import backward_pass
from .layout import output_strides, with_strides


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
        packed = forward.pack_for_forward(weight, groups, x.dtype)
        if local:
            z, partials = forward.conv3x3_forward(x_cl, weight, groups, stride, padding, store=forward.STORE_Z,
                                                  compute_stats=True, packed=packed)
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
        y = with_strides(y, output_strides(x, weight, y.shape))
        ctx.save_for_backward(x, weight, z, stats, packed[0])
        ctx.conf = (stride, padding, groups, int(total), group)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, stats, packed = ctx.saved_tensors
        stride, padding, groups, total, group = ctx.conf
        need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]

        def all_reduce(sum_g, sum_gx):  # the global batch's sums: BatchNorm's backward needs them
            sums = torch.cat((sum_g, sum_gx))
            dist.all_reduce(sums, group=group)
            return sums.chunk(2)

        with on_device(dy):  # the autograd engine may run this on another thread
            dx, dw, dgamma, dbeta = backward_pass(dy, x, weight, z, stats, packed, stride, padding, groups, True,
                                                  need_x, need_w, all_reduce=all_reduce, count=total)
        return (dx if need_x else None, dw if need_w else None, dgamma if need_gamma else None,
                dbeta if need_beta else None, *[None] * 8)


@torch.compiler.disable
def sync_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride, padding,
                              groups, eps, momentum, group):
    """Training-mode fused op with the batch statistics of every rank of ``group`` (checked inputs)."""
    with on_device(x):
        return SyncGroupedConvBNReLU.apply(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                                           padding, groups, eps, momentum, group)
