"""Block benchmarks: one grouped 3x3 conv + BN + ReLU at every grouped-conv shape of ResNeXt, and of
two RegNetYs (regnety_016, regnety_160: 24 and 112 channels per group, ``benchmarks.shapes.REGNETS``).

Providers, all on the same random parameters and inputs:

- ``fused``: ``kernels.grouped_conv_bn_relu.grouped_conv_bn_relu`` (ours), NCHW and
  channels_last input, the better one reported.
- ``cudnn``: the eager ``kernels.reference.ConvBNReLU`` module (conv2d, batch_norm, relu) with
  ``cudnn.benchmark = True``, NCHW and channels_last, the better reported. In ``inference`` it
  also tries BN folded into the conv's weight and bias (conv2d + bias, relu), as a deployment would.
- ``compile``: ``torch.compile`` of that same module (channels_last input; Inductor chooses its
  own layouts inside), ``--bench-max-autotune`` for max-autotune.

Modes: ``inference`` (eval-mode BN, no_grad), ``train_fwd`` (batch statistics, running stats
updated, autograd recording), ``train_fwd_bwd`` (that forward, then ``y.backward(dy)`` with a
preallocated random ``dy``; gradients for x, the conv weight, and BN's weight and bias).

Timing. The figure is ``extra_info["median_ms"]``, from ``gpu_time_ms``: the median over
``TIMED_CALLS`` calls, each timed on its own with CUDA events after the warm-up, with L2 flushed
and gradients reset to None before each call, outside the timed region. It is GPU time, as a kernel
engineer reads it: L2 cannot serve a call from the previous call's data (stage 4's whole working
set would fit), and Python launch overhead stays out. Outputs come from PyTorch's caching
allocator, which after the warm-up hands out cached blocks without a device allocation.
pytest-benchmark's own statistics come from ``benchmark.pedantic`` around ``call();
torch.cuda.synchronize()`` with the same flush and reset in an untimed setup: wall-clock latency
from an idle GPU, launch overhead included, kept for pytest-benchmark's tooling only.
``benchmarks/report.py`` uses ``median_ms``.

Kernels. After all that timing, a ``fused`` case runs ``--bench-profile-calls`` (default 3) more
calls of its reported variant, each alone under ``torch.profiler`` (CUDA activity only; gradients
reset and L2 flushed before it, outside the profiler, so the flush's fill kernel is not counted),
and records ``extra_info["kernels"]``: ``{kernel name: GPU ms per call}``, slowest first, so that a
GPU run shows which kernel to attack next. Triton kernels appear under their function name
(``_fwd_kernel``, ``_bwd_dx_kernel``), PyTorch's (layout copies, fills) under theirs.
"""

import itertools
import statistics
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from benchmarks.shapes import MODES, block_shapes, conv_flops, min_bytes, regnet_shapes, throughput
from kernels.reference import ConvBNReLU

PROVIDERS = ("cudnn", "fused", "compile")  # cudnn first: the others' speedups are relative to it
TIMED_CALLS = 100
PEDANTIC_ROUNDS = 20
# ~1 ms of GPU clock: long enough for the CPU to enqueue a whole call (eager training
# forward + backward, or torch.compile's guards) before the GPU reaches the start event
SLEEP_CYCLES = 2_000_000


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        shapes = block_shapes() + regnet_shapes()  # ResNeXt's, then RegNetY's (24 and 112 per group)
        cases = list(itertools.product(shapes, metafunc.config.bench_dtypes, MODES, PROVIDERS))
        ids = [f"{s.id}-{d}-{m}-{p}" for s, d, m, p in cases]
        metafunc.parametrize("case", cases, ids=ids)


def _module(shape, dtype, channels_last):
    """ConvBNReLU with random weights and random BN affine parameters and running statistics."""
    torch.manual_seed(0)
    m = ConvBNReLU(shape.channels, shape.channels, shape.stride, shape.groups).cuda()
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)  # about half the outputs pass the ReLU
        m.bn.running_mean.normal_(0.0, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    m.conv.to(dtype)  # BN parameters and statistics stay float32, as under autocast
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _forward(provider, variant, m, shape, compile_mode):
    """The op as a function of x, for one provider and variant."""
    if provider == "fused":
        from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu  # GPU only: imported late

        bn = m.bn
        return lambda x: grouped_conv_bn_relu(
            x, m.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, stride=shape.stride,
            padding=1, groups=shape.groups, eps=bn.eps, momentum=bn.momentum, training=m.training)
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache: otherwise the recompile limit silently falls back to eager
        return torch.compile(m, mode=compile_mode)
    if variant.endswith("folded"):
        bn = m.bn
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = (m.conv.weight.float() * scale.view(-1, 1, 1, 1)).to(m.conv.weight.dtype)
            weight = weight.contiguous(memory_format=torch.channels_last) if "channels_last" in variant else weight
            bias = (bn.bias - bn.running_mean * scale).to(weight.dtype)
        return lambda x: F.relu_(F.conv2d(x, weight, bias, shape.stride, 1, 1, shape.groups))
    return m


def _setup(provider, variant, shape, dtype, mode, batch, compile_mode):
    """Allocate everything, warm up; return (call, tensors whose .grad to reset per call)."""
    channels_last = variant.startswith("channels_last")
    m = _module(shape, dtype, channels_last and provider != "fused")
    m.train(mode != "inference")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape.input_shape(batch), device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    f = _forward(provider, variant, m, shape, compile_mode)
    grads = []
    if mode == "inference":
        def call():
            with torch.no_grad():
                f(x)
    elif mode == "train_fwd":
        x.requires_grad_(True)

        def call():
            f(x)
    else:
        x.requires_grad_(True)
        grads = [x, *m.parameters()]
        dy = torch.randn_like(f(x).detach())  # same memory format as the provider's output

        def call():
            f(x).backward(dy)
    for _ in range(3):  # compilation, cudnn.benchmark's search, Triton autotuning
        call()
        for t in grads:
            t.grad = None
    torch.cuda.synchronize()
    return call, grads


def gpu_time_ms(call, grads, l2_flush, calls=TIMED_CALLS):
    """Median GPU time of ``call()`` in ms; state and caches reset before each call, untimed."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for start, end in zip(starts, ends):
        for t in grads:
            t.grad = None  # otherwise backward adds into .grad: an extra pass over dx
        l2_flush.zero_()
        torch.cuda._sleep(SLEEP_CYCLES)  # the GPU waits here while the CPU enqueues the call
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def pedantic_calls(call, grads, l2_flush):
    """(setup, timed) for ``benchmark.pedantic``: the untimed setup leaves the same state before
    every call as ``gpu_time_ms`` does; the timed part is the call and a synchronisation."""
    def setup():
        for t in grads:
            t.grad = None
        l2_flush.zero_()
        torch.cuda.synchronize()

    def timed():
        call()
        torch.cuda.synchronize()

    return setup, timed


def kernel_times_ms(events, calls: int) -> dict[str, float]:
    """``{kernel name: ms per call}``, slowest first, from ``(name, device time in us)`` events
    gathered over ``calls`` calls (a name may come several times: several calls, several launches)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    total_us = defaultdict(float)
    for name, us in events:
        if us > 0:
            total_us[name] += us
    ranked = sorted(total_us.items(), key=lambda kv: (-kv[1], kv[0]))
    return {name: us / calls / 1e3 for name, us in ranked}


def device_events(averages) -> list[tuple[str, float]]:
    """``(name, device time in us)`` of the GPU-side entries of ``prof.key_averages()``: kernels,
    memcpys, memsets. CPU-side entries are left out: a runtime call such as ``cudaLaunchKernel``
    counts its kernels' time as its own too."""
    from torch.autograd import DeviceType

    out = []
    for evt in averages:
        if getattr(evt, "device_type", DeviceType.CPU) == DeviceType.CPU:
            continue
        us = getattr(evt, "device_time_total", None)  # torch >= 2.4; cuda_time_total before
        out.append((evt.key, us if us is not None else getattr(evt, "cuda_time_total", 0)))
    return out


def profile_kernels(call, grads, l2_flush, calls: int) -> dict[str, float]:
    """GPU time per call of each kernel ``call()`` launches (``kernel_times_ms``), each of the
    ``calls`` calls profiled on its own, from the same state as in ``gpu_time_ms``."""
    from torch.profiler import ProfilerActivity, profile

    events = []
    for _ in range(calls):
        for t in grads:
            t.grad = None
        l2_flush.zero_()
        torch.cuda.synchronize()  # the flush ends before the profiler starts: its kernel stays out
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        events += device_events(prof.key_averages())
    return kernel_times_ms(events, calls)


def _variants(provider, mode):
    if provider == "compile":
        return ["channels_last"]
    layouts = ["nchw", "channels_last"]
    if provider == "cudnn" and mode == "inference":
        return layouts + [f"{layout}+folded" for layout in layouts]
    return layouts


@pytest.mark.gpu
def test_block(benchmark, gpu_env, cudnn_times, l2_flush, bench_batch, compile_mode, profile_calls, case):
    shape, dtype_name, mode, provider = case
    dtype = getattr(torch, dtype_name)
    best, variants_ms = None, {}
    for variant in _variants(provider, mode):
        call, grads = _setup(provider, variant, shape, dtype, mode, bench_batch, compile_mode)
        ms = gpu_time_ms(call, grads, l2_flush)
        variants_ms[variant] = ms
        if best is None or ms < variants_ms[best[0]]:
            best = (variant, call, grads)
        del call, grads
    variant, call, grads = best
    median_ms = variants_ms[variant]

    setup, timed = pedantic_calls(call, grads, l2_flush)
    config = (shape.id, dtype_name, mode, bench_batch)
    if provider == "cudnn":
        cudnn_times[config] = median_ms
    flops = conv_flops(shape, bench_batch, mode)
    nbytes = min_bytes(shape, bench_batch, dtype, mode)
    benchmark.group = f"{shape.id} {dtype_name} {mode}"
    benchmark.extra_info.update(gpu_env)
    benchmark.extra_info.update(
        op="block", arch=shape.arch, stage=shape.stage, shape=list(shape.input_shape(bench_batch)),
        groups=shape.groups, stride=shape.stride, dtype=dtype_name, mode=mode, provider=provider,
        median_ms=median_ms, flops=flops, bytes=nbytes,
        **throughput(flops, nbytes, median_ms, gpu_env["copy_gbps"]),
        speedup_vs_cudnn=cudnn_times[config] / median_ms if config in cudnn_times else None,
        variant=variant, variants_ms=variants_ms, compile_mode=compile_mode if provider == "compile" else None,
        timer="median of per-call CUDA-event times, L2 flushed, warm-up excluded")
    benchmark.pedantic(timed, setup=setup, rounds=PEDANTIC_ROUNDS, warmup_rounds=2)
    if provider == "fused" and profile_calls:  # after every timed call, so the profiler disturbs none
        kernels = profile_kernels(call, grads, l2_flush, profile_calls)
        if kernels:
            benchmark.extra_info["kernels"] = kernels
        else:  # a profiler that can't trace (CUPTI missing or busy) returns nothing rather than raising
            warnings.warn(f"{shape.id} {dtype_name} {mode}: torch.profiler recorded no GPU kernel; "
                          "no per-kernel times for this case", stacklevel=1)
