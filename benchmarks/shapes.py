"""The grouped 3x3 convolutions of ResNeXt, and what one run of the fused op must compute and move.

One table, derived from the architecture rather than typed in: ResNeXt's bottleneck width is
``int(planes * width_per_group / 64) * groups`` with ``planes = 64 * 2**(stage - 1)``, the grouped
conv maps that width to itself, and at 224x224 input the stages run at 56, 28, 14 and 7 pixels.
Each stage contributes its stride-1 block and, for stages 2-4, the stride-2 first block, whose
grouped conv reads the bottleneck width of the *new* stage at the *previous* stage's spatial size
(the stride sits on the 3x3 conv). Stage 1's first block has stride 1 and the same shape as the
others, so it is listed once.

The FLOP and byte formulas are shared by every provider, so that TFLOP/s, GB/s and the roofline
fraction compare like with like.
"""

import math
from dataclasses import dataclass

import torch

__all__ = ["ARCHS", "REGNETS", "MODES", "BOTTLENECK_MODES", "BlockShape", "block_shapes", "regnet_shapes",
           "stage_planes", "stage_size", "block_inplanes", "bottleneck_of", "bottleneck_shapes", "conv_flops",
           "min_bytes", "throughput"]

MODES = ("inference", "train_fwd", "train_fwd_bwd")

# name -> (blocks per stage, groups (cardinality), width_per_group (base width))
ARCHS = {
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
}

# RegNetY (Radosavovic et al. 2020) as timm builds it (regnet.py's width generator, bottleneck ratio
# 1, widths rounded to the group width): the grouped 3x3 conv's width per stage, and the group width
# (channels per group: 24 and 112, which no power-of-two channel tile divides). Every stage's first
# block has stride 2, stage 1's too (the stem's stride-2 conv leaves 112x112).
REGNETS = {
    "regnety_016": ((48, 120, 336, 888), 24),
    "regnety_160": ((224, 448, 1232, 3024), 112),
}

IMAGE_SIZE = 224
STEM_REDUCTION = 4  # 7x7/2 conv then 3x3/2 max-pool: stage 1 runs at 224 / 4 = 56


def stage_planes(stage: int) -> int:
    """A ResNet/ResNeXt bottleneck's ``planes`` at ``stage`` (1..4): 64, 128, 256, 512 (its output is
    planes·4 channels)."""
    return 64 * 2 ** (stage - 1)


def stage_size(stage: int) -> int:
    """The side of the feature map a stage's stride-1 blocks run at, for ``stage`` 1..4 of a 224-pixel
    image: 56, 28, 14, 7 (a stride-2 first block takes twice that in)."""
    return IMAGE_SIZE // STEM_REDUCTION // 2 ** (stage - 1)


@dataclass(frozen=True)
class BlockShape:
    """One grouped 3x3 conv (padding 1) of a ResNeXt bottleneck; ``channels`` in = out."""

    arch: str
    stage: int  # 1..4
    stride: int  # 1, or 2 for the first block of stages 2-4
    channels: int  # bottleneck width of the stage
    groups: int
    size: int  # input height = width

    @property
    def out_size(self) -> int:
        return (self.size + 2 - 3) // self.stride + 1

    @property
    def channels_per_group(self) -> int:
        return self.channels // self.groups

    @property
    def label(self) -> str:
        """Short name used in test ids, tables and the chart: ``stage2``, ``stage2/s2``."""
        return f"stage{self.stage}" + ("/s2" if self.stride == 2 else "")

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.label.replace('/', '-')}"

    def input_shape(self, batch: int) -> tuple:
        return (batch, self.channels, self.size, self.size)

    def output_shape(self, batch: int) -> tuple:
        return (batch, self.channels, self.out_size, self.out_size)


def block_shapes(arch: str | None = None) -> list[BlockShape]:
    """Every distinct grouped-conv shape of ``arch`` (all of ``ARCHS`` when None), stage order."""
    shapes = []
    for name in ([arch] if arch else ARCHS):
        _, groups, width_per_group = ARCHS[name]
        for stage in range(1, 5):
            planes = stage_planes(stage)
            width = int(planes * width_per_group / 64) * groups
            size = stage_size(stage)
            if stage > 1:
                shapes.append(BlockShape(name, stage, 2, width, groups, size * 2))
            shapes.append(BlockShape(name, stage, 1, width, groups, size))
    return shapes


def regnet_shapes(arch: str | None = None) -> list[BlockShape]:
    """Every distinct grouped-conv shape of a RegNet of ``REGNETS`` (all when None), stage order."""
    shapes = []
    for name in ([arch] if arch else REGNETS):
        widths, group_width = REGNETS[name]
        for stage, width in enumerate(widths, 1):
            size = stage_size(stage)
            shapes.append(BlockShape(name, stage, 2, width, width // group_width, size * 2))
            shapes.append(BlockShape(name, stage, 1, width, width // group_width, size))
    return shapes


def block_inplanes(shape: BlockShape) -> list[int]:
    """Input channels of the ResNeXt bottlenecks whose grouped conv is ``shape``: a stride-2 shape is
    its stage's first block (projection from planes·2 channels); a stride-1 shape the identity blocks
    (planes·4), and at stage 1 also the network's first block (a stride-1 projection from 64)."""
    planes = stage_planes(shape.stage)
    if shape.stride == 2:
        return [planes * 2]
    return [planes * 4] + ([planes] if shape.stage == 1 else [])


def bottleneck_of(shape: BlockShape, inplanes: int | None = None):
    """The float32 ``resnext.Bottleneck`` (CPU, train mode) whose grouped conv is ``shape``, with
    ``inplanes`` input channels (default: ``block_inplanes(shape)[0]``) and the 1x1 projection
    shortcut wherever the stride or the channels change."""
    import torch.nn as nn

    import resnext

    planes = stage_planes(shape.stage)
    wpg = shape.channels * 64 // (planes * shape.groups)
    inplanes = inplanes or block_inplanes(shape)[0]
    down = None
    if shape.stride == 2 or inplanes != planes * 4:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, shape.stride, bias=False), nn.BatchNorm2d(planes * 4))
    return resnext.Bottleneck(inplanes, planes, shape.stride, down, shape.groups, wpg)


def conv_flops(shape: BlockShape, batch: int, mode: str) -> int:
    """FLOPs of the op, counted as 2 x multiply-accumulates of its convolutions.

    ``inference`` and ``train_fwd`` run one convolution; ``train_fwd_bwd`` adds the input
    gradient (dgrad) and the weight gradient (wgrad), each as many MACs as the forward. BN and
    ReLU are O(elements), not counted; this is what ``torch.utils.flop_counter`` counts too.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n, c, ho, wo = shape.output_shape(batch)
    macs = n * c * ho * wo * shape.channels_per_group * 9
    return 2 * macs * (3 if mode == "train_fwd_bwd" else 1)


def min_bytes(shape: BlockShape, batch: int, dtype: torch.dtype, mode: str) -> int:
    """Compulsory memory traffic of one call: each tensor the op consumes is read once, each
    tensor it produces is written once, nothing intermediate goes through memory.

    Activations (x, y, dy, dx) and the conv weight (and its gradient) are in ``dtype``; the BN
    vectors are float32, one value per channel.

    - ``inference``: read x, weight, gamma, beta, running mean and var; write y.
    - ``train_fwd``: read x, weight, gamma, beta; read and write running mean and var; write y
      and the saved per-channel mean and inverse std for the backward.
    - ``train_fwd_bwd``: ``train_fwd``, then a backward that reads dy, x (to recompute the
      normalised conv output and for wgrad), weight, gamma, beta, saved mean and inverse std, and
      writes dx, dweight, dgamma, dbeta.

    This is a lower bound no implementation beats: a real training forward must also see the conv
    output twice (batch statistics before normalising), so ``train_*`` roofline fractions near 1
    are not reachable; the fraction still ranks providers fairly because all share this count.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    e = torch.empty((), dtype=dtype).element_size()
    x = math.prod(shape.input_shape(batch)) * e
    y = math.prod(shape.output_shape(batch)) * e
    w = shape.channels * shape.channels_per_group * 9 * e
    vec = shape.channels * 4  # one float32 per channel
    if mode == "inference":
        return x + w + 4 * vec + y
    fwd = x + w + 2 * vec + 2 * 2 * vec + y + 2 * vec
    if mode == "train_fwd":
        return fwd
    bwd = (y + x + w + 4 * vec) + (x + w + 2 * vec)  # reads (dy, x, ...) + writes (dx, dw, ...)
    return fwd + bwd


def throughput(flops: float, nbytes: float, median_ms: float, copy_gbps: float | None) -> dict:
    """TFLOP/s, GB/s (1e9 bytes) and the fraction of the measured copy bandwidth, from one time."""
    seconds = median_ms * 1e-3
    gbps = nbytes / seconds / 1e9
    return {
        "tflops": flops / seconds / 1e12,
        "gbps": gbps,
        "roofline": gbps / copy_gbps if copy_gbps else None,
    }


BOTTLENECK_MODES = ("inference", "train_fwd_bwd")


def bottleneck_shapes():
    """(arch, stage, stride, inplanes, planes, groups, width_per_group, input size) of the first
    (projection) block and a stride-1 identity block of every stage."""
    out = []
    for arch, (_, groups, wpg) in ARCHS.items():
        for stage in range(1, 5):
            planes = stage_planes(stage)
            size = stage_size(stage)
            stride = 1 if stage == 1 else 2
            inplanes = 64 if stage == 1 else planes * 2
            out.append((arch, stage, stride, inplanes, planes, groups, wpg, size * stride))
            out.append((arch, stage, 1, planes * 4, planes, groups, wpg, size))
    return out
