"""Fused grouped 3x3 convolution + BatchNorm + ReLU, forward and backward, in Triton.

Computes exactly::

    relu(batch_norm(conv2d(x, weight, None, stride, padding, 1, groups),
                    running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))

* Inference (``training=False``, no grad needed): BatchNorm folds into a per-channel
  scale = γ/√(var + eps) and shift = β − mean·scale, applied with the ReLU in the conv kernel's
  epilogue: x is read once and y written once, in one launch (the packed weight and the fold are
  reused while the weight and BatchNorm tensors are unchanged).
* Training: the conv kernel writes z = conv(x) and float32 per-chunk (mean, M2) statistics; a small
  kernel merges them, updates the running statistics (unbiased variance, like nn.BatchNorm2d) and
  ``num_batches_tracked`` and folds the batch statistics into scale/shift; a pointwise pass writes
  y = relu(z·scale + shift). Under ``torch.no_grad`` z is not stored: the statistics pass writes
  nothing and a second conv pass applies BN + ReLU in its epilogue.
* Backward (training or frozen BN): see ``kernels/conv3x3/backward.py``. Saved: x, weight, z, the
  (4, C_out) statistics and the packed weight, which dgrad reads transposed. No PyTorch convolution
  is called anywhere, and no per-channel arithmetic runs in PyTorch (``kernels/conv3x3/compose.py``).

Layout: the kernels work on channels-last (NHWC) tensors, an implicit GEMM per filter tap with
several groups packed block-diagonally per tile (``kernels/conv3x3/tiles.py``). NCHW inputs are
converted to channels-last on entry and the results back, which costs extra passes: feed
channels-last tensors for speed.

Limitations:
* 3x3 filters, dilation 1, stride 1 or 2, symmetric integer padding; no conv bias (BatchNorm
  follows). Other filters raise ValueError rather than falling back to PyTorch.
* At least one input and one output channel, and an output of at least 1x1 (ValueError otherwise;
  an empty batch, N = 0, is computed).
* float32, float16, bfloat16 activations (float32 accumulation); BatchNorm tensors float32. The
  weight is x's dtype, or float32 (autocast's master weights: packed in x's dtype, its gradient
  float32). float32 convolutions use TF32 exactly when ``torch.backends.cudnn.allow_tf32`` says
  cuDNN would.
* CUDA tensors, or CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1`` set before
  this module is imported; see ``kernels.enable_interpreter``). The interpreter is slow and its
  bfloat16 ``tl.dot`` is wrong, so bfloat16 dots are widened to float32 there.
* NaN and inf: never fewer non-finite outputs than PyTorch (ReLU keeps NaN; its backward passes the
  gradient on at a NaN, as ``threshold_backward`` does), but sometimes more. Block-diagonal packing
  multiplies the other groups of a channel tile by exact zeros, and NaN·0 = inf·0 = NaN: a NaN or
  inf input turns those groups' outputs at the same pixels NaN too (in training, their whole
  channels, through the batch statistics), where PyTorch's stay finite.
* Inference reuses the packed weight and folded BatchNorm while the tensors keep their version
  (``Tensor._version``); writes through ``.data`` do not bump it: call ``kernels.clear_caches()``.

Eager calls run the launchers through one ``torch.autograd.Function`` (``_GroupedConvBNReLU``),
after one round of checks. What ``torch.compile``, ``torch.export`` and other tracers see is the
registered op (``torch.library``):

* ``torch.ops.resnext_fused.grouped_conv_bn_relu``, the public op, which ``grouped_conv_bn_relu``
  calls when traced, with that function's arguments by the same names::

      grouped_conv_bn_relu(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias,
          Tensor(a!)? running_mean, Tensor(b!)? running_var, *, int stride=1, int padding=1,
          int groups=1, float eps=1e-05, float momentum=0.1, bool training=False,
          Tensor(c!)? num_batches_tracked=None) -> Tensor

  ``(a!)``, ``(b!)``, ``(c!)``: the running statistics and the batch count are updated in place
  (when training). Its kernels: the computation (CompositeExplicitAutograd), a fake one (shapes and
  conv2d's strides, for tracing) and an Autograd one. That one runs the op as it is when no gradient
  will be asked for (inference, ``torch.no_grad``: z is never stored), else the same
  autograd.Function over two internal ops:
* ``resnext_fused::_grouped_conv_bn_relu_fwd`` (the same arguments, all positional) →
  ``(y, z, stats, packed)``: also what the backward reads, z = conv(x), the (4, C_out) float32
  rows mean, invstd, scale, shift, and the packed weight (a custom op's outputs may not alias);
* ``resnext_fused::_grouped_conv_bn_relu_bwd(dy, x, weight, z, stats, packed, ...)`` → (dx, dweight, dγ, dβ).

Why not one ``custom_op`` with ``register_autograd``: that refuses an op that mutates its inputs,
and its ``setup_context`` may save only inputs and outputs, so z and the statistics have to be the
outputs of some op that users of the public op never see. Hence a public op defined with
``torch.library.Library`` whose Autograd kernel (the same pattern ``custom_op`` registers for its
own ops) applies an autograd.Function over two ``custom_op``s. Not ``triton_op``: the launchers
run host-side logic (config choice, tile choice, weight packing) that Inductor cannot trace, and the
op is opaque by design. Under ``torch.compile`` it is one node of the graph (no graph break) and
Inductor compiles everything around it; ``torch.export`` of an eval-mode model keeps it as one
node. Every op checks its inputs (the real and the fake implementations) and needs exact input
strides (``needs_exact_strides``): the layouts it returns follow the layouts it is given.
"""

import torch
import torch.nn as nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .batchnorm.modules import bn_call_args, sync_group
from .common import DTYPES, check_device, describe, on_device
from .conv3x3.compose import backward_pass, forward_pass, new_output, new_saved
from .layout import grad_strides

__all__ = ["grouped_conv_bn_relu", "grouped_conv_bn_relu_modules", "GroupedConvBNReLU"]


def _check_inputs(x, weight, bn_tensors, stride, padding, groups, eps, momentum, training, single_value_ok=False,
                  weight_float32_ok=True):
    """Raise ValueError/TypeError naming the argument for anything the kernels do not compute."""
    bn_tensors = dict(bn_tensors)
    tracked = bn_tensors.pop("num_batches_tracked", None)
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be torch.Tensor")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype and not (weight_float32_ok and weight.dtype == torch.float32):
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be a 3x3 filter, got kernel size {tuple(weight.shape[2:])}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide the input channels ({c_in}) and the output "
                         f"channels (weight.shape[0]={c_out})")
    if weight.shape[1] != c_in // groups:
        raise ValueError(f"weight.shape[1] must be C_in/groups = {c_in // groups}, got {weight.shape[1]}")
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= 2:
        raise ValueError(f"padding must be an int in [0, 2] (the same on both sides), got {padding!r}")
    # Degenerate sizes: N = 0 is computed (an empty batch, as PyTorch does); the others are refused
    # here, before any kernel runs (PyTorch itself refuses C_out = 0 and outputs of size 0, and for
    # C_in = 0 returns an (N, 0, H, W) tensor rather than the C_out channels a conv defines).
    if c_in == 0:
        raise ValueError(f"x has no input channels (shape {tuple(x.shape)}): a convolution needs C_in >= 1")
    if c_out == 0:
        raise ValueError(f"weight has no output channels (shape {tuple(weight.shape)}): C_out must be >= 1")
    h_out, w_out = ((s + 2 * padding - 3) // stride + 1 for s in x.shape[2:])
    if h_out < 1 or w_out < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is smaller than the 3x3 filter with "
                         f"padding={padding}: the output would be {h_out}x{w_out}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    for name, t in bn_tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != c_out:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor of C_out={c_out} elements, got {shape}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (BatchNorm statistics and affine parameters), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read and update it in place), "
                             f"got stride {t.stride()}")
    for name, t in (("weight", weight), *bn_tensors.items()):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    check_device("x", x)
    if not training and (bn_tensors["running_mean"] is None or bn_tensors["running_var"] is None):
        raise ValueError("running_mean and running_var are required when training=False")
    if training and not single_value_ok and x.shape[0] * h_out * w_out == 1:
        raise ValueError(f"training BatchNorm needs more than 1 value per channel, got output "
                         f"{x.shape[0]}x{h_out}x{w_out} for x of shape {tuple(x.shape)}")
    if (bn_tensors["running_mean"] is None) != (bn_tensors["running_var"] is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if tracked is not None and not (isinstance(tracked, torch.Tensor) and tracked.numel() == 1
                                    and tracked.dtype == torch.long and tracked.device == x.device):
        raise ValueError(f"num_batches_tracked must be a one-element int64 tensor on x's device ({x.device}), "
                         f"got {describe(tracked)}" + (f" {tracked.dtype} on {tracked.device}"
                                                       if isinstance(tracked, torch.Tensor) else ""))


def _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked=None):
    return {"bn_weight": bn_weight, "bn_bias": bn_bias, "running_mean": running_mean, "running_var": running_var,
            "num_batches_tracked": num_batches_tracked}


def _bump_versions(training, *tensors):
    """The kernels write the running statistics through pointers: bump their autograd versions, as an
    in-place op (or the ADInplaceOrView kernel ``custom_op`` registers) does."""
    if training:
        torch.autograd.graph.increment_version([t for t in tensors if t is not None and not t.is_inference()])


def _no_grad_call(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding,
                  groups, eps, momentum, training):
    """y of a call no gradient will be asked for (z never stored), on x's device; inputs checked."""
    _bump_versions(training, running_mean, running_var, num_batches_tracked)
    with on_device(x):
        return forward_pass(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride,
                            padding, groups, eps, momentum, training, save=False)[0]


# ---------------------------------------------------------------------------------------------
# autograd: one Function, over the launchers (eager) or over the internal ops (traced)


class _GroupedConvBNReLU(torch.autograd.Function):
    """The op's autograd: the forward saves z, the statistics and the packed weight, the backward reads
    them. ``traced``: through the internal ``torch.library`` ops, which tracers see."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding,
                groups, eps, momentum, training, traced):
        args = (x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding, groups,
                eps, momentum, training)
        if traced:
            y, z, stats, packed = _fwd_op(*args)
        else:
            y, z, stats, packed = forward_pass(*args, save=True)
            _bump_versions(training, running_mean, running_var, num_batches_tracked)
        ctx.save_for_backward(x, weight, z, stats, packed)
        ctx.conf = (stride, padding, groups, training)
        ctx.traced = traced
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, stats, packed = ctx.saved_tensors
        need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
        if ctx.traced:
            dx, dw, dgamma, dbeta = _bwd_op(dy, x, weight, z, stats, packed, *ctx.conf, need_x, need_w)
        else:
            with on_device(dy):  # the autograd engine may run this on another thread
                dx, dw, dgamma, dbeta = backward_pass(dy, x, weight, z, stats, packed, *ctx.conf, need_x, need_w)
        return (dx if need_x else None, dw if need_w else None, dgamma if need_gamma else None,
                dbeta if need_beta else None, *[None] * 10)


# ---------------------------------------------------------------------------------------------
# The registered ops (torch.library): schemas, fake implementations, autograd


@torch.library.custom_op(
    "resnext_fused::_grouped_conv_bn_relu_fwd", mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    schema="(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
           "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, int stride, int padding, int groups, "
           "float eps, float momentum, bool training) -> (Tensor, Tensor, Tensor, Tensor)",
    tags=(torch.Tag.needs_exact_strides,))
def _fwd_op(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding, groups,
            eps, momentum, training):
    """(y, z, stats, packed) for the backward; called by the public op's autograd kernel."""
    _check_inputs(x, weight, _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked), stride,
                  padding, groups, eps, momentum, training)
    with on_device(x):
        return forward_pass(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride,
                            padding, groups, eps, momentum, training, save=True)


@_fwd_op.register_fake
def _fwd_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding, groups,
              eps, momentum, training):
    _check_inputs(x, weight, _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked), stride,
                  padding, groups, eps, momentum, training)
    y = new_output(x, weight, stride, padding)
    return (y, *new_saved(x, weight, groups, y))


@torch.library.custom_op(
    "resnext_fused::_grouped_conv_bn_relu_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor z, Tensor stats, Tensor packed, int stride, int padding, "
           "int groups, bool training, bool need_x, bool need_weight) -> (Tensor, Tensor, Tensor, Tensor)",
    tags=(torch.Tag.needs_exact_strides,))
def _bwd_op(dy, x, weight, z, stats, packed, stride, padding, groups, training, need_x, need_weight):
    """(dx, dweight, dγ, dβ); no autograd formula of its own, so double backward raises."""
    with on_device(dy):
        return backward_pass(dy, x, weight, z, stats, packed, stride, padding, groups, training, need_x, need_weight)


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, z, stats, packed, stride, padding, groups, training, need_x, need_weight):
    dx = x.new_empty_strided(x.shape, grad_strides(x)) if need_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_weight else x.new_empty(0)
    return dx, dw, stats.new_empty(weight.shape[0]), stats.new_empty(weight.shape[0])


_LIB = torch.library.Library("resnext_fused", "FRAGMENT")  # noqa: TOR901  (see the module docstring)
_LIB.define(
    "grouped_conv_bn_relu(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, *, int stride=1, int padding=1, int groups=1, "
    "float eps=1e-05, float momentum=0.1, bool training=False, Tensor(c!)? num_batches_tracked=None) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag, torch.Tag.needs_exact_strides))
_OP = torch.ops.resnext_fused.grouped_conv_bn_relu.default


def _op_impl(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=1, groups=1,
             eps=1e-5, momentum=0.1, training=False, num_batches_tracked=None):
    _check_inputs(x, weight, _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked), stride,
                  padding, groups, eps, momentum, training)
    return _no_grad_call(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride,
                         padding, groups, eps, momentum, training)


def _op_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=1, groups=1,
             eps=1e-5, momentum=0.1, training=False, num_batches_tracked=None):
    _check_inputs(x, weight, _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked), stride,
                  padding, groups, eps, momentum, training)
    return new_output(x, weight, stride, padding)


def _needs_grad(x, weight, bn_weight, bn_bias):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bn_weight, bn_bias))


def _op_autograd(keyset, x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1, padding=1,
                 groups=1, eps=1e-5, momentum=0.1, training=False, num_batches_tracked=None):
    # z is stored only when a gradient will be asked for; this is the one place that knows
    if _needs_grad(x, weight, bn_weight, bn_bias):
        return _GroupedConvBNReLU.apply(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                                        stride, padding, groups, eps, momentum, training, True)
    with torch._C._AutoDispatchBelowAutograd():
        return _OP.redispatch(keyset & torch._C._after_autograd_keyset, x, weight, bn_weight, bn_bias,
                              running_mean, running_var, stride=stride, padding=padding, groups=groups,
                              eps=eps, momentum=momentum, training=training, num_batches_tracked=num_batches_tracked)


_LIB.impl("grouped_conv_bn_relu", _op_impl, "CompositeExplicitAutograd")
_LIB.impl("grouped_conv_bn_relu", _op_autograd, "Autograd", with_keyset=True)
torch.library.register_fake("resnext_fused::grouped_conv_bn_relu", _op_fake, lib=_LIB)


def _traced(x):
    """Whether this call is being traced or transformed (torch.compile, torch.export, fake or meta
    tensors, a dispatch mode, functorch): then the registered op, which they see as one node."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or x.device.type == "meta"
            or isinstance(x, torch._subclasses.fake_tensor.FakeTensor)
            or _get_current_dispatch_mode() is not None or torch._C._are_functorch_transforms_active())


def grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                         stride=1, padding=1, groups=1, eps=1e-5, momentum=0.1, training=False,
                         num_batches_tracked=None):
    """``relu(batch_norm(conv2d(x, weight, None, stride, padding, 1, groups), ...))``, fused.

    Args:
        x: (N, C_in, H, W), NCHW-contiguous or channels_last; float32, float16 or bfloat16.
        weight: (C_out, C_in/groups, 3, 3), x's dtype (float32 too under autocast).
        bn_weight, bn_bias: (C_out,) float32 BatchNorm affine parameters, or None (γ=1, β=0).
        running_mean, running_var: (C_out,) float32 buffers, updated in place when ``training``;
            may be None when training (like ``track_running_stats=False``).
        stride, padding, groups, eps, momentum, training: as in conv2d / batch_norm.
        num_batches_tracked: a one-element int64 tensor that a training call adds one to (as
            nn.BatchNorm2d's buffer), or None.

    Under ``torch.autocast`` x is cast to the autocast dtype first, as conv2d casts it; a float32
    weight is packed in that dtype by the kernels (no cast of its own) and gets a float32 gradient.

    Returns:
        (N, C_out, H_out, W_out) in x's dtype, in conv2d's memory format: channels_last when x or
        the weight suggests it by its strides (``kernels.layout.suggest_memory_format``), else NCHW.
        The gradient of x has x's layout. An empty batch (N = 0) gives an empty output and zero
        gradients.
    """
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    bn = _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked)
    _check_inputs(x, weight, bn, stride, padding, groups, eps, momentum, training, weight_float32_ok=autocast)
    eps, momentum, training = float(eps), float(momentum), bool(training)
    if _traced(x):
        return _OP(x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride, padding=padding,
                   groups=groups, eps=eps, momentum=momentum, training=training,
                   num_batches_tracked=num_batches_tracked)
    if not _needs_grad(x, weight, bn_weight, bn_bias):
        return _no_grad_call(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride,
                             padding, groups, eps, momentum, training)
    with on_device(x):
        return _GroupedConvBNReLU.apply(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                                        stride, padding, groups, eps, momentum, training, False)


def _check_modules(conv, bn):
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        raise TypeError(f"expected an nn.Conv2d and an nn.BatchNorm2d or nn.SyncBatchNorm, got "
                        f"{type(conv).__name__} and {type(bn).__name__}")
    if conv.bias is not None:
        raise ValueError("conv must have bias=False (the BatchNorm that follows makes it redundant)")
    if conv.kernel_size != (3, 3) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"conv must be a 3x3 filter with dilation 1 and zero padding, got kernel_size="
                         f"{conv.kernel_size}, dilation={conv.dilation}, padding_mode={conv.padding_mode!r}")
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
        raise ValueError(f"conv.stride must be (1, 1) or (2, 2), got {conv.stride}")
    if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"conv.padding must be symmetric integers, got {conv.padding}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features ({bn.num_features}) must equal conv.out_channels ({conv.out_channels})")


def _sync_call(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, stride, padding,
               groups, eps, momentum, group):
    """The training-mode op over a process group (``kernels/_grouped_conv_bn_relu_sync.py``), checked and
    autocast as ``grouped_conv_bn_relu`` is."""
    from ._grouped_conv_bn_relu_sync import sync_grouped_conv_bn_relu

    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    bn = _bn(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked)
    # one value per channel on this rank is fine: the statistics are over every rank's pixels
    _check_inputs(x, weight, bn, stride, padding, groups, eps, momentum, training=True, single_value_ok=True,
                  weight_float32_ok=autocast)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return sync_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                                     padding=padding, groups=groups, eps=float(eps), momentum=float(momentum),
                                     group=group)


def grouped_conv_bn_relu_modules(x, conv, bn):
    """Run an existing ``nn.Conv2d`` → ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) → ReLU through
    the fused kernels.

    Does nn.BatchNorm2d's bookkeeping too (``kernels.batchnorm.modules.bn_call_args``): ``bn.training``,
    ``num_batches_tracked``, momentum=None (cumulative moving average) and ``track_running_stats=False``
    behave as in PyTorch. An ``nn.SyncBatchNorm`` in training mode inside an initialised process group
    of more than one rank normalises with the statistics of the global batch
    (``kernels/_grouped_conv_bn_relu_sync.py``; on CUDA with NCCL, and on CPU with gloo); otherwise it
    behaves as nn.BatchNorm2d, as PyTorch's does.
    """
    _check_modules(conv, bn)
    momentum, use_batch_stats, running_mean, running_var, tracked = bn_call_args(bn)
    group = sync_group(bn)
    if group is not None:
        return _sync_call(x, conv.weight, bn.weight, bn.bias, running_mean, running_var, tracked, conv.stride[0],
                          conv.padding[0], conv.groups, bn.eps, momentum, group)
    return grouped_conv_bn_relu(
        x, conv.weight, bn.weight, bn.bias, running_mean, running_var, stride=conv.stride[0], padding=conv.padding[0],
        groups=conv.groups, eps=bn.eps, momentum=momentum, training=use_batch_stats, num_batches_tracked=tracked)


class GroupedConvBNReLU(nn.Module):
    """``nn.Conv2d(3x3, groups) → nn.BatchNorm2d → ReLU`` computed by the fused Triton kernels.

    Owns the two modules under the roles ``conv`` and ``bn``, so its state_dict has the keys of
    the unfused pair (``kernels.reference.ConvBNReLU``) and checkpoints move freely between them.
    """

    def __init__(self, in_channels, out_channels, stride=1, groups=1, padding=1, eps=1e-5, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)

    @classmethod
    def from_modules(cls, conv, bn):
        """Wrap an existing pair; the modules (and so their parameters) are shared, not copied."""
        _check_modules(conv, bn)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv = conv
        module.bn = bn
        return module

    def forward(self, x):
        return grouped_conv_bn_relu_modules(x, self.conv, self.bn)
