"""Inputs the fused op does not compute raise ValueError / TypeError naming the offending argument,
before any kernel runs (never a silent fallback, never a wrong answer)."""

import re

import pytest
import torch

from _helpers import Shape, assert_close, gpu_only, make_inputs, reference, run
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU, grouped_conv_bn_relu

SHAPE = Shape(2, 8, 16, 2, 5, 5, 1)


def call(device, training=False, **changes):
    """The fused op on valid inputs with some arguments replaced (``changes``)."""
    inputs = make_inputs(SHAPE, torch.float32, device)
    kwargs = dict(stride=SHAPE.stride, groups=SHAPE.groups, training=training)
    for k, v in changes.items():
        (inputs if k in inputs else kwargs)[k] = v(inputs[k]) if callable(v) else v
    return grouped_conv_bn_relu(*inputs.values(), **kwargs)


def names(arg):
    """A ``match`` pattern: the message names ``arg`` as a word."""
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


BAD = [  # (id, changes, exception, argument the message must name)
    ("x-3d", dict(x=lambda x: x[0]), ValueError, "x"),
    ("x-5d", dict(x=lambda x: x[None]), ValueError, "x"),
    ("weight-3d", dict(weight=lambda w: w[0]), ValueError, "weight"),
    ("x-int", dict(x=lambda x: x.to(torch.int32)), TypeError, "x"),
    ("x-float64", dict(x=lambda x: x.double(), weight=lambda w: w.double()), TypeError, "x"),
    ("weight-dtype", dict(weight=lambda w: w.half()), TypeError, "weight"),
    ("weight-5x5", dict(weight=lambda w: torch.randn(16, 4, 5, 5, device=w.device)), ValueError, "weight"),
    ("weight-1x1", dict(weight=lambda w: w[..., :1, :1].contiguous()), ValueError, "weight"),
    ("weight-3x1", dict(weight=lambda w: w[..., :1].contiguous()), ValueError, "weight"),
    ("groups-not-dividing-cin", dict(groups=3, weight=lambda w: torch.randn(
        15, 3, 3, 3, device=w.device)), ValueError, "groups"),  # 8 input channels
    ("groups-not-dividing-cout", dict(groups=4, weight=lambda w: torch.randn(
        18, 2, 3, 3, device=w.device)), ValueError, "groups"),  # 18 output channels
    ("groups-zero", dict(groups=0), ValueError, "groups"),
    ("weight-cin-per-group", dict(weight=lambda w: torch.randn(16, 8, 3, 3, device=w.device)),
     ValueError, "weight"),
    ("stride-3", dict(stride=3), ValueError, "stride"),
    ("stride-0", dict(stride=0), ValueError, "stride"),
    ("stride-tuple", dict(stride=(1, 2)), ValueError, "stride"),
    ("bn_weight-length", dict(bn_weight=lambda t: t[:-1]), ValueError, "bn_weight"),
    ("bn_bias-length", dict(bn_bias=lambda t: torch.cat([t, t])), ValueError, "bn_bias"),
    ("running_mean-length", dict(running_mean=lambda t: t[:3]), ValueError, "running_mean"),
    ("running_var-2d", dict(running_var=lambda t: t[None]), ValueError, "running_var"),
    ("running_var-int", dict(running_var=lambda t: t.to(torch.int64)), TypeError, "running_var"),
    ("running_mean-missing-eval", dict(running_mean=None, running_var=None), ValueError,
     "running_mean"),
]


@pytest.mark.parametrize("changes, exc, arg", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_raises_naming_the_argument(changes, exc, arg, device):
    with pytest.raises(exc, match=names(arg)):
        call(device, **changes)


@pytest.mark.parametrize("shape", [pytest.param((1, 8, 1, 1), id="N1-1x1"),
                                   pytest.param((1, 8, 2, 2), id="N1-2x2-stride2")])
def test_training_with_one_value_per_channel(shape, device):
    """As F.batch_norm: batch statistics of a single value per channel are undefined."""
    stride = 2 if shape[2] == 2 else 1
    with pytest.raises(ValueError, match="value per channel"):
        torch.nn.functional.batch_norm(torch.zeros(1, 8, 1, 1), None, None, training=True)
    with pytest.raises(ValueError):
        call(device, training=True, stride=stride,
             x=lambda x: torch.randn(shape, device=x.device))


def test_bad_inputs_leave_running_stats_alone(device):
    """A rejected call (here a wrong bn_bias length in training mode) must not have updated the
    running statistics first."""
    inputs = make_inputs(SHAPE, torch.float32, device)
    before = inputs["running_mean"].clone(), inputs["running_var"].clone()
    inputs["bn_bias"] = inputs["bn_bias"][:-1]
    with pytest.raises(ValueError):
        run(grouped_conv_bn_relu, inputs, SHAPE, training=True)
    assert torch.equal(inputs["running_mean"], before[0])
    assert torch.equal(inputs["running_var"], before[1])


@pytest.mark.parametrize("conv_kwargs, arg", [
    pytest.param(dict(kernel_size=5, padding=2), "kernel_size", id="kernel-5x5"),
    pytest.param(dict(dilation=2, padding=2), "dilation", id="dilation-2"),
    pytest.param(dict(bias=True), "bias", id="conv-bias"),
    pytest.param(dict(padding_mode="reflect"), "padding_mode", id="reflect-padding"),
    pytest.param(dict(stride=3), "stride", id="stride-3"),
    pytest.param(dict(stride=(1, 2)), "stride", id="stride-1x2"),
])
def test_from_modules_rejects_what_it_cannot_fuse(conv_kwargs, arg):
    kwargs = dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=2, bias=False)
    kwargs.update(conv_kwargs)
    conv = torch.nn.Conv2d(**kwargs)
    with pytest.raises(ValueError, match=names(arg)):
        GroupedConvBNReLU.from_modules(conv, torch.nn.BatchNorm2d(8))


def test_from_modules_rejects_mismatched_bn():
    conv = torch.nn.Conv2d(8, 16, 3, 1, 1, groups=2, bias=False)
    with pytest.raises(ValueError, match="num_features"):
        GroupedConvBNReLU.from_modules(conv, torch.nn.BatchNorm2d(8))
    with pytest.raises(TypeError):
        GroupedConvBNReLU.from_modules(conv, torch.nn.BatchNorm1d(16))


def test_noncontiguous_bn_tensors(device):
    """BatchNorm tensors that are strided views (e.g. every other element of a larger buffer):
    either computed right, with the running statistics updated *through the view*, or refused
    with a ValueError naming the argument -- never read or written as if contiguous."""
    inputs = make_inputs(SHAPE, torch.float32, device)
    backing = {k: torch.stack([inputs[k], torch.full_like(inputs[k], 7.0)], 1)
               for k in ("bn_weight", "bn_bias", "running_mean", "running_var")}
    strided = dict(inputs, **{k: v[:, 0] for k, v in backing.items()})
    assert not strided["running_var"].is_contiguous()
    try:
        y = run(grouped_conv_bn_relu, strided, SHAPE, training=True)
    except ValueError as e:
        assert re.search("bn_weight|bn_bias|running_mean|running_var", str(e)), str(e)
    else:
        y_ref, rm_ref, rv_ref, _ = reference(inputs, SHAPE, training=True)
        assert_close(y, y_ref, torch.float32, "y")
        assert_close(strided["running_mean"], rm_ref, torch.float32, "running_mean")
        assert_close(strided["running_var"], rv_ref, torch.float32, "running_var")
        for k, v in backing.items():
            assert torch.all(v[:, 1] == 7.0), f"{k}: wrote between the view's elements"


@gpu_only
def test_cpu_tensors_without_interpreter():
    with pytest.raises(ValueError, match=names("x")):
        call("cpu")


@gpu_only
@pytest.mark.parametrize("arg", ["weight", "bn_weight", "bn_bias", "running_mean", "running_var"])
def test_tensors_on_different_devices(arg):
    with pytest.raises(ValueError, match=names(arg)):
        call("cuda", **{arg: lambda t: t.cpu()})
