"""Patch torchvision's and timm's ResNet/ResNeXt and RegNet blocks in place to use the fused kernels.

:func:`resnext.fuse_kernels` calls this for every block of a model that is not one of ours. A
recognised block keeps its class, modules, parameters, buffers and state_dict keys; only a
``forward`` changes, through an instance attribute::

    module.forward = functools.partial(_torchvision_forward, module)   # or another fused forward

which ``nn.Module.__call__`` finds before the class's ``forward``. A partial of a module-level
function survives ``copy.deepcopy`` and pickling (``torch.save(model)``) bound to the copy's own
modules; :func:`unpatch_block` deletes the attribute and the class's ``forward`` is back.

Where the patch goes depends on the block:

* ResNet/ResNeXt ``Bottleneck`` (torchvision's, timm's): on the block. At the conv level its
  forward is the library's own ``Bottleneck.forward`` with ``conv2 -> bn2 -> ReLU`` replaced by one
  call of the fused op on the very same ``conv2``/``bn2`` modules; at the block level
  (``level="block"``, plain blocks only, see below) it is ``kernels.bottleneck.fused_bottleneck`` on
  the block's own modules.
* RegNet (timm's ``regnet.Bottleneck``, RegNetX/RegNetY; torchvision's ``regnet.ResBottleneckBlock``):
  on the conv-norm-act module inside the block that holds the grouped 3x3 conv: timm's
  ``block.conv2`` (a ``ConvNormAct``: ``.conv``, then ``.bn``, a ``BatchNormAct2d`` holding ``.drop``
  and ``.act``, then, since timm 1.0, an optional ``.aa``) and torchvision's ``block.f.b`` (a
  ``Conv2dNormActivation``, an ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)``). Its forward becomes one
  call of the fused op (then timm's ``aa``, when there is one); the block's own forward (the SE
  module, conv3, the shortcut) runs as the library wrote it. Why not patch the block: timm's RegNet
  forward changed between versions (0.5: ``x += shortcut``, ``se``/``drop_path`` None when off; 0.6
  on: ``drop_path(x) + downsample(shortcut)``, and no shortcut at all when ``downsample`` is None),
  while ConvNormAct's has stayed conv -> bn [-> aa] and torchvision's is nn.Sequential's: the small
  module is less code to reproduce, the same in every version.

Recognised blocks (by class module and name, so neither library is imported here), and subclasses
of them that do not override ``forward``:

* ``torchvision.models.resnet.Bottleneck`` (resnet50/101/152, resnext*, wide_resnet*; also the
  backbones of torchvision's detection and segmentation models), forward as in torchvision 0.28;
* ``timm.models.resnet.Bottleneck`` (resnet*, resnext*, seresnext*, ecaresnet*, resnetblur*,
  resnetrs*, ... in ``timm/models/resnet.py``), forward as of timm 0.6 to 1.0; the older one
  (drop_block after every BN) is only reproduced when drop_block is off, and is refused otherwise;
* ``timm.models.regnet.Bottleneck`` (regnetx_*, regnety_*; timm 0.5 to 1.0: conv2 a ``ConvBnAct``,
  ``ConvNormAct`` or ``ConvNormActAa`` of ``timm.models.layers`` or ``timm.layers``; regnetz_* and
  regnety_040s_gn are recognised and refused: SiLU, GroupNorm);
* ``torchvision.models.regnet.ResBottleneckBlock`` (regnet_x_*, regnet_y_*; ``f.b`` checked by its
  structure, an nn.Sequential of Conv2d, BatchNorm, ReLU: torchvision 0.12's ``ConvNormActivation``
  and 0.13's ``Conv2dNormActivation`` alike).

Conv level: a block is fused only when the op computes it exactly (:func:`unfusable_reason` says why
not): the conv a bias-free ``nn.Conv2d`` 3x3, dilation 1, stride 1 or 2, equal zero padding in
[0, 2] (groups 1 too: ResNet-50's blocks fuse like ResNeXt's); the norm an ``nn.BatchNorm2d``, an
``nn.SyncBatchNorm`` (after ``convert_sync_batchnorm``: global-batch statistics in a process group)
or torchvision's ``FrozenBatchNorm2d`` (detection backbones; eps > 0) and, in timm's RegNet,
``BatchNormAct2d``, ``SyncBatchNormAct`` (timm's own ``convert_sync_batchnorm``) or
``FrozenBatchNormAct2d`` (``freeze_batch_norm_2d``), none subclassed with another forward; the
activation after it ``nn.ReLU``; timm's ``drop_block`` (ResNet) or ``bn.drop`` (RegNet) off
(``nn.Identity`` or absent). timm's ``aa`` (BlurPool, after the activation), ``se`` and ``drop_path``
are outside the fused part and run as they are. BatchNorms in eval mode inside a model in train mode
(mmdetection's ``norm_eval``) use their running statistics and still train their affine parameters.

Block level (torchvision's and timm's ResNet ``Bottleneck`` only): the whole block through
``kernels.bottleneck.fused_bottleneck``, when it is plain: nn.ReLU activations, exactly
``nn.BatchNorm2d`` everywhere, no ``se``, ``aa``, ``drop_block`` or ``drop_path``, a downsample that
is ``Sequential(Conv2d 1x1 with the stride, BatchNorm2d)`` or none, plus
``kernels.bottleneck.unfusable_reason``'s checks. RegNet blocks are refused there: their modules are
laid out otherwise (``conv2.conv``/``conv2.bn``, ``f.a``/``f.b``/``f.c``) and RegNetY's SE sits between
conv2 and conv3.

Each fused forward first checks that the modules it computes are still what was checked when it was
patched (asked again only when one of the patched module's children or grandchildren was replaced;
otherwise a few µs of host time a call): a model changed after ``fuse_kernels`` (PyTorch's
``convert_sync_batchnorm`` on a timm RegNet turns ``BatchNormAct2d`` into an ``nn.SyncBatchNorm``
without its ReLU) raises a ValueError saying what changed, never computes something else. Attributes changed in place
(``conv.stride = ...``) are not seen, and the check is skipped while ``torch.compile`` traces.
Forward hooks on the fused modules no longer fire (they are not called), as in
:class:`resnext.Bottleneck`'s fused path.
"""

import functools
import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

__all__ = ["BLOCK_NAMES", "LEVELS", "block_kind", "unfusable_reason", "patch_block", "unpatch_block", "is_patched",
           "patched_level"]

LEVELS = ("conv", "block")


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


def _name(module) -> str:
    return type(module).__name__


def _full_name(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _same_forward(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


# ---------------------------------------------------------------------------------------------
# The norm layers the fused op computes, by library

_TV_FROZEN_BN = (("torchvision.ops.misc", "FrozenBatchNorm2d"),)
_TIMM_LAYERS = ("timm.layers", "timm.models.layers")  # timm >= 0.9, and before
_TIMM_NORM_ACT = tuple((f"{p}.norm_act", c) for p in _TIMM_LAYERS
                       for c in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"))
_TIMM_FROZEN = tuple(n for n in _TIMM_NORM_ACT if n[1] == "FrozenBatchNormAct2d")
_TIMM_CONV_NORM_ACT = tuple((f"{p}.conv_bn_act", c) for p in _TIMM_LAYERS
                            for c in ("ConvNormAct", "ConvNormActAa", "ConvBnAct"))


def _is_frozen_bn(bn: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d or timm's FrozenBatchNormAct2d: buffers only, eval-mode maths."""
    return _defining_class(type(bn), _TV_FROZEN_BN + _TIMM_FROZEN) is not None


def _conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """``relu(bn(conv(x)))`` through the fused op, for any BatchNorm the reasons below accept."""
    op, op_modules = _fused_ops()
    if not _is_frozen_bn(bn):
        return op_modules(x, conv, bn)
    # a frozen BatchNorm is batch_norm with fixed statistics in train and eval alike
    return op(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, stride=conv.stride[0],
              padding=conv.padding[0], groups=conv.groups, eps=bn.eps, training=False)


# ---------------------------------------------------------------------------------------------
# Why the fused op cannot compute a conv -> norm -> act (None: it can)


def _conv_reason(conv: nn.Module, name: str = "conv2") -> Optional[str]:
    if not _same_forward(conv, nn.Conv2d):
        return f"{name} is {_name(conv)}, not an nn.Conv2d"
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
    return f"{name} has {', '.join(problems)}" if problems else None


def _frozen_reason(bn: nn.Module, name: str, base: type) -> Optional[str]:
    if type(bn).forward is not base.forward:
        return f"{name} is {_name(bn)}, a {base.__name__} with its own forward"
    if not bn.eps > 0:
        return f"{name} is a {base.__name__} with eps={bn.eps} (the op needs eps > 0)"
    return None


def _channels_reason(channels: int, conv: nn.Conv2d, name: str, conv_name: str) -> Optional[str]:
    if channels != conv.out_channels:
        return f"{name} has {channels} channels but {conv_name} has {conv.out_channels}"
    return None


def _bn_reason(bn: nn.Module, conv: nn.Conv2d, name: str = "bn2", conv_name: str = "conv2") -> Optional[str]:
    """A plain BatchNorm module (its activation is a separate module)."""
    frozen = _defining_class(type(bn), _TV_FROZEN_BN)
    if frozen is not None:
        return _frozen_reason(bn, name, frozen) or _channels_reason(bn.weight.numel(), conv, name, conv_name)
    if not (_same_forward(bn, nn.BatchNorm2d) or _same_forward(bn, nn.SyncBatchNorm)):
        return (f"{name} is {_full_name(bn)}, not an nn.BatchNorm2d, an nn.SyncBatchNorm or torchvision's "
                "FrozenBatchNorm2d")
    return _channels_reason(bn.num_features, conv, name, conv_name)


def _act_reason(act: nn.Module, name: str) -> Optional[str]:
    return None if _same_forward(act, nn.ReLU) else f"{name} is {_name(act)}, not nn.ReLU"


def _norm_act_reason(bn: nn.Module, conv: nn.Conv2d, name: str, conv_name: str) -> Optional[str]:
    """timm's BatchNormAct2d family: batch_norm, then ``.drop``, then ``.act``, in one module."""
    base = _defining_class(type(bn), _TIMM_NORM_ACT)
    if base is None:
        return (f"{name} is {_full_name(bn)}, not timm's BatchNormAct2d, SyncBatchNormAct or "
                "FrozenBatchNormAct2d (BatchNorm with its ReLU)")
    if base.__qualname__ == "FrozenBatchNormAct2d":
        why = _frozen_reason(bn, name, base) or _channels_reason(bn.weight.numel(), conv, name, conv_name)
    elif type(bn).forward is not base.forward:
        why = f"{name} is {_name(bn)}, a {base.__name__} with its own forward"
    else:
        why = _channels_reason(bn.num_features, conv, name, conv_name)
    drop = getattr(bn, "drop", None)  # absent before timm 0.6
    if not why and drop is not None and type(drop) is not nn.Identity:
        why = f"{name}.drop is {_name(drop)} (it sits between the BatchNorm and the ReLU)"
    return why or _act_reason(getattr(bn, "act", None), f"{name}.act")


# ---------------------------------------------------------------------------------------------
# The conv level: what each block computes through the fused op, and why it cannot


def _resnet_conv_reason(block: nn.Module) -> Optional[str]:
    """torchvision's and timm's ResNet Bottleneck: conv2 -> bn2 -> [drop_block] -> act."""
    reason = _conv_reason(block.conv2) or _bn_reason(block.bn2, block.conv2)
    if reason:
        return reason
    timm = _defining_class(type(block), (("timm.models.resnet", "Bottleneck"),)) is not None
    act_name = "act2" if timm else "relu"
    reason = _act_reason(getattr(block, act_name), act_name)
    drop_block = getattr(block, "drop_block", None)
    if not reason and drop_block is not None and type(drop_block) is not nn.Identity:
        reason = f"drop_block is {_name(drop_block)} (DropBlock sits between bn2 and act2)"
    return reason


def _timm_conv_norm_act_reason(cna: nn.Module) -> Optional[str]:
    """timm's ConvNormAct (RegNet's conv2): conv -> bn (BatchNormAct2d: batch_norm, drop, act) -> aa."""
    base = _defining_class(type(cna), _TIMM_CONV_NORM_ACT)
    if base is None:
        return f"conv2 is {_full_name(cna)}, not timm's ConvNormAct"
    if type(cna).forward is not base.forward:
        return f"conv2 is {_name(cna)}, a {base.__name__} with its own forward"
    conv = getattr(cna, "conv", None)
    return _conv_reason(conv, "conv2.conv") or _norm_act_reason(cna.bn, conv, "conv2.bn", "conv2.conv")


def _tv_conv_norm_act_reason(seq: nn.Module) -> Optional[str]:
    """torchvision's Conv2dNormActivation (RegNet's f.b): Sequential(Conv2d, norm, activation)."""
    if not (_same_forward(seq, nn.Sequential) and len(seq) == 3):
        parts = f"({', '.join(_name(m) for m in seq)})" if isinstance(seq, nn.Sequential) else ""
        return (f"f.b is {_name(seq)}{parts}, not a Conv2dNormActivation(Conv2d, BatchNorm2d, ReLU): the fused op "
                "needs conv -> BatchNorm -> ReLU")
    return (_conv_reason(seq[0], "f.b[0]") or _bn_reason(seq[1], seq[0], "f.b[1]", "f.b[0]")
            or _act_reason(seq[2], "f.b[2]"))


# ---------------------------------------------------------------------------------------------
# The fused forwards. Each first checks that what it computes is still there (_still_fusable).

_CHECKED = weakref.WeakKeyDictionary()  # patched module -> (reason function, its parts, why not)


def _parts(module: nn.Module) -> list:
    """The module's children and theirs: every module a reason reads."""
    parts = []
    for child in module._modules.values():
        parts.append(child)
        if child is not None:
            parts.extend(child._modules.values())
    return parts


def _still_fusable(module: nn.Module, reason: Callable) -> None:
    """Raise when ``module`` changed since it was patched so that its fused forward would compute
    something else; ``reason`` is asked again only when one of its (grand)children was replaced."""
    if torch.compiler.is_compiling():
        return
    parts = _parts(module)
    seen = _CHECKED.get(module)
    if (seen is None or seen[0] is not reason or len(seen[1]) != len(parts)
            or any(a is not b for a, b in zip(seen[1], parts))):
        seen = _CHECKED[module] = (reason, parts, reason(module))
    if seen[2] is not None:
        raise ValueError(f"{_name(module)} was patched by resnext.fuse_kernels and has changed since: {seen[2]}; "
                         "call resnext.fuse_kernels(model) again, or resnext.unfuse_kernels(model)")


def _torchvision_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Bottleneck.forward`` with conv2 -> bn2 -> relu fused."""
    _still_fusable(block, _resnet_conv_reason)
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
    _still_fusable(block, _resnet_conv_reason)
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


def _timm_conv_norm_act_forward(cna: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``ConvNormAct.forward`` (0.5 to 1.0) with conv -> bn (drop off, act ReLU) fused."""
    _still_fusable(cna, _timm_conv_norm_act_reason)
    x = _conv_bn_relu(x, cna.conv, cna.bn)
    aa = getattr(cna, "aa", None)  # none in ConvNormAct 0.6-0.9, None or a module else
    return x if aa is None else aa(x)


def _tv_conv_norm_act_forward(seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Conv2dNormActivation`` (nn.Sequential's forward) fused."""
    _still_fusable(seq, _tv_conv_norm_act_reason)
    return _conv_bn_relu(x, seq[0], seq[1])


# ---------------------------------------------------------------------------------------------
# The block level (ResNet bottlenecks): kernels.bottleneck.fused_bottleneck

_EXTRAS = {"se": "squeeze-and-excitation", "aa": "anti-aliasing", "drop_block": "DropBlock",
           "drop_path": "stochastic depth"}


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Sequential):
        return f"{_name(module)}({', '.join(_name(m) for m in module)})"
    return _name(module)


def _block_level_reason(block: nn.Module) -> Optional[str]:
    """Why ``fused_bottleneck`` cannot compute this torchvision or timm Bottleneck exactly, or None."""
    acts = ("act1", "act2", "act3") if hasattr(block, "act1") else ("relu",)
    for name in acts:
        why = _act_reason(getattr(block, name, None), name)
        if why:
            return why
    for name, what in _EXTRAS.items():
        extra = getattr(block, name, None)
        if extra is not None and type(extra) is not nn.Identity:
            return f"{name} is {_name(extra)}: the fused bottleneck has no {what}"
    down = getattr(block, "downsample", None)
    if down is not None and not (isinstance(down, nn.Sequential) and len(down) == 2):
        return (f"downsample is {_describe(down)}, the fused bottleneck computes Sequential(Conv2d 1x1 with the "
                "stride, BatchNorm2d)")
    bns = [(n, getattr(block, n, None)) for n in ("bn1", "bn2", "bn3")]
    bns += [("downsample[1]", down[1])] if down is not None else []
    for name, bn in bns:  # the kernels' own check accepts any subclass (timm's BatchNormAct2d is one)
        if isinstance(bn, nn.BatchNorm2d) and not _same_forward(bn, nn.BatchNorm2d):
            return f"{name} is {_full_name(bn)}, an nn.BatchNorm2d with its own forward"
    from kernels.bottleneck import unfusable_reason as kernels_reason

    return kernels_reason(block)


def _fused_bottleneck_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole block through the Triton kernels (``kernels/bottleneck.py``)."""
    _still_fusable(block, _block_level_reason)
    from kernels.bottleneck import fused_bottleneck

    return fused_bottleneck(x, block)


# ---------------------------------------------------------------------------------------------
# The recognised blocks


class _Kind(NamedTuple):
    forward: Callable  # the conv level's fused forward, installed on target(block)
    target: Callable  # block -> the module whose forward the conv level replaces (None when absent)
    reason: Callable  # target -> why the fused op cannot compute it, or None
    missing: str  # why, when the block has no such target
    block_level: bool  # whether level="block" runs it (through fused_bottleneck)


def _itself(block):
    return block


def _timm_regnet_target(block):
    return getattr(block, "conv2", None)


def _tv_regnet_target(block):
    f = getattr(block, "f", None)
    return getattr(f, "b", None) if _same_forward(f, nn.Sequential) else None


_BLOCKS = {  # (class module, class name) -> _Kind
    ("torchvision.models.resnet", "Bottleneck"): _Kind(_torchvision_forward, _itself, _resnet_conv_reason, "", True),
    ("timm.models.resnet", "Bottleneck"): _Kind(_timm_forward, _itself, _resnet_conv_reason, "", True),
    ("timm.models.regnet", "Bottleneck"): _Kind(
        _timm_conv_norm_act_forward, _timm_regnet_target, _timm_conv_norm_act_reason, "it has no conv2", False),
    ("torchvision.models.regnet", "ResBottleneckBlock"): _Kind(
        _tv_conv_norm_act_forward, _tv_regnet_target, _tv_conv_norm_act_reason,
        "its f is not an nn.Sequential holding b (torchvision's BottleneckTransform)", False),
}
BLOCK_NAMES = tuple(f"{module}.{name}" for module, name in _BLOCKS)
_LEVEL_OF = {kind.forward: "conv" for kind in _BLOCKS.values()}
_LEVEL_OF[_fused_bottleneck_forward] = "block"


def _kind(block: nn.Module):
    """``(the recognised library class in block's MRO, its _Kind)``, or ``(None, None)``."""
    base = _defining_class(type(block), _BLOCKS)
    return (None, None) if base is None else (base, _BLOCKS[(base.__module__, base.__qualname__)])


def block_kind(module: nn.Module) -> Optional[str]:
    """``"torchvision.models.resnet.Bottleneck"`` (or another of ``BLOCK_NAMES``) when ``module`` is
    one, else None."""
    base, _ = _kind(module)
    return None if base is None else f"{base.__module__}.{base.__qualname__}"


def _targets(block: nn.Module):
    """The modules this module may have patched in ``block``: the block, and its conv-norm-act."""
    _, kind = _kind(block)
    if kind is None:
        return []
    target = kind.target(block)
    return [block] if target is None or target is block else [block, target]


def _level_of(module: nn.Module) -> Optional[str]:
    forward = vars(module).get("forward")
    if isinstance(forward, functools.partial) and forward.args and forward.args[0] is module:
        return _LEVEL_OF.get(forward.func)
    return None


def patched_level(block: nn.Module) -> Optional[str]:
    """``"conv"`` or ``"block"`` when this module patched ``block`` (or its conv-norm-act), else None."""
    for module in _targets(block):
        level = _level_of(module)
        if level is not None:
            return level
    return None


def is_patched(block: nn.Module) -> bool:
    """True when ``block`` (or, in a RegNet block, its conv-norm-act) runs one of this module's forwards."""
    return patched_level(block) is not None


def unfusable_reason(block: nn.Module, level: str = "conv") -> Optional[str]:
    """Why the fused op (``level="conv"``: the block's grouped conv -> BN -> ReLU) or the fused bottleneck
    (``level="block"``: the whole block) cannot compute this recognised block exactly, or None."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    base, kind = _kind(block)
    if base is None:
        return f"{_name(block)} is not one of {', '.join(BLOCK_NAMES)}"
    name = f"{base.__module__}.{base.__qualname__}"
    if type(block).forward is not base.forward:
        return f"{type(block).__qualname__} overrides {name}.forward"
    if level == "block" and not kind.block_level:
        return "level='block' runs torchvision's and timm's ResNet Bottleneck only (RegNet blocks: level='conv')"
    if level == "block":
        reason = _block_level_reason(block)
    else:
        target = kind.target(block)
        reason = kind.missing if target is None else kind.reason(target)
    if reason:
        return reason
    if any("forward" in vars(m) and _level_of(m) is None for m in _targets(block)):
        return "its forward is already replaced on the instance by another patch"
    return None


def patch_block(block: nn.Module, level: str = "conv") -> None:
    """Run ``block`` through the fused kernels at ``level``; a ValueError saying why when
    :func:`unfusable_reason` refuses it."""
    why = unfusable_reason(block, level)
    if why is not None:
        raise ValueError(f"cannot patch {_name(block)} at level={level!r}: {why}")
    unpatch_block(block)  # e.g. from the conv level to the block level
    if level == "block":
        block.forward = functools.partial(_fused_bottleneck_forward, block)
        return
    _, kind = _kind(block)
    target = kind.target(block)
    target.forward = functools.partial(kind.forward, target)


def unpatch_block(block: nn.Module) -> None:
    """Back to the classes' own ``forward``; what this module did not patch is left as it is."""
    for module in _targets(block):
        if _level_of(module) is not None:
            del module.forward
