"""torchvision's and timm's ResNet/ResNeXt and RegNet models patched in place by ``resnext.fuse_kernels``.

The evidence is the real packages: their models patched vs unpatched (outputs in eval and train,
every gradient and running statistic, state_dict keys, classes), and that PyTorch is left no
convolution with a block's conv2 weight, forward or backward (a ``TorchDispatchMode`` sees every
``aten.convolution`` and ``aten.convolution_backward``); their ResNeXts also at the block level
(``level="block"``). They run wherever torchvision (and, for timm's, timm) can be imported, and skip
with the reason elsewhere (neither is a dependency). tests/test_adoption.py checks the same (and
more: refusals, frozen and eval-mode BatchNorms, group widths) on stand-ins, everywhere.

torchvision's CUDA wheels do not import on a CPU-only torch: their C++ ops need libc10_cuda.so, and
``torchvision/__init__.py`` then registers fake kernels for ops that were never defined
(``RuntimeError: operator torchvision::nms does not exist``). Its model code is pure Python, so
there :func:`_import_torchvision_resnet` loads the package without running that ``__init__`` (the
module object from its spec, the submodules imported as usual), and the ``thirdparty`` fixture takes
everything that added out of ``sys.modules`` again when this file's tests are done. timm imports
torchvision's ``ops.misc``, so it needs either.

The last section runs without either package (as CI does), on stand-in classes that carry
torchvision's and timm's module and class names, which is what ``fuse_kernels`` keys on: detection,
every refusal, the patched forwards against the stand-ins' own, DDP. Tiny models (one block per
stage, 4 groups) keep the interpreter's time to a few seconds a model.
"""

import copy
import functools
import importlib
import importlib.util
import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import resnext
from _patched import (ConvCalls, assert_same_structure, assert_unpatched, fused_weights, model_blocks, one_warning,
                      randomize_bn)
from resnext import patch

INTERPRET = kernels.interpreter_enabled()
NAMES = ("resnext.Bottleneck", "torchvision.models.resnet.Bottleneck", "timm.models.resnet.Bottleneck")

# ---------------------------------------------------------------------------------------------
# Loading the packages


def _import_torchvision_resnet():
    """``(torchvision.models.resnet or None, why not, shimmed)``."""
    try:
        return importlib.import_module("torchvision.models.resnet"), None, False
    except ImportError as e:
        return None, f"torchvision is not installed ({e})", False
    except Exception as e:  # noqa: BLE001 -- e.g. a wheel whose C++ ops do not load against this torch
        broken = f"{type(e).__name__}: {e}"
    try:
        spec = importlib.util.find_spec("torchvision")
        sys.modules["torchvision"] = importlib.util.module_from_spec(spec)  # its __init__ not run
        return importlib.import_module("torchvision.models.resnet"), None, True
    except Exception as e:  # noqa: BLE001 -- any failure means: skip, saying why
        return None, (f"`import torchvision` fails ({broken}) and so does its models/resnet.py without "
                      f"the package __init__ ({type(e).__name__}: {e})"), True


@pytest.fixture(scope="module")
def thirdparty():
    before = set(sys.modules)
    tv_resnet, tv_reason, shimmed = _import_torchvision_resnet()
    timm, timm_reason = None, None
    if tv_resnet is None:
        timm_reason = f"timm imports torchvision, which is unavailable: {tv_reason}"
    else:
        try:
            timm = importlib.import_module("timm")
        except ImportError as e:
            timm_reason = f"timm is not installed ({e})"
        except Exception as e:  # noqa: BLE001 -- skip, saying why
            timm_reason = f"timm does not import ({type(e).__name__}: {e})"
    yield SimpleNamespace(tv=tv_resnet, tv_reason=tv_reason, timm=timm, timm_reason=timm_reason)
    if shimmed:  # leave no half-initialised torchvision behind for other test files
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("torchvision", "timm"):
                del sys.modules[name]


@pytest.fixture
def tv(thirdparty):
    """``torchvision.models.resnet``."""
    if thirdparty.tv is None:
        pytest.skip(thirdparty.tv_reason)
    return thirdparty.tv


@pytest.fixture
def timm(thirdparty):
    if thirdparty.timm is None:
        pytest.skip(thirdparty.timm_reason)
    return thirdparty.timm


@pytest.fixture(autouse=True)
def _kernels():
    pytest.importorskip("kernels.grouped_conv_bn_relu", reason="fused kernel not available")


# ---------------------------------------------------------------------------------------------
# Helpers


def _assert_close(actual, expected, msg=None, atol=2e-5, rtol=1e-4):
    """float32 against float32 PyTorch: atol relative to the largest magnitude, as in ``_helpers.TOL``
    (the stem's weight gradient sums over every pixel and reaches ~15; both sides are ~5e-5 off
    float64 there)."""
    torch.testing.assert_close(actual, expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=rtol,
                               msg=msg)


def _run(model, x, head, seed=1):
    """Output, input gradient and the convolutions PyTorch ran, of one forward + backward."""
    torch.manual_seed(seed)  # drop_path draws the same masks in both models
    x = x.clone().requires_grad_(True)
    with ConvCalls() as convs:
        out = model(x)
        (out * head).sum().backward()
    return out, x.grad, convs.calls


def _assert_step_matches(model, ref, out, dx, out_ref, dx_ref):
    """One step of the patched ``model`` (``_run``) against the unpatched ``ref``'s: output, input
    gradient, every parameter's gradient and every buffer (running statistics)."""
    _assert_close(out, out_ref, atol=1e-5)
    _assert_close(dx, dx_ref)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        _assert_close(p.grad, ref_params[n].grad, n)
    ref_buffers = dict(ref.named_buffers())
    for n, b in model.named_buffers():
        _assert_close(b, ref_buffers[n], n, atol=1e-5, rtol=1e-5)


def _assert_no_conv2_left(calls, model):
    """No convolution PyTorch ran used a block's conv2 weight, and none was grouped except timm's
    anti-aliasing blur (a fixed depthwise 3x3 filter that follows the fused part)."""
    conv2 = fused_weights(model)
    blur = {m.filt.data_ptr() for m in model.modules() if type(m).__name__ == "BlurPool2d"}
    assert not [c for c in calls if c[0] in conv2], "a conv2 ran in PyTorch"
    assert not [c for c in calls if c[1] > 1 and c[0] not in blur], "a grouped convolution ran in PyTorch"


# ---------------------------------------------------------------------------------------------
# The real packages: tiny models, patched vs unpatched


def _tv_resnext(tv):
    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10)


def _tv_resnet(tv):  # groups=1, as resnet50: widths 16/32/64/128
    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], width_per_group=16, num_classes=10)


def _tv_frozen_bn(tv):  # torchvision's detection backbones: FrozenBatchNorm2d everywhere
    misc = importlib.import_module("torchvision.ops.misc")
    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10,
                     norm_layer=misc.FrozenBatchNorm2d)


def _timm_layers(timm):
    return getattr(timm, "layers", None) or timm.models.layers  # timm.models.layers before timm 0.9


def _timm_resnext(timm):
    return timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], cardinality=4, base_width=4,
                                     num_classes=10)


def _timm_se_blur(timm):  # seresnext + resnetblur + stochastic depth: aa, se, drop_path around the fused part
    return timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], cardinality=4, base_width=4,
                                     num_classes=10, aa_layer=_timm_layers(timm).BlurPool2d, drop_path_rate=0.2,
                                     block_args=dict(attn_layer="se"))


def _tv_regnet(tv):  # torchvision's RegNetY trunk at 5 (odd) and 24 channels per group
    regnet = importlib.import_module("torchvision.models.regnet")
    params = regnet.BlockParams(depths=[1, 1], widths=[15, 48], group_widths=[5, 24], bottleneck_multipliers=[1.0, 1.0],
                                strides=[1, 2], se_ratio=0.25)
    return regnet.RegNet(params, num_classes=10, stem_width=16)


def _timm_regnet(timm):  # timm's RegNetY blocks (timm >= 0.6: group_size) behind a ConvNormAct stem
    block = timm.models.regnet.Bottleneck
    return nn.Sequential(_timm_layers(timm).ConvNormAct(3, 16, 3, stride=2),
                         block(16, 15, 1, group_size=5, se_ratio=0.25), block(15, 48, 2, group_size=24, se_ratio=0.25),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


CASES = {  # name: (package fixture, builder, train modes)
    "tv-resnext": ("tv", _tv_resnext, (False, True)),
    "tv-resnet-groups1": ("tv", _tv_resnet, (True,)),
    "tv-frozen-bn": ("tv", _tv_frozen_bn, (True,)),  # FrozenBatchNorm2d: the same maths in eval
    "timm-resnext": ("timm", _timm_resnext, (False, True)),
    "timm-se-blur-droppath": ("timm", _timm_se_blur, (True,)),
    "tv-regnety": ("tv", _tv_regnet, (False, True)),
    "timm-regnety": ("timm", _timm_regnet, (False, True)),
}


@pytest.mark.parametrize("name, train", [pytest.param(n, t, id=f"{n}-{'train' if t else 'eval'}")
                                         for n, (_, _, modes) in CASES.items() for t in modes])
def test_patched_matches_unpatched(name, train, request, device):
    package, build, _ = CASES[name]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = randomize_bn(build(request.getfixturevalue(package)), gen).to(device).train(train)
    model = copy.deepcopy(ref)
    before = model.state_dict(keep_vars=True)
    assert resnext.fuse_kernels(model) is model
    blocks = model_blocks(model)
    assert len(blocks) == (2 if "regnet" in name else 4) and all(patch.is_patched(b) for b in blocks)
    assert_same_structure(model, ref)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is before[k] for k in before)  # the very same tensors, not copies

    x = torch.randn(2, 3, 48, 48, generator=gen).to(device)
    head = torch.randn(2, 10, generator=gen).to(device)  # a random linear loss: every gradient non-trivial
    out_ref, dx_ref, convs_ref = _run(ref, x, head)
    out, dx, convs = _run(model, x, head)

    assert {c[0] for c in convs_ref} >= fused_weights(ref)  # the spy sees them
    _assert_no_conv2_left(convs, model)
    # float32 both; the differences are float32 reductions summed in another order
    _assert_step_matches(model, ref, out, dx, out_ref, dx_ref)

    assert resnext.unfuse_kernels(model) is model
    assert_unpatched(model)
    assert_same_structure(model, ref)


@pytest.mark.parametrize("name, train", [("tv-resnext", True), ("tv-resnext", False), ("timm-resnext", True),
                                         ("timm-resnext", False)])
def test_block_level_matches_unpatched(name, train, request, device):
    """``fuse_kernels(model, level="block")`` on the real packages' plain ResNeXt: every Bottleneck through
    kernels.bottleneck.fused_bottleneck (no PyTorch conv or BatchNorm inside one), the unpatched
    model's outputs, gradients and running statistics; unfuse_kernels undoes it."""
    package, build, _ = CASES[name]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = randomize_bn(build(request.getfixturevalue(package)), gen).to(device).train(train)
    model = resnext.fuse_kernels(copy.deepcopy(ref), level="block")
    blocks = model_blocks(model)
    assert len(blocks) == 4 and all(patch.patched_level(b) == "block" for b in blocks)
    assert_same_structure(model, ref)
    inside = []
    for b in blocks:
        for m in b.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.register_forward_hook(lambda m, a, o: inside.append(m))
    x = torch.randn(2, 3, 48, 48, generator=gen).to(device)
    head = torch.randn(2, 10, generator=gen).to(device)
    out_ref, dx_ref, _ = _run(ref, x, head)
    out, dx, _ = _run(model, x, head)
    assert not inside, "a PyTorch conv or BatchNorm ran inside a fused block"
    _assert_step_matches(model, ref, out, dx, out_ref, dx_ref)
    resnext.unfuse_kernels(model)
    assert_unpatched(model)


def test_optimizer_made_before_patching_trains_the_same(tv, device):
    """What a training script does: build the model and optimizer, then add the one line."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = randomize_bn(_tv_resnext(tv), gen).to(device).train()
    model = copy.deepcopy(ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for m in (ref, model)]
    resnext.fuse_kernels(model)
    # 48x48: stage 4's BN then normalises over 2x2x2 values; at 32x32 (2 values) float32 PyTorch
    # itself drifts ~1e-2 off float64 within two steps
    x = torch.randn(2, 3, 48, 48, generator=gen).to(device)
    labels = torch.tensor([3, 7], device=device)
    for _ in range(2):
        for m, opt in zip((ref, model), opts):
            F.cross_entropy(m(x), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    ref_state = ref.state_dict()
    for k, v in model.state_dict().items():
        _assert_close(v, ref_state[k], k, atol=1e-5)


@pytest.mark.parametrize("package", ["tv", "timm"])
def test_deepcopy_and_pickle_keep_the_patch(package, request, device):
    build = _tv_resnext if package == "tv" else _timm_resnext
    torch.manual_seed(0)
    model = resnext.fuse_kernels(randomize_bn(build(request.getfixturevalue(package)),
                                               torch.Generator().manual_seed(0)).to(device).eval())
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole model, as `torch.save(model)` checkpoints do
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), loaded):
            assert type(clone) is type(model)
            blocks = model_blocks(clone)
            # patched, and bound to the clone's own blocks (so to its own parameters)
            assert all(patch.is_patched(b) and b.forward.args[0] is b for b in blocks)
            with ConvCalls() as convs:
                assert torch.equal(clone(x), expected)
            _assert_no_conv2_left(convs.calls, clone)
            resnext.unfuse_kernels(clone)
            assert not any(patch.is_patched(b) for b in blocks) and patch.is_patched(model_blocks(model)[0])
            torch.testing.assert_close(clone(x), expected, atol=1e-5, rtol=1e-4)


def test_torch_compile_runs_the_fused_op(tv, device):
    torch.manual_seed(0)
    ref = randomize_bn(_tv_resnext(tv), torch.Generator().manual_seed(0)).to(device).eval()
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing, without a code generator
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad(), ConvCalls() as convs:
        out = compiled(x)
    _assert_no_conv2_left(convs.calls, model)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The real packages: full-size models, built on the meta device (no forward)


FULL_SIZE = {  # name: (package, builder, blocks)
    "tv-resnext50_32x4d": ("tv", lambda tv, _: tv.resnext50_32x4d(), 16),
    "tv-resnext101_64x4d": ("tv", lambda tv, _: tv.resnext101_64x4d(), 33),
    "tv-resnet50": ("tv", lambda tv, _: tv.resnet50(), 16),
    "tv-wide_resnet50_2": ("tv", lambda tv, _: tv.wide_resnet50_2(), 16),
    "timm-resnext50_32x4d": ("timm", lambda _, timm: timm.create_model("resnext50_32x4d"), 16),
    "timm-seresnext50_32x4d": ("timm", lambda _, timm: timm.create_model("seresnext50_32x4d"), 16),
    "timm-resnet50d": ("timm", lambda _, timm: timm.create_model("resnet50d"), 16),
    "tv-regnet_y_1_6gf": ("tv", lambda *_: importlib.import_module("torchvision.models.regnet").regnet_y_1_6gf(), 27),
    "tv-regnet_x_3_2gf": ("tv", lambda *_: importlib.import_module("torchvision.models.regnet").regnet_x_3_2gf(), 25),
    "timm-regnetx_032": ("timm", lambda _, timm: timm.create_model("regnetx_032"), 25),
    "timm-regnety_032": ("timm", lambda _, timm: timm.create_model("regnety_032"), 21),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_models_patch_in_place(name, thirdparty, request):
    package, build, n_blocks = FULL_SIZE[name]
    request.getfixturevalue(package)  # skips when the package is unavailable
    with torch.device("meta"):
        model, ref = build(thirdparty.tv, thirdparty.timm), build(thirdparty.tv, thirdparty.timm)
    before = model.state_dict(keep_vars=True)
    resnext.fuse_kernels(resnext.fuse_kernels(model))  # twice: the second call changes nothing
    blocks = model_blocks(model)
    assert len(blocks) == n_blocks and all(patch.is_patched(b) for b in blocks)
    assert_same_structure(model, ref)
    assert all(v is before[k] for k, v in model.state_dict(keep_vars=True).items())
    resnext.unfuse_kernels(model)
    assert_unpatched(model)


@pytest.mark.parametrize("name", ["tv-resnext50_32x4d", "tv-resnet50", "timm-resnext50_32x4d"])
def test_full_size_resnext_patch_at_the_block_level(name, thirdparty, request):
    package, build, n_blocks = FULL_SIZE[name]
    request.getfixturevalue(package)
    with torch.device("meta"):
        model = build(thirdparty.tv, thirdparty.timm)
    resnext.fuse_kernels(model, level="block")
    assert [patch.patched_level(b) for b in model_blocks(model)] == ["block"] * n_blocks


@pytest.mark.parametrize("name, why", [
    ("timm-seresnext50_32x4d", "se is SEModule: the fused bottleneck has no squeeze-and-excitation"),
    ("timm-resnet50d", "downsample is Sequential("),
    ("tv-regnet_y_1_6gf", "level='block' runs torchvision's and timm's ResNet Bottleneck only"),
])
def test_full_size_block_level_refusals(name, why, thirdparty, request):
    package, build, n_blocks = FULL_SIZE[name]
    request.getfixturevalue(package)
    with torch.device("meta"):
        model = build(thirdparty.tv, thirdparty.timm)
    with pytest.raises(ValueError, match="nothing was changed") as err:
        resnext.fuse_kernels(model, level="block")
    assert why in str(err.value) and "level='conv' (the default) fuses" in str(err.value)
    assert not any(patch.is_patched(b) for b in model_blocks(model))
    resnext.fuse_kernels(model)  # the conv level still applies
    assert [patch.patched_level(b) for b in model_blocks(model)] == ["conv"] * n_blocks


@pytest.mark.skipif(INTERPRET, reason="a full resnext50_32x4d takes ~20 s a forward through the interpreter")
def test_full_size_torchvision_resnext50_matches(tv):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = randomize_bn(tv.resnext50_32x4d(), gen).cuda().train()
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    x = torch.randn(8, 3, 64, 64, generator=gen).cuda()
    head = torch.randn(8, 1000, generator=gen).cuda()
    out_ref, dx_ref, _ = _run(ref, x, head)
    out, dx, convs = _run(model, x, head)
    _assert_no_conv2_left(convs, model)

    def rel(a, b):  # 16 blocks deep, with training-mode BN: compare by relative norm
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    assert rel(out, out_ref) < 1e-4 and rel(dx, dx_ref) < 1e-3
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert rel(p.grad, ref_params[n].grad) < 1e-3, n


@pytest.mark.skipif(INTERPRET, reason="a full resnext50_32x4d takes minutes a step through the interpreter")
def test_patched_torchvision_resnext50_trains_with_bf16_autocast_channels_last(tv):
    """The issue's GPU check: a few SGD steps of the patched model, as a training script runs them."""
    torch.manual_seed(0)
    ref = tv.resnext50_32x4d(num_classes=10).cuda().to(memory_format=torch.channels_last).train()
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    x = torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16, device="cuda") % 10
    curves = []
    for m in (ref, model):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        losses = []
        for _ in range(6):  # one batch, again and again: the loss must fall
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(m(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    ref_losses, losses = curves
    assert ref_losses[-1] < ref_losses[0], ref_losses  # the setting trains at all
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (losses, ref_losses)
    # the same weights and batch in the first step: bfloat16 rounding apart, the same loss
    assert abs(losses[0] - ref_losses[0]) < 2e-2 * ref_losses[0], (losses, ref_losses)
    assert all(patch.is_patched(b) for b in model_blocks(model))
    assert model.layer1[0].conv2.weight.dtype == torch.float32  # autocast casts, the parameters stay


# ---------------------------------------------------------------------------------------------
# The real packages: what is refused


def test_refuses_timm_drop_block_and_fuses_the_rest_when_not_strict(timm):
    with torch.device("meta"):
        model = timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], cardinality=4,
                                          base_width=4, drop_block_rate=0.2)
    with pytest.raises(ValueError) as err:
        resnext.fuse_kernels(model)
    msg = str(err.value)
    assert "cannot compute 2 of its 4 blocks" in msg and "nothing was changed" in msg
    assert "layer3.0 (timm.models.resnet.Bottleneck): drop_block is DropBlock2d" in msg and "layer4.0" in msg
    assert "strict=False" in msg
    assert not any("forward" in vars(b) for b in model_blocks(model))
    with pytest.warns(UserWarning, match="left 2 of 4 blocks .* to PyTorch"):
        resnext.fuse_kernels(model, strict=False)
    assert [patch.is_patched(b) for b in (model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0])] == [
        True, True, False, False]


def test_refuses_timm_activation_and_batchnormact(timm):
    with torch.device("meta"):
        silu = timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], act_layer=nn.SiLU)
        bn_act = timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1],
                                           norm_layer=_timm_layers(timm).BatchNormAct2d)
    with pytest.raises(ValueError, match=r"layer1\.0 \(timm\.models\.resnet\.Bottleneck\): act2 is SiLU, not "):
        resnext.fuse_kernels(silu)
    with pytest.raises(ValueError, match=r"bn2 is timm\..*\.BatchNormAct2d, not an nn\.BatchNorm2d"):
        resnext.fuse_kernels(bn_act, strict=False)  # nothing fusable: an error even when not strict


def test_refuses_torchvision_dilated_blocks(tv):
    with torch.device("meta"):
        model = tv.resnext50_32x4d(replace_stride_with_dilation=[False, True, True])  # DeepLab's backbone
    with pytest.raises(ValueError) as err:
        resnext.fuse_kernels(model)
    msg = str(err.value)
    # a dilated stage's first block keeps the previous stage's dilation (1 in stage 3)
    assert "cannot compute 8 of its 16 blocks" in msg and "layer3.0 " not in msg
    assert "layer3.1 (torchvision.models.resnet.Bottleneck): conv2 has dilation=(2, 2) (1 only)" in msg
    assert "layer4.0 (torchvision.models.resnet.Bottleneck): conv2 has dilation=(2, 2) (1 only)" in msg
    assert "layer4.2 (torchvision.models.resnet.Bottleneck): conv2 has dilation=(4, 4) (1 only)" in msg


def test_nothing_to_fuse_names_what_was_looked_for(tv):
    with torch.device("meta"):
        model = tv.resnet18()  # BasicBlock: no 3x3 conv -> BN -> ReLU inside a Bottleneck
    for fn in (resnext.fuse_kernels, resnext.unfuse_kernels):
        with pytest.raises(ValueError, match="ResNet holds no resnext.Bottleneck") as err:
            fn(model)
        assert all(name in str(err.value) for name in NAMES)


# ---------------------------------------------------------------------------------------------
# Without the packages: stand-ins carrying torchvision's and timm's names


class _TvBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` as far as ``fuse_kernels`` can tell (its names and attributes)."""

    __module__ = "torchvision.models.resnet"
    __qualname__ = "Bottleneck"

    def __init__(self, channels=16, width=8, groups=4, stride=1, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, groups=groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if stride == 1 else nn.Sequential(nn.Conv2d(channels, channels, 1, stride,
                                                                           bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _TimmBottleneck(nn.Module):
    """timm's ``Bottleneck`` (0.6 to 1.0) as far as ``fuse_kernels`` can tell."""

    __module__ = "timm.models.resnet"
    __qualname__ = "Bottleneck"

    def __init__(self, channels=16, width=8, groups=4, act_layer=nn.ReLU, drop_block=None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = drop_block or nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.se = None
        self.act3 = act_layer(inplace=True)
        self.downsample = None
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


def test_stand_ins_are_recognised_by_name_only():
    assert patch.block_kind(_TvBottleneck()) == "torchvision.models.resnet.Bottleneck"
    assert patch.block_kind(_TimmBottleneck()) == "timm.models.resnet.Bottleneck"
    assert patch.block_kind(resnext.Bottleneck(16, 4)) is None  # ours switch by a flag instead

    class Subclass(_TvBottleneck):  # a subclass that keeps forward is theirs too
        pass

    assert patch.block_kind(Subclass()) == "torchvision.models.resnet.Bottleneck"
    assert patch.unfusable_reason(Subclass()) is None


def test_import_resnext_imports_neither_package():
    code = ("import sys, torch, resnext; from resnext import patch; "
            "assert patch.block_kind(torch.nn.Conv2d(1, 1, 1)) is None; "
            "bad = [m for m in ('torchvision', 'timm', 'kernels.grouped_conv_bn_relu') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_stand_ins_patched_match_unpatched(train, device):
    torch.manual_seed(0)
    ours = resnext.Bottleneck(16, 4, groups=4, width_per_group=32)  # 16 -> 16 channels, width 8
    ref = nn.Sequential(_TvBottleneck(stride=2), _TimmBottleneck(), ours)
    ref = randomize_bn(ref, torch.Generator().manual_seed(0)).to(device).train(train)
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    assert all(patch.is_patched(b) for b in model[:2]) and model[2].fused_kernels
    assert_same_structure(model, ref)
    x = torch.randn(2, 16, 8, 8, device=device)
    head = torch.randn(2, 16, 4, 4, device=device)
    out_ref, dx_ref, _ = _run(ref, x, head)
    out, dx, convs = _run(model, x, head)
    assert not [c for c in convs if c[2] == (3, 3)]  # every 3x3 conv here is a block's conv2
    _assert_step_matches(model, ref, out, dx, out_ref, dx_ref)
    resnext.unfuse_kernels(model)
    assert not any("forward" in vars(b) for b in model[:2]) and not model[2].fused_kernels


def test_sync_batchnorm_models_are_fused(device):
    """After ``nn.SyncBatchNorm.convert_sync_batchnorm`` every block still fuses (bn2 is a
    SyncBatchNorm) and, outside a process group, computes what the patched BatchNorm2d model does,
    bit for bit, in training mode (tests/test_sync_bn.py checks the synced statistics)."""
    torch.manual_seed(0)
    ref = nn.Sequential(_TvBottleneck(stride=2), _TimmBottleneck(),
                        resnext.Bottleneck(16, 4, groups=4, width_per_group=32))
    ref = randomize_bn(ref, torch.Generator().manual_seed(0)).to(device).train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert all(isinstance(b.bn2, nn.SyncBatchNorm) for b in synced)
    resnext.fuse_kernels(synced)
    resnext.fuse_kernels(ref)
    assert all(patch.is_patched(b) for b in synced[:2]) and synced[2].fused_kernels
    x = torch.randn(2, 16, 8, 8, device=device)
    head = torch.randn(2, 16, 4, 4, device=device)
    out_ref, dx_ref, _ = _run(ref, x, head)
    out, dx, _ = _run(synced, x, head)
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    for (n, p), q in zip(synced.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n
    for (n, b), c in zip(synced.named_buffers(), ref.buffers()):
        assert torch.equal(b, c), n


def test_ddp_runs_the_patched_forward(tmp_path, device):
    """DistributedDataParallel calls ``module(...)``, so the instance's forward; one gloo process."""
    import torch.distributed as dist

    torch.manual_seed(0)
    ref = randomize_bn(nn.Sequential(_TvBottleneck(stride=2), _TimmBottleneck()),
                        torch.Generator().manual_seed(0)).to(device).train()
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 16, 8, 8, device=device)
        head = torch.randn(2, 16, 4, 4, device=device)
        out_ref, _, _ = _run(ref, x, head)
        out, _, convs = _run(ddp, x, head)
    finally:
        dist.destroy_process_group()
    assert not [c for c in convs if c[2] == (3, 3)]
    _assert_close(out, out_ref, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():  # DDP's all-reduce hooks saw the fused op's gradients
        _assert_close(p.grad, ref_params[n].grad, n)


class _BatchNormWithItsOwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def _with(block, **attrs):
    for k, v in attrs.items():
        setattr(block, k, v)
    return block


REFUSED = {
    "dilation": (lambda: _TvBottleneck(dilation=2), "conv2 has dilation=(2, 2) (1 only)"),
    "bias": (lambda: _with(_TvBottleneck(), conv2=nn.Conv2d(8, 8, 3, padding=1, groups=4)),
             "conv2 has a bias (bias=False only)"),
    "5x5": (lambda: _with(_TvBottleneck(), conv2=nn.Conv2d(8, 8, 5, padding=2, bias=False)),
            r"conv2 has kernel_size=(5, 5) (3x3 only)"),
    "padding": (lambda: _with(_TvBottleneck(), conv2=nn.Conv2d(8, 8, 3, padding=(1, 0), bias=False)),
                "conv2 has padding=(1, 0) (equal integers in [0, 2] only)"),
    "reflect": (lambda: _with(_TvBottleneck(), conv2=nn.Conv2d(8, 8, 3, padding=1, bias=False,
                                                                padding_mode="reflect")),
                "conv2 has padding_mode='reflect' (zeros only)"),
    "groupnorm": (lambda: _with(_TvBottleneck(), bn2=nn.GroupNorm(4, 8)),
                  "bn2 is torch.nn.modules.normalization.GroupNorm, not an nn.BatchNorm2d"),
    "bn-forward": (lambda: _with(_TvBottleneck(), bn2=_BatchNormWithItsOwnForward(8)),
                   "_BatchNormWithItsOwnForward, not an nn.BatchNorm2d"),
    "relu6": (lambda: _TimmBottleneck(act_layer=nn.ReLU6), "act2 is ReLU6, not nn.ReLU"),
    "drop-block": (lambda: _TimmBottleneck(drop_block=nn.Dropout2d(0.1)), "drop_block is Dropout2d"),
    "own-forward": (lambda: type("QuantizableBottleneck", (_TvBottleneck,), {"forward": lambda self, x: x})(),
                    "QuantizableBottleneck overrides torchvision.models.resnet.Bottleneck.forward"),
    "patched-by-others": (lambda: _with(_TvBottleneck(), forward=lambda x: x),
                          "its forward is already replaced on the instance by another patch"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_what_the_op_cannot_compute(case):
    build, why = REFUSED[case]
    model = nn.Sequential(build(), _TimmBottleneck())
    with pytest.raises(ValueError, match="cannot compute 1 of its 2 blocks exactly") as err:
        resnext.fuse_kernels(model)
    assert f"  0 ({patch.block_kind(model[0])}): " in str(err.value) and why in str(err.value)
    assert not patch.is_patched(model[1])  # all or nothing
    text = one_warning(lambda: resnext.fuse_kernels(model, strict=False))
    assert "left 1 of 2 blocks of Sequential to PyTorch" in text and why in text
    assert not patch.is_patched(model[0]) and patch.is_patched(model[1])
    if case == "patched-by-others":  # unfuse_kernels leaves the other patch alone
        resnext.unfuse_kernels(model)
        assert "forward" in vars(model[0]) and "forward" not in vars(model[1])


def test_nothing_to_fuse_without_the_packages():
    for fn in (resnext.fuse_kernels, resnext.unfuse_kernels):
        with pytest.raises(ValueError) as err:
            fn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        assert str(err.value).startswith("Sequential holds no resnext.Bottleneck")
        assert all(name in str(err.value) for name in NAMES)


def test_patch_is_a_partial_of_a_module_function():
    """What makes deepcopy, pickling and torch.compile work: a plain ``functools.partial``."""
    block = resnext.fuse_kernels(nn.Sequential(_TimmBottleneck()))[0]
    assert isinstance(block.forward, functools.partial) and block.forward.func.__module__ == "resnext.patch"
    clone = copy.deepcopy(block)
    assert patch.is_patched(clone) and clone.forward.args[0] is clone
