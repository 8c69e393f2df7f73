"""Benchmark options, the GPU check, and the session-wide facts every record carries.

Without a usable CUDA GPU (none present, or Triton's interpreter switched on) every benchmark is
still collected and then skipped with a reason, so ``pytest benchmarks/ --benchmark-only`` exits 0,
and the run says why in one line (``skip_summary``), even under ``-q``.
"""

import gc
import os
import subprocess
from pathlib import Path

import pytest
import torch

import kernels

HAS_GPU = torch.cuda.is_available() and not kernels.interpreter_enabled()
NO_GPU_REASON = ("needs a CUDA GPU with Triton's interpreter off" +
                 ("" if torch.cuda.is_available() else " (no CUDA GPU found)"))
ALL_DTYPES = ("bfloat16", "float16", "float32")
SUMMARY_PREFIX = "resnext-fused benchmarks:"


def pytest_addoption(parser):
    group = parser.getgroup("resnext-fused benchmarks")
    group.addoption("--bench-batch", type=int, default=256,
                    help="batch size for block and model benchmarks (models halve it on OOM); default 256")
    group.addoption("--bench-dtypes", default=",".join(ALL_DTYPES),
                    help="comma-separated dtypes for the block benchmarks; default %(default)s")
    group.addoption("--bench-max-autotune", action="store_true",
                    help="compile provider: torch.compile(mode='max-autotune-no-cudagraphs')")
    group.addoption("--bench-profile-calls", type=int, default=3,
                    help="fused block cases: calls profiled after the timed ones for the time of each "
                         "kernel (extra_info['kernels']); 0 turns it off; default %(default)s")


def pytest_configure(config):
    names = [d.strip() for d in config.getoption("--bench-dtypes").split(",") if d.strip()]
    if not names or any(d not in ALL_DTYPES for d in names):
        raise pytest.UsageError(f"--bench-dtypes: expected a subset of {ALL_DTYPES}, got {names}")
    if config.getoption("--bench-batch") < 1:
        raise pytest.UsageError("--bench-batch must be >= 1")
    if config.getoption("--bench-profile-calls") < 0:
        raise pytest.UsageError("--bench-profile-calls must be >= 0")
    config.bench_dtypes = names  # read by the block benchmarks' pytest_generate_tests


def pytest_collection_modifyitems(config, items):
    """Skip (not deselect) the ``gpu`` benchmarks without a GPU: collected-then-skipped keeps
    the exit status 0, where an empty collection would exit 5."""
    if HAS_GPU:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if item.get_closest_marker("gpu") and here in Path(item.path).parents:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Count this folder's GPU benchmarks left after ``-k``/``-m`` deselection, for the summary."""
    here = Path(__file__).parent
    session.config.bench_gpu_cases = sum(
        1 for item in session.items if item.get_closest_marker("gpu") and here in Path(item.path).parents)


def skip_summary(skipped: int, cases: int, reason: str = NO_GPU_REASON) -> str | None:
    """The one line saying why benchmarks were skipped, or None when none was skipped for it."""
    if not skipped:
        return None
    counted = f"all {cases} cases" if skipped == cases else f"{skipped} of {cases} cases"
    return f"{SUMMARY_PREFIX} {counted} skipped: {reason}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Without a GPU, pytest alone would end on "390 skipped" (and, under ``-q``, show no header)."""
    if HAS_GPU:
        return
    here = Path(__file__).parent
    skipped = sum(1 for rep in terminalreporter.stats.get("skipped", [])
                  if here in (config.rootpath / rep.nodeid.split("::")[0]).parents  # tests/ has its own GPU skips
                  and isinstance(rep.longrepr, tuple) and rep.longrepr[-1] == f"Skipped: {NO_GPU_REASON}")
    line = skip_summary(skipped, getattr(config, "bench_gpu_cases", skipped))
    if line:
        terminalreporter.write_line(line)


def _compile_mode(config) -> str | None:
    """torch.compile mode of the ``compile`` provider.

    CUDA graphs stay off even under max-autotune: they remove launch overhead for any provider
    alike (ours included), so they would blur the comparison of kernels rather than inform it.
    """
    return "max-autotune-no-cudagraphs" if config.getoption("--bench-max-autotune") else None


def _nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi unavailable ({e.__class__.__name__})"


def git_sha() -> str | None:
    """The commit measured: ``$RESNEXT_GIT_SHA`` (the GPU machine gets a copy of the tree without
    ``.git``: gpu_session.sh passes it on), else ``git rev-parse HEAD`` where that works."""
    if os.environ.get("RESNEXT_GIT_SHA"):
        return os.environ["RESNEXT_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Library versions, GPU name and the commit, recorded with every result."""
    import triton

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": torch.cuda.get_device_name() if HAS_GPU else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": str(cudnn) if cudnn else None,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
    }


def pytest_report_header(config):
    if not HAS_GPU:
        return [f"{SUMMARY_PREFIX} every case will be skipped: {NO_GPU_REASON}"]
    v = versions()
    return [f"benchmarks: nvidia-smi: {_nvidia_smi()}",
            f"benchmarks: torch {v['torch']} (CUDA {v['cuda']}), cuDNN {v['cudnn']}, triton {v['triton']}, "
            f"batch {config.getoption('--bench-batch')}, dtypes {','.join(config.bench_dtypes)}, "
            f"compile mode {_compile_mode(config) or 'default'}, "
            f"kernel profile calls {config.getoption('--bench-profile-calls')}"]


def measure_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 B/s), counting read + write: 2 * nbytes / time.

    Median over ``reps`` copies timed one by one with CUDA events, after warm-up. At 1 GiB the
    buffers are far larger than L2, so this is what HBM delivers to a streaming kernel.
    """
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    median_ms = sorted(times)[len(times) // 2]
    return 2 * nbytes / (median_ms * 1e-3) / 1e9


@pytest.fixture(scope="session")
def gpu_env():
    """Session facts copied into every record's ``extra_info``; also turns cudnn.benchmark on."""
    if not HAS_GPU:
        pytest.skip(NO_GPU_REASON)
    torch.backends.cudnn.benchmark = True  # fair baseline: cuDNN picks its fastest algorithm
    env = versions()
    env["copy_gbps"] = measure_copy_bandwidth()
    # float32 convs follow these flags in eager, compile and (per the kernel contract) ours alike
    env["allow_tf32"] = torch.backends.cudnn.allow_tf32
    return env


@pytest.fixture(scope="session")
def cudnn_times():
    """cudnn's time per configuration, filled by the cudnn cases (collected first) so that the
    fused and compile cases can put their speedup into ``extra_info``. The report recomputes it."""
    return {}


@pytest.fixture(scope="session")
def l2_flush():
    """A 256 MB buffer; zeroing it evicts L2 (50 MB on H100) between timed calls."""
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


@pytest.fixture
def bench_batch(request) -> int:
    return request.config.getoption("--bench-batch")


@pytest.fixture
def compile_mode(request) -> str | None:
    return _compile_mode(request.config)


@pytest.fixture
def profile_calls(request) -> int:
    return request.config.getoption("--bench-profile-calls")


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """After each case, drop compiled graphs and cached blocks so the next case starts clean."""
    yield
    if HAS_GPU:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
