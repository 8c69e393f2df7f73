"""ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", 2017).

The ImageNet models follow torchvision's ``models/resnet.py`` exactly: the stride sits on the
grouped 3x3 conv, the grouped width is ``int(planes * width_per_group / 64) * groups``, convs get
Kaiming-normal (fan_out) init, and the state_dict keys (``conv1``, ``bn1``, ``layerN.i.conv1..3``,
``bn1..3``, ``downsample.0/1``, ``fc``) are torchvision's, so torchvision and timm ``tv_in1k``
checkpoints load with ``strict=True``.

The CIFAR models are the paper's section 5.3: a 3x3 stem conv, three stages whose outputs are
256 / 512 / 1024 channels, a grouped width of ``groups * width_per_group * 2**i`` in stage ``i``,
and stride 2 on the grouped conv of stages 2 and 3 (depth = 9 * blocks_per_stage + 2).

Every aggregated transformation (grouped 3x3 conv -> BN -> ReLU) can run as one fused Triton op:
``fuse_kernels(model)`` flips a plain bool on every :class:`Bottleneck`, so no module, parameter,
buffer or state_dict key changes, and ``unfuse_kernels(model)`` flips it back. The same two calls
patch torchvision's and timm's ResNet/ResNeXt bottlenecks and RegNet blocks in place
(``resnext/patch.py``). The kernels are imported lazily, so ``import resnext`` never imports Triton
kernels and a caller can still switch Triton's interpreter on first (``kernels.auto_select_backend()``).
"""

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import patch as _patch

__all__ = [
    "Bottleneck",
    "ResNeXt",
    "CifarResNeXt",
    "resnext50_32x4d",
    "resnext101_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext152_32x4d",
    "resnext101_32x16d",
    "resnext29_8x64d",
    "resnext29_16x64d",
    "resnext_tiny",
    "fuse_kernels",
    "unfuse_kernels",
    "list_models",
    "create_model",
]


def _fused_op():
    """The fused grouped conv + BN + ReLU on modules, imported only when a model asks for it."""
    from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu_modules

    return grouped_conv_bn_relu_modules


def _fused_block():
    """The whole bottleneck through the Triton kernels (``kernels/bottleneck.py``)."""
    from kernels.bottleneck import fused_bottleneck

    return fused_bottleneck


LEVELS = ("conv", "block")


def _level(value) -> Optional[str]:
    """``fused_kernels`` as given (False/None, True, "conv", "block") -> None, "conv" or "block"."""
    if value is None or value is False:
        return None
    if value is True:
        return "conv"
    if value in LEVELS:
        return value
    raise ValueError(f"fused_kernels must be False, True, 'conv' or 'block', got {value!r}")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """ResNeXt's aggregated transformation: 1x1 reduce, grouped 3x3 (carries the stride), 1x1 expand.

    ``fused_kernels`` (a plain attribute, not a submodule): False; "conv" (or True) routes
    conv2 -> bn2 -> ReLU through the fused Triton op with the very same ``conv2``/``bn2`` modules;
    "block" runs the whole block through the Triton kernels (``kernels/bottleneck.py``), with the
    same modules, parameters and buffers.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.fused_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernels == "block":
            return _fused_block()(x, self)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.fused_kernels:
            out = _fused_op()(out, self.conv2, self.bn2)
        else:
            out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _make_stage(inplanes: int, planes: int, blocks: int, stride: int,
                groups: int, width_per_group: int) -> nn.Sequential:
    """One stage of ``blocks`` bottlenecks; the first one changes stride/width, with a projection."""
    downsample = None
    if stride != 1 or inplanes != planes * Bottleneck.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * Bottleneck.expansion, stride),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
    layers = [Bottleneck(inplanes, planes, stride, downsample, groups, width_per_group)]
    inplanes = planes * Bottleneck.expansion
    layers += [Bottleneck(inplanes, planes, 1, None, groups, width_per_group) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class _ResNeXtBase(nn.Module):
    """Shared init, head and forward; subclasses build the stem and ``self.stages``."""

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Each residual branch then starts as the identity (Goyal et al., arXiv:1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier (skipped when ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ResNeXt(_ResNeXtBase):
    """ImageNet ResNeXt: 7x7/2 stem, 3x3/2 max-pool, four bottleneck stages, average pool, fc."""

    def __init__(self, layers: Sequence[int], groups: int = 32, width_per_group: int = 4,
                 num_classes: int = 1000, zero_init_residual: bool = False, fused_kernels: Union[bool, str] = False):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {list(layers)}")
        self.groups, self.width_per_group = groups, width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = _make_stage(inplanes, planes, blocks, 1 if i == 0 else 2, groups, width_per_group)
            self.add_module(f"layer{i + 1}", stage)
            inplanes = planes * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights(zero_init_residual)
        level = _level(fused_kernels)
        if level:
            fuse_kernels(self, level=level)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of the last stage, ``(N, 2048, H/32, W/32)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CifarResNeXt(_ResNeXtBase):
    """The paper's CIFAR ResNeXt (section 5.3) for 32x32 inputs: 3x3 stem and three stages."""

    def __init__(self, depth: int = 29, groups: int = 8, width_per_group: int = 64, stem_width: int = 64,
                 num_classes: int = 10, zero_init_residual: bool = False, fused_kernels: Union[bool, str] = False):
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise ValueError(f"depth must be 9 * blocks_per_stage + 2 (11, 20, 29, ...), got {depth}")
        blocks = (depth - 2) // 9
        self.groups, self.width_per_group = groups, width_per_group
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem_width
        # planes 64 * 2**i makes the grouped width groups * width_per_group * 2**i and the
        # stage output 256 * 2**i, as in the paper.
        for i, planes in enumerate((64, 128, 256)):
            stage = _make_stage(inplanes, planes, blocks, 1 if i == 0 else 2, groups, width_per_group)
            self.add_module(f"layer{i + 1}", stage)
            inplanes = planes * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights(zero_init_residual)
        level = _level(fused_kernels)
        if level:
            fuse_kernels(self, level=level)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of the last stage, ``(N, 1024, H/4, W/4)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def _blocks(model: nn.Module):
    """``(name, block, kind)`` of every block to switch: ours (kind ``resnext.Bottleneck``) and
    torchvision's / timm's (``resnext.patch.BLOCK_NAMES``), in ``named_modules`` order."""
    found = []
    for name, m in model.named_modules():
        kind = "resnext.Bottleneck" if isinstance(m, Bottleneck) else _patch.block_kind(m)
        if kind is not None:
            found.append((name or "<model>", m, kind))
    if not found:
        looked_for = ", ".join(("resnext.Bottleneck",) + _patch.BLOCK_NAMES)
        raise ValueError(f"{type(model).__name__} holds no resnext.Bottleneck blocks, nor any other block "
                         f"with a grouped 3x3 conv -> BN -> ReLU to (un)fuse; looked for {looked_for}")
    return found


def _unfusable_reason(block: nn.Module, level: str) -> Optional[str]:
    """Why ``level`` cannot run ``block`` exactly, or None. Ours are not checked at the conv level: the op
    checks its inputs at every call."""
    if not isinstance(block, Bottleneck):
        return _patch.unfusable_reason(block, level)
    if level == "conv":
        return None
    from kernels.bottleneck import unfusable_reason

    return unfusable_reason(block)


def _by_reason(refused) -> str:
    """``"a, b (kind): why; c (kind): other reason"``: the refused blocks on one line, grouped by why."""
    groups = {}
    for name, _, kind, why in refused:
        groups.setdefault((kind, why), []).append(name)
    return "; ".join(f"{', '.join(names)} ({kind}): {why}" for (kind, why), names in groups.items())


def _refuse(model: nn.Module, refused, total: int, level: str, strict: bool) -> None:
    """Raise when strict or nothing else is fusable (then nothing was changed: a line per refused block),
    else warn once, on one line (logs keep it whole); either way naming every refused block, its kind
    and why."""
    fusable, model_name = total - len(refused), type(model).__name__
    if not strict and fusable:
        warnings.warn(f"fuse_kernels: left {len(refused)} of {total} blocks of {model_name} to PyTorch: "
                      f"{_by_reason(refused)}", stacklevel=4)
        return
    lines = "\n".join(f"  {name} ({kind}): {why}" for name, _, kind, why in refused)
    hint = ""
    if fusable:
        args = "strict=False" if level == "conv" else "level='block', strict=False"
        hint = f"; fuse_kernels(model, {args}) fuses the other {fusable} and leaves these to PyTorch"
    if level == "block":  # say where the conv level still applies (ours: not checked before their first call)
        conv_ok = sum(not isinstance(b, Bottleneck) and _patch.unfusable_reason(b, "conv") is None
                      for _, b, _, _ in refused)
        if conv_ok:
            hint += f"; level='conv' (the default) fuses the grouped conv + BN + ReLU of {conv_ok} of these"
    what = "the fused op" if level == "conv" else "the fused bottleneck"
    raise ValueError(f"{model_name}: {what} cannot compute {len(refused)} of its {total} blocks exactly, "
                     f"nothing was changed{hint}:\n{lines}")


def _switch(block: nn.Module, level) -> None:
    """One block to ``level`` ("conv", "block") or back to PyTorch (False): ours by their flag, theirs by
    patching their forward (``resnext/patch.py``)."""
    if isinstance(block, Bottleneck):
        block.fused_kernels = level
    elif level:
        _patch.patch_block(block, level)
    else:
        _patch.unpatch_block(block)


def _set_fused(model: nn.Module, value, strict: bool = True) -> nn.Module:
    blocks = _blocks(model)
    left = set()
    if value:  # every block is checked before any is changed: all or nothing when strict
        refused = [(name, block, kind, why) for name, block, kind in blocks
                   if (why := _unfusable_reason(block, value)) is not None]
        if refused:
            _refuse(model, refused, len(blocks), value, strict)
            left = {id(block) for _, block, _, _ in refused}
    for _, block, _ in blocks:
        _switch(block, False if id(block) in left else value)
    return model


def fuse_kernels(model: nn.Module, strict: bool = True, level: str = "conv") -> nn.Module:
    """Run every block's grouped conv + BN + ReLU as the fused Triton op, in place; returns ``model``.

    ``level="block"`` runs each whole bottleneck through the Triton kernels instead (1x1 GEMMs with
    BatchNorm statistics in their epilogues and BN + ReLU applied as the next conv loads its input;
    ``kernels/bottleneck.py``): no PyTorch convolution or BatchNorm inside a block. This package's
    :class:`Bottleneck`, and torchvision's and timm's ResNet ``Bottleneck`` where they are plain (ReLU,
    nn.BatchNorm2d, no SE, anti-aliasing, DropBlock or drop-path, a 1x1-conv or no downsample).

    Blocks: this package's :class:`Bottleneck`; torchvision's and timm's ResNet ``Bottleneck``
    (``torchvision.models.resnext50_32x4d()``, ``timm.create_model("seresnext50_32x4d")``, a detection
    backbone...; ResNets with groups=1 fuse too) and RegNet blocks (``torchvision.models.regnet_y_1_6gf()``,
    ``timm.create_model("regnetx_032")``: the grouped conv2 with its BatchNorm and ReLU; their SE runs in
    PyTorch), patched per instance (see :mod:`resnext.patch`). Works in train and eval mode (and with
    BatchNorms in eval mode inside a model in train mode, mmdetection's ``norm_eval``); the model keeps
    its class, modules, parameters, buffers and state_dict keys, so checkpoints, optimizers and
    training scripts work unchanged.

    A block that ``level`` cannot compute exactly (a dilated conv2, DropBlock or a non-ReLU activation
    after bn2, timm's BatchNormAct2d with SiLU, an SE module at the block level, ...) raises one
    ValueError naming every such block and why (a line each), and nothing is changed; with
    ``strict=False`` such blocks are left to PyTorch (not to another level) and one warning, one line,
    names them, grouped by why. A model with no block at all, or none that ``level`` can compute, is a
    ValueError.
    Imports the kernels now, so switch Triton's interpreter on first on a machine without a GPU.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    _fused_op() if level == "conv" else _fused_block()  # fail here, not in the first forward
    return _set_fused(model, level, strict)


def unfuse_kernels(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_kernels` (either level): back to eager PyTorch in every block."""
    return _set_fused(model, False)


def _resnext(layers: Sequence[int], groups: int, width_per_group: int, **kwargs) -> ResNeXt:
    return ResNeXt(layers, groups=groups, width_per_group=width_per_group, **kwargs)


def resnext50_32x4d(num_classes: int = 1000, fused_kernels: Union[bool, str] = False, **kwargs) -> ResNeXt:
    """ResNeXt-50 32x4d (25.0 M parameters, 4.23 GMACs at 224x224)."""
    return _resnext([3, 4, 6, 3], 32, 4, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext101_32x4d(num_classes: int = 1000, fused_kernels: Union[bool, str] = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 32x4d (44.2 M parameters, 7.97 GMACs)."""
    return _resnext([3, 4, 23, 3], 32, 4, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext101_32x8d(num_classes: int = 1000, fused_kernels: Union[bool, str] = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 32x8d (88.8 M parameters, 16.41 GMACs)."""
    return _resnext([3, 4, 23, 3], 32, 8, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext101_64x4d(num_classes: int = 1000, fused_kernels: Union[bool, str] = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 64x4d (83.5 M parameters, 15.46 GMACs)."""
    return _resnext([3, 4, 23, 3], 64, 4, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext152_32x4d(num_classes: int = 1000, fused_kernels: Union[bool, str] = False, **kwargs) -> ResNeXt:
    """ResNeXt-152 32x4d (60.0 M parameters, 11.71 GMACs)."""
    return _resnext([3, 8, 36, 3], 32, 4, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext101_32x16d(num_classes: int = 1000, fused_kernels: Union[bool, str] = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 32x16d (194.0 M parameters, 36.16 GMACs; the width of Mahajan et al.'s WSL models)."""
    return _resnext([3, 4, 23, 3], 32, 16, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext29_8x64d(num_classes: int = 10, fused_kernels: Union[bool, str] = False, **kwargs) -> CifarResNeXt:
    """CIFAR ResNeXt-29 8x64d (34.4 M parameters, 5.39 GMACs), for 32x32 inputs."""
    return CifarResNeXt(29, 8, 64, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext29_16x64d(num_classes: int = 10, fused_kernels: Union[bool, str] = False, **kwargs) -> CifarResNeXt:
    """CIFAR ResNeXt-29 16x64d (68.2 M parameters; the paper says 68.1), for 32x32 inputs."""
    return CifarResNeXt(29, 16, 64, num_classes=num_classes, fused_kernels=fused_kernels, **kwargs)


def resnext_tiny(num_classes: int = 10, fused_kernels: Union[bool, str] = False, **kwargs) -> CifarResNeXt:
    """Small CIFAR-style ResNeXt-11 8x4d (grouped widths 32/64/128, 16-channel stem) for quick runs."""
    return CifarResNeXt(11, 8, 4, stem_width=16, num_classes=num_classes,
                        fused_kernels=fused_kernels, **kwargs)


_MODELS: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (resnext50_32x4d, resnext101_32x4d, resnext101_32x8d, resnext101_64x4d, resnext152_32x4d,
              resnext101_32x16d, resnext29_8x64d, resnext29_16x64d, resnext_tiny)
}


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`."""
    return list(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by builder name, e.g. ``create_model("resnext50_32x4d", fused_kernels=True)``."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(_MODELS)}") from None
    return builder(**kwargs)
