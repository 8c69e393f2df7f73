"""Model benchmarks: images/s of ResNeXt inference and of one training step.

Providers: ``fused`` (``resnext.create_model(arch, fused_kernels=True)``: every grouped conv + BN +
ReLU is our kernel), ``fused_block`` (``fused_kernels="block"``: every whole bottleneck in Triton,
``kernels/bottleneck.py``), ``cudnn`` (the same model with ``fused_kernels=False``, eager, cudnn.benchmark
on) and ``compile`` (``torch.compile`` of the unfused model). All run bfloat16 autocast on
channels_last float32 inputs at ``--bench-batch`` (default 256), halved until the provider's
model fits; the batch used is recorded.

- ``inference``: eval mode, no_grad, one forward.
- ``train``: train mode, forward, cross-entropy on random labels, backward, SGD (momentum,
  weight decay) step, ``zero_grad(set_to_none=True)``.

Timing is pytest-benchmark's: ``benchmark.pedantic`` around ``step(); torch.cuda.synchronize()``,
after warm-up steps (compilation, autotuning) outside it. A step is tens to hundreds of ms, so the
one synchronisation per step costs well under 1%, and wall-clock time is the right measure here:
CPU overhead between kernels is part of what a model step costs. ``images_per_s = batch /
stats.median``; ``benchmarks/report.py`` computes it the same way. ``host_ms`` is the median CPU
time of ``step()`` alone, before the synchronisation: what Python and the launches cost the CPU per
step. Where it nears the step's time the GPU waits on the host (the seed recipe's batch of 32 per
GPU: ``--bench-batch 32``).
"""

import gc
import itertools
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

ARCHS = ("resnext50_32x4d", "resnext101_32x8d")
MODES = ("inference", "train")
PROVIDERS = ("cudnn", "fused", "fused_block", "compile")  # cudnn first: the others' speedups are relative to it
WARMUP_STEPS = 3
ROUNDS = 15


def pytest_generate_tests(metafunc):
    if "model_case" in metafunc.fixturenames:
        cases = list(itertools.product(ARCHS, MODES, PROVIDERS))
        metafunc.parametrize("model_case", cases, ids=["-".join(c) for c in cases])


def _build_step(arch, mode, provider, batch, compile_mode):
    """Model, optimizer and inputs for one provider, warmed up; returns ``step()``."""
    from resnext import create_model  # imported late: collection must work without the package's deps

    torch.manual_seed(0)
    level = {"fused": "conv", "fused_block": "block"}.get(provider, False)
    model = create_model(arch, fused_kernels=level).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        num_classes = model.eval()(x[:2]).shape[1]
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache: otherwise the recompile limit silently falls back to eager
        net = torch.compile(model, mode=compile_mode)
    else:
        net = model

    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                net(x)
    else:
        model.train()
        labels = torch.randint(0, num_classes, (batch,), device="cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(net(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    return step


def _fitting_step(arch, mode, provider, batch, compile_mode):
    """``_build_step`` at ``batch``, halved on out-of-memory; returns (step, batch)."""
    while True:
        try:
            return _build_step(arch, mode, provider, batch, compile_mode), batch
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, possibly wrapped by torch.compile
            if "out of memory" not in str(e) or batch == 1:
                raise
        # outside the except block, so the traceback no longer holds the failed attempt's tensors
        batch //= 2
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_model(benchmark, gpu_env, cudnn_times, bench_batch, compile_mode, model_case):
    arch, mode, provider = model_case
    step, batch = _fitting_step(arch, mode, provider, bench_batch, compile_mode)

    host = []

    def timed():
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()

    benchmark.group = f"{arch} {mode} batch {bench_batch}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    images_per_s = batch / benchmark.stats.stats.median
    config = ("model", arch, mode, bench_batch)
    if provider == "cudnn":
        cudnn_times[config] = images_per_s
    benchmark.extra_info.update(gpu_env)
    benchmark.extra_info.update(
        op="model", arch=arch, mode=mode, batch=batch, bench_batch=bench_batch, dtype="bfloat16", provider=provider,
        images_per_s=images_per_s, median_ms=benchmark.stats.stats.median * 1e3,
        host_ms=statistics.median(host) * 1e3,
        speedup_vs_cudnn=images_per_s / cudnn_times[config] if config in cudnn_times else None,
        compile_mode=compile_mode if provider == "compile" else None,
        timer="pytest-benchmark stats.median of step() + torch.cuda.synchronize()")
