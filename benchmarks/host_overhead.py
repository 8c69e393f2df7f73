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

Without a GPU, ``--stub`` measures the same calls on the CPU, as the GPU composes them
(``kernels.common.gpu_tiles``) through Triton's interpreter, beside eager PyTorch's modules::

    python -m benchmarks.host_overhead --stub

* device ops per call (``count_device_ops``): the Triton launches plus the outermost aten ops that
  do work, from ``torch.profiler``'s CPU event tree of the second of two identical calls (gradients
  reset before each); views, allocations, the ``.to`` / ``.contiguous`` / ``.clone`` / ``reshape``
  wrappers, autograd's bookkeeping and custom ops are looked through, and what runs inside a
  launch is not counted;
* host µs per call (``stub_host_us``): the same calls with every Triton launch replaced by a no-op,
  median of a few hundred, so that it is the Python and dispatcher cost alone.
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

from benchmarks.shapes import ARCHS, MODES, block_shapes


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


# ---------------------------------------------------------------------------------------------
# the CPU measurement (--stub)

_VIEWS = {"view", "_unsafe_view", "as_strided", "as_strided_", "_reshape_alias", "reshape", "permute", "transpose",
          "t", "unsqueeze", "squeeze", "select", "slice", "expand", "expand_as", "alias", "detach", "unbind",
          "split", "chunk", "narrow", "unflatten", "flatten", "view_as", "resolve_conj", "resolve_neg",
          "lift_fresh", "_nested_view_from_buffer", "split_with_sizes", "movedim"}
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "zeros",
                "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones", "new_full",
                "scalar_tensor", "empty_permuted"}
_WRAPPERS = {"to", "_to_copy", "contiguous", "clone", "type_as", "clone_"}
LOOK_THROUGH = {f"aten::{n}" for n in _VIEWS | _ALLOCATIONS | _WRAPPERS}
LAUNCH_PREFIX = "triton launch: "


def _launcher():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def count_device_ops(call):
    """(Triton launches, aten ops that do work, their names) of ``call()`` as the module docstring says."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cls = _launcher()
    run = cls.run

    def marked(self, *args, **kwargs):
        with record_function(LAUNCH_PREFIX + self.fn.__name__):
            return run(self, *args, **kwargs)

    cls.run = marked
    try:
        call()  # the first call: compiles, fills caches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
    finally:
        cls.run = run
    launches, work = [], []

    def visit(event):
        name = event.name
        if name.startswith(LAUNCH_PREFIX):
            launches.append(name[len(LAUNCH_PREFIX):])
        elif name.startswith("aten::") and name not in LOOK_THROUGH:
            work.append(name)
        else:
            for child in event.cpu_children:
                visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return launches, work


def stub_host_us(call, calls=300):
    """Median µs of ``call()`` with every Triton launch a no-op: the host path alone."""
    cls = _launcher()
    run = cls.run
    cls.run = lambda self, *args, **kwargs: None
    try:
        for _ in range(10):
            call()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    finally:
        cls.run = run
    return statistics.median(times) * 1e6


def stub_cases():
    """``{name: (fused module, eager module, input, dy)}``: the op and both kinds of bottleneck, small."""
    import copy

    import resnext
    from kernels.bottleneck import FusedBottleneck
    from kernels.grouped_conv_bn_relu import GroupedConvBNReLU
    from kernels.reference import ConvBNReLU

    torch.manual_seed(0)
    cases = {}
    eager = ConvBNReLU(16, 16, 1, 4)
    cases["op"] = (GroupedConvBNReLU.from_modules(copy.deepcopy(eager.conv), copy.deepcopy(eager.bn)), eager,
                   (2, 16, 4, 4), (2, 16, 4, 4))
    for name, inplanes, stride in (("bottleneck identity", 64, 1), ("bottleneck projection s2", 32, 2)):
        down = None
        if stride != 1 or inplanes != 64:
            down = nn.Sequential(nn.Conv2d(inplanes, 64, 1, stride, bias=False), nn.BatchNorm2d(64))
        block = resnext.Bottleneck(inplanes, 16, stride, down, 4, 16)
        out = 4 // stride
        cases[name] = (FusedBottleneck.from_block(copy.deepcopy(block)), block, (2, inplanes, 4, 4), (2, 64, out, out))
    return cases


def stub_call(module, x_shape, dy_shape, mode):
    """A call of ``module`` in ``mode`` ("train_fwd_bwd" or "inference") on channels-last float32 input,
    its gradients reset to None first (the same work every call)."""
    x = torch.randn(x_shape).contiguous(memory_format=torch.channels_last)
    if mode == "inference":
        module.eval()

        def call():
            with torch.no_grad():
                module(x)
        return call
    module.train()
    xg = x.requires_grad_()
    dy = torch.randn(dy_shape).contiguous(memory_format=torch.channels_last)
    params = list(module.parameters())

    def call():
        xg.grad = None
        for p in params:
            p.grad = None
        module(xg).backward(dy)
    return call


def stub_table(calls=300):
    """Rows (case, mode, fused launches + aten ops, eager ops, fused µs, eager µs) under gpu_tiles()."""
    from kernels.common import gpu_tiles

    rows = []
    with gpu_tiles():
        for name, (fused, eager, x_shape, dy_shape) in stub_cases().items():
            for mode in ("train_fwd_bwd", "inference"):
                f_call, e_call = (stub_call(m, x_shape, dy_shape, mode) for m in (fused, eager))
                launches, work = count_device_ops(f_call)
                _, eager_work = count_device_ops(e_call)
                rows.append(dict(case=name, mode=mode, launches=len(launches), aten=len(work), eager=len(eager_work),
                                 fused_us=stub_host_us(f_call, calls), eager_us=stub_host_us(e_call, calls),
                                 fused_ops=launches + work, eager_ops=eager_work))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(ARCHS), default="resnext50_32x4d")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prof", default=None, help="write a cProfile of the fused calls (top 40 per mode) here")
    p.add_argument("--stub", action="store_true",
                   help="no GPU: device ops and host µs per call on the CPU, launches stubbed (module docstring)")
    p.add_argument("--verbose", action="store_true", help="--stub: list every op counted")
    args = p.parse_args(argv)
    if args.stub:
        import kernels

        if not kernels.interpreter_enabled():
            print("error: --stub runs through Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        print("device ops and host µs per call, CPU, the GPU's composition (launches stubbed for the µs)")
        print("| call | mode | fused ops (launches + aten) | eager ops | fused µs | eager µs | host ratio |")
        print("|---|---|---|---|---|---|---|")
        for r in stub_table():
            print(f"| {r['case']} | {r['mode']} | {r['launches'] + r['aten']} ({r['launches']} + {r['aten']}) "
                  f"| {r['eager']} | {r['fused_us']:.0f} | {r['eager_us']:.0f} "
                  f"| {r['fused_us'] / r['eager_us']:.2f}x |",
                  flush=True)
            if args.verbose:
                print(f"  fused: {', '.join(r['fused_ops'])}\n  eager: {', '.join(r['eager_ops'])}")
        return 0
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
