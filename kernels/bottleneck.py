"""The whole ResNeXt bottleneck in Triton kernels, composed: no PyTorch convolution or BatchNorm.

    y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + identity),
    identity = x, or bn_d(conv_d(x)) (the projection shortcut, which carries the stride).

Training forward, each arrow one kernel; every BatchNorm's statistics come from the epilogue of the
conv that produces its input, and every BatchNorm + ReLU is applied as the next conv loads it:

    x ─conv1 (+stats)→ z1 ─[bn1+relu on load] conv2 3x3 (+stats)→ z2 ─[bn2+relu on load] conv3 (+stats)→ z3
    x ─conv_d, stride (+stats)→ z_d                 tail: y = relu(bn3(z3) + x or bn_d(z_d))

Saved for backward: x and z1, z2, z3 (z_d) and per-channel vectors — no normalised or activated copy.
Backward, again one kernel per arrow and no pass of its own for any BatchNorm or ReLU:

    dy ─tail (+BN3, BN_d sums)→ g ─conv3 dgrad [bn2 ReLU mask, +BN2 sums]→ g2
       ─conv2 3x3 dgrad [bn1 ReLU mask, +BN1 sums]→ g1 ─conv1 dgrad [+ shortcut's gradient]→ dx
    wgrads: conv3 (z2 → relu(bn2) on load), conv2 (z1 → relu(bn1) on load), conv1 (x), conv_d (x)
    projection: conv_d's dgrad (stride 2: zeros where it did not read) is conv1's dgrad's residual.

Every dz is rebuilt as the kernels load it, dz = scale·g + k1·z + k0 (``kernels.conv3x3.backward``), from the
masked gradient g the kernel above stored and the BatchNorm's sums its epilogue emitted. Float32
accumulation and fixed-order float32 reductions throughout.

NaN and inf as in the op (``kernels.grouped_conv_bn_relu``, Limitations): never fewer non-finite
values than the eager block, more where block-diagonal packing multiplies them by zeros. The
kernels launch on the input's device (``kernels.common.on_device``), forward and backward.
"""

import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .batchnorm.modules import bn_call_args
from .batchnorm.stats import bn_grad, bn_stats
from .batchnorm.tail import tail_backward, tail_forward
from .common import DTYPES, check_device, on_device
from .conv1x1.backward import conv1x1_dgrad, conv1x1_wgrad
from .conv1x1.forward import conv1x1_forward
from .conv3x3 import backward, forward
from .conv3x3.compose import constant, frozen_fold, packed_weight


class BN(NamedTuple):
    """One BatchNorm of the block as a call uses it (``bn_call_args``)."""

    gamma: torch.Tensor  # (C,) float32 (ones without affine parameters)
    beta: torch.Tensor
    running_mean: Optional[torch.Tensor]  # None: not tracked
    running_var: Optional[torch.Tensor]
    tracked: Optional[torch.Tensor]  # num_batches_tracked for the statistics kernel to count, or None
    eps: float
    momentum: float
    batch_stats: bool  # normalise with the batch's statistics (training), else the running ones


class Fold(NamedTuple):
    """(mean, invstd, scale, shift), float32 (C,) rows of one (4, C) tensor (``bn_stats``, ``bn_fold``)."""

    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def _bn_args(bn, c, device):
    """The call's ``BN`` of an nn.BatchNorm2d, doing its bookkeeping as its forward does."""
    momentum, use_batch, running_mean, running_var, tracked = bn_call_args(bn)
    gamma = bn.weight if bn.weight is not None else constant(1.0, c, device)
    beta = bn.bias if bn.bias is not None else constant(0.0, c, device)
    return BN(gamma, beta, running_mean, running_var, tracked, bn.eps, momentum, use_batch)


def _fold(parts, count, bn, cached):
    """The ``Fold`` of one BatchNorm: from the conv's chunk statistics when it normalises with batch
    statistics (running statistics and num_batches_tracked updated), else from its buffers (reused
    while they are unchanged, when ``cached``)."""
    if bn.batch_stats:
        return Fold(*bn_stats(parts, count, bn.gamma, bn.beta, bn.running_mean, bn.running_var, bn.eps, bn.momentum,
                              bn.tracked))
    return Fold(*frozen_fold(bn.gamma, bn.beta, bn.running_mean, bn.running_var, bn.eps, reuse=cached))


def _coeffs(fold, grads):
    """The (scale, shift, k1, k0) the dgrad and wgrad kernels rebuild dz from."""
    return fold.scale, fold.shift, grads[2], grads[3]


class _FusedBottleneck(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, w3, wd, g1, b1, g2, b2, g3, b3, gd, bd, bns, stride, groups, grad):
        bn1, bn2, bn3, bnd = bns
        x = x.contiguous(memory_format=torch.channels_last)
        n, _, h, w = x.shape
        z1, p1 = conv1x1_forward(x, w1, 1, compute_stats=bn1.batch_stats, check=False)
        f1 = _fold(p1, n * h * w, bn1, not grad)
        packed = packed_weight(w2, groups, x.dtype, reuse=not grad)  # kept for dgrad
        z2, p2 = forward.conv3x3_forward(z1, w2, groups, stride, 1, store=forward.STORE_Z,
                                         compute_stats=bn2.batch_stats, in_scale=f1.scale, in_shift=f1.shift,
                                         packed=packed)
        count = n * z2.shape[2] * z2.shape[3]
        f2 = _fold(p2, count, bn2, not grad)
        z3, p3 = conv1x1_forward(z2, w3, 1, in_scale=f2.scale, in_shift=f2.shift, compute_stats=bn3.batch_stats,
                                 check=False)
        f3 = _fold(p3, count, bn3, not grad)
        zd = fd = None
        if wd is not None:
            zd, pd = conv1x1_forward(x, wd, stride, compute_stats=bnd.batch_stats, check=False)
            fd = _fold(pd, count, bnd, not grad)
        y = tail_forward(z3, f3.scale, f3.shift, x if zd is None else zd, *((fd.scale, fd.shift) if fd else ()),
                         check=False)
        ctx.save_for_backward(x, w1, w2, w3, wd, z1, z2, z3, zd, packed[0])
        ctx.folds = (f1, f2, f3, fd)
        ctx.training = tuple(bn.batch_stats if bn is not None else None for bn in bns)
        ctx.conf = (stride, groups, count, n * h * w)
        return y

    @staticmethod
    def backward(ctx, dy):
        with on_device(dy):  # the autograd engine may run this on another thread
            return _FusedBottleneck._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, w1, w2, w3, wd, z1, z2, z3, zd, packed = ctx.saved_tensors
        f1, f2, f3, fd = ctx.folds
        t1, t2, t3, td = ctx.training
        stride, groups, count, count1 = ctx.conf
        dy = dy.contiguous(memory_format=torch.channels_last).to(z3.dtype)
        proj = zd is not None
        g, part = tail_backward(dy, z3, f3.scale, f3.shift, f3.mean, f3.invstd, zd if proj else x,
                                *((fd.scale, fd.shift, fd.mean, fd.invstd) if proj else ()), check=False)
        # BN3: Σg, Σg·x̂3 and dz3 = s3·g + k1·z3 + k0 (g already carries the tail's ReLU mask)
        d3 = bn_grad(part[:, 0], part[:, 1], f3.scale, f3.mean, f3.invstd, count, t3)
        c3 = _coeffs(f3, d3)
        dw3 = conv1x1_wgrad(z2, g, z3, c3, w3.shape, 1, mask=False, in_scale=f2.scale, in_shift=f2.shift,
                            check=False)
        # conv3's dgrad: g2 = d relu(bn2(z2)) with BN2's ReLU mask, and BN2's sums, in its epilogue
        g2, s2 = conv1x1_dgrad(g, z3, w3, c3, z2.shape, 1, mask=False,
                               relu_bn=(z2, f2.scale, f2.shift, f2.mean, f2.invstd), check=False)
        d2 = bn_grad(*s2, f2.scale, f2.mean, f2.invstd, count, t2)
        c2 = _coeffs(f2, d2)
        # conv2 (grouped 3x3): dz2 rebuilt from (g2, z2); its dgrad, reading the forward's packed weight
        # transposed, gives g1 and BN1's sums likewise
        dw2 = backward.conv3x3_wgrad(z1, g2, z2, w2, c2, groups, stride, 1, in_scale=f1.scale, in_shift=f1.shift)
        g1, s1 = backward.conv3x3_dgrad(g2, z2, w2, c2, z1.shape, groups, stride, 1,
                                        relu_bn=(z1, f1.scale, f1.shift, f1.mean, f1.invstd),
                                        packed=(packed, packed.shape[1]))
        d1 = bn_grad(*s1, f1.scale, f1.mean, f1.invstd, count1, t1)
        c1 = _coeffs(f1, d1)
        dw1 = conv1x1_wgrad(x, g1, z1, c1, w1.shape, 1, mask=False, check=False)
        dwd = dgd = dbd = None
        if proj:
            dd = bn_grad(part[:, 0], part[:, 2], fd.scale, fd.mean, fd.invstd, count, td)
            cd = _coeffs(fd, dd)
            dwd = conv1x1_wgrad(x, g, zd, cd, wd.shape, stride, mask=False, check=False)
            shortcut = conv1x1_dgrad(g, zd, wd, cd, x.shape, stride, mask=False, check=False)
            dgd, dbd = dd[1], dd[0]
        else:
            shortcut = g
        # conv1's dgrad adds the shortcut's gradient in its epilogue
        dx = conv1x1_dgrad(g1, z1, w1, c1, x.shape, 1, mask=False, residual=shortcut, check=False)
        # dγ = Σ g·x̂, dβ = Σ g per BatchNorm
        return (dx, dw1, dw2, dw3, dwd, d1[1], d1[0], d2[1], d2[0], d3[1], d3[0], dgd, dbd,
                None, None, None, None)


def _conv_problem(name, conv, kernel, stride, groups=1):
    """Why ``conv`` is not the bias-free, unpadded-or-same, undilated conv the kernels compute."""
    if type(conv) is not nn.Conv2d:
        return f"{name} is {type(conv).__name__}, not nn.Conv2d"
    want = dict(kernel_size=(kernel, kernel), stride=(stride, stride), padding=(kernel // 2, kernel // 2),
                dilation=(1, 1), padding_mode="zeros")
    for attr, value in want.items():
        if getattr(conv, attr) != value:
            return f"{name}.{attr} is {getattr(conv, attr)!r}, the fused bottleneck computes {value!r}"
    if groups is not None and conv.groups != groups:
        return f"{name}.groups is {conv.groups}, expected {groups}"
    if conv.bias is not None:
        return f"{name} has a bias (a BatchNorm follows it: the fused bottleneck has none)"
    return None


def _bn_problem(name, bn, channels):
    # exactly BatchNorm2d's semantics: SyncBatchNorm, FrozenBatchNorm2d, ... are other modules
    if not isinstance(bn, nn.BatchNorm2d):
        return (f"{name} is {type(bn).__name__}, not nn.BatchNorm2d (SyncBatchNorm: use the grouped-conv "
                "level, fused_kernels='conv')")
    if bn.num_features != channels:
        return f"{name}.num_features is {bn.num_features}, its conv gives {channels} channels"
    return None


def unfusable_reason(block):
    """Why ``fused_bottleneck`` cannot compute ``block`` exactly (a string), or None when it can.

    The block must be ResNeXt's bottleneck as ``resnext.Bottleneck`` (and torchvision's) builds it:
    conv1 1x1 → bn1 → ReLU → conv2 3x3 grouped, padding 1, stride 1 or 2 → bn2 → ReLU → conv3 1x1 →
    bn3, plus the identity or downsample = Sequential(1x1 conv with conv2's stride, BatchNorm2d), then
    ReLU; convs without bias, nn.BatchNorm2d everywhere."""
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"):
        if not hasattr(block, name):
            return f"{type(block).__name__} has no {name}"
    stride = block.conv2.stride[0] if isinstance(block.conv2, nn.Conv2d) else 1
    why = (_conv_problem("conv1", block.conv1, 1, 1) or _conv_problem("conv2", block.conv2, 3, stride, None)
           or _conv_problem("conv3", block.conv3, 1, 1))
    if why:
        return why
    if stride not in (1, 2):
        return f"conv2.stride is {block.conv2.stride!r}, the fused bottleneck computes stride 1 or 2"
    c1, c2, c3 = block.conv1, block.conv2, block.conv3
    if c2.in_channels != c1.out_channels or c3.in_channels != c2.out_channels:
        return f"channels do not chain: conv1 -> {c1.out_channels}, conv2 {c2.in_channels} -> {c2.out_channels}, " \
               f"conv3 {c3.in_channels}"
    why = (_bn_problem("bn1", block.bn1, c1.out_channels) or _bn_problem("bn2", block.bn2, c2.out_channels)
           or _bn_problem("bn3", block.bn3, c3.out_channels))
    if why:
        return why
    down = block.downsample
    if down is None:
        if stride != 1 or c1.in_channels != c3.out_channels:
            return (f"no downsample, but the identity ({c1.in_channels} channels) does not match the output "
                    f"({c3.out_channels} channels, stride {stride})")
        return None
    if not (isinstance(down, nn.Sequential) and len(down) == 2):
        return f"downsample is {type(down).__name__}, not Sequential(Conv2d 1x1, BatchNorm2d)"
    return (_conv_problem("downsample[0]", down[0], 1, stride)
            or _bn_problem("downsample[1]", down[1], c3.out_channels)
            or (f"downsample[0] maps {down[0].in_channels} -> {down[0].out_channels} channels, the block "
                f"{c1.in_channels} -> {c3.out_channels}"
                if (down[0].in_channels, down[0].out_channels) != (c1.in_channels, c3.out_channels) else None))


_CHECKED = weakref.WeakKeyDictionary()  # block -> (its submodules, unfusable_reason of them)


def _unfusable_reason_cached(block):
    """``unfusable_reason(block)``, asked again only when one of its submodules was replaced (e.g. by
    ``nn.SyncBatchNorm.convert_sync_batchnorm``): ~20 µs of host time per call otherwise."""
    parts = tuple(getattr(block, name, None) for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"))
    parts += tuple(parts[-1]) if isinstance(parts[-1], nn.Sequential) else ()
    seen = _CHECKED.get(block)
    if seen is None or len(seen[0]) != len(parts) or any(a is not b for a, b in zip(seen[0], parts)):
        seen = _CHECKED[block] = (parts, unfusable_reason(block))
    return seen[1]


def fused_bottleneck(x, block):
    """``block(x)`` for a ResNeXt bottleneck (``resnext.Bottleneck``, ``FusedBottleneck``, or any module
    with conv1/bn1, conv2/bn2 grouped 3x3, conv3/bn3 and downsample = None or Sequential(conv 1x1 with
    the stride, BatchNorm2d)), through the Triton kernels, with the block's own parameters and buffers
    and nn.BatchNorm2d's semantics in training and eval mode. A block it cannot compute exactly is a
    ValueError saying why (``unfusable_reason``). The inputs are checked here, once: the kernels'
    launchers below run unchecked."""
    why = _unfusable_reason_cached(block)
    if why is not None:
        raise ValueError(f"fused_bottleneck: {why}")
    mods = [block.conv1, block.conv2, block.conv3]
    bns = [block.bn1, block.bn2, block.bn3]
    down = block.downsample
    if down is not None:
        mods.append(down[0])
        bns.append(down[1])
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != block.conv1.in_channels:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D (N, C={block.conv1.in_channels}, H, W) tensor, got {got}")
    check_device("x", x)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, m in zip(("conv1", "conv2", "conv3", "downsample[0]"), mods):
        if m.weight.device != x.device:
            raise ValueError(f"{name}.weight is on {m.weight.device} but x is on {x.device}")
    weights = [m.weight.to(x.dtype) for m in mods] + ([None] if down is None else [])
    args = [_bn_args(bn, bn.num_features, x.device) for bn in bns] + ([None] if down is None else [])
    affine = []
    for a in args:
        affine += [None, None] if a is None else [a.gamma, a.beta]
    # whether a gradient will be asked for: the inference path reuses packed weights and folded BatchNorms
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, *affine))
    with on_device(x):
        return _FusedBottleneck.apply(x, *weights, *affine, tuple(args), block.conv2.stride[0], block.conv2.groups,
                                      grad)


class FusedBottleneck(nn.Module):
    """ResNeXt's bottleneck as one module run through the Triton kernels (``fused_bottleneck``).

    It owns conv1/bn1, conv2/bn2 (grouped 3x3, carries the stride), conv3/bn3 and, when the stride or
    the width changes, downsample = Sequential(1x1 conv, BatchNorm2d), under the names
    ``resnext.Bottleneck`` and torchvision's Bottleneck use, so state_dicts load either way.
    ``FusedBottleneck.from_block(block)`` wraps an existing block's very modules (shared, not copied).
    """

    def __init__(self, in_channels, width, out_channels, stride=1, groups=32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))
        why = unfusable_reason(self)
        if why is not None:
            raise ValueError(f"FusedBottleneck: {why}")

    @classmethod
    def from_block(cls, block):
        """A FusedBottleneck sharing ``block``'s modules (its parameters and buffers, not copies)."""
        why = unfusable_reason(block)
        if why is not None:
            raise ValueError(f"FusedBottleneck.from_block: {why}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"):
            setattr(fused, name, getattr(block, name))
        fused.train(block.training)
        return fused

    def forward(self, x):
        return fused_bottleneck(x, self)
