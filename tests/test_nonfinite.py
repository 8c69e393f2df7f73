"""NaN and inf in the input: the fused op and the fused bottleneck are never more finite than PyTorch.

A diverging run must show up as NaN, not train on: every output, gradient and running statistic that
PyTorch's eager modules make non-finite must be non-finite in ours, and where the output and the
running statistics are finite in both they must agree. Ours may have *more* non-finite values:
block-diagonal packing multiplies the other groups of a channel tile by exact zeros, and NaN·0 and
inf·0 are NaN (the op's Limitations). Gradients are held to the first rule only: where our forward
is NaN and PyTorch's is not, ReLU's backward passes dy on (as PyTorch's does at a NaN), so e.g.
dβ = Σ dy there, finite and unlike PyTorch's Σ dy·[y > 0].

Reference: the eager modules in float64 and in float32 (their union of non-finite positions);
values compared where all three are finite, with the usual norm-wise tolerance (``_helpers``).
Run with the interpreter's and with the GPU's tiles and composition (the ``tiles`` fixture).
"""

import copy

import pytest
import torch

import resnext
from _helpers import TOL, rel_errors
from kernels.bottleneck import FusedBottleneck
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU
from kernels.reference import ConvBNReLU
from test_bottleneck import _block

POISONS = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
           pytest.param(float("-inf"), id="-inf")]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def _poisoned(shape, value, device, seed=0):
    """A channels-last float32 input with ``value`` at one element (sample 0, channel 1, near the middle)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[0, 1, shape[2] // 2, shape[3] // 3] = value
    return x.to(device).contiguous(memory_format=torch.channels_last)


def _run(module, x, dy):
    """Output, dx, every parameter gradient and every floating buffer after one forward + backward."""
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"d.{k}": p.grad for k, p in module.named_parameters()})
    out.update({f"b.{k}": b.clone() for k, b in module.named_buffers() if b.is_floating_point()})
    return out


def check_never_more_finite(ours, exact, eager):
    """Every value non-finite in PyTorch (float64 or float32) is non-finite in ours; where all three
    are finite, the output and the buffers agree with float64 within TOL. Returns how many values
    were compared."""
    compared = 0
    for name, ref in exact.items():
        got, ref32 = ours[name].detach().double().cpu(), eager[name].detach().double().cpu()
        ref = ref.detach().cpu()
        bad_ref = ~torch.isfinite(ref) | ~torch.isfinite(ref32)
        missed = bad_ref & torch.isfinite(got)
        assert not missed.any(), (f"{name}: {int(missed.sum())} of {int(bad_ref.sum())} values non-finite in "
                                  f"PyTorch are finite in ours, e.g. at {tuple(missed.nonzero()[0].tolist())}")
        both = ~bad_ref & torch.isfinite(got)
        if (name == "y" or name.startswith("b.")) and both.any():
            err = rel_errors(got[both], ref[both].double()).max().item()
            assert err <= TOL[torch.float32], f"{name}: values finite in both differ, relative error {err:.3g}"
            compared += int(both.sum())
    return compared


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("value", POISONS)
def test_op_never_more_finite_than_pytorch(value, train, tiles, device):
    """32 channels in groups of 4: the NaN/inf sits in group 0, so the first 16-channel tile turns
    non-finite (packing) and the second stays finite and is compared."""
    torch.manual_seed(0)
    unfused = ConvBNReLU(32, 32, stride=1, groups=8).train(train)
    with torch.no_grad():
        unfused.bn.weight.uniform_(0.5, 1.5)
        unfused.bn.bias.normal_(0, 0.5)
        unfused.bn.running_var.uniform_(0.5, 1.5)
    fused = GroupedConvBNReLU.from_modules(copy.deepcopy(unfused.conv), copy.deepcopy(unfused.bn)).to(device)
    x = _poisoned((2, 32, 6, 6), value, device)
    dy = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)
    ours = _run(fused, x, dy)
    eager = _run(copy.deepcopy(unfused).to(device), x, dy)
    exact = _run(copy.deepcopy(unfused).double().to(device), x.double(), dy.double())
    if value != value or train:  # PyTorch itself turns something non-finite
        assert not torch.isfinite(exact["y"]).all()
    assert check_never_more_finite(ours, exact, eager) > 0


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("case", [pytest.param((32, 8, 1, 4, 8, 2, 6), id="identity"),
                                  pytest.param((16, 8, 2, 4, 8, 2, 7), id="projection-stride2")])
@pytest.mark.parametrize("value", POISONS)
def test_bottleneck_never_more_finite_than_pytorch(value, case, train, tiles, device):
    inplanes, planes, stride, groups, wpg, n, hw = case
    block = _block(inplanes, planes, stride, groups, wpg).train(train)
    fused = FusedBottleneck.from_block(copy.deepcopy(block)).to(device)
    x = _poisoned((n, inplanes, hw, hw), value, device)
    ho = (hw - 1) // stride + 1
    dy = torch.randn(n, planes * 4, ho, ho, generator=torch.Generator().manual_seed(2)).to(device)
    ours = _run(fused, x, dy)
    eager = _run(copy.deepcopy(block).to(device), x, dy)
    exact = _run(copy.deepcopy(block).double().to(device), x.double(), dy.double())
    assert isinstance(block, resnext.Bottleneck)
    assert not torch.isfinite(exact["y"]).all() or value == float("-inf")
    check_never_more_finite(ours, exact, eager)
