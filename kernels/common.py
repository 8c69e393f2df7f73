"""Triton helpers every kernel family shares: the interpreter switch, tl.dot with its precision,
forced-config launches, batch-size buckets for autotune keys, and BatchNorm + ReLU's gradient.

Kernel families: ``kernels/conv3x3`` (the grouped 3x3 conv), ``kernels/conv1x1`` (the 1x1 GEMMs of
the bottleneck), ``kernels/batchnorm`` (statistics, reductions and pointwise kernels).
"""

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated; the launchers read this copy.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

if INTERPRET:
    from . import _interpreter_speedups  # noqa: F401  (patches Triton's interpreter on import)

# Smallest tl.dot extent the GPU compiler accepts for 16-bit operands (the interpreter accepts
# anything, which is why every tile below is clamped to it explicitly).
MIN_DOT = 16
# Pixel tile of the pointwise and reduction kernels. The interpreter runs programs one after
# another at a fixed Python cost per block op, so it gets far fewer, larger programs.
POINTWISE_BLOCK_M = 4096 if INTERPRET else 64


def pointwise_tiles(c):
    """(BLOCK_M, BLOCK_C) of the pointwise and reduction kernels over (pixels, C) tensors."""
    return POINTWISE_BLOCK_M, min(64, triton.next_power_of_2(c))


def describe(t):
    """An argument as an error message shows it: a tensor's shape, else its type."""
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_channel_vector(name, t, c, c_name, ref, ref_name, contiguous=False):
    """Raise ValueError naming ``name`` unless ``t`` is a (c,) float32 tensor on ``ref``'s device
    (and contiguous, when the launcher passes it to a kernel as it is)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != c:
        raise ValueError(f"{name} must be a 1-D tensor of {c_name}={c} elements, got {describe(t)}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def dot_options(dtype):
    """The ``UPCAST`` and ``PRECISION`` meta-parameters of ``dot_acc`` for operands of ``dtype``.

    float32 convs use TF32 exactly when cuDNN would (``torch.backends.cudnn.allow_tf32``).
    """
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return dict(UPCAST=INTERPRET and dtype == torch.bfloat16, PRECISION="tf32" if tf32 else "ieee")


# Pixels per tl.dot in the weight gradient, and the granularity of every pixel split: fixed, not
# tuned, so that the float32 sums run in the same order whatever config autotuning picks (each
# dot accumulates its K blocks in order, so only the dot's extent and the split edges matter).
WGRAD_BLOCK_K = 4096 if INTERPRET else 64


def shape_bucket(n):
    """Bucket the batch size for autotune keys: bounded recompiles and re-tunes across batch sizes."""
    return triton.next_power_of_2(max(int(n), 1))


def reduction_splits(m, device):
    """How many pixel ranges the reductions split into: a fixed function of the problem and
    the device, so results are bit-identical from run to run."""
    if INTERPRET:
        return max(1, min(4, triton.cdiv(m, 16384)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(2 * sms, triton.cdiv(m, 2048)))


def launch(kernel, grid, config, *args, **meta):
    """Launch an autotuned kernel, or force one of its configs (tests run every shipped config)."""
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                        num_stages=config.num_stages)


@triton.jit
def pixel_coords(offs_m, H, W):
    """(n, h, w) of flat pixel indices into an (N, H, W) grid."""
    return offs_m // (H * W), (offs_m // W) % H, offs_m % W


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += a @ b`` in float32.

    UPCAST works around Triton's interpreter, whose bfloat16 ``tl.dot`` returns garbage
    (seen with triton 3.6-3.9): there the operands are widened to float32 first, which is exact.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def bn_relu_grad(dy, z, scale, shift, k1, k0, valid):
    """Gradient w.r.t. the conv output z of ``relu(z·scale + shift)`` with BatchNorm's backward.

    Per channel, dz = scale·g + k1·z + k0 with g = dy·[z·scale + shift > 0]; k1 = k0 = 0 for
    frozen (eval-mode) BatchNorm. All float32; positions outside the tensor give exactly 0.
    """
    z = z.to(tl.float32)
    g = tl.where(z * scale[None, :] + shift[None, :] > 0, dy.to(tl.float32), 0.0)
    dz = g * scale[None, :] + z * k1[None, :] + k0[None, :]
    return tl.where(valid, dz, 0.0)
