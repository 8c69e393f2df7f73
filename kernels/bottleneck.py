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

import torch
import torch.nn as nn

from .batchnorm.pointwise import bn_backward_coeffs
from .batchnorm.stats import bn_stats
from .batchnorm.tail import tail_backward, tail_forward
from .conv1x1.backward import conv1x1_dgrad, conv1x1_wgrad
from .conv1x1.forward import conv1x1_forward
from .common import on_device
from .conv3x3 import backward, forward
from .grouped_conv_bn_relu import bn_call_args


def _bn_args(bn, c, device):
    """(γ, β, running_mean, running_var, eps, momentum, batch statistics?) of an nn.BatchNorm2d,
    doing its bookkeeping (num_batches_tracked, momentum=None) as its forward does."""
    momentum, use_batch, running_mean, running_var = bn_call_args(bn)
    gamma = bn.weight if bn.weight is not None else torch.ones(c, device=device)
    beta = bn.bias if bn.bias is not None else torch.zeros(c, device=device)
    return gamma, beta, running_mean, running_var, bn.eps, momentum, use_batch


def _fold(parts, count, bn):
    """(mean, invstd, scale, shift) float32 of one BatchNorm: from the conv's chunk statistics when
    it normalises with batch statistics (running statistics updated), else from its buffers."""
    gamma, beta, rm, rv, eps, momentum, use_batch = bn
    if use_batch:
        return bn_stats(parts, count, gamma.detach(), beta.detach(), rm, rv, eps, momentum)
    invstd = torch.rsqrt(rv + eps)
    scale = gamma.detach() * invstd
    return rm.clone(), invstd, scale, beta.detach() - rm * scale


class _FusedBottleneck(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, w3, wd, g1, b1, g2, b2, g3, b3, gd, bd, bns, stride, groups):
        bn1, bn2, bn3, bnd = bns
        x = x.contiguous(memory_format=torch.channels_last)
        n, _, h, w = x.shape
        z1, p1 = conv1x1_forward(x, w1, 1, compute_stats=bn1[6])
        f1 = _fold(p1, n * h * w, bn1)
        z2, p2 = forward.conv_forward(z1, w2.contiguous(), groups, stride, 1, store=forward.STORE_Z,
                                   compute_stats=bn2[6], in_scale=f1[2], in_shift=f1[3])
        count = n * z2.shape[2] * z2.shape[3]
        f2 = _fold(p2, count, bn2)
        z3, p3 = conv1x1_forward(z2, w3, 1, in_scale=f2[2], in_shift=f2[3], compute_stats=bn3[6])
        f3 = _fold(p3, count, bn3)
        zd = fd = None
        if wd is not None:
            zd, pd = conv1x1_forward(x, wd, stride, compute_stats=bnd[6])
            fd = _fold(pd, count, bnd)
        y = tail_forward(z3, f3[2], f3[3], x if zd is None else zd, *(fd[2:] if fd else ()))
        ctx.save_for_backward(x, w1, w2, w3, wd, z1, z2, z3, zd)
        ctx.folds = (f1, f2, f3, fd)
        ctx.training = tuple(bn[6] for bn in bns if bn is not None)
        ctx.conf = (stride, groups, count, n * h * w)
        return y

    @staticmethod
    def backward(ctx, dy):
        with on_device(dy):  # the autograd engine may run this on another thread
            return _FusedBottleneck._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, w1, w2, w3, wd, z1, z2, z3, zd = ctx.saved_tensors
        f1, f2, f3, fd = ctx.folds
        t1, t2, t3, *td = ctx.training
        stride, groups, count, count1 = ctx.conf
        dy = dy.contiguous(memory_format=torch.channels_last).to(z3.dtype)
        proj = zd is not None
        g, sums3, sums_d = tail_backward(dy, z3, f3[2], f3[3], f3[0], f3[1], zd if proj else x,
                                         *((fd[2], fd[3], fd[0], fd[1]) if proj else ()))
        # conv3: dz3 = s3·g + k1·z3 + k0 (g already carries the tail's ReLU mask)
        c3 = (f3[2], f3[3], *bn_backward_coeffs(sums3, f3[2], f3[0], f3[1], count, t3))
        dw3 = conv1x1_wgrad(z2, g, z3, c3, w3.shape, 1, mask=False, in_scale=f2[2], in_shift=f2[3])
        # conv3's dgrad: g2 = d relu(bn2(z2)) with BN2's ReLU mask, and BN2's sums, in its epilogue
        g2, s2 = conv1x1_dgrad(g, z3, w3, c3, z2.shape, 1, mask=False, relu_bn=(z2, *f2[2:], *f2[:2]))
        # conv2 (grouped 3x3): dz2 rebuilt from (g2, z2); its dgrad gives g1 and BN1's sums likewise
        c2 = (f2[2], f2[3], *bn_backward_coeffs(s2, f2[2], f2[0], f2[1], count, t2))
        dw2 = backward.conv_dw(z1, g2, z2, w2, c2, groups, stride, 1, in_scale=f1[2], in_shift=f1[3])
        g1, s1 = backward.conv_dx(g2, z2, w2, c2, z1.shape, groups, stride, 1, relu_bn=(z1, *f1[2:], *f1[:2]))
        c1 = (f1[2], f1[3], *bn_backward_coeffs(s1, f1[2], f1[0], f1[1], count1, t1))
        dw1 = conv1x1_wgrad(x, g1, z1, c1, w1.shape, 1, mask=False)
        dwd = dgd = dbd = None
        if proj:
            cd = (fd[2], fd[3], *bn_backward_coeffs(sums_d, fd[2], fd[0], fd[1], count, td[0]))
            dwd = conv1x1_wgrad(x, g, zd, cd, wd.shape, stride, mask=False)
            shortcut = conv1x1_dgrad(g, zd, wd, cd, x.shape, stride, mask=False)
            dgd, dbd = sums_d[1], sums_d[0]
        else:
            shortcut = g
        # conv1's dgrad adds the shortcut's gradient in its epilogue
        dx = conv1x1_dgrad(g1, z1, w1, c1, x.shape, 1, mask=False, residual=shortcut)
        # dγ = Σ g·x̂, dβ = Σ g per BatchNorm
        return (dx, dw1, dw2, dw3, dwd, s1[1], s1[0], s2[1], s2[0], sums3[1], sums3[0], dgd, dbd,
                None, None, None)


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


def fused_bottleneck(x, block):
    """``block(x)`` for a ResNeXt bottleneck (``resnext.Bottleneck``, ``FusedBottleneck``, or any module
    with conv1/bn1, conv2/bn2 grouped 3x3, conv3/bn3 and downsample = None or Sequential(conv 1x1 with
    the stride, BatchNorm2d)), through the Triton kernels, with the block's own parameters and buffers
    and nn.BatchNorm2d's semantics in training and eval mode. A block it cannot compute exactly is a
    ValueError saying why (``unfusable_reason``)."""
    why = unfusable_reason(block)
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
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weights = [m.weight.to(x.dtype) for m in mods] + ([None] if down is None else [])
    args = [_bn_args(bn, bn.num_features, x.device) for bn in bns] + ([None] if down is None else [])
    affine = []
    for a in args:
        affine += [None, None] if a is None else [a[0], a[1]]
    with on_device(x):
        return _FusedBottleneck.apply(x, *weights, *affine, tuple(args), block.conv2.stride[0], block.conv2.groups)


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
