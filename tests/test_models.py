"""ResNeXt models: architecture against torchvision's, the fused-kernel swap, checkpoint loading.

torchvision is not importable here, so its layout is written out from its ``models/resnet.py``
(key names, strides, widths) and its published parameter counts. The fused blocks run through
Triton's interpreter on the CPU, so those tests use tiny models and inputs.
"""

import copy
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import resnext
from resnext import Bottleneck, CifarResNeXt, ResNeXt

# ---------------------------------------------------------------------------------------------
# Sizes and architecture

# torchvision's published counts (weights tables) and the paper's CIFAR models (table 7 gives
# 34.4 M and 68.1 M; the exact figures below are the architecture's, see the tests' docstring).
PARAMS = {
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,   # = 50_32x4d + 17 stage-3 blocks of 1,126,400
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "resnext152_32x4d": 59_951_400,   # = 101_32x4d + 4 stage-2 blocks (282,624) + 13 stage-3 blocks
    "resnext101_32x16d": 194_026_792,
    "resnext29_8x64d": 34_426_698,    # counted by hand stage by stage; paper: 34.4 M
    "resnext29_16x64d": 68_155_210,   # paper: 68.1 M
    "resnext_tiny": 956_890,
}


def test_list_models_covers_every_builder():
    assert sorted(resnext.list_models()) == sorted(PARAMS)
    for name in PARAMS:
        assert callable(getattr(resnext, name)), name


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_count(name):
    with torch.device("meta"):
        model = resnext.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_create_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'resnext42'.*resnext50_32x4d"):
        resnext.create_model("resnext42")


def _torchvision_keys(layers):
    """torchvision's resnet.py state_dict keys for a Bottleneck ResNet with these stage depths."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for stage, blocks in enumerate(layers, 1):
        for i in range(blocks):
            p = f"layer{stage}.{i}."
            for j in (1, 2, 3):
                keys += [p + f"conv{j}.weight"] + [p + f"bn{j}.{s}" for s in bn]
            if i == 0:
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{s}" for s in bn]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name, layers", [("resnext50_32x4d", [3, 4, 6, 3]),
                                          ("resnext101_64x4d", [3, 4, 23, 3]),
                                          ("resnext152_32x4d", [3, 8, 36, 3])])
def test_state_dict_keys_are_torchvision_keys(name, layers):
    with torch.device("meta"):
        model = resnext.create_model(name)
    keys = list(model.state_dict())
    assert keys == _torchvision_keys(layers)
    assert len(_torchvision_keys([3, 4, 6, 3])) == 320  # torchvision resnext50_32x4d's count


@pytest.mark.parametrize("name, groups, widths", [
    ("resnext50_32x4d", 32, (128, 256, 512, 1024)),
    ("resnext101_32x8d", 32, (256, 512, 1024, 2048)),
    ("resnext101_64x4d", 64, (256, 512, 1024, 2048)),
])
def test_imagenet_widths_and_strides(name, groups, widths):
    with torch.device("meta"):
        model = resnext.create_model(name)
    assert model.conv1.weight.shape == (64, 3, 7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.weight.shape == (1000, 2048)
    for stage, width in enumerate(widths, 1):
        first = getattr(model, f"layer{stage}")[0]
        stride = 1 if stage == 1 else 2
        # torchvision (ResNet v1.5): the stride is on the grouped 3x3, not on conv1
        assert first.conv1.stride == (1, 1)
        assert first.conv2.stride == (stride, stride) and first.conv2.groups == groups
        assert first.conv2.weight.shape == (width, width // groups, 3, 3)
        assert first.downsample[0].stride == (stride, stride)
        assert first.conv3.out_channels == 256 * 2 ** (stage - 1)


def test_cifar_architecture():
    model = resnext.resnext29_8x64d()
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    for stage, (width, out) in enumerate([(512, 256), (1024, 512), (2048, 1024)], 1):
        layer = getattr(model, f"layer{stage}")
        assert len(layer) == 3  # depth 29 = 9 * 3 + 2
        stride = 1 if stage == 1 else 2
        assert layer[0].conv2.stride == (stride, stride) and layer[0].conv2.groups == 8
        assert layer[0].conv2.out_channels == width and layer[0].conv3.out_channels == out
    assert not hasattr(model, "layer4") and model.fc.in_features == 1024

    tiny = resnext.resnext_tiny()
    assert [getattr(tiny, f"layer{s}")[0].conv2.out_channels for s in (1, 2, 3)] == [32, 64, 128]
    assert tiny.conv1.out_channels == 16 and len(tiny.layer1) == 1
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert tiny(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth"):
        CifarResNeXt(depth=30)


def test_forward_features_and_head():
    torch.manual_seed(0)
    model = resnext.resnext50_32x4d(num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 2048, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
        torch.testing.assert_close(model(x), model.forward_head(feats))
    assert model(x).shape == (1, 7)


def test_init_matches_torchvision():
    torch.manual_seed(0)
    model = resnext.resnext50_32x4d()
    w = model.layer3[0].conv2.weight  # (512, 16, 3, 3): kaiming fan_out = 512 * 9, not / groups
    assert abs(w.std().item() / (2.0 / (512 * 9)) ** 0.5 - 1) < 0.05
    w = model.layer1[0].conv1.weight  # (128, 64, 1, 1)
    assert abs(w.std().item() / (2.0 / 128) ** 0.5 - 1) < 0.05
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert model.layer4[2].bn3.weight.abs().sum() > 0
    zero = resnext.resnext50_32x4d(zero_init_residual=True)
    for m in zero.modules():
        if isinstance(m, Bottleneck):
            assert m.bn3.weight.abs().sum() == 0 and m.bn2.weight.abs().sum() > 0


def test_import_does_not_import_kernels():
    code = ("import sys, resnext; m = resnext.resnext_tiny(); "
            "assert 'kernels.grouped_conv_bn_relu' not in sys.modules, 'kernels imported'; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# The fused-kernel swap

def _fused_module():
    return pytest.importorskip("kernels.grouped_conv_bn_relu", reason="fused kernel not available")


def _tiny_imagenet():
    """ImageNet-style ResNeXt with one block per stage: 4 groups, 4/8/16/32 channels per group."""
    return ResNeXt([1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10)


def _randomize_bn(model, gen):
    """Non-trivial affine parameters and running statistics, so eval mode tests real values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def test_fuse_kernels_changes_no_parameter_buffer_or_key():
    _fused_module()
    model = resnext.resnext_tiny()
    before = model.state_dict(keep_vars=True)
    assert resnext.fuse_kernels(model) is model
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(b.fused_kernels for b in blocks)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the very same tensors, not copies
    assert resnext.unfuse_kernels(model) is model
    assert not any(b.fused_kernels for b in blocks)
    assert list(model.state_dict()) == list(before)


def test_builder_flag_and_state_dict_round_trip():
    _fused_module()
    torch.manual_seed(0)
    fused = resnext.resnext_tiny(fused_kernels=True)
    assert all(m.fused_kernels for m in fused.modules() if isinstance(m, Bottleneck))
    assert all(m.fused_kernels for m in resnext.resnext50_32x4d(fused_kernels=True).modules()
               if isinstance(m, Bottleneck))
    torch.manual_seed(1)
    plain = resnext.resnext_tiny()
    assert not any(m.fused_kernels for m in plain.modules() if isinstance(m, Bottleneck))
    assert list(plain.state_dict()) == list(fused.state_dict())
    plain.load_state_dict(fused.state_dict(), strict=True)
    for k, v in fused.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    again = resnext.resnext_tiny(fused_kernels=True)
    again.load_state_dict(plain.state_dict(), strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_fuse_kernels_rejects_models_without_blocks():
    _fused_module()
    with pytest.raises(ValueError, match="no resnext.Bottleneck"):
        resnext.fuse_kernels(nn.Sequential(nn.Conv2d(3, 3, 3)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("builder, size", [
    (resnext.resnext_tiny, 16),   # CIFAR-style: 8 groups, 4/8/16 channels per group
    # ImageNet stem: grouped convs at 12x12, 6x6, 3x3 (ragged), 2x2. Not 32x32: training-mode BN
    # over the 2 values per channel of a 1x1 stage 4 is so ill-conditioned that float32 PyTorch
    # itself is 2e-4 off float64 there.
    (_tiny_imagenet, 48),
], ids=["cifar-tiny", "imagenet-1block"])
def test_fused_matches_unfused(builder, size, train, monkeypatch, device):
    fused_module = _fused_module()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = _randomize_bn(builder(), gen).train(train).to(device)
    fused = resnext.fuse_kernels(copy.deepcopy(ref))

    calls = []
    real = fused_module.grouped_conv_bn_relu_modules

    def spy(x, conv, bn):
        calls.append((conv, bn))
        return real(x, conv, bn)

    monkeypatch.setattr(fused_module, "grouped_conv_bn_relu_modules", spy)

    x = torch.randn(2, 3, size, size, generator=gen).to(device)
    head = torch.randn(2, 10, generator=gen).to(device)  # a random linear loss: no trivial gradient
    outs, grads = [], []
    for model in (ref, fused):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * head).sum().backward()
        outs.append(out)
        grads.append(xi.grad)

    blocks = [m for m in fused.modules() if isinstance(m, Bottleneck)]
    assert [c for c, _ in calls] == [b.conv2 for b in blocks]  # every block took the fused path
    # float32 throughout; the observed differences are <1e-6 (outputs) and <1e-5 relative
    # (gradients): the tolerances leave room for reductions summed in another order through a
    # dozen layers. Eval-mode input gradients are ~1e-2 in size, hence the small atol.
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=2e-5, rtol=1e-4)
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=2e-5, rtol=1e-4, msg=name)
    ref_buffers = dict(ref.named_buffers())
    for name, b in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, ref_buffers[name]), name
        else:
            torch.testing.assert_close(b, ref_buffers[name], atol=1e-5, rtol=1e-5, msg=name)
    if train:  # the running statistics really moved, in both
        assert all(int(b) == 1 for n, b in fused.named_buffers() if n.endswith("num_batches_tracked"))


# ---------------------------------------------------------------------------------------------
# Checkpoint loading

def _torchvision_checkpoint(model):
    """What torchvision's / timm's checkpoint of this model holds: an OrderedDict of tensors."""
    return OrderedDict((k, v.clone()) for k, v in model.state_dict().items())


def _assert_same_state(model, source):
    src = source.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, src[k]), k


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: OrderedDict(("module." + k, v) for k, v in sd.items()),   # DataParallel / DDP
    lambda sd: OrderedDict(("model." + k, v) for k, v in sd.items()),    # wrapper module
    lambda sd: {"state_dict": OrderedDict(("module.model." + k, v) for k, v in sd.items()), "epoch": 3},
    lambda sd: {"model": OrderedDict(("_orig_mod." + k, v) for k, v in sd.items()),  # torch.compile
                "optimizer": {"state": {}}, "config": {"lr": 0.1}},
    lambda sd: OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")),
], ids=["plain", "module.", "model.", "state_dict+module.model.", "trainer-dict+_orig_mod.", "old-torchvision"])
def test_load_torchvision_format(wrap, tmp_path):
    torch.manual_seed(0)
    source = _randomize_bn(resnext.resnext_tiny(), torch.Generator().manual_seed(1))
    checkpoint = wrap(_torchvision_checkpoint(source))
    torch.manual_seed(2)
    model = resnext.resnext_tiny()
    assert resnext.load_state_dict(model, checkpoint) is model
    _assert_same_state(model, source)

    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    from_file = resnext.load_state_dict(resnext.resnext_tiny(), str(path))
    _assert_same_state(from_file, source)


def test_load_full_size_torchvision_layout(tmp_path):
    torch.manual_seed(0)
    source = resnext.resnext50_32x4d()
    path = tmp_path / "resnext50_32x4d-tv.pth"
    torch.save(OrderedDict(("module." + k, v) for k, v in source.state_dict().items()), path)
    model = resnext.load_state_dict(resnext.resnext50_32x4d(fused_kernels=False), path)
    _assert_same_state(model, source)


def test_wrong_checkpoint_errors():
    small = CifarResNeXt(11, 8, 4, stem_width=16)
    deeper = CifarResNeXt(20, 8, 4, stem_width=16)          # 2 blocks per stage
    other_groups = CifarResNeXt(11, 4, 8, stem_width=16)    # same widths, 4 groups of 8 channels

    with pytest.raises(ValueError) as err:
        resnext.load_state_dict(deeper, small.state_dict())
    msg = str(err.value)
    assert "missing keys" in msg and "layer1.1.conv1.weight" in msg and "unexpected" not in msg
    missing = [k for k in deeper.state_dict() if k not in small.state_dict()
               and not k.endswith("num_batches_tracked")]
    assert f"{len(missing)} missing keys" in msg and msg.count("...") == 1  # first few, then ...

    with pytest.raises(ValueError, match=r"unexpected keys: layer1\.1\.conv1\.weight"):
        resnext.load_state_dict(small, deeper.state_dict())

    with pytest.raises(ValueError, match=r"3 shape mismatches: layer1\.0\.conv2\.weight \(32, 8, 3, 3\) "
                                         r"vs model \(32, 4, 3, 3\)"):
        resnext.load_state_dict(small, other_groups.state_dict())

    # strict=False loads what matches and still refuses shapes that differ
    before = deeper.layer1[1].conv1.weight.clone()
    resnext.load_state_dict(deeper, small.state_dict(), strict=False)
    assert torch.equal(deeper.layer1[0].conv2.weight, small.layer1[0].conv2.weight)
    assert torch.equal(deeper.layer1[1].conv1.weight, before)
    with pytest.raises(ValueError, match="shape mismatches"):
        resnext.load_state_dict(small, other_groups.state_dict(), strict=False)

    with pytest.raises(TypeError, match="path or a state dict"):
        resnext.load_state_dict(small, [1, 2])
    with pytest.raises(ValueError, match="holds no tensors.*'epoch'"):
        resnext.load_state_dict(small, {"epoch": 3, "weights": {"a": 1}})
