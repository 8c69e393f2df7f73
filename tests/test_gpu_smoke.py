"""The GPU smoke suite: what fails only on a GPU shows in its first 90 seconds.

``pytest -m gpu_smoke tests/`` (``benchmarks/gpu_session.sh window``, step b): every kernel family in
bfloat16 and float16 at small shapes against PyTorch's float64 result, through the public entry
points — the op in inference and training forward + backward (the grouped 3x3 conv, BatchNorm
statistics, pointwise kernels), the fused bottleneck forward + backward (the 1x1 GEMMs, their
epilogues, the tail) — and one training step of a block-level resnext50_32x4d against eager.

The shapes are resnext50_32x4d's channels at batch 16 and 8x8 pixels (a 96x96 image for the model):
the same JIT specialisations as the benchmarks' (no size divisible by 16 or equal to 1, where theirs
are not either), so the benchmarks that follow reuse these compiles. Under the interpreter (CI) only
float16 and the first two shapes run; bfloat16 needs a GPU.
"""

import copy

import pytest
import torch

import resnext
from _helpers import INTERPRET, TOL, rel_errors
from benchmarks.shapes import block_inplanes, block_shapes, stage_planes
from kernels.bottleneck import fused_bottleneck
from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu
from test_bottleneck import _block

pytestmark = pytest.mark.gpu_smoke

SHAPES = block_shapes("resnext50_32x4d")[:2] if INTERPRET else block_shapes("resnext50_32x4d")
DTYPES = [pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
              INTERPRET, reason="the interpreter miscomputes bfloat16"))]
N, SIZE = 16, 8
# half-precision inputs against float64 on the same rounded inputs, norm-wise per slice (_helpers):
# BatchNorm over N·8·8 pixels per channel and 9·C/groups products per output leave ~1e-3 (float16)
SMOKE_TOL = {torch.float16: TOL[torch.float16], torch.bfloat16: TOL[torch.bfloat16]}


def _check(name, ours, ref, dtype):
    assert ours is not None and torch.isfinite(ours).all(), f"{name}: missing or non-finite"
    err = rel_errors(ours, ref).max().item()
    assert err <= SMOKE_TOL[dtype], f"{name} ({dtype}): relative error {err:.3g} > {SMOKE_TOL[dtype]:.3g}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_op(shape, dtype, training, device):
    g = torch.Generator().manual_seed(shape.stage)
    c, size = shape.channels, SIZE if shape.stride == 1 else 2 * SIZE
    x = torch.randn(N, c, size, size, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, c // shape.groups, 3, 3, generator=g) / (9 * c // shape.groups) ** 0.5).to(device, dtype)
    gamma, beta = (torch.rand(c, generator=g) + 0.5).to(device), torch.randn(c, generator=g).to(device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    leaves = [t.clone().requires_grad_(training) for t in (x, w, gamma, beta)]
    y = grouped_conv_bn_relu(*leaves, rm.clone(), rv.clone(), stride=shape.stride, groups=shape.groups,
                             training=training)
    ref_leaves = [t.detach().double().requires_grad_(training) for t in (x, w, gamma, beta)]
    z = torch.nn.functional.conv2d(ref_leaves[0], ref_leaves[1], None, shape.stride, 1, 1, shape.groups)
    y_ref = torch.relu(torch.nn.functional.batch_norm(z, rm.double(), rv.double(), ref_leaves[2], ref_leaves[3],
                                                      training, 0.1, 1e-5))
    _check("y", y, y_ref, dtype)
    if training:
        dy = torch.randn(y.shape, generator=g).to(device) * (y_ref.detach().abs() > 0.05)
        y.backward(dy.to(dtype))
        y_ref.backward(dy.double())
        for name, ours, ref in zip(("dx", "dweight", "dgamma", "dbeta"), leaves, ref_leaves):
            _check(name, ours.grad, ref.grad, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_bottleneck(shape, dtype, training, device):
    """Under autocast, as models run it. Inside the block the ReLUs' kinks see rounded inputs, so the
    gradients are judged against PyTorch's own autocast error: at most twice it (plus one ulp)."""
    planes, inplanes = stage_planes(shape.stage), block_inplanes(shape)[0]
    block = _block(inplanes, planes, shape.stride, shape.groups, 4).train(training).to(device)
    eager, exact = copy.deepcopy(block), copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(10 + shape.stage)
    size = SIZE * shape.stride
    x = torch.randn(N, inplanes, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(N, planes * 4, SIZE, SIZE, generator=g).to(device)
    out = {}
    for name, module, run in (("ours", block, lambda m, t: fused_bottleneck(t, m)), ("eager", eager, None),
                              ("exact", exact, None)):
        t = (x.double() if name == "exact" else x.clone()).requires_grad_(training)
        with torch.autocast(device, dtype, enabled=name != "exact"):
            y = run(module, t) if run else module(t)
        grads = {}
        if training:
            y.backward(dy.to(y.dtype))
            grads = {"dx": t.grad, **{f"d{k}": p.grad for k, p in module.named_parameters()}}
        out[name] = {"y": y.detach(), **grads}
    for key, ref in out["exact"].items():
        ours, theirs = out["ours"][key], out["eager"][key]
        assert ours is not None and torch.isfinite(ours).all(), f"{key}: missing or non-finite"
        err, torch_err = rel_errors(ours, ref).max().item(), rel_errors(theirs, ref).max().item()
        assert err <= 2 * torch_err + torch.finfo(dtype).eps, (
            f"{key} ({dtype}): relative error {err:.3g} > 2 x PyTorch's autocast error {torch_err:.3g}")


@pytest.mark.skipif(INTERPRET, reason="a whole resnext50_32x4d step takes minutes under the interpreter")
def test_block_level_model_step(device):
    """One bfloat16-autocast training step of resnext50_32x4d with every bottleneck fused, against the
    eager model's step: the loss and the parameters after SGD agree."""
    torch.manual_seed(0)
    eager = resnext.create_model("resnext50_32x4d", num_classes=10).to(device).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(eager)
    resnext.fuse_kernels(fused, level="block")
    x = torch.randn(N, 3, 96, 96, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (N,), device=device)
    losses = []
    for model in (eager, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.autocast(device, torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 0.05 * abs(losses[0]), losses
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        assert torch.isfinite(p).all(), name
        err = rel_errors(p.detach().reshape(1, -1), q.detach().reshape(1, -1)).item()
        assert err <= 5e-2, f"{name}: {err:.3g} from eager after one step"
