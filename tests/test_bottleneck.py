"""The whole bottleneck through the Triton kernels (kernels/bottleneck.py) against the eager
``resnext.Bottleneck`` with the same modules: output, every parameter's gradient, dx and the
running statistics, in training and eval mode, with and without the projection shortcut.

Judged against a float64 copy of the eager block: our float32 error within 2x PyTorch's own
float32 error (BatchNorm over few pixels amplifies rounding; a fixed tolerance would test
conditioning), plus a floor of 1e-6 of each tensor's scale."""

import copy

import pytest
import torch
import torch.nn as nn

import resnext
from _helpers import INTERPRET
from kernels.bottleneck import FusedBottleneck, fused_bottleneck, unfusable_reason

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


@pytest.mark.usefixtures("tiles")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_fused_bottleneck_matches_the_eager_block(case, train, device):
    inplanes, planes, stride, groups, wpg, n, hw = case
    block = _block(inplanes, planes, stride, groups, wpg).train(train).to(device)
    eager, ref = copy.deepcopy(block), copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, inplanes, hw, hw, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    ho = (hw - 1) // stride + 1
    dy = torch.randn(n, planes * 4, ho, ho, generator=g).to(device)
    ours, theirs, exact = _run(block, x, dy, True), _run(eager, x, dy, False), _run(ref, x.double(), dy, False)
    assert ours.keys() == exact.keys()
    for k in exact:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(ours[k], exact[k]), k
            continue
        scale = max(exact[k].abs().max().item(), 1e-30)
        err_ours = (ours[k].double() - exact[k]).abs().max().item()
        err_torch = (theirs[k].double() - exact[k]).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6 * scale, f"{k}: {err_ours:.3g} vs PyTorch's {err_torch:.3g}"


def test_block_level_model_matches_eager_and_unfuses(device):
    """create_model(..., fused_kernels="block"): every Bottleneck through the kernels (no PyTorch
    convolution inside a block), the eager model's outputs, gradients and buffers within 2x
    PyTorch's own float32 error; unfuse_kernels restores the eager blocks; bad levels are refused."""
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny", num_classes=10, fused_kernels="block").to(device)
    blocks = [m for m in model.modules() if isinstance(m, resnext.Bottleneck)]
    assert blocks and all(b.fused_kernels == "block" for b in blocks)
    eager = resnext.unfuse_kernels(copy.deepcopy(model))
    assert all(not b.fused_kernels for b in eager.modules() if isinstance(b, resnext.Bottleneck))
    ref = copy.deepcopy(eager).double()
    convs = []
    hooks = [m.register_forward_hook(lambda m, a, o: convs.append(m)) for b in blocks for m in b.modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(device)
    head = torch.randn(4, 10, generator=torch.Generator().manual_seed(4)).to(device)
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
        assert err <= 2 * torch_err + 1e-6 * max(c.abs().max().item(), 1e-30), (i, err, torch_err)
    with pytest.raises(ValueError, match="level must be one of"):
        resnext.fuse_kernels(eager, level="bottleneck")
    with pytest.raises(ValueError, match="fused_kernels must be False, True, 'conv' or 'block'"):
        resnext.create_model("resnext_tiny", fused_kernels="yes")


@pytest.mark.parametrize("case", CASES)
def test_fused_bottleneck_under_float16_autocast(case, device):
    """Under torch.autocast(float16) the block runs in float16 (float32 accumulation and BatchNorm
    statistics): every output, gradient and running statistic within 2x the error of PyTorch's own
    autocast run, both against a float64 copy of the block."""
    inplanes, planes, stride, groups, wpg, n, hw = case
    block = _block(inplanes, planes, stride, groups, wpg).train().to(device)
    eager, ref = copy.deepcopy(block), copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, inplanes, hw, hw, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    ho = (hw - 1) // stride + 1
    dy = torch.randn(n, planes * 4, ho, ho, generator=g).to(device)
    with torch.autocast(device, dtype=torch.float16):
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


@pytest.mark.parametrize("case", CASES)
def test_fused_bottleneck_module(case, device):
    """FusedBottleneck: from_block shares the block's modules (same parameters, same result bit for
    bit); a new one has resnext.Bottleneck's state_dict keys and, loaded with a block's state, gives
    that block's fused result bit for bit."""
    inplanes, planes, stride, groups, wpg, n, hw = case
    block = _block(inplanes, planes, stride, groups, wpg).to(device)
    x = torch.randn(n, inplanes, hw, hw, generator=torch.Generator().manual_seed(6)).to(device)
    wrapped = FusedBottleneck.from_block(block)
    assert wrapped.conv2 is block.conv2 and wrapped.bn3 is block.bn3 and wrapped.training
    assert list(wrapped.state_dict()) == list(block.state_dict())
    width = block.conv1.out_channels
    fresh = FusedBottleneck(inplanes, width, planes * 4, stride, groups).to(device)
    assert list(fresh.state_dict()) == list(block.state_dict())
    fresh.load_state_dict(block.state_dict())
    for mode in (True, False):
        eager_state = copy.deepcopy(block.state_dict())
        y_block = fused_bottleneck(x, block.train(mode))
        block.load_state_dict(eager_state)  # undo the running-statistics update
        assert torch.equal(wrapped.train(mode)(x), y_block)
        assert torch.equal(fresh.train(mode)(x), y_block)
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), fresh.state_dict().values()))


def _sync_bn(bn):
    sync = nn.SyncBatchNorm(bn.num_features)
    sync.load_state_dict(bn.state_dict())
    return sync


UNFUSABLE = [  # (id, change to the block, what the error names)
    ("conv1-bias", lambda b: setattr(b, "conv1", nn.Conv2d(b.conv1.in_channels, b.conv1.out_channels, 1)),
     "conv1 has a bias"),
    ("conv2-dilated", lambda b: setattr(b.conv2, "dilation", (2, 2)), r"conv2.dilation is \(2, 2\)"),
    ("conv2-stride3", lambda b: setattr(b.conv2, "stride", (3, 3)), "conv2.stride is"),
    ("sync-bn", lambda b: setattr(b, "bn2", _sync_bn(b.bn2)), "bn2 is SyncBatchNorm, not nn.BatchNorm2d"),
    ("no-bn", lambda b: setattr(b, "bn3", nn.Identity()), "bn3 is Identity"),
    ("downsample-3", lambda b: setattr(b, "downsample", nn.Sequential(*b.downsample, nn.ReLU())),
     "downsample is Sequential, not Sequential"),
    ("downsample-stride", lambda b: setattr(b.downsample[0], "stride", (1, 1)), r"downsample\[0\].stride"),
]


@pytest.mark.parametrize("change, message", [pytest.param(*u[1:], id=u[0]) for u in UNFUSABLE])
def test_unfusable_blocks_are_refused_naming_why(change, message, device):
    """A block the kernels cannot compute exactly is an error naming the module and why, from the
    function, the module and fuse_kernels(level='block') (which then changes nothing); strict=False
    leaves that block to PyTorch with a warning and fuses the rest."""
    block = _block(16, 8, 2, 4, 8)
    assert unfusable_reason(block) is None
    change(block)
    assert unfusable_reason(block) is not None
    x = torch.randn(2, 16, 7, 7, device=device)
    with pytest.raises(ValueError, match=message):
        fused_bottleneck(x, block.to(device))
    with pytest.raises(ValueError, match=message):
        FusedBottleneck.from_block(block)
    model = resnext.create_model("resnext_tiny", num_classes=10)
    first = model.layer2[0]  # stride 2, with a projection shortcut
    assert unfusable_reason(first) is None
    change(first)
    blocks = [m for m in model.modules() if isinstance(m, resnext.Bottleneck)]
    with pytest.raises(ValueError, match=f"cannot compute 1 of its {len(blocks)} blocks exactly, nothing was changed"):
        resnext.fuse_kernels(model, level="block")
    assert not any(b.fused_kernels for b in blocks)
    with pytest.warns(UserWarning, match="left 1 of"):
        resnext.fuse_kernels(model, level="block", strict=False)
    assert [b.fused_kernels for b in blocks] == ["block" if b is not first else False for b in blocks]


def test_fused_bottleneck_checks_x(device):
    block = _block(32, 8, 1, 4, 8).to(device)
    with pytest.raises(ValueError, match=r"x must be a 4-D \(N, C=32, H, W\) tensor, got shape \(2, 16, 6, 6\)"):
        fused_bottleneck(torch.randn(2, 16, 6, 6, device=device), block)


def _model_step(model, x, head):
    """One forward and backward: [y, dx, every parameter's gradient, every buffer]."""
    x = x.clone().requires_grad_()
    y = model(x)
    (y * head.to(x.dtype)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


def check_block_level_resnext50(size, device, perturbed_runs=4):
    """resnext50_32x4d with every bottleneck fused vs the eager model, one training step (batch 2,
    size x size images, training BatchNorm), every output, gradient and buffer against a float64 copy.

    PyTorch's own float32 error is taken as the worst of the eager model's error on x and on
    ``perturbed_runs`` copies of x changed by one float32 rounding (2^-24 relative): all are float32
    results for the same float64 problem. Measured at 64x64 on the interpreter (batch 2: stage 4
    normalises over 8 pixels), that error is ill-conditioned: one such change moved PyTorch's error on
    d.layer4.2.bn3.weight 64x and put 3-15 tensors past 2x the unperturbed error, so judging against
    one eager run tests luck (our 2.44x at worst there, on d.layer3.4.conv3.weight, where one
    perturbed eager run itself reached 2.36x). Returns our worst ratio to that envelope."""
    torch.manual_seed(0)
    eager = resnext.create_model("resnext50_32x4d", num_classes=10).to(device)
    fused = resnext.fuse_kernels(copy.deepcopy(eager), level="block")
    ref = copy.deepcopy(eager).double()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    head = torch.randn(2, 10, generator=torch.Generator().manual_seed(8)).to(device)
    exact = _model_step(ref, x.double().to(device), head)
    ours = _model_step(fused, x.to(device), head)
    theirs = [_model_step(copy.deepcopy(eager), x.to(device), head)]
    for seed in range(perturbed_runs):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed))
        theirs.append(_model_step(copy.deepcopy(eager), (x * (1 + 2.0**-24 * noise)).to(device), head))
    names = ["y", "dx"] + [f"d.{k}" for k, _ in eager.named_parameters()] + [f"b.{k}" for k, _ in eager.named_buffers()]
    worst = 0.0
    for i, (name, c) in enumerate(zip(names, exact)):
        if not c.is_floating_point():
            assert torch.equal(ours[i], c), name
            continue
        err = (ours[i].double() - c).abs().max().item()
        torch_err = max((run[i].double() - c).abs().max().item() for run in theirs)
        floor = 1e-6 * max(c.abs().max().item(), 1e-30)
        assert err <= 2 * torch_err + floor, f"{name}: {err:.3g} vs PyTorch's {torch_err:.3g}"
        worst = max(worst, err / (torch_err + floor))
    assert worst > 0  # the comparison saw rounding at all
    return worst


@pytest.mark.skipif(INTERPRET, reason="resnext50_32x4d's 16 fused blocks take ~5 minutes under Triton's "
                    "interpreter (the 2-core CI runs resnext_tiny's, above); runs on the GPU")
@pytest.mark.parametrize("size", [32, 64])
def test_block_level_resnext50_within_2x_pytorch_float32_error(size, device):
    """Within 2x PyTorch's own float32 error (check_block_level_resnext50). On the interpreter, run
    by hand: 32x32 at 1.16x at worst against the unperturbed eager run alone; 64x64 at 1.35x at
    worst against the envelope of 4 perturbed runs (2.44x against the unperturbed run alone)."""
    check_block_level_resnext50(size, device)
