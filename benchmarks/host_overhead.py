"""Host (CPU) time of one fused-op call, and where it goes: for the blocks where the GPU idles.

The H100 run (benchmarks/results/nvidia-h100-80gb-hbm3.md) timed resnext50_32x4d stage3's fused
train_fwd_bwd at 2.6 ms median GPU time while its kernels summed to ~1.0 ms, and the pytest-benchmark
wall-clock of the call (enqueue + sync) at 3.4 ms vs cuDNN's 1.0 ms: the host, not the GPU, sets the
pace at the small stages. This measures that host time directly, per mode, next to cuDNN's eager
module, and profiles the fused call with cProfile so the next change is aimed at a measured cost::

    PYTHONPATH=. python -m benchmarks.host_overhead --arch resnext50_32x4d --stage 3 [--prof FILE]

"enqueue" is the wall time of the call alone (the GPU is kept busy by a preceding ``_sleep`` so
that the call never waits on it): the CPU cost of the Python, the dispatcher and the kernel
launches. Needs a CUDA GPU.
"""

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
import torch.nn as nn

from benchmarks.shapes import ARCHS, block_shapes

MODES = ("inference", "train_fwd", "train_fwd_bwd")


def _calls(module, x, dy, mode):
    if mode == "inference":
        module.eval()

        def call():
            with torch.no_grad():
                module(x)
    else:
        module.train()
        xg = x.detach().requires_grad_()
        if mode == "train_fwd":
            def call():
                module(xg)
        else:
            def call():
                module(xg).backward(dy)
    return call


def enqueue_us(call, calls=50):
    """Median host time of ``call()`` in µs, the GPU kept busy so that nothing waits on it."""
    times = []
    for _ in range(calls):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time queued ahead of the call
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(ARCHS), default="resnext50_32x4d")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prof", default=None, help="write a cProfile of the fused calls (top 40 per mode) here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from kernels.grouped_conv_bn_relu import GroupedConvBNReLU

    shape = next(s for s in block_shapes(args.arch) if s.stage == args.stage and s.stride == args.stride)
    torch.manual_seed(0)
    x = torch.randn(shape.input_shape(args.batch), device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    # bfloat16 conv weights, float32 BatchNorm (as under autocast, without its per-call casts)
    fused = GroupedConvBNReLU(shape.channels, shape.channels, shape.stride, shape.groups).cuda()
    fused.conv.to(torch.bfloat16)
    eager = nn.Sequential(nn.Conv2d(shape.channels, shape.channels, 3, shape.stride, 1, groups=shape.groups,
                                    bias=False), nn.BatchNorm2d(shape.channels), nn.ReLU(inplace=True)).cuda()
    eager[0].to(torch.bfloat16, memory_format=torch.channels_last)
    dy = torch.randn(shape.output_shape(args.batch), device="cuda", dtype=torch.bfloat16)
    dy = dy.contiguous(memory_format=torch.channels_last)
    print(f"{shape.id} batch {args.batch} bfloat16 channels_last: host time per call (µs), median of 50")
    print("| mode | fused | cudnn eager |\n|---|---|---|")
    for mode in MODES:
        row = []
        for module in (fused, eager):
            call = _calls(module, x, dy, mode)
            for _ in range(5):  # autotuning, compilation, cudnn.benchmark
                call()
            torch.cuda.synchronize()
            row.append(enqueue_us(call))
        print(f"| {mode} | {row[0]:.0f} | {row[1]:.0f} |", flush=True)
        if args.prof:
            call = _calls(fused, x, dy, mode)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                call()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
            with open(args.prof, "a") as f:
                f.write(f"# cProfile of 20 fused {mode} calls, {shape.id}, sorted by own time\n")
                f.write(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
