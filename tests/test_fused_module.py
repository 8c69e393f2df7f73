"""GroupedConvBNReLU and grouped_conv_bn_relu_modules against the unfused nn.Conv2d -> nn.BatchNorm2d
-> ReLU (``kernels.reference.ConvBNReLU``): state_dict compatibility, shared modules, and
nn.BatchNorm2d's bookkeeping (train/eval, num_batches_tracked, momentum=None, no running stats).

The unfused reference runs in float64 (a deep copy, ``.double()``), fed the same float32 inputs.
"""

import copy

import pytest
import torch

from _helpers import STATS_TOL, assert_close
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU, grouped_conv_bn_relu_modules
from kernels.reference import ConvBNReLU

F32 = torch.float32


def randomize_bn(bn, seed):
    """Random affine parameters and running statistics (fresh modules have 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
            bn.bias.copy_(0.5 * torch.randn(bn.num_features, generator=g))
        if bn.track_running_stats:
            bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))


def make_pair(c_in, c_out, stride=1, groups=1, device="cpu", seed=0, **bn_kwargs):
    """(fused module, float64 unfused copy) with identical, randomised state."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False)
    bn = torch.nn.BatchNorm2d(c_out, **bn_kwargs)
    randomize_bn(bn, seed)
    unfused = ConvBNReLU(c_in, c_out, stride, groups)
    unfused.conv, unfused.bn = conv, bn
    ref = copy.deepcopy(unfused).double().to(device)
    fused = GroupedConvBNReLU.from_modules(conv, bn).to(device)
    return fused, ref


def batches(shape, steps, device, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g).to(device) for _ in range(steps)]
    return [x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in xs]


def check_steps(fused, ref, xs, backward=True):
    """Forward (+ backward of a random upstream gradient) step by step; compares outputs, every
    parameter gradient and every buffer after each step."""
    for step, x in enumerate(xs):
        y = fused(x.requires_grad_(backward))
        x_ref = x.detach().double().requires_grad_(backward)
        y_ref = ref(x_ref)
        assert y.dtype == x.dtype and y.shape == y_ref.shape
        assert_close(y.detach(), y_ref.detach(), F32, f"y (step {step})")
        if backward:
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            dy = dy.to(y.device)
            y.backward(dy.float())
            y_ref.backward(dy)
            assert_close(x.grad, x_ref.grad, F32, f"dx (step {step})")
            for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
                if p_ref.grad is None:
                    assert p.grad is None, f"{name} does not require grad but got one"
                else:
                    assert_close(p.grad, p_ref.grad, F32, f"d{name} (step {step})")
        for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
            if b.dtype == torch.long:  # num_batches_tracked
                assert torch.equal(b, b_ref), f"{name} (step {step}): {b} != {b_ref}"
            else:
                assert_close(b, b_ref, F32, f"{name} (step {step})", STATS_TOL)


def test_state_dict_matches_unfused():
    fused, unfused = GroupedConvBNReLU(16, 32, 2, 4), ConvBNReLU(16, 32, 2, 4)
    sd, sd_ref = fused.state_dict(), unfused.state_dict()
    assert list(sd) == list(sd_ref)
    for k in sd:
        assert sd[k].shape == sd_ref[k].shape and sd[k].dtype == sd_ref[k].dtype, k
    randomize_bn(unfused.bn, 3)
    fused.load_state_dict(unfused.state_dict(), strict=True)
    for k, v in unfused.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    ConvBNReLU(16, 32, 2, 4).load_state_dict(fused.state_dict(), strict=True)


def test_constructor_builds_the_unfused_layers():
    m = GroupedConvBNReLU(16, 24, stride=2, groups=4, padding=1, eps=1e-3, momentum=0.2)
    c, bn = m.conv, m.bn
    assert isinstance(c, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
            c.groups, c.bias) == (16, 24, (3, 3), (2, 2), (1, 1), (1, 1), 4, None)
    assert (bn.num_features, bn.eps, bn.momentum) == (24, 1e-3, 0.2)


def test_from_modules_shares_the_modules(device):
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False).to(device)
    bn = torch.nn.BatchNorm2d(8).to(device)
    m = GroupedConvBNReLU.from_modules(conv, bn)
    assert m.conv is conv and m.bn is bn
    assert m.conv.weight is conv.weight
    m(torch.randn(2, 8, 5, 5, device=device))  # training mode: the shared buffers move
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, torch.zeros(8, device=device))


# (C_in, C_out, stride, groups, N, H, W)
MODULE_CASES = [
    pytest.param((16, 16, 1, 4, 2, 5, 5), id="cpg4"),
    pytest.param((8, 16, 2, 2, 2, 7, 6), id="cin4-cout8-stride2"),
    pytest.param((8, 8, 1, 8, 2, 4, 4), id="depthwise"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", MODULE_CASES)
def test_train_steps_match_unfused(case, channels_last, device):
    """Three training steps: outputs, gradients, running statistics, num_batches_tracked.
    channels_last also converts the module (its conv weight becomes channels_last, as with
    ``model.to(memory_format=torch.channels_last)``)."""
    c_in, c_out, stride, groups, n, h, w = case
    fused, ref = make_pair(c_in, c_out, stride, groups, device)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    check_steps(fused.train(), ref.train(), batches((n, c_in, h, w), 3, device, channels_last))


def test_eval_uses_and_keeps_running_stats(device):
    fused, ref = make_pair(16, 16, 1, 4, device)
    fused.eval(), ref.eval()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    check_steps(fused, ref, batches((2, 16, 5, 5), 2, device))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval mode"


def test_train_then_eval(device):
    """Running statistics gathered in training are the ones used afterwards in eval."""
    fused, ref = make_pair(16, 16, 2, 4, device, momentum=0.5)
    xs = batches((2, 16, 6, 6), 3, device)
    check_steps(fused.train(), ref.train(), xs[:2], backward=False)
    check_steps(fused.eval(), ref.eval(), xs[2:], backward=False)


def test_momentum_none_is_cumulative_average(device):
    fused, ref = make_pair(8, 16, 1, 2, device, momentum=None)
    check_steps(fused.train(), ref.train(), batches((2, 8, 5, 5), 3, device), backward=False)
    assert fused.bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_running_stats(mode, device):
    """track_running_stats=False: batch statistics in train *and* eval mode, no buffers."""
    fused, ref = make_pair(16, 16, 1, 4, device, track_running_stats=False)
    fused.train(mode == "train"), ref.train(mode == "train")
    check_steps(fused, ref, batches((2, 16, 5, 5), 2, device))


def test_affine_false(device):
    """nn.BatchNorm2d(affine=False): no weight/bias (gamma = 1, beta = 0)."""
    fused, ref = make_pair(16, 16, 1, 4, device, affine=False)
    check_steps(fused.train(), ref.train(), batches((2, 16, 5, 5), 2, device))


def test_frozen_bn_module(device):
    """Fine-tuning with frozen BatchNorm: bn in eval mode with requires_grad=False parameters,
    conv trainable."""
    fused, ref = make_pair(16, 16, 1, 4, device)
    for m in (fused, ref):
        m.train()
        m.bn.eval()
        m.bn.requires_grad_(False)
    x = batches((2, 16, 5, 5), 1, device)[0]
    check_steps(fused, ref, [x])
    assert fused.bn.weight.grad is None and fused.conv.weight.grad is not None


class _ModulesFunction(torch.nn.Module):
    """Calls ``grouped_conv_bn_relu_modules`` on a pair it does not wrap (no GroupedConvBNReLU)."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return grouped_conv_bn_relu_modules(x, self.conv, self.bn)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_modules_function_matches_unfused(mode, device):
    """grouped_conv_bn_relu_modules(x, conv, bn) on a bare nn.Conv2d and nn.BatchNorm2d: the unfused
    modules' outputs, gradients and buffers (bn's bookkeeping included), step by step."""
    fused, ref = make_pair(16, 32, 2, 4, device, momentum=0.3)
    pair = _ModulesFunction(fused.conv, fused.bn).train(mode == "train")
    check_steps(pair, ref.train(mode == "train"), batches((2, 16, 7, 6), 2, device, seed=4))


def test_module_autocast(device):
    """A float32 module under torch.autocast(float16) behaves like the unfused one there."""
    fused, _ = make_pair(16, 16, 1, 4, device)
    unfused = ConvBNReLU(16, 16, 1, 4).to(device)
    unfused.load_state_dict(fused.state_dict())
    x = batches((2, 16, 5, 5), 1, device, channels_last=True)[0]
    with torch.autocast(device_type=device, dtype=torch.float16):
        y = fused(x)
        y_ref = unfused(x)
    assert y.dtype == y_ref.dtype == torch.float16
    # both round conv(x) to float16 before BatchNorm and y after it (see TOL in _helpers.py)
    assert_close(y.detach(), y_ref.detach().double(), torch.float16, "y")
    assert_close(fused.bn.running_var, unfused.bn.running_var, torch.float16, "running_var",
                 STATS_TOL)
    y.float().sum().backward()  # gradient values under autocast: tests/test_fused_training.py
    assert fused.conv.weight.grad.dtype == fused.bn.weight.grad.dtype == torch.float32
