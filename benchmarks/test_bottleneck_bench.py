"""Bottleneck benchmarks: one whole ResNeXt block at every stage of resnext50_32x4d and resnext101_32x8d.

Blocks: per stage the first block (projection shortcut; stride 2 from stage 2 on) and a stride-1
identity block, batch ``--bench-batch`` (default 256), bfloat16 autocast, channels_last float32
inputs and parameters, as the model benchmarks run them. Providers, on the same parameters:

- ``cudnn``: the eager ``resnext.Bottleneck`` (cudnn.benchmark on), timed with channels_last and
  with NCHW activations and parameters; the faster layout is the record (``layout`` says which);
- ``fused_conv``: the same block with ``fused_kernels="conv"`` (grouped conv + BN + ReLU fused);
- ``fused_block``: ``fused_kernels="block"`` (the whole block in Triton, ``kernels/bottleneck.py``);
- ``compile``: ``torch.compile`` of the eager block.

Modes ``inference`` (eval, no_grad) and ``train_fwd_bwd`` (train mode, forward, ``y.backward(dy)``).
Timing as the block benchmarks (``benchmarks/test_block_bench.gpu_time_ms``: median GPU time of
single calls, L2 flushed, gradients reset, outside the timed region). ``extra_info``: ``op =
"bottleneck"``, ``median_ms``, FLOPs (the four convolutions; x3 for forward + backward) and the
compulsory bytes: inference reads x and writes y; training also writes and re-reads the conv
outputs z1, z2, z3 (z_d) once and reads dy, writes dx — the minimum the fused design moves.
``benchmarks/report.py`` tabulates them (``## Bottlenecks``) and checks the fused bottleneck's goals.
"""

import copy
import itertools

import pytest
import torch
import torch.nn as nn

from benchmarks.shapes import BOTTLENECK_MODES as MODES, bottleneck_shapes, throughput
from benchmarks.test_block_bench import gpu_time_ms, pedantic_calls

PROVIDERS = ("cudnn", "fused_conv", "fused_block", "compile")


def _label(s):
    arch, stage, stride, inplanes, planes = s[:5]
    kind = "proj" if inplanes != planes * 4 or stride != 1 else "identity"
    return f"{arch}-stage{stage}-{kind}" + ("-s2" if stride == 2 else "")


def flops_and_bytes(s, batch, mode):
    _, _, stride, cin, planes, groups, wpg, size = s
    width, cout = planes * wpg // 64 * groups, planes * 4
    out = (size - 1) // stride + 1
    m_in, m_out = batch * size * size, batch * out * out
    flops = 2 * (m_in * cin * width + m_out * width * width // groups * 9 + m_out * width * cout)
    proj = stride != 1 or cin != cout
    if proj:
        flops += 2 * m_out * cin * cout
    elem = 2  # bfloat16 activations
    nbytes = (m_in * cin + m_out * cout) * elem
    if mode == "train_fwd_bwd":
        flops *= 3
        z = m_in * width + m_out * width + m_out * cout + (m_out * cout if proj else 0)
        nbytes += (2 * z + m_out * cout + m_in * cin) * elem  # z written + re-read, dy, dx
    return flops, nbytes


def pytest_generate_tests(metafunc):
    if "bottleneck_case" in metafunc.fixturenames:
        cases = list(itertools.product(bottleneck_shapes(), MODES, PROVIDERS))
        metafunc.parametrize("bottleneck_case", cases, ids=[f"{_label(s)}-{m}-{p}" for s, m, p in cases])


def _setup(s, mode, provider, batch, compile_mode, layout=torch.channels_last):
    import resnext

    arch, stage, stride, inplanes, planes, groups, wpg, size = s
    down = None
    if stride != 1 or inplanes != planes * 4:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    torch.manual_seed(0)
    block = resnext.Bottleneck(inplanes, planes, stride, down, groups, wpg).cuda()
    block = block.to(memory_format=layout).train(mode != "inference")
    if provider in ("fused_conv", "fused_block"):
        block.fused_kernels = provider.removeprefix("fused_")
    net = torch.compile(copy.deepcopy(block), mode=compile_mode) if provider == "compile" else block
    x = torch.randn(batch, inplanes, size, size, device="cuda").contiguous(memory_format=layout)
    grads = []
    if mode == "inference":
        def call():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                net(x)
    else:
        x.requires_grad_(True)
        grads = [x, *net.parameters()]
        with torch.autocast("cuda", torch.bfloat16):
            dy = torch.randn_like(net(x).detach())

        def call():
            with torch.autocast("cuda", torch.bfloat16):
                y = net(x)
            y.backward(dy)
    for _ in range(3):  # compilation, autotuning, cudnn.benchmark's search
        call()
        for t in grads:
            t.grad = None
    torch.cuda.synchronize()
    return call, grads


@pytest.mark.gpu
def test_bottleneck(benchmark, gpu_env, cudnn_times, l2_flush, bench_batch, compile_mode, bottleneck_case):
    s, mode, provider = bottleneck_case
    layouts = {"channels_last": torch.channels_last}
    if provider == "cudnn":  # eager PyTorch at its better layout
        layouts["nchw"] = torch.contiguous_format
    best = None  # (median ms, layout name, call, grads) of the faster layout
    for name, memory_format in layouts.items():
        call, grads = _setup(s, mode, provider, bench_batch, compile_mode, memory_format)
        ms = gpu_time_ms(call, grads, l2_flush)
        if best is None or ms < best[0]:
            best = (ms, name, call, grads)
        del call, grads  # the slower layout's block and tensors go as soon as best lets go of them
    median_ms, layout, call, grads = best

    setup, timed = pedantic_calls(call, grads, l2_flush)
    config = ("bottleneck", _label(s), mode, bench_batch)
    if provider == "cudnn":
        cudnn_times[config] = median_ms
    flops, nbytes = flops_and_bytes(s, bench_batch, mode)
    arch, stage, stride, inplanes, planes, groups, wpg, size = s
    benchmark.group = f"{_label(s)} {mode}"
    benchmark.extra_info.update(gpu_env)
    benchmark.extra_info.update(
        op="bottleneck", arch=arch, stage=stage, stride=stride, inplanes=inplanes, planes=planes,
        groups=groups, size=size, batch=bench_batch, dtype="bfloat16", mode=mode, provider=provider,
        layout=layout, median_ms=median_ms, flops=flops, bytes=nbytes, **throughput(flops, nbytes, median_ms, gpu_env["copy_gbps"]),
        speedup_vs_cudnn=cudnn_times[config] / median_ms if config in cudnn_times else None,
        timer="median of per-call CUDA-event times, L2 flushed, warm-up excluded")
    benchmark.pedantic(timed, setup=setup, rounds=10, warmup_rounds=1)
