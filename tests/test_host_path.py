"""Device work per call: no more than eager PyTorch's, as the GPU composes the calls (issue 26).

Counted on the CPU through Triton's interpreter with the GPU's tiles and composition
(``kernels.common.gpu_tiles``), by ``benchmarks.host_overhead.count_device_ops``: Triton launches
plus the outermost aten ops that do work, in the second of two identical calls (gradients reset
before each). Eager PyTorch's ``nn.Conv2d`` + ``nn.BatchNorm2d`` + ``nn.ReLU`` and
``resnext.Bottleneck`` are counted the same way. Host time is measured by
``python -m benchmarks.host_overhead --stub``, not here (timed tests are flaky).
"""

import pytest

from benchmarks.host_overhead import count_device_ops, stub_call, stub_cases
from kernels.common import gpu_tiles

# inference: no more than the fused kernels themselves (packed weights and folds reused)
INFERENCE_LIMIT = {"op": 1, "bottleneck identity": 4, "bottleneck projection s2": 5}


@pytest.fixture(scope="module")
def cases():
    with gpu_tiles():
        yield stub_cases()


@pytest.mark.parametrize("mode", ["train_fwd_bwd", "inference"])
@pytest.mark.parametrize("name", list(INFERENCE_LIMIT))
def test_device_ops_per_call(name, mode, cases):
    fused, eager, x_shape, dy_shape = cases[name]
    with gpu_tiles():
        launches, aten = count_device_ops(stub_call(fused, x_shape, dy_shape, mode))
        _, eager_ops = count_device_ops(stub_call(eager, x_shape, dy_shape, mode))
    ours = launches + aten
    assert not aten, f"{name} {mode}: PyTorch ops between the kernels: {aten}"
    if mode == "inference":
        assert len(ours) <= INFERENCE_LIMIT[name], f"{name} inference launches {ours}"
    else:
        assert len(ours) <= len(eager_ops), f"{name} {mode}: {len(ours)} device ops {ours} vs eager {eager_ops}"


def test_inference_reuses_packed_weights_while_they_are_unchanged(device):
    """Eval calls reuse the packed weight and the folded BatchNorm while the tensors keep their version:
    an in-place update (an optimizer step, load_state_dict) is seen at once; a write through ``.data``,
    which bumps no version, only after ``kernels.clear_caches()`` (the documented limitation)."""
    import torch

    import kernels
    from kernels.grouped_conv_bn_relu import GroupedConvBNReLU
    from kernels.reference import ConvBNReLU

    torch.manual_seed(0)
    fused = GroupedConvBNReLU(16, 16, groups=4).to(device).eval()
    eager = ConvBNReLU(16, 16, 1, 4).to(device).eval()
    x = torch.randn(2, 16, 5, 5, device=device).contiguous(memory_format=torch.channels_last)

    def check(what):
        eager.load_state_dict(fused.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5, msg=what)

    check("first call")
    with torch.no_grad():
        fused.conv.weight.mul_(-2.0)
        fused.bn.running_var.fill_(3.0)
        fused.bn.bias.add_(0.5)
    check("after in-place updates")
    with torch.no_grad():
        stale = fused(x)
        fused.conv.weight.data.mul_(0.5)
        assert torch.equal(fused(x), stale)  # .data bumps no version: the packed weight is reused
    kernels.clear_caches()
    check("after clear_caches")
