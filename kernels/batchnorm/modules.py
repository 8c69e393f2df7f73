"""What ``nn.BatchNorm2d`` (and ``nn.SyncBatchNorm``) does on each call besides the arithmetic, for
the fused op and the fused bottleneck: its training flag, ``num_batches_tracked``, the cumulative
average (momentum=None), buffers that are not tracked, and which process group a SyncBatchNorm
normalises over."""

import torch.distributed as dist
import torch.nn as nn


def bn_call_args(bn):
    """(momentum, batch statistics?, running_mean, running_var, num_batches_tracked) of one call of
    a BatchNorm module, as ``nn.BatchNorm2d.forward`` does it: in training ``num_batches_tracked``
    counts the call — returned for the statistics kernel to add one, or, with momentum=None (the
    cumulative average, 1/num_batches_tracked, needed on the host), added here and None returned —
    and buffers that are not tracked are never updated (None)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    tracked = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if bn.momentum is None:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked)
        else:
            tracked = bn.num_batches_tracked
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return momentum, use_batch_stats, bn.running_mean if keep else None, bn.running_var if keep else None, tracked


def sync_group(bn):
    """The process group whose global batch a SyncBatchNorm normalises over, or None where
    ``nn.SyncBatchNorm`` would not sync (eval mode, no process group, a group of one)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None
