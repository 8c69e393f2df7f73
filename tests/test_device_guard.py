"""Every public entry point launches its kernels on its inputs' device, not on the current one.

Triton launches on the *current* CUDA device, so a DDP rank that never called
``torch.cuda.set_device`` would compute on GPU 0 unless each entry point (and each backward, which
the autograd engine may run on another thread) enters ``kernels.common.on_device``. Without a
second GPU this is tested with a stand-in for the guard that records which device it was entered
for, and a hook on every kernel launch that records which guard was active at the time.
"""

import contextlib

import pytest
import torch
import triton

import kernels.common as common
from kernels.bottleneck import FusedBottleneck, fused_bottleneck
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU, grouped_conv_bn_relu, grouped_conv_bn_relu_modules
from test_bottleneck import _block


@pytest.fixture
def launches(monkeypatch):
    """The device of the innermost guard active at each kernel launch (None: launched unguarded)."""
    active, seen = [], []

    @contextlib.contextmanager
    def guard(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(common, "_device_guard", guard)
    if common.INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction as launcher
    else:
        launcher = triton.runtime.jit.JITFunction
    run = launcher.run

    def recording_run(self, *args, **kwargs):
        seen.append(active[-1] if active else None)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", recording_run)
    return seen


def _assert_all_on(seen, device, what):
    assert seen, f"{what}: no kernel launched"
    wrong = [d for d in seen if d != torch.device(device)]
    assert not wrong, f"{what}: {len(wrong)} of {len(seen)} launches outside a guard for {device}: {wrong[:3]}"


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_op_launches_on_the_inputs_device(mode, launches, device):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 4, 3, 3, device=device)
    gamma, beta = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device)
    rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
    grad = mode != "no_grad"
    for t in (x, w, gamma, beta):
        t.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = grouped_conv_bn_relu(x, w, gamma, beta, rm, rv, groups=4, training=mode == "train")
    _assert_all_on(launches, x.device, f"{mode} forward")
    if grad:
        launches.clear()
        y.sum().backward()
        _assert_all_on(launches, x.device, f"{mode} backward")


def test_modules_launch_on_the_inputs_device(launches, device):
    module = GroupedConvBNReLU(16, 16, groups=4).to(device)
    x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
    module(x).sum().backward()
    grouped_conv_bn_relu_modules(x, module.conv, module.bn.eval())
    _assert_all_on(launches, x.device, "GroupedConvBNReLU / grouped_conv_bn_relu_modules")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_bottleneck_launches_on_the_inputs_device(projection, train, launches, device):
    case = (16, 8, 2, 4, 8) if projection else (32, 8, 1, 4, 8)
    block = _block(*case).train(train).to(device)
    x = torch.randn(2, case[0], 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = fused_bottleneck(x, block)
    _assert_all_on(launches, x.device, "fused_bottleneck forward")
    launches.clear()
    y.sum().backward()
    _assert_all_on(launches, x.device, "fused_bottleneck backward")
    launches.clear()
    FusedBottleneck.from_block(block)(x.detach())
    _assert_all_on(launches, x.device, "FusedBottleneck")
