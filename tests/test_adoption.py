"""Beyond this package's ResNeXt (issue 27): RegNet, SE-ResNeXt, detection backbones, and
torchvision's and timm's ResNeXt at the block level, all through ``resnext.fuse_kernels``.

Neither torchvision nor timm imports here (torchvision's wheels need a CUDA torch; timm needs
torchvision), so the models are built from ``_standins.py``: classes carrying the libraries' module
and class names, attributes and forwards, copied from their source (timm 1.0 and 0.5, torchvision
0.13+). Where the packages import, tests/test_thirdparty_models.py runs their real ResNeXts.

Every numerical test is judged as tests/test_bottleneck.py judges the fused bottleneck: against a
float64 copy of the eager model, our float32 error within 2x PyTorch's own float32 error (plus a
floor of 1e-6 of each tensor's scale), for the output, the input's and every parameter's gradient
and every buffer (running statistics, num_batches_tracked exactly). That PyTorch is left no grouped
convolution after patching, and has all of them back after ``unfuse_kernels``, is counted with a
TorchDispatchMode that sees every ``aten.convolution`` and ``aten.convolution_backward``.

Sizes: the interpreter's time grows with the channels per group, not the pixels: a grouped conv of
2 x 120 channels costs ~13 s forward and backward, 3 x 5 channels ~0.3 s. So 120 channels per group
run once (timm's RegNetY, training), 56 once (torchvision's, eval mode), and everything else at 5
(odd) and 24, or at ResNeXt widths of 4 and 8 channels per group: ~70 s on 2 cores.
"""

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn as nn

import _standins as S
import resnext
from _patched import (ConvCalls, assert_same_structure, assert_unpatched, fused_weights, model_blocks, one_warning,
                      randomize_bn)
from resnext import patch


@pytest.fixture(autouse=True)
def _kernels():
    pytest.importorskip("kernels.grouped_conv_bn_relu", reason="fused kernel not available")


# ---------------------------------------------------------------------------------------------
# Helpers


def _randomize(model, seed=0):
    """No BatchNorm the identity (``_patched.randomize_bn``), from ``seed``."""
    return randomize_bn(model, torch.Generator().manual_seed(seed))


def _grouped(calls):
    return sorted(c for c in calls if c[1] > 1)


def _step(model, x, head, spy=True):
    """One forward and backward of ``(model(x) * head).sum()``: {"y", "dx", "d.<param>", "b.<buffer>"},
    and the convolutions PyTorch ran."""
    x = x.clone().requires_grad_()
    convs = ConvCalls()
    with convs if spy else contextlib.nullcontext():
        y = model(x)
        (y * head.to(y.dtype)).sum().backward()
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"d.{k}": p.grad for k, p in model.named_parameters()})
    out.update({f"b.{k}": b.clone() for k, b in model.named_buffers()})
    return out, convs.calls


def _three_steps(ref, model, x, head):
    """(ours, PyTorch's float32, float64) results of one step, and the convolutions each left to PyTorch."""
    exact, _ = _step(copy.deepcopy(ref).double(), x.double(), head.double())
    eager, eager_convs = _step(ref, x, head)
    ours, convs = _step(model, x, head)
    return ours, eager, exact, convs, eager_convs


def _assert_within_2x_pytorch(ours, eager, exact):
    assert ours.keys() == exact.keys()
    for k, c in exact.items():
        if c is None:  # a frozen parameter: no gradient anywhere
            assert ours[k] is None and eager[k] is None, k
            continue
        if not c.is_floating_point():
            assert torch.equal(ours[k], c), k
            continue
        err = (ours[k].double() - c).abs().max().item()
        torch_err = (eager[k].double() - c).abs().max().item()
        floor = 1e-6 * max(c.abs().max().item(), 1e-30)
        assert err <= 2 * torch_err + floor, f"{k}: {err:.3g} vs PyTorch's {torch_err:.3g}"


def _check_fused_model(ref, model, x, head):
    """``model`` is ``ref`` patched at the conv level: the same structure, our step within 2x PyTorch's
    error, no grouped conv (nor any patched conv) left to PyTorch; after unfuse_kernels, every grouped
    conv back in PyTorch."""
    blocks = model_blocks(model)
    assert blocks and all(patch.patched_level(b) == "conv" for b in blocks)
    assert_same_structure(model, ref)
    ours, eager, exact, convs, eager_convs = _three_steps(ref, model, x, head)
    fused = fused_weights(model)
    assert fused <= {c[0] for c in _convs_of(eager_convs, ref, model)}  # the spy sees the eager ones
    assert not _grouped(convs), "a grouped convolution ran in PyTorch"
    assert not [c for c in convs if c[0] in fused], "a patched convolution ran in PyTorch"
    _assert_within_2x_pytorch(ours, eager, exact)
    assert resnext.unfuse_kernels(model) is model
    assert_unpatched(model)
    assert_same_structure(model, ref)
    _, back = _step(model, x, head)
    assert len(_grouped(back)) == len(_grouped(eager_convs)) > 0
    assert fused <= {c[0] for c in back}


def _convs_of(calls, ref, model):
    """``calls`` of ``ref``, with ``ref``'s weights named by ``model``'s (its deep copy's) pointers."""
    ptr = {p.data_ptr(): q.data_ptr() for p, q in zip(ref.parameters(), model.parameters())}
    return [(ptr.get(w, w), *rest) for w, *rest in calls]


# ---------------------------------------------------------------------------------------------
# RegNet at the conv level: timm's RegNetX/RegNetY and torchvision's, patched in place

# channels per group (groups): 5 (3, an odd width), 24 (2), 56 (2), 120 (2): no channel tile divides them
W120 = dict(widths=(15, 48, 240), group_widths=(5, 24, 120), strides=(1, 2, 2))
W56 = dict(widths=(15, 48, 112), group_widths=(5, 24, 56), strides=(1, 2, 1))
LIGHT = dict(widths=(15, 48), group_widths=(5, 24), strides=(1, 2))
REGNETS = {  # name: (builder, train mode); the input is 2 x 3 x 16 x 16 (stem stride 2: stages at 8x8 .. 2x2)
    "timm-regnety-train": (lambda: S.TimmRegNet(W120["widths"], W120["group_widths"], W120["strides"],
                                                se_ratio=0.25), True),
    "tv-regnety-eval": (lambda: S.TvRegNet(**W56, se_ratio=0.25), False),
    "tv-regnetx-train": (lambda: S.TvRegNet(**LIGHT), True),
    "timm0.5-regnetx-eval": (lambda: S.timm05_regnet(**LIGHT), False),
}


@pytest.mark.parametrize("name", list(REGNETS))
def test_regnet_matches_eager_within_2x_pytorch_error(name, device):
    """RegNet blocks patched in place: outputs, every gradient and running statistic against eager
    PyTorch, at 5, 24, 56 and 120 channels per group (each library in train and eval mode, each width
    with gradients at least once: the op does not know the library, the patch does not know the width);
    SE between conv2 and conv3 runs in PyTorch; the very same tensors, keys and classes afterwards."""
    build, train = REGNETS[name]
    torch.manual_seed(0)
    ref = _randomize(build()).to(device).train(train)
    model = copy.deepcopy(ref)
    before = model.state_dict(keep_vars=True)
    assert resnext.fuse_kernels(model) is model
    assert all(v is before[k] for k, v in model.state_dict(keep_vars=True).items())  # not copies
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(device)
    with torch.no_grad():
        out_shape = copy.deepcopy(ref)(x).shape
    head = torch.randn(out_shape, generator=gen).to(device)
    _check_fused_model(ref, model, x, head)


def test_regnet_patch_is_on_the_conv_norm_act_and_survives_deepcopy(device):
    """The patch is a partial of a resnext.patch function on timm's ConvNormAct (block.conv2) and
    torchvision's Conv2dNormActivation (block.f.b), bound to that very module; a deep copy is patched
    and bound to its own modules, computes the same bits, and unfuses alone; patching twice is a no-op."""
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(S.TimmRegNetBottleneck(10, 10, group_size=5),
                                     S.ResBottleneckBlock(10, 10, 1, nn.BatchNorm2d, nn.ReLU, group_width=5,
                                                          se_ratio=0.25))).to(device).eval()
    resnext.fuse_kernels(resnext.fuse_kernels(model))
    targets = [model[0].conv2, model[1].f.b]
    for t in targets:
        assert isinstance(t.forward, functools.partial) and t.forward.func.__module__ == "resnext.patch"
        assert t.forward.args[0] is t
    assert not any("forward" in vars(b) for b in model)  # the blocks' own forward runs (SE, conv3, shortcut)
    clone = copy.deepcopy(model)
    assert [clone[0].conv2.forward.args[0], clone[1].f.b.forward.args[0]] == [clone[0].conv2, clone[1].f.b]
    x = torch.randn(2, 10, 4, 4, device=device)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    resnext.unfuse_kernels(clone)
    assert_unpatched(clone)
    assert all(patch.is_patched(b) for b in model)


def _named_regnet_pair(first, second):
    model = nn.Sequential()
    model.add_module("s1", first)
    model.add_module("s2", second)
    return model


class _OwnForwardBNAct(S.BatchNormAct2d):
    def forward(self, x):
        return super().forward(x) * 2


class _OwnForwardConvNormAct(S.ConvNormAct):
    def forward(self, x):
        return self.bn(self.conv(x))


class _QuantizableBlock(S.ResBottleneckBlock):
    def forward(self, x):
        return x


def _timm_regnet(**kw):
    return S.TimmRegNetBottleneck(16, 16, group_size=8, se_ratio=0.25, **kw)


def _tv_regnet(activation=nn.ReLU, norm_layer=nn.BatchNorm2d, cls=S.ResBottleneckBlock):
    return cls(16, 16, 1, norm_layer, activation, group_width=8, se_ratio=0.25)


def _with(block, path, value):
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, value)
    return block


REGNET_REFUSED = {  # name: (the refused block, why); the other block of the model is fusable
    "timm-silu": (lambda: _timm_regnet(act_layer=nn.SiLU), "conv2.bn.act is SiLU, not nn.ReLU"),
    "timm-drop-block": (lambda: _timm_regnet(drop_block=S.DropBlock2d),
                        "conv2.bn.drop is DropBlock2d (it sits between the BatchNorm and the ReLU)"),
    "timm-groupnorm": (lambda: _timm_regnet(norm_layer=functools.partial(S.GroupNormAct, group_size=4)),
                       "conv2.bn is timm.layers.norm_act.GroupNormAct, not timm's BatchNormAct2d"),
    "timm-dilated": (lambda: _timm_regnet(dilation=(2, 2)), "conv2.conv has dilation=(2, 2) (1 only)"),
    "timm-same-padding": (lambda: _with(_timm_regnet(), "conv2.conv", S.Conv2dSame(16, 16, 3, groups=2, bias=False)),
                          "conv2.conv is Conv2dSame, not an nn.Conv2d"),
    "timm-no-norm": (lambda: _with(_timm_regnet(), "conv2", S.ConvNormAct(16, 16, 3, groups=2, apply_norm=False)),
                     "conv2.bn is torch.nn.modules.container.Sequential, not timm's BatchNormAct2d"),
    "timm-torch-sync-bn": (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(_timm_regnet()),  # drops the ReLU
                           "conv2.bn is torch.nn.modules.batchnorm.SyncBatchNorm, not timm's BatchNormAct2d"),
    "timm-bn-forward": (lambda: _with(_timm_regnet(), "conv2.bn", _OwnForwardBNAct(16)),
                        "conv2.bn is _OwnForwardBNAct, a BatchNormAct2d with its own forward"),
    "timm-cna-forward": (lambda: _with(_timm_regnet(), "conv2", _OwnForwardConvNormAct(16, 16, 3, groups=2)),
                         "conv2 is _OwnForwardConvNormAct, a ConvNormAct with its own forward"),
    "tv-silu": (lambda: _tv_regnet(activation=nn.SiLU), "f.b[2] is SiLU, not nn.ReLU"),
    "tv-no-activation": (lambda: _with(_tv_regnet(), "f.b", S.Conv2dNormActivation(16, 16, 3, groups=2,
                                                                                   activation_layer=None)),
                         "f.b is Conv2dNormActivation(Conv2d, BatchNorm2d), not a Conv2dNormActivation(Conv2d, "
                         "BatchNorm2d, ReLU)"),
    "tv-groupnorm": (lambda: _tv_regnet(norm_layer=lambda c: nn.GroupNorm(4, c)),
                     "f.b[1] is torch.nn.modules.normalization.GroupNorm, not an nn.BatchNorm2d"),
    "tv-bias": (lambda: _with(_tv_regnet(), "f.b.0", nn.Conv2d(16, 16, 3, padding=1, groups=2)),
                "f.b[0] has a bias (bias=False only)"),
    "tv-own-forward": (lambda: _tv_regnet(cls=_QuantizableBlock),
                       "_QuantizableBlock overrides torchvision.models.regnet.ResBottleneckBlock.forward"),
    "tv-f-replaced": (lambda: _with(_tv_regnet(), "f", nn.Identity()),
                      "its f is not an nn.Sequential holding b (torchvision's BottleneckTransform)"),
    "tv-patched-by-others": (lambda: _with(_tv_regnet(), "f.b.forward", lambda x: x),
                             "its forward is already replaced on the instance by another patch"),
}


@pytest.mark.parametrize("case", list(REGNET_REFUSED))
def test_regnet_refusals_name_the_block_and_why(case):
    """strict (the default): a ValueError naming the block, its kind and why, and nothing changed;
    strict=False: one warning naming it, the others fused."""
    build, why = REGNET_REFUSED[case]
    other = _timm_regnet() if case.startswith("timm") else _tv_regnet()
    model = _named_regnet_pair(build(), other)
    kind = patch.block_kind(model.s1)
    with pytest.raises(ValueError) as err:
        resnext.fuse_kernels(model)
    msg = str(err.value)
    assert "the fused op cannot compute 1 of its 2 blocks exactly, nothing was changed" in msg
    assert f"\n  s1 ({kind}): {why}" in msg and "fuse_kernels(model, strict=False)" in msg
    assert not any(patch.is_patched(b) for b in model)
    text = one_warning(lambda: resnext.fuse_kernels(model, strict=False))
    assert "left 1 of 2 blocks of Sequential to PyTorch" in text and f"s1 ({kind}): {why}" in text
    assert not patch.is_patched(model.s1) and patch.is_patched(model.s2)
    resnext.unfuse_kernels(model)
    assert not patch.is_patched(model.s2)
    if case.endswith("patched-by-others"):  # unfuse_kernels leaves the other patch alone
        assert "forward" in vars(model.s1.f.b)


def test_one_warning_names_every_block_left_to_pytorch():
    """timm's drop_block on the later stages (as ``drop_block_rate`` sets it): strict lists every such
    block in one error, a line each; strict=False fuses the others and says so in one warning line,
    the blocks grouped by why."""
    model = S.TimmRegNet((16, 32), (8, 8), (1, 2), depths=(1, 2))
    for block in model.s2.children():
        block.conv2.bn.drop = S.DropBlock2d()
    with pytest.raises(ValueError, match="cannot compute 2 of its 3 blocks exactly, nothing was changed") as err:
        resnext.fuse_kernels(model)
    assert "\n  s2.b1 (timm.models.regnet.Bottleneck): conv2.bn.drop is DropBlock2d" in str(err.value)
    assert "\n  s2.b2 (timm.models.regnet.Bottleneck): conv2.bn.drop is DropBlock2d" in str(err.value)
    text = one_warning(lambda: resnext.fuse_kernels(model, strict=False))
    assert text == ("fuse_kernels: left 2 of 3 blocks of RegNet to PyTorch: s2.b1, s2.b2 (timm.models.regnet."
                    "Bottleneck): conv2.bn.drop is DropBlock2d (it sits between the BatchNorm and the ReLU)")
    assert [patch.is_patched(b) for b in (model.s1.b1, model.s2.b1, model.s2.b2)] == [True, False, False]


def test_a_model_changed_after_patching_raises_rather_than_computing_something_else(device):
    """PyTorch's convert_sync_batchnorm after fuse_kernels turns timm's BatchNormAct2d into an
    nn.SyncBatchNorm without the ReLU: the patched forward refuses to run; fuse_kernels again says why.
    Likewise a block-level block given an SE module after patching."""
    model = resnext.fuse_kernels(nn.Sequential(_timm_regnet())).to(device)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert patch.is_patched(model[0])  # the ConvNormAct itself was kept, and its forward attribute
    with pytest.raises(ValueError, match=r"ConvNormAct was patched by resnext.fuse_kernels and has changed since: "
                                         r"conv2.bn is torch.nn.modules.batchnorm.SyncBatchNorm, not timm's"):
        model(torch.randn(2, 16, 4, 4, device=device))
    with pytest.raises(ValueError, match="conv2.bn is torch.nn.modules.batchnorm.SyncBatchNorm"):
        resnext.fuse_kernels(model)
    resnext.unfuse_kernels(model)
    assert_unpatched(model)
    resnet = resnext.fuse_kernels(S.TimmResNet(), level="block").to(device)
    resnet.layer1[0].se = S.SEModule(32)
    with pytest.raises(ValueError, match="Bottleneck was patched by resnext.fuse_kernels and has changed since: se is "
                                         "SEModule: the fused bottleneck has no squeeze-and-excitation"):
        resnet(torch.randn(2, 3, 8, 8, device=device))


def test_timm_sync_batchnorm_act_is_fused(device):
    """timm's own convert_sync_batchnorm (SyncBatchNormAct keeps act and drop), here after
    fuse_kernels: the patched forward checks the new modules and computes, outside a process group,
    what the BatchNormAct2d model computes, bit for bit, in training mode."""
    torch.manual_seed(0)
    ref = _randomize(nn.Sequential(_timm_regnet())).to(device).train()
    synced = resnext.fuse_kernels(copy.deepcopy(ref))
    synced = S.timm_convert_sync_batchnorm(synced)
    assert type(synced[0].conv2.bn) is S.SyncBatchNormAct and patch.is_patched(synced[0])
    resnext.fuse_kernels(ref)
    x = torch.randn(2, 16, 4, 4, device=device)
    head = torch.randn(2, 16, 4, 4, device=device)
    ours, _ = _step(synced, x, head)
    theirs, _ = _step(ref, x, head)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


# ---------------------------------------------------------------------------------------------
# ResNeXt at the conv level: SE-ResNeXt, detection backbones, norm_eval


def test_se_resnext_at_the_conv_level(device):
    """timm's seresnext-style Bottleneck (``se`` set, after bn3): conv2 -> bn2 -> ReLU fused, SE in PyTorch."""
    torch.manual_seed(0)
    ref = _randomize(S.TimmResNet(attn_layer="se")).to(device).train()
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    assert all(type(b.se) is S.SEModule for b in model_blocks(model))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    head = torch.randn(2, 64, 4, 4, generator=gen).to(device)
    _check_fused_model(ref, model, x, head)


def test_detection_backbone_with_frozen_batchnorm(device):
    """torchvision's detection backbones: FrozenBatchNorm2d everywhere and the stem frozen
    (``trainable_layers``), trained in train mode; and a timm RegNet block after timm's
    ``freeze_batch_norm_2d`` (FrozenBatchNormAct2d). Frozen BatchNorms keep their buffers."""
    torch.manual_seed(0)
    ref = nn.Sequential(S.TvResNet(norm_layer=S.FrozenBatchNorm2d),
                        S.TimmRegNetBottleneck(64, 64, group_size=16, norm_layer=S.FrozenBatchNormAct2d))
    ref = _randomize(ref).to(device).train()
    ref[0].conv1.requires_grad_(False)
    model = resnext.fuse_kernels(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    head = torch.randn(2, 64, 4, 4, generator=gen).to(device)
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    _check_fused_model(ref, model, x, head)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def _norm_eval(model):
    """mmdetection's ``norm_eval``: the model in train mode, every BatchNorm in eval mode, its affine
    parameters still trained."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


NORM_EVAL = {  # name: (builder, level)
    "conv": (lambda: nn.Sequential(S.TvResNet(), S.TimmRegNetBottleneck(64, 64, group_size=16)), "conv"),
    "block": (lambda: S.TvResNet(), "block"),
}


@pytest.mark.parametrize("name", list(NORM_EVAL))
def test_norm_eval_trains_the_batchnorm_affine_parameters_through_the_fused_kernels(name, device):
    """BatchNorms in eval mode inside a model in train mode: the running statistics stay as they are,
    γ and β get their gradients through the fused op (or bottleneck), within 2x PyTorch's error, and
    two SGD steps later the model still matches."""
    build, level = NORM_EVAL[name]
    torch.manual_seed(0)
    ref = _norm_eval(_randomize(build()).to(device))
    model = resnext.fuse_kernels(copy.deepcopy(ref), level=level)
    exact_model = copy.deepcopy(ref).double()
    models = (model, ref, exact_model)
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    head = torch.randn(2, 64, 4, 4, generator=gen).to(device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for _ in range(2):
        results = [_step(m, x.to(dt), head.to(dt), spy=False)[0]
                   for m, dt in zip(models, (torch.float32, torch.float32, torch.float64))]
        _assert_within_2x_pytorch(*results)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    bn_weights = [k for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_weights and all(results[0][f"d.{k}.weight"].abs().sum() > 0 for k in bn_weights)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # nothing tracked, nothing moved


# ---------------------------------------------------------------------------------------------
# torchvision's and timm's ResNeXt at the block level

BLOCK_MODELS = {"tv": lambda: S.TvResNet(), "timm": lambda: S.TimmResNet()}


def _hook_calls(model):
    """Record every call of a conv or BatchNorm inside a block (none when the block runs in kernels)."""
    calls = []
    for b in model_blocks(model):
        for m in b.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.register_forward_hook(lambda m, a, o: calls.append(m))
    return calls


@pytest.mark.parametrize("lib, train", [("tv", True), ("timm", False)], ids=["tv-train", "timm-eval"])
def test_thirdparty_resnext_at_the_block_level(lib, train, device):
    """``fuse_kernels(model, level="block")`` runs each plain torchvision/timm Bottleneck (one with a
    projection and stride 2, one with the identity) through kernels.bottleneck.fused_bottleneck: no
    PyTorch conv or BatchNorm inside a block, within 2x PyTorch's error; unfuse_kernels undoes it."""
    torch.manual_seed(0)
    ref = _randomize(BLOCK_MODELS[lib]()).to(device).train(train)
    model = resnext.fuse_kernels(copy.deepcopy(ref), level="block")
    blocks = model_blocks(model)
    assert len(blocks) == 2 and all(patch.patched_level(b) == "block" for b in blocks)
    assert blocks[0].downsample is not None and blocks[1].downsample is not None  # 16 -> 32, then stride 2
    assert_same_structure(model, ref)
    calls = _hook_calls(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    head = torch.randn(2, 64, 4, 4, generator=gen).to(device)
    exact, _ = _step(copy.deepcopy(ref).double(), x.double(), head.double(), spy=False)
    eager, _ = _step(ref, x, head, spy=False)
    ours, _ = _step(model, x, head, spy=False)
    assert not calls, "a PyTorch conv or BatchNorm ran inside a fused block"
    _assert_within_2x_pytorch(ours, eager, exact)
    resnext.unfuse_kernels(model)
    assert_unpatched(model)
    with torch.no_grad():
        model(x)
    assert len(calls) == 2 * 6 + 2 * 2  # conv1-3, bn1-3 and the downsample's pair, per block


def test_levels_switch_in_place():
    """conv -> block -> conv on the same timm/torchvision blocks and ours; the patch is replaced, not
    stacked. patch_block and unfusable_reason refuse what they do not do, naming the argument."""
    ours = resnext.Bottleneck(64, 16, groups=4, width_per_group=16)
    model = nn.Sequential(S.TvResNet(), S.TimmResNet(), ours)
    blocks = model_blocks(model)
    for level in ("conv", "block", "conv", "block"):
        resnext.fuse_kernels(model, level=level)
        assert all(patch.patched_level(b) == level for b in blocks) and ours.fused_kernels == level
    resnext.unfuse_kernels(model)
    assert_unpatched(model)
    assert not ours.fused_kernels
    regnet = _timm_regnet()
    with pytest.raises(ValueError, match="cannot patch Bottleneck at level='block': level='block' runs torchvision's"):
        patch.patch_block(regnet, "block")
    with pytest.raises(ValueError, match="level must be one of"):
        patch.unfusable_reason(regnet, "bottleneck")
    with pytest.raises(ValueError, match="level must be one of"):
        resnext.fuse_kernels(model, level="regnet")
    assert not patch.is_patched(regnet)


BLOCK_REFUSED = {  # name: (model, refused blocks, why, whether the conv level fuses them)
    "timm-se": (lambda: S.TimmResNet(attn_layer="se"), 2,
                "se is SEModule: the fused bottleneck has no squeeze-and-excitation", True),
    "timm-blurpool": (lambda: S.TimmResNet(aa_layer=S.BlurPool2d), 1,  # only the stride-2 block has it
                      "aa is BlurPool2d: the fused bottleneck has no anti-aliasing", True),
    "timm-drop-path": (lambda: S.TimmResNet(drop_path=0.1), 2,
                       "drop_path is DropPath: the fused bottleneck has no stochastic depth", True),
    "timm-drop-block": (lambda: S.TimmResNet(drop_block=S.DropBlock2d), 2,
                        "drop_block is DropBlock2d: the fused bottleneck has no DropBlock", False),
    "timm-silu": (lambda: S.TimmResNet(act_layer=nn.SiLU), 2, "act1 is SiLU, not nn.ReLU", False),
    "timm-resnet-d": (lambda: S.TimmResNet(avg_down=True), 2,  # Sequential(AvgPool2d or Identity, Conv2d, BN)
                      "Conv2d, BatchNorm2d), the fused bottleneck computes Sequential(Conv2d 1x1 with the stride, "
                      "BatchNorm2d)", True),
    "timm-batchnormact": (lambda: S.TimmResNet(norm_layer=S.BatchNormAct2d), 2,
                          "bn1 is timm.layers.norm_act.BatchNormAct2d, an nn.BatchNorm2d with its own forward", False),
    "tv-frozen-bn": (lambda: S.TvResNet(norm_layer=S.FrozenBatchNorm2d), 2,
                     "bn1 is FrozenBatchNorm2d, not nn.BatchNorm2d", True),
    "tv-sync-bn": (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(S.TvResNet()), 2,
                   "bn1 is SyncBatchNorm, not nn.BatchNorm2d", True),
    "tv-dilated": (lambda: _with(S.TvResNet(), "layer2.0.conv2", nn.Conv2d(32, 32, 3, 2, padding=2, dilation=2,
                                                                          groups=4, bias=False)), 1,
                   "conv2.padding is (2, 2), the fused bottleneck computes (1, 1)", False),
    "tv-regnet": (lambda: S.TvRegNet(**LIGHT), 2,
                  "level='block' runs torchvision's and timm's ResNet Bottleneck only", True),
    "timm-regnet": (lambda: S.TimmRegNet(LIGHT["widths"], LIGHT["group_widths"], LIGHT["strides"]), 2,
                    "level='block' runs torchvision's and timm's ResNet Bottleneck only", True),
}


@pytest.mark.parametrize("case", list(BLOCK_REFUSED))
def test_block_level_refusals_name_the_block_and_why(case):
    """What the fused bottleneck does not compute is one line per block naming it; nothing is changed
    (strict), or those blocks are left to PyTorch with one warning (strict=False, when others fuse);
    the error says where the conv level still applies, and it does."""
    build, n_refused, why, conv_ok = BLOCK_REFUSED[case]
    model = build()
    blocks = model_blocks(model)
    with pytest.raises(ValueError) as err:
        resnext.fuse_kernels(model, level="block")
    msg = str(err.value)
    assert f"the fused bottleneck cannot compute {n_refused} of its {len(blocks)} blocks exactly, nothing was " \
           f"changed" in msg
    lines = msg.split("\n")[1:]
    assert len(lines) == n_refused and all(why in line for line in lines), msg
    assert all(f"({patch.block_kind(blocks[0])}): " in line for line in lines)
    assert ("level='conv' (the default) fuses the grouped conv + BN + ReLU of" in msg) == conv_ok, msg
    assert not any(patch.is_patched(b) for b in blocks)
    if n_refused < len(blocks):
        text = one_warning(lambda: resnext.fuse_kernels(model, level="block", strict=False))
        assert f"left {n_refused} of {len(blocks)} blocks" in text and why in text
        assert sorted(patch.patched_level(b) or "" for b in blocks) == ["", "block"]
    else:  # nothing to fuse at this level: an error even when not strict
        with pytest.raises(ValueError, match="nothing was changed"):
            resnext.fuse_kernels(model, level="block", strict=False)
    if conv_ok:
        resnext.fuse_kernels(model)
        assert all(patch.patched_level(b) == "conv" for b in blocks)
