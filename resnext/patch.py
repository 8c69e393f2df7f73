"""Patch torchvision's and timm's ResNet/ResNeXt bottlenecks in place to use the fused op.

:func:`resnext.fuse_kernels` calls this for every block of a model that is not one of ours. A
recognised block keeps its class, modules, parameters, buffers and state_dict keys; only its
``forward`` changes, through an instance attribute::

    block.forward = functools.partial(_torchvision_forward, block)   # or _timm_forward

which ``nn.Module.__call__`` finds before the class's ``forward``. The functions below are the
libraries' own ``Bottleneck.forward`` with ``conv2 -> bn2 -> ReLU`` replaced by one call of the
fused op on the very same ``conv2``/``bn2`` modules; everything else runs as before. A partial of
a module-level function survives ``copy.deepcopy`` and pickling (``torch.save(model)``) bound to
the copy's own modules; :func:`unpatch_block` deletes the attribute and the class's ``forward``
is back.

Recognised blocks (by class module and name, so neither library is imported here):

* ``torchvision.models.resnet.Bottleneck`` (resnet50/101/152, resnext*, wide_resnet*; also the
  backbones of torchvision's detection and segmentation models), forward as in torchvision 0.28;
* ``timm.models.resnet.Bottleneck`` (resnet*, resnext*, seresnext*, ecaresnet*, resnetblur*,
  resnetrs*, ... in ``timm/models/resnet.py``), forward as of timm 0.6 to 1.0; the older one
  (drop_block after every BN) is only reproduced when drop_block is off, and is refused otherwise;
* subclasses of either that do not override ``forward``.

A block is fused only when the op computes it exactly (:func:`unfusable_reason` says why not):
conv2 a bias-free ``nn.Conv2d`` 3x3, dilation 1, stride 1 or 2, equal zero padding in [0, 2]
(groups 1 too: ResNet-50's blocks fuse like ResNeXt's); bn2 an ``nn.BatchNorm2d``, an
``nn.SyncBatchNorm`` (after ``convert_sync_batchnorm``: global-batch statistics in a process group)
or torchvision's ``FrozenBatchNorm2d`` (detection backbones; eps > 0), none subclassed with another
forward;
the activation after it ``nn.ReLU``; in timm, ``drop_block`` off (``nn.Identity`` or ``None``).
timm's ``aa`` (BlurPool, after the activation), ``se`` and ``drop_path`` are outside the fused
part and run as they are. Forward hooks on ``conv2``/``bn2`` no longer fire (those modules are not
called), as in :class:`resnext.Bottleneck`'s fused path.
"""

import functools
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["BLOCK_NAMES", "block_kind", "unfusable_reason", "patch_block", "unpatch_block", "is_patched"]


def _defining_class(cls: type, names) -> Optional[type]:
    """The class in ``cls``'s MRO whose (module, name) is one of ``names``, or None."""
    for base in cls.__mro__:
        if (base.__module__, base.__qualname__) in names:
            return base
    return None


def _fused_ops():
    """The fused op, imported only when a patched block runs (``import resnext`` stays light)."""
    from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu, grouped_conv_bn_relu_modules

    return grouped_conv_bn_relu, grouped_conv_bn_relu_modules


_FROZEN_BN = (("torchvision.ops.misc", "FrozenBatchNorm2d"),)


def _is_frozen_bn(bn: nn.Module) -> bool:
    return _defining_class(type(bn), _FROZEN_BN) is not None


def _conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """``relu(bn(conv(x)))`` through the fused op, for an nn.BatchNorm2d or a FrozenBatchNorm2d."""
    op, op_modules = _fused_ops()
    if not _is_frozen_bn(bn):
        return op_modules(x, conv, bn)
    # FrozenBatchNorm2d is batch_norm with fixed statistics in train and eval alike
    return op(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, stride=conv.stride[0],
              padding=conv.padding[0], groups=conv.groups, eps=bn.eps, training=False)


def _torchvision_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Bottleneck.forward`` with conv2 -> bn2 -> relu fused."""
    identity = x
    out = block.relu(block.bn1(block.conv1(x)))
    out = _conv_bn_relu(out, block.conv2, block.bn2)
    out = block.bn3(block.conv3(out))
    if block.downsample is not None:
        identity = block.downsample(x)
    out += identity
    return block.relu(out)


def _timm_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Bottleneck.forward`` with conv2 -> bn2 -> (drop_block, off) -> act2 fused."""
    shortcut = x
    x = block.act1(block.bn1(block.conv1(x)))
    x = _conv_bn_relu(x, block.conv2, block.bn2)
    if block.aa is not None:  # None before timm 0.6, nn.Identity since when off
        x = block.aa(x)
    x = block.bn3(block.conv3(x))
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    x += shortcut
    return block.act3(x)


# (class module, class name) -> (fused forward, the attribute holding the ReLU after bn2)
_BLOCKS = {
    ("torchvision.models.resnet", "Bottleneck"): (_torchvision_forward, "relu"),
    ("timm.models.resnet", "Bottleneck"): (_timm_forward, "act2"),
}
BLOCK_NAMES = tuple(f"{module}.{name}" for module, name in _BLOCKS)
_FORWARDS = tuple(forward for forward, _ in _BLOCKS.values())


def block_kind(module: nn.Module) -> Optional[str]:
    """``"torchvision.models.resnet.Bottleneck"`` (or timm's) when ``module`` is one, else None."""
    base = _defining_class(type(module), _BLOCKS)
    return None if base is None else f"{base.__module__}.{base.__qualname__}"


def _same_forward(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _conv_reason(conv: nn.Module) -> Optional[str]:
    if not _same_forward(conv, nn.Conv2d):
        return f"conv2 is {type(conv).__name__}, not an nn.Conv2d"
    problems = []
    if conv.kernel_size != (3, 3):
        problems.append(f"kernel_size={conv.kernel_size} (3x3 only)")
    if conv.dilation != (1, 1):
        problems.append(f"dilation={conv.dilation} (1 only)")
    if conv.stride not in ((1, 1), (2, 2)):
        problems.append(f"stride={conv.stride} (1 or 2 only)")
    if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1] or not 0 <= conv.padding[0] <= 2:
        problems.append(f"padding={conv.padding!r} (equal integers in [0, 2] only)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r} (zeros only)")
    if conv.bias is not None:
        problems.append("a bias (bias=False only)")
    return f"conv2 has {', '.join(problems)}" if problems else None


def _bn_reason(bn: nn.Module, conv: nn.Conv2d) -> Optional[str]:
    if _is_frozen_bn(bn):
        if type(bn).forward is not _defining_class(type(bn), _FROZEN_BN).forward:
            return f"bn2 is {type(bn).__name__}, a FrozenBatchNorm2d with its own forward"
        if not bn.eps > 0:
            return f"bn2 is a FrozenBatchNorm2d with eps={bn.eps} (the op needs eps > 0)"
        channels = bn.weight.numel()
    elif _same_forward(bn, nn.BatchNorm2d) or _same_forward(bn, nn.SyncBatchNorm):
        channels = bn.num_features
    else:
        return (f"bn2 is {type(bn).__module__}.{type(bn).__name__}, not an nn.BatchNorm2d, an "
                "nn.SyncBatchNorm or torchvision's FrozenBatchNorm2d")
    if channels != conv.out_channels:
        return f"bn2 has {channels} channels but conv2 has {conv.out_channels}"
    return None


def unfusable_reason(block: nn.Module) -> Optional[str]:
    """Why the fused op cannot compute this recognised block's conv2 -> bn2 -> ReLU exactly, or None."""
    kind = block_kind(block)
    if kind is None:
        return f"{type(block).__name__} is not one of {', '.join(BLOCK_NAMES)}"
    base = _defining_class(type(block), _BLOCKS)
    if type(block).forward is not base.forward:
        return f"{type(block).__qualname__} overrides {kind}.forward"
    if "forward" in vars(block) and not is_patched(block):
        return "its forward is already replaced on the instance by another patch"
    forward, act_name = _BLOCKS[(base.__module__, base.__qualname__)]
    reason = _conv_reason(block.conv2) or _bn_reason(block.bn2, block.conv2)
    if reason:
        return reason
    act = getattr(block, act_name)
    if not _same_forward(act, nn.ReLU):
        return f"{act_name} is {type(act).__name__}, not nn.ReLU"
    if forward is _timm_forward:
        drop_block = getattr(block, "drop_block", None)
        if drop_block is not None and type(drop_block) is not nn.Identity:
            return f"drop_block is {type(drop_block).__name__} (DropBlock sits between bn2 and act2)"
    return None


def is_patched(block: nn.Module) -> bool:
    """True when ``block.forward`` is this module's fused forward."""
    forward = vars(block).get("forward")
    return isinstance(forward, functools.partial) and forward.func in _FORWARDS and forward.args[0] is block


def patch_block(block: nn.Module) -> None:
    """Route ``block``'s conv2 -> bn2 -> ReLU through the fused op; check :func:`unfusable_reason` first."""
    base = _defining_class(type(block), _BLOCKS)
    forward, _ = _BLOCKS[(base.__module__, base.__qualname__)]
    block.forward = functools.partial(forward, block)


def unpatch_block(block: nn.Module) -> None:
    """Back to the class's own ``forward``; a block that is not patched is left as it is."""
    if is_patched(block):
        del block.forward
