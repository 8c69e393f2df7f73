"""The whole bottleneck through the Triton kernels (kernels/_bottleneck.py) against the eager
``resnext.Bottleneck`` with the same modules: output, every parameter's gradient, dx and the
running statistics, in training and eval mode, with and without the projection shortcut.

Judged against a float64 copy of the eager block: our float32 error within a few times PyTorch's own
float32 error (BatchNorm over few pixels amplifies rounding; a fixed tolerance would test
conditioning), plus a floor of 1e-6 of each tensor's scale."""

import copy

import pytest
import torch
import torch.nn as nn

import resnext
from kernels._bottleneck import fused_bottleneck

CASES = [
    # (inplanes, planes, stride, groups, width_per_group, n, hw): identity; projection with stride 2
    pytest.param((32, 8, 1, 4, 8, 2, 6), id="identity"),
    pytest.param((16, 8, 2, 4, 8, 2, 7), id="projection-stride2"),
]


def _block(inplanes, planes, stride, groups, wpg):
    down = None
    if stride != 1 or inplanes != planes * 4:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    torch.manual_seed(0)
    block = resnext.Bottleneck(inplanes, planes, stride, down, groups, wpg)
    g = torch.Generator().manual_seed(1)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return block


def _run(block, x, dy, fused):
    x = x.clone().requires_grad_()
    y = fused_bottleneck(x, block) if fused else block(x)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"d.{k}": p.grad for k, p in block.named_parameters()})
    out.update({f"b.{k}": b.clone() for k, b in block.named_buffers()})
    return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_fused_bottleneck_matches_the_eager_block(case, train):
    inplanes, planes, stride, groups, wpg, n, hw = case
    block = _block(inplanes, planes, stride, groups, wpg).train(train)
    eager, ref = copy.deepcopy(block), copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, inplanes, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    ho = (hw - 1) // stride + 1
    dy = torch.randn(n, planes * 4, ho, ho, generator=g)
    ours, theirs, exact = _run(block, x, dy, True), _run(eager, x, dy, False), _run(ref, x.double(), dy, False)
    assert ours.keys() == exact.keys()
    for k in exact:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(ours[k], exact[k]), k
            continue
        scale = max(exact[k].abs().max().item(), 1e-30)
        err_ours = (ours[k].double() - exact[k]).abs().max().item()
        err_torch = (theirs[k].double() - exact[k]).abs().max().item()
        assert err_ours <= 4 * err_torch + 1e-6 * scale, f"{k}: {err_ours:.3g} vs PyTorch's {err_torch:.3g}"


def test_block_level_model_matches_eager_and_unfuses():
    """create_model(..., fused_kernels="block"): every Bottleneck through the kernels (no PyTorch
    convolution inside a block), the eager model's outputs, gradients and buffers within a few times
    PyTorch's own float32 error; unfuse_kernels restores the eager blocks; bad levels are refused."""
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny", num_classes=10, fused_kernels="block")
    blocks = [m for m in model.modules() if isinstance(m, resnext.Bottleneck)]
    assert blocks and all(b.fused_kernels == "block" for b in blocks)
    eager = resnext.unfuse_kernels(copy.deepcopy(model))
    assert all(not b.fused_kernels for b in eager.modules() if isinstance(b, resnext.Bottleneck))
    ref = copy.deepcopy(eager).double()
    convs = []
    hooks = [m.register_forward_hook(lambda m, a, o: convs.append(m)) for b in blocks for m in b.modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    head = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    outs = []
    for m, xi in ((model, x), (eager, x), (ref, x.double())):
        xi = xi.clone().requires_grad_()
        (m(xi) * head.to(xi.dtype)).sum().backward()
        outs.append([xi.grad] + [p.grad for p in m.parameters()] + list(m.buffers()))
    assert not convs, "a PyTorch conv or BatchNorm ran inside a fused block"
    for h in hooks:
        h.remove()
    for i, (a, b, c) in enumerate(zip(*outs)):
        if not c.is_floating_point():
            assert torch.equal(a, c), i
            continue
        err, torch_err = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert err <= 4 * torch_err + 1e-6 * max(c.abs().max().item(), 1e-30), (i, err, torch_err)
    with pytest.raises(ValueError, match="level must be one of"):
        resnext.fuse_kernels(eager, level="bottleneck")
    with pytest.raises(ValueError, match="fused_kernels must be False, True, 'conv' or 'block'"):
        resnext.create_model("resnext_tiny", fused_kernels="yes")


@pytest.mark.parametrize("case", CASES)
def test_fused_bottleneck_under_float16_autocast(case):
    """Under torch.autocast(float16) the block runs in float16 (float32 accumulation and BatchNorm
    statistics): every output, gradient and running statistic within 2x the error of PyTorch's own
    autocast run, both against a float64 copy of the block."""
    inplanes, planes, stride, groups, wpg, n, hw = case
    block = _block(inplanes, planes, stride, groups, wpg).train()
    eager, ref = copy.deepcopy(block), copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, inplanes, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    ho = (hw - 1) // stride + 1
    dy = torch.randn(n, planes * 4, ho, ho, generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        ours, theirs = _run(block, x, dy, True), _run(eager, x, dy, False)
    exact = _run(ref, x.double(), dy, False)
    assert ours["y"].dtype == theirs["y"].dtype == torch.float16
    for k in exact:
        if not exact[k].is_floating_point():
            continue
        err_ours = (ours[k].double() - exact[k]).abs().max().item()
        err_torch = (theirs[k].double() - exact[k]).abs().max().item()
        ulp = torch.finfo(torch.float16).eps * max(exact[k].abs().max().item(), 1e-30)
        assert err_ours <= 2 * err_torch + ulp, f"{k}: {err_ours:.3g} vs PyTorch's {err_torch:.3g}"
