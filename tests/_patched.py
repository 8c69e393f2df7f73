"""What the tests of patched third-party models share (tests/test_adoption.py on stand-ins,
tests/test_thirdparty_models.py on the real torchvision and timm): BatchNorms made non-trivial, the
blocks ``fuse_kernels`` recognises and the weight of each one's fused grouped conv, a spy on the
convolutions PyTorch runs, and the checks that a patched model is still the same model."""

import warnings

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from resnext import patch


def randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every BatchNorm-like module (plain,
    Sync, Frozen, timm's Act: whatever holds running statistics and an affine weight), so that no
    BatchNorm is the identity; this also undoes timm's zero_init_last, which would leave every
    branch's gradients zero."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None and getattr(m, "weight", None) is not None:
                c = m.running_mean.numel()
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks ``fuse_kernels`` recognises, in module order."""
    return [m for m in model.modules() if patch.block_kind(m) is not None]


def conv2_weight(block: nn.Module) -> torch.Tensor:
    """The weight of the grouped 3x3 conv the fused op computes: ``conv2`` (ResNet), ``conv2.conv``
    (timm's RegNet), ``f.b[0]`` (torchvision's RegNet)."""
    kind = patch.block_kind(block)
    if kind == "timm.models.regnet.Bottleneck":
        return block.conv2.conv.weight
    if kind == "torchvision.models.regnet.ResBottleneckBlock":
        return block.f.b[0].weight
    return block.conv2.weight


def fused_weights(model: nn.Module) -> set[int]:
    """data_ptr of the weight of every grouped 3x3 conv the fused op computes, block by block (what a
    ``ConvCalls`` entry's first field is matched against)."""
    return {conv2_weight(b).data_ptr() for b in model_blocks(model)}


class ConvCalls(TorchDispatchMode):
    """Every convolution PyTorch runs, forward and backward: ``(weight data_ptr, groups, kernel size)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:  # (x, w, bias, stride, padding, dilation, ..., groups)
            self.calls.append((args[1].data_ptr(), args[8], tuple(args[1].shape[2:])))
        elif func is torch.ops.aten.convolution_backward.default:  # (dy, x, w, ..., groups, output_mask)
            self.calls.append((args[2].data_ptr(), args[9], tuple(args[2].shape[2:])))
        return func(*args, **(kwargs or {}))


def assert_same_structure(model: nn.Module, ref: nn.Module) -> None:
    """Same classes, state_dict keys, parameter and buffer names as an unpatched twin."""
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in ref.named_buffers()]


def assert_unpatched(model: nn.Module) -> None:
    """No block patched, no forward left on any instance (what ``unfuse_kernels`` promises)."""
    assert not any(patch.is_patched(b) for b in model_blocks(model))
    assert not any("forward" in vars(m) for m in model.modules())


def one_warning(fn) -> str:
    """Call ``fn``; return the text of the one fuse_kernels warning it gave (asserting there was one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    caught = [str(w.message) for w in caught if "fuse_kernels" in str(w.message)]
    assert len(caught) == 1, caught
    return caught[0]
