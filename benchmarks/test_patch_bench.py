"""torchvision's resnext50_32x4d patched in place by ``resnext.fuse_kernels``: images/s beside the
unpatched model's.

What a user who already trains torchvision's model gets from the one-line patch. Providers:
``cudnn`` (``torchvision.models.resnext50_32x4d()`` as it is, eager, cudnn.benchmark on) and
``fused`` (the same model after ``resnext.fuse_kernels(model)``). bfloat16 autocast on a
channels_last model and inputs at ``--bench-batch`` (default 256), halved until the model fits;
modes and timing as in ``test_model_bench.py`` (``inference``: eval, no_grad; ``train``: forward,
cross-entropy, backward, SGD step, ``zero_grad``). The warm-up steps' losses must be finite and are
recorded (``warmup_losses``); that the patched model trains like the unpatched one is
``tests/test_thirdparty_models.py``'s GPU test.

Records are ``op="model"`` with ``arch="torchvision.resnext50_32x4d"``: ``benchmarks/report.py``
puts them in its models table as a row of their own (cudnn and fused columns, fused / cudnn).
Needs torchvision; skipped with the reason without it.
"""

import gc
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

ARCH = "resnext50_32x4d"
MODES = ("inference", "train")
PROVIDERS = ("cudnn", "fused")  # cudnn first: the fused speedup is relative to it
WARMUP_STEPS = 3
ROUNDS = 15


def pytest_generate_tests(metafunc):
    if "patch_case" in metafunc.fixturenames:
        cases = list(itertools.product(MODES, PROVIDERS))
        metafunc.parametrize("patch_case", cases, ids=[f"torchvision-{ARCH}-{m}-{p}" for m, p in cases])


def _build_step(mode, provider, batch):
    """torchvision's model (patched for ``fused``), optimizer and inputs, warmed up; returns ``step()``."""
    models = pytest.importorskip("torchvision.models", reason="needs torchvision")
    import resnext  # imported late: collection must work without the package's deps

    torch.manual_seed(0)
    model = getattr(models, ARCH)().cuda().to(memory_format=torch.channels_last)
    if provider == "fused":
        resnext.fuse_kernels(model)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    losses = []
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                model(x)
    else:
        model.train()
        labels = torch.randint(0, 1000, (batch,), device="cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    for _ in range(WARMUP_STEPS):
        loss = step()
        if loss is not None:
            losses.append(loss.item())
    torch.cuda.synchronize()
    assert all(math.isfinite(v) for v in losses), (provider, losses)
    return step, losses


def _fitting_step(mode, provider, batch):
    """``_build_step`` at ``batch``, halved on out-of-memory; returns (step, losses, batch)."""
    while True:
        try:
            return (*_build_step(mode, provider, batch), batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # outside the except block, so the traceback no longer holds the failed attempt's tensors
        batch //= 2
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_patched_torchvision_model(benchmark, gpu_env, cudnn_times, bench_batch, patch_case):
    mode, provider = patch_case
    step, losses, batch = _fitting_step(mode, provider, bench_batch)

    def timed():
        step()
        torch.cuda.synchronize()

    arch = f"torchvision.{ARCH}"
    benchmark.group = f"{arch} {mode}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    images_per_s = batch / benchmark.stats.stats.median
    config = ("model", arch, mode)
    if provider == "cudnn":
        cudnn_times[config] = images_per_s
    benchmark.extra_info.update(gpu_env)
    benchmark.extra_info.update(
        op="model", arch=arch, mode=mode, batch=batch, dtype="bfloat16", provider=provider,
        images_per_s=images_per_s, median_ms=benchmark.stats.stats.median * 1e3,
        speedup_vs_cudnn=images_per_s / cudnn_times[config] if config in cudnn_times else None,
        warmup_losses=losses, patched_with="resnext.fuse_kernels" if provider == "fused" else None,
        timer="pytest-benchmark stats.median of step() + torch.cuda.synchronize()")
