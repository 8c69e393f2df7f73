"""The sm_90 compile report: every kernel the op launches compiles for H100, and the committed
reports describe the kernels as they are, compiled by this machine's Triton (3.9) and by the GPU
machine's (3.6).

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

from benchmarks.compile_report import kernels_hash, problems, report_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the GPU machine's Triton, and this machine's: a report of each is committed
TRITONS = ("3.6", "3.9")
HALF = ("bfloat16", "float16")
RECORD_KEYS = {"kernel": str, "shape": dict, "stride": int, "dtype": str, "config": dict, "kept": bool,
               "chosen": bool, "compile_s": float, "registers": int, "spill_bytes": int, "shared_bytes": int,
               "ctas_per_sm": int, "mma": str, "loads": str}


def committed(version, blocks=False):
    """The committed report (meta, records) of one Triton version."""
    path = RESULTS / f"{report_name(blocks, version)}.json"
    assert path.exists(), (f"run python -m benchmarks.compile_report{' --blocks' if blocks else ''} --cold under "
                           f"triton {version} and commit benchmarks/results/{path.stem}.*")
    report = json.loads(path.read_text())
    return report["meta"], report["records"]
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
    name = report_name()
    assert (out_dir / f"{name}.md").read_text().startswith("# ")
    return json.loads((out_dir / f"{name}.json").read_text())


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


@pytest.mark.parametrize("blocks", [False, True], ids=["op", "blocks"])
@pytest.mark.parametrize("version", TRITONS)
def test_committed_reports_are_fresh_and_usable(version, blocks):
    """Each committed report was generated from kernels/ as it is (regenerate both with
    ``python -m benchmarks.compile_report [--blocks] --cold`` under each Triton whenever kernels/
    changes), over every shape and dtype, cold; no kept config fails or overflows shared memory;
    every half-precision (kernel, shape) has a kept spill-free config, and the config the GPU
    launches without benchmarking (``chosen``) compiles, fits and does not spill."""
    meta, records = committed(version, blocks)
    assert meta["triton"].startswith(version + "."), meta["triton"]
    assert meta["kernels_hash"] == kernels_hash(), (
        f"{report_name(blocks, version)}.json is stale: kernels/ changed since it was generated")
    assert not meta["quick"] and not meta["failures"] and meta["blocks"] == blocks
    assert {r["dtype"] for r in records} == {"bfloat16", "float16", "float32"}
    assert {r["stride"] for r in records} == {1, 2}
    assert not [r for r in records if r["kept"] and (r["error"] or r["over_shared"])]
    bad = [k for k, ok in _usable_kept(records).items() if not ok]
    assert not bad, f"no kept config without spills within shared memory: {bad}"
    chosen_bad = [(r["kernel"], r["shape"]["stage"], r["dtype"], r["config"]) for r in records
                  if r["chosen"] and r["dtype"] in HALF and (r["error"] or r["over_shared"] or r["spill_bytes"])]
    assert not chosen_bad, f"launched without benchmarking but spills, overflows or fails: {chosen_bad[:5]}"
    if blocks:
        assert {"_conv1x1_kernel", "_dgrad_kernel", "_wgrad_kernel", "_tail_fwd_kernel", "_tail_bwd_kernel",
                "_fwd_kernel", "_bwd_dx_kernel", "_bwd_dw_kernel"} <= {r["kernel"] for r in records}


@pytest.mark.parametrize("blocks", [False, True], ids=["op", "blocks"])
def test_what_compiles_under_39_compiles_under_36(blocks):
    """Every (kernel, variant, stride) that compiles for sm_90 under triton 3.9 compiles under 3.6
    too, with a kept bfloat16 config that neither spills nor overflows shared memory."""
    def usable(records):
        out = {}
        for r in records:
            if r["dtype"] == "bfloat16":
                key = (r["kernel"], r["variant"], r["shape"]["arch"], r["shape"]["stage"], r["stride"])
                ok = r["kept"] and not r["error"] and not r["over_shared"] and not r["spill_bytes"]
                out[key] = out.get(key, False) or ok
        return out

    new, old = usable(committed("3.9", blocks)[1]), usable(committed("3.6", blocks)[1])
    missing = [k for k, ok in new.items() if ok and not old.get(k)]
    assert not missing, f"compiles under triton 3.9 but not (usably) under 3.6: {missing[:5]}"
