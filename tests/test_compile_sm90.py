"""The sm_90 compile report: every kernel the op launches compiles for H100, and the committed
report describes the kernels as they are.

Runs without a GPU: ``python -m benchmarks.compile_report --quick`` compiles ahead of time with
Triton's NVIDIA backend (nothing is launched). In a subprocess, because this test process
decorated the kernels for the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.compile_report import kernels_hash, problems

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "compile-sm90.json"
HALF = ("bfloat16", "float16")
RECORD_KEYS = {"kernel": str, "shape": dict, "stride": int, "dtype": str, "config": dict, "kept": bool,
               "registers": int, "spill_bytes": int, "shared_bytes": int, "ctas_per_sm": int, "mma": str,
               "loads": str}
# kernels the interpreter launches and the GPU path never does, and why
INTERPRETER_ONLY = {"_bn_relu_bwd_kernel": "dz is written to memory only under the interpreter (TILES.materialize_dz)"}


def _nvidia_backend_available():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


needs_nvidia_backend = pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend here")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compile-sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--quick", "--out-dir", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert (out_dir / "compile-sm90.md").read_text().startswith("# ")
    return json.loads((out_dir / "compile-sm90.json").read_text())


def _usable_kept(records):
    """(kernel, arch, stage, dtype) of half-precision records -> whether a kept config of it
    compiled without spilling and within shared memory."""
    groups = {}
    for r in records:
        if r["dtype"] in HALF:
            key = (r["kernel"], r["shape"]["arch"], r["shape"]["stage"], r["dtype"])
            ok = r["kept"] and r["error"] is None and r["spill_bytes"] == 0 and not r["over_shared"]
            groups[key] = groups.get(key, False) or ok
    return groups


def _launched_kernels(device):
    """Names of the Triton kernels the op launches here (interpreter or GPU) in every mode."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import kernels.grouped_conv_bn_relu as op

    names = set()
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def recording(cls):
        def run(self, *args, **kwargs):
            names.add(self.fn.__name__)
            return originals[cls](self, *args, **kwargs)
        return run

    try:
        for cls in originals:
            cls.run = recording(cls)
        for stride in (1, 2):
            for training, grad in ((False, False), (True, True), (True, False), (False, True)):
                x = torch.randn(2, 16, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
                w = torch.randn(16, 4, 3, 3, device=device)
                gamma, beta = torch.ones(16, device=device), torch.zeros(16, device=device)
                for t in (x, w, gamma, beta):
                    t.requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    y = op.grouped_conv_bn_relu(x, w, gamma, beta, torch.zeros(16, device=device),
                                                torch.ones(16, device=device), stride=stride, groups=4,
                                                training=training)
                    if grad:
                        y.sum().backward()
    finally:
        for cls, run in originals.items():
            cls.run = run
    return names


@needs_nvidia_backend
def test_quick_report_schema(quick_report):
    meta, records = quick_report["meta"], quick_report["records"]
    assert meta["kernels_hash"] == kernels_hash() and meta["triton"]
    assert records
    for r in records:
        assert r["error"] is None or not r["kept"], r
        if r["error"] is not None:
            continue
        for key, kind in RECORD_KEYS.items():
            assert isinstance(r[key], kind), (key, r)
        assert set(r["shape"]) == {"arch", "stage", "N", "C", "H", "W", "groups"}
        assert r["mma"] in ("wgmma", "mma.sync", "none")
        assert {"num_warps", "num_stages"} <= set(r["config"])
    assert {r["dtype"] for r in records} == set(HALF)
    assert {r["stride"] for r in records} == {1, 2}


@needs_nvidia_backend
def test_quick_report_has_every_kernel_the_op_launches(quick_report, device):
    compiled = {r["kernel"] for r in quick_report["records"]}
    launched = _launched_kernels(device) - set(INTERPRETER_ONLY)
    assert launched <= compiled, f"launched but not in the compile report: {sorted(launched - compiled)}"


@needs_nvidia_backend
def test_half_precision_kernels_have_a_kept_spill_free_config(quick_report):
    bad = [k for k, ok in _usable_kept(quick_report["records"]).items() if not ok]
    assert not bad, f"no kept config without spills within shared memory: {bad}"


def test_kept_config_over_shared_memory_fails_the_run():
    shape = {"arch": "resnext50_32x4d", "stage": "stage1"}
    rec = dict(kernel="_k", shape=shape, dtype="bfloat16", config={"BLOCK_M": 256, "num_warps": 8, "num_stages": 3},
               kept=True, error=None, over_shared=True, shared_bytes=240_000)
    assert problems([rec], []) and problems([dict(rec, over_shared=False, error="PTXASError: ...")], [])
    assert not problems([dict(rec, kept=False)], [])  # autotuning never launches a pruned config
    assert not problems([dict(rec, over_shared=False)], [])


def test_committed_report_is_fresh():
    """The committed report was generated from kernels/ as it is: regenerate it with
    ``python -m benchmarks.compile_report`` whenever kernels/ changes."""
    assert COMMITTED.exists(), "run python -m benchmarks.compile_report and commit benchmarks/results/compile-sm90.*"
    meta = json.loads(COMMITTED.read_text())["meta"]
    assert meta["kernels_hash"] == kernels_hash(), (
        "benchmarks/results/compile-sm90.json is stale: kernels/ changed since it was generated; "
        "run python -m benchmarks.compile_report and commit the result")


def test_committed_report_covers_every_shape_with_usable_configs():
    report = json.loads(COMMITTED.read_text())
    assert not report["meta"]["quick"] and not report["meta"]["failures"]
    records = report["records"]
    assert {r["dtype"] for r in records} == {"bfloat16", "float16", "float32"}
    assert not [r for r in records if r["kept"] and (r["error"] or r["over_shared"])]
    bad = [k for k, ok in _usable_kept(records).items() if not ok]
    assert not bad, f"no kept config without spills within shared memory: {bad}"


COMMITTED_BLOCKS = COMMITTED.with_name("compile-sm90-blocks.json")


def test_committed_block_report_is_fresh_and_usable():
    """``python -m benchmarks.compile_report --blocks``: every kernel of the fused bottleneck
    (kernels/bottleneck.py) compiled at every stage; generated from kernels/ as it is, no kept
    config failing or over shared memory, and a kept spill-free config for every half-precision
    (kernel, shape)."""
    assert COMMITTED_BLOCKS.exists(), ("run python -m benchmarks.compile_report --blocks and commit "
                                       "benchmarks/results/compile-sm90-blocks.*")
    report = json.loads(COMMITTED_BLOCKS.read_text())
    assert report["meta"]["blocks"] and not report["meta"]["failures"]
    assert report["meta"]["kernels_hash"] == kernels_hash(), (
        "compile-sm90-blocks.json is stale: run python -m benchmarks.compile_report --blocks")
    records = report["records"]
    launched = {r["kernel"] for r in records}
    assert {"_conv1x1_kernel", "_dgrad_kernel", "_wgrad_kernel", "_tail_fwd_kernel", "_tail_bwd_kernel",
            "_fwd_kernel", "_bwd_dx_kernel", "_bwd_dw_kernel"} <= launched
    assert not [r for r in records if r["kept"] and (r["error"] or r["over_shared"])]
    bad = [k for k, ok in _usable_kept(records).items() if not ok]
    assert not bad, f"no kept config without spills within shared memory: {bad}"
