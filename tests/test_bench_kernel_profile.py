"""Per-kernel timing of the fused block benchmarks: the aggregation on synthetic profiler events
(CPU), and the whole profiling path on a real GPU (GPU only)."""

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent, FunctionEventAvg

import kernels
from benchmarks.test_block_bench import device_events, kernel_times_ms, profile_kernels

HAS_GPU = torch.cuda.is_available() and not kernels.interpreter_enabled()


def test_kernel_times_ms_averages_per_call_slowest_first():
    events = [("_bwd_dx_kernel", 30.0), ("_fwd_kernel", 100.0), ("Memset (Device)", 2.0),
              ("_fwd_kernel", 120.0), ("_bwd_dx_kernel", 30.0), ("_idle_kernel", 0.0)]
    times = kernel_times_ms(events, calls=2)
    assert times == pytest.approx({"_fwd_kernel": 0.110, "_bwd_dx_kernel": 0.030, "Memset (Device)": 0.001})
    assert list(times) == ["_fwd_kernel", "_bwd_dx_kernel", "Memset (Device)"]  # slowest first; no 0-time entry
    assert list(kernel_times_ms([("b", 1.0), ("a", 1.0)], calls=1)) == ["a", "b"]  # ties: by name
    assert kernel_times_ms([], calls=3) == {}
    with pytest.raises(ValueError, match="calls"):
        kernel_times_ms(events, calls=0)


def test_device_events_keeps_gpu_side_entries_only():
    averages = [
        SimpleNamespace(key="_fwd_kernel", device_type=DeviceType.CUDA, device_time_total=40.0),
        # a runtime call carries its kernel's time too: counting it would count the kernel twice
        SimpleNamespace(key="cudaLaunchKernel", device_type=DeviceType.CPU, device_time_total=40.0),
        # torch < 2.4 named it cuda_time_total
        SimpleNamespace(key="Memcpy DtoD (Device -> Device)", device_type=DeviceType.CUDA, cuda_time_total=7.0),
    ]
    assert device_events(averages) == [("_fwd_kernel", 40.0), ("Memcpy DtoD (Device -> Device)", 7.0)]


def _average(name, durations_us, device_type, kernel_us=None):
    """A ``key_averages()`` entry built from this torch's own event classes."""
    avg = FunctionEventAvg()
    for i, us in enumerate(durations_us):
        evt = FunctionEvent(id=i, name=name, thread=0, start_us=0, end_us=us, use_device="cuda",
                            device_type=device_type)
        if kernel_us is not None:
            evt.append_kernel("_fwd_kernel", 0, kernel_us)
        avg.add(evt)
    return avg


def test_device_events_on_this_torch_profiler_classes():
    """The attributes read (``key``, ``device_type``, ``device_time_total``) as this torch has them."""
    averages = [_average("_fwd_kernel", [10, 30], DeviceType.CUDA),
                _average("cudaLaunchKernel", [3], DeviceType.CPU, kernel_us=10)]
    assert averages[1].device_time_total == 10  # what the CPU-side filter keeps out
    assert device_events(averages) == [("_fwd_kernel", 40)]
    assert kernel_times_ms(device_events(averages), calls=2) == {"_fwd_kernel": 0.02}


def test_device_events_of_a_cpu_profile_is_empty():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(8).add_(1)
    assert len(prof.key_averages()) > 0 and device_events(prof.key_averages()) == []


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU with Triton's interpreter off")
def test_profile_kernels_on_gpu():
    """One PyTorch kernel per call, the L2 flush's fill left out; a Triton kernel under its name."""
    flush = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    y = torch.randn(1 << 20, device="cuda")
    times = profile_kernels(lambda: y.mul_(1.0), [], flush, calls=3)
    assert len(times) == 1 and next(iter(times.values())) > 0, times

    from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu

    x = torch.randn(2, 32, 8, 8, device="cuda")
    w = torch.randn(32, 8, 3, 3, device="cuda")
    gamma, beta, mean, var = torch.ones(32, device="cuda"), torch.zeros(32, device="cuda"), \
        torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")

    def call():
        grouped_conv_bn_relu(x, w, gamma, beta, mean, var, stride=1, padding=1, groups=4, training=False)

    call()  # compile and autotune outside the profiler
    times = profile_kernels(call, [], flush, calls=2)
    assert "_fwd_kernel" in times, times
    assert list(times.values()) == sorted(times.values(), reverse=True)
