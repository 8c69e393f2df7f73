"""Triton helpers every kernel family shares: the interpreter switch and the tiles that differ
under it, the activation dtypes and the device check, the device guard, tl.dot with its precision,
batch-size buckets for autotune keys, and ReLU / BatchNorm + ReLU's gradient. (Which config an
autotuned kernel launches with: ``kernels.configs``.)

Kernel families: ``kernels/conv3x3`` (the grouped 3x3 conv), ``kernels/conv1x1`` (the 1x1 GEMMs of
the bottleneck), ``kernels/batchnorm`` (statistics, reductions and pointwise kernels).
"""

import contextlib
import dataclasses
import weakref
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

# Triton reads TRITON_INTERPRET when a kernel is decorated; the launchers read this copy (one rule
# for what turns it on: kernels.interpreter_enabled).
INTERPRET = interpreter_enabled()

if INTERPRET:
    from . import _interpreter_speedups  # noqa: F401  (patches Triton's interpreter on import)

# Activation dtypes every kernel takes (float32 accumulation; BatchNorm tensors are float32).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Whether the launchers take CPU tensors: under the interpreter only (the compile report, which
# runs the launchers on CPU stand-ins for a GPU it compiles for, switches it on for itself).
CPU_TENSORS_OK = INTERPRET

def cdiv(a, b):
    """⌈a / b⌉ for host-side sizes (``triton.cdiv`` is a constexpr function: slow on the host, 3.9)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (>= 1), for host-side tile sizes (``triton.next_power_of_2`` is
    a constexpr function, ~4 µs a call on the host under triton 3.9)."""
    return 1 << max(0, int(n) - 1).bit_length()


# Smallest tl.dot extent the GPU compiler accepts for 16-bit operands (the interpreter accepts
# anything, which is why every tile below is clamped to it explicitly).
MIN_DOT = 16


@dataclasses.dataclass
class Tiles:
    """What the kernels run differently on a GPU and under Triton's interpreter, in one place.

    The interpreter runs programs one after another at a fixed Python cost per block op, so it
    gets few, huge tiles, one config per kernel, and dz written to memory once instead of rebuilt
    by every tap. ``gpu_tiles()`` makes the interpreter run the GPU's instead (tests: the GPU's
    composition, loops and masked tails on the CPU). Read at call time, never copied.
    """

    pointwise_block_m: int  # pixel tile of the pointwise and reduction kernels
    # Pixels per tl.dot in the weight gradients, and the granularity of every pixel split: fixed,
    # not tuned, so that the float32 sums run in the same order whatever config autotuning picks
    # (each dot accumulates its K blocks in order, so only the dot's extent and the split edges matter).
    wgrad_block_k: int
    min_split_rows: int  # fewest pixels per 1x1 weight-gradient split
    materialize_dz: bool  # the op's backward writes dz once (kernels.batchnorm.pointwise.bn_relu_bwd)
    gpu_configs: bool  # autotuned kernels launch GPU configs (kernels.configs), not the interpreter's


GPU_TILES = Tiles(pointwise_block_m=64, wgrad_block_k=64, min_split_rows=2048, materialize_dz=False,
                  gpu_configs=True)
INTERPRETER_TILES = Tiles(pointwise_block_m=4096, wgrad_block_k=4096, min_split_rows=16384, materialize_dz=True,
                          gpu_configs=False)
TILES = dataclasses.replace(INTERPRETER_TILES if INTERPRET else GPU_TILES)
# SM count the GPU tiles size their splits with where there is no GPU (gpu_tiles() on the CPU): an H200's
STAND_IN_SMS = 132


@contextlib.contextmanager
def gpu_tiles():
    """Run the kernels with the GPU's tiles, configs and composition, also under the interpreter."""
    saved = dataclasses.replace(TILES)
    for field in dataclasses.fields(Tiles):
        setattr(TILES, field.name, getattr(GPU_TILES, field.name))
    try:
        yield TILES
    finally:
        for field in dataclasses.fields(Tiles):
            setattr(TILES, field.name, getattr(saved, field.name))


def pointwise_tiles(c):
    """(BLOCK_M, BLOCK_C) of the pointwise and reduction kernels over (pixels, C) tensors."""
    return TILES.pointwise_block_m, min(64, next_power_of_2(c))


class VersionedCache:
    """Values computed from tensors, reused while every one of them is the same object at the same
    version (``Tensor._version``, which in-place ops and optimizers bump), e.g. packed weights and
    folded BatchNorms in inference. At most ``size`` entries, least recently used dropped first.

    Limitation: writes through ``.data`` (``param.data.copy_(...)``) do not bump the version; after
    such a write call ``kernels.clear_caches()``.
    """

    caches = weakref.WeakSet()

    def __init__(self, size=256):
        self.size, self.entries = size, OrderedDict()
        VersionedCache.caches.add(self)

    def get(self, tensors, extra, compute):
        """``compute()``, or what it returned for the same ``tensors`` (a tuple; None entries allowed)
        at the same versions and the same hashable ``extra``."""
        key = (tuple(id(t) for t in tensors), extra)
        entry = self.entries.get(key)
        versions = tuple(None if t is None else t._version for t in tensors)
        if entry is not None:
            refs, seen, value = entry
            if seen == versions and all((r is None and t is None) or (r is not None and r() is t)
                                        for r, t in zip(refs, tensors)):
                self.entries.move_to_end(key)
                return value
        value = compute()
        self.entries[key] = (tuple(None if t is None else weakref.ref(t) for t in tensors), versions, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self):
        self.entries.clear()


def clear_caches():
    """Forget every packed weight and folded BatchNorm kept for reuse (``VersionedCache``)."""
    for cache in list(VersionedCache.caches):
        cache.clear()


def check_device(name, t):
    """Raise ValueError naming ``name`` unless tensor ``t`` is where the kernels can run: a CUDA
    GPU, or the CPU under Triton's interpreter."""
    if t.device.type == "cpu" and not CPU_TENSORS_OK:
        raise ValueError(f"{name} is a CPU tensor but Triton's interpreter is off: move the tensors to a CUDA "
                         "GPU, or set TRITON_INTERPRET=1 (kernels.enable_interpreter()) before importing the kernels")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be a CUDA tensor (or CPU under the interpreter), got device {t.device}")


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_device(t):
    """Make ``t``'s device the current one while the kernels launch: Triton launches on the *current*
    CUDA device (e.g. a DDP rank that never called torch.cuda.set_device). Every public entry point
    and every backward runs its launches inside it."""
    return _device_guard(t.device)


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


def shape_bucket(n):
    """Bucket the batch size for autotune keys: bounded recompiles and re-tunes across batch sizes."""
    return next_power_of_2(max(int(n), 1))


def reduction_splits(m, device):
    """How many pixel ranges the reductions split into: a fixed function of the problem and
    the device, so results are bit-identical from run to run."""
    if not TILES.gpu_configs:
        return max(1, min(4, cdiv(m, 16384)))
    return max(1, min(2 * multiprocessors(device), cdiv(m, 2048)))


def multiprocessors(device):
    """The SM count of ``device`` (a stand-in's where the GPU tiles run on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return STAND_IN_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


SUM_ROWS_BLOCK_S, SUM_ROWS_BLOCK_N = 16, 256


@triton.jit
def _sum_rows_kernel(
    part_ptr,  # (S, N) float32 partials
    out_ptr,  # (N,) the output dtype
    S, N,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_N columns, every row in order, BLOCK_S rows at a time (each block by
    # tl.sum's fixed tree): the same bits from run to run, whatever produced the partials.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s_start in range(0, S, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        valid = (offs_s < S)[:, None] & mask_n[None, :]
        acc += tl.sum(tl.load(part_ptr + offs_s.to(tl.int64)[:, None] * N + offs_n[None, :], mask=valid, other=0.0),
                      axis=0)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def sum_rows(parts, dtype):
    """``parts`` (S, ...) float32 summed over S in a fixed order, in ``dtype``: one launch, or none
    (a view) when there is one row and ``dtype`` is float32."""
    if parts.shape[0] == 1 and dtype == torch.float32:
        return parts[0]
    out = torch.empty(parts.shape[1:], device=parts.device, dtype=dtype)
    n = out.numel()
    if n:
        _sum_rows_kernel[(cdiv(n, SUM_ROWS_BLOCK_N),)](parts, out, parts.shape[0], n,
                                                             BLOCK_S=SUM_ROWS_BLOCK_S, BLOCK_N=SUM_ROWS_BLOCK_N)
    return out


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
def relu(v):
    """max(v, 0) that keeps NaN, as torch.relu does (tl.maximum's default returns 0 for a NaN)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_grad(g, pre):
    """ReLU's backward as PyTorch's threshold_backward: ``g`` where not ``pre <= 0``, so a NaN
    input passes its gradient on; float32."""
    return tl.where(pre <= 0, 0.0, g.to(tl.float32))


@triton.jit
def bn_relu_grad(dy, z, scale, shift, k1, k0, valid):
    """Gradient w.r.t. the conv output z of ``relu(z·scale + shift)`` with BatchNorm's backward.

    Per channel, dz = scale·g + k1·z + k0 with g = dy·[z·scale + shift > 0] (``relu_grad``); k1 = k0 = 0
    for frozen (eval-mode) BatchNorm. All float32; positions outside the tensor give exactly 0.
    """
    z = z.to(tl.float32)
    g = relu_grad(dy, z * scale[None, :] + shift[None, :])
    dz = g * scale[None, :] + z * k1[None, :] + k0[None, :]
    return tl.where(valid, dz, 0.0)
