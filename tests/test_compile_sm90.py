"""The GPU compiler accepts every config autotuning keeps, within H100's shared memory.

Runs without a GPU: Triton's NVIDIA backend compiles ahead of time for sm_90 (nothing is
launched). In a subprocess, because this test process decorated the kernels for the interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend_available():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend here")
def test_kept_configs_compile_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--per-group", "4", "64"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "/group" in line]
    assert len(lines) >= 3 * 2 * 3, out.stdout  # 3 kernels x 2 widths x at least 3 configs each
    assert not any("OVER LIMIT" in line for line in lines)
