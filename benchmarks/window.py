"""A lent GPU's window: the steps one device call runs, each within its own cap, and the plan that
says beforehand whether they fit.

    bash benchmarks/gpu_session.sh window             # python -m benchmarks.window run window
    bash benchmarks/gpu_session.sh window --dry-run   # python -m benchmarks.window plan window (any machine)
    bash benchmarks/gpu_session.sh window2            # what did not fit: resnext101_32x8d, torch.compile, ncu

A GPU is lent for 15 minutes of device time all told, a fresh machine's start (1-2 minutes)
included, at most 10 minutes per call; ``window`` is planned for 8 minutes of wall time, ``window2``
for the 4.5 that a second call may have (BUDGETS).
Steps run in order, each a subprocess under its cap (SIGINT at the cap: pytest-benchmark still
writes what finished); a step that would start with too little time left is skipped. After each
step ``$OUT`` holds (the device tool brings back at most 8 files): ``window.log`` (a line per step:
status, seconds, new files in Triton's cache, i.e. kernels compiled in that step), ``window.tar.gz``
(every step's log and JSON so far), and as soon as they exist ``<gpu>-tests.txt`` (the smoke suite,
headed by the versions), the tuned table ``<GPU>.json`` and the report ``<gpu>.{json,md,png}``.

The plan (``plan``, or ``--dry-run``) needs no GPU. Per step it counts the kernel compiles the step
needs that no earlier step made (distinct specialisation x config, from the committed compile
report of the GPU machine's Triton: ``benchmarks/results/compile-sm90[-blocks]-triton3.6.json``,
whose ``chosen`` records are what ``kernels.configs`` launches without benchmarking and whose
``compile_s`` were measured here, cold), the autotune benchmark runs (0: tables and heuristics;
``benchmarks.tune`` times each kept config of each key), and estimates its seconds from
COSTS (process start, the benchmarks' repetitions times a call's time from the last GPU results or
the roofline, compiles divided over the precompile's processes). Its last line is ``window plan: N
compiles, M benchmark runs, estimated T s (budget 480 s)``; it exits 1 when T is over the budget.
The estimate is a model, not a measurement: ``window.log`` of a real run says what each step took.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.precompile import BLOCK_MODES, OP_MODES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = {"window": 480, "window2": 270}
GPU_TRITON = "3.6"  # the GPU machine's Triton: its compile reports are the plan's
ARCH = "resnext50_32x4d"
PY = [sys.executable]

# the cost model of the plan, in seconds (measured where a source is given, else a stated guess)
COSTS = {
    "python_torch_start": 8.0,  # import torch + triton + the kernels, CUDA context (guess, GPU machine)
    "pytest_start": 15.0,  # python_torch_start + collecting ~400 benchmark cases + copy bandwidth (guess)
    "compile_default_s": 1.0,  # a compile whose report time is not cold (guess from cold runs here)
    "precompile_jobs": 16,  # the GPU machine's cores
    "sleep_ms": 1.0,  # test_block_bench.SLEEP_CYCLES at ~2 GHz
    "flush_ms": 0.15,  # zeroing 256 MB of L2 flush buffer
    "calls_per_variant": 3 + 100 + 22,  # warm-up, gpu_time_ms, pedantic rounds + warm-up
    "profile_s": 0.5,  # 3 profiled calls of a fused case (torch.profiler start/stop)
    "model_steps": 3 + 1 + 15,  # WARMUP_STEPS, pedantic warm-up, ROUNDS
    "model_build_s": 6.0,  # create_model, .cuda(), cudnn.benchmark's search at the first steps (guess)
    "host_ms_per_fused_block": 1.0,  # host time per fused bottleneck or op call in a step (guess; issue 26)
    "tune_bench_s": 0.05,  # do_bench(warmup=3 ms, rep=15 ms) + launch overhead per config
    "report_s": 10.0,
    "smoke_gpu_s": 15.0,  # the smoke tests' own GPU and reference work, beyond start and compiles (guess)
    "copy_gbps": 4300.0,  # H200 device-to-device copy, measured (shared/KERNEL-NOTES.md)
    "roofline_fraction": 0.3,  # where no GPU result says otherwise, a call reaches this of the copy bandwidth
}


@dataclass
class Step:
    """One step: a command (``{out}``, ``{budget}`` filled in), its cap, what the plan counts."""

    name: str
    cap_s: int
    argv: list
    compiles: list = field(default_factory=list)  # (arch, dtypes, modes, which configs, parallel jobs or 0)
    cases: list = field(default_factory=list)  # ("block" | "bottleneck" | "model", arch, spec) for the estimate
    log: str = ""  # where its output goes under $OUT/raw (default <name>.log)
    fill: bool = False  # takes whatever time is left (the tuning)


PYTEST = PY + ["-m", "pytest", "-q", "-p", "no:cacheprovider"]


def _bench(name, module, cap, k, *extra, compiles=(), cases=()):
    return Step(name, cap, PYTEST + [f"benchmarks/{module}", "--benchmark-only", "-k", k, *extra,
                                     f"--benchmark-json={{out}}/raw/{name}.json"], list(compiles), list(cases))


PLANS = {
    "window": [
        Step("versions", 20, PY + ["-m", "benchmarks.window", "versions"]),
        Step("precompile", 60, PY + ["-m", "benchmarks.precompile", "--arch", ARCH, "--dtype", "bfloat16", "float16",
                                     "--jobs", "16"],
             compiles=[(ARCH, ("bfloat16", "float16"), OP_MODES + BLOCK_MODES, "chosen", 16)]),
        Step("smoke", 90, PYTEST + ["-m", "gpu_smoke", "-rs", "tests/"], log="tests.txt",
             compiles=[(ARCH, ("bfloat16", "float16"), ("inference", "train") + BLOCK_MODES, "chosen", 0)],
             cases=[("smoke", ARCH, None)]),
        _bench("blocks", "test_block_bench.py", 100,
               f"{ARCH} and bfloat16 and (inference or train_fwd_bwd) and not compile", "--bench-dtypes", "bfloat16",
               compiles=[(ARCH, ("bfloat16",), ("inference", "train"), "chosen", 0)],
               cases=[("block", ARCH, (("inference", "train_fwd_bwd"), ("cudnn", "fused")))]),
        _bench("bottleneck", "test_bottleneck_bench.py", 70, f"{ARCH} and train_fwd_bwd and not compile",
               compiles=[(ARCH, ("bfloat16",), ("train", "block_train"), "chosen", 0)],
               cases=[("bottleneck", ARCH, (("train_fwd_bwd",), ("cudnn", "fused_conv", "fused_block")))]),
        _bench("models-256", "test_model_bench.py", 70, f"{ARCH} and not compile", "--bench-batch", "256",
               compiles=[(ARCH, ("bfloat16",), ("inference", "train") + BLOCK_MODES, "chosen", 0)],
               cases=[("model", ARCH, (256, ("cudnn", "fused", "fused_block")))]),
        _bench("models-32", "test_model_bench.py", 60, f"{ARCH} and not compile", "--bench-batch", "32",
               cases=[("model", ARCH, (32, ("cudnn", "fused", "fused_block")))]),
        # the trainer at the seed recipe's batch, the step captured in a CUDA graph and not (img/s per run)
        Step("trainer-32", 60, ["bash", "-c", "for g in --cuda-graphs --no-cuda-graphs; do "
                                f"{PY[0]} -m resnext.train --synthetic --arch {ARCH} --amp bf16 --channels-last "
                                "--fused-kernels --batch-size 32 --epochs 1 --synthetic-samples 1280 --workers 4 "
                                "$g --out {out}/raw/train$g; tail -1 {out}/raw/train$g/metrics.jsonl; "
                                "rm -f {out}/raw/train$g/*.pt; done"],
             cases=[("trainer", ARCH, 2)]),
        Step("tune", 0, PY + ["-m", "benchmarks.tune", "--arch", ARCH, "--dtype", "bfloat16", "--budget-s", "{budget}",
                              "--out", "{out}/{table}"],
             compiles=[(ARCH, ("bfloat16",), OP_MODES + BLOCK_MODES, "kept", 16)], cases=[("tune", ARCH, None)],
             fill=True),
        Step("report", 20, PY + ["-m", "benchmarks.window", "report", "{out}"], cases=[("report", None, None)]),
    ],
    # the baselines the goals are judged against that window leaves out, then what else fits
    "window2": [
        _bench("compile-models", "test_model_bench.py", 110, f"{ARCH} and train and compile", "--bench-batch", "256",
               cases=[("model", ARCH, (256, ("compile",)), ("train",))]),
        _bench("compile-bottleneck", "test_bottleneck_bench.py", 90, f"{ARCH} and train_fwd_bwd and compile and stage1",
               cases=[("bottleneck", ARCH, (("train_fwd_bwd",), ("compile",)), ("stage1",))]),
        _bench("blocks-regnety", "test_block_bench.py", 80,
               "regnety and bfloat16 and (inference or train_fwd_bwd) and not compile", "--bench-dtypes", "bfloat16",
               cases=[("block", "regnety_016", (("inference", "train_fwd_bwd"), ("cudnn", "fused"))),
                      ("block", "regnety_160", (("inference", "train_fwd_bwd"), ("cudnn", "fused")))]),
        Step("profile", 0, ["bash", "benchmarks/gpu_session.sh", "profile", "1", "1"], cases=[("profile", None, None)],
             fill=True),
        Step("report", 20, PY + ["-m", "benchmarks.window", "report", "{out}"], cases=[("report", None, None)]),
    ],
}
# a step that would get less than this (or than its own cap, if smaller) is skipped; the report's cap
# is kept for it to the end
MIN_STEP_S = 10


# ---------------------------------------------------------------------------------------------
# the plan


def _report(blocks):
    from benchmarks.compile_report import report_name

    path = RESULTS / f"{report_name(blocks, GPU_TRITON)}.json"
    if not path.exists():
        raise SystemExit(f"error: {path.relative_to(ROOT)} is missing: the plan counts compiles from the GPU "
                         f"machine's compile report (python -m benchmarks.compile_report [--blocks] --cold under "
                         f"triton {GPU_TRITON})")
    report = json.loads(path.read_text())
    return report["meta"], report["records"]


def compile_units(records, cold, arch, dtypes, modes, which):
    """{unit: (seconds, autotuned)} of the compiles ``which`` configs ("chosen", "kept") need: one per
    distinct (kernel, dtype, constexprs, specialisation, config)."""
    units = {}
    for r in records:
        if r["shape"]["arch"] != arch or r["dtype"] not in dtypes or not set(r["modes"]) & set(modes):
            continue
        if not (r["chosen"] if which == "chosen" else r["kept"]) or r["error"]:
            continue
        key = (r["kernel"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True),
               json.dumps(r["specialization"], sort_keys=True), json.dumps(r["config"], sort_keys=True))
        # the same kernel compiled once per run: the other records of it found it in the cache (~0 s)
        seconds = r.get("compile_s") if cold and r.get("compile_s") else COSTS["compile_default_s"]
        units[key] = (max(seconds, units.get(key, (0.0,))[0]), r["autotuned"])
    return units


def _call_ms(kind, arch, stage_or_shape, mode, provider, gpu_results):
    """A call's GPU time: the last GPU results' where they have the case, else the roofline's."""
    import torch

    from benchmarks.shapes import min_bytes
    from benchmarks.test_bottleneck_bench import flops_and_bytes

    if kind == "block":
        shape = stage_or_shape
        for r in gpu_results:
            if r["op"] == "block" and (r["arch"], r["stage"], r["stride"], r["mode"], r["provider"]) == (
                    arch, shape.stage, shape.stride, mode, provider):
                return r["median_ms"]
        nbytes = min_bytes(shape, 256, torch.bfloat16, mode)
    else:
        nbytes = flops_and_bytes(stage_or_shape, 256, mode)[1]
    return nbytes / (COSTS["copy_gbps"] * 1e9 * COSTS["roofline_fraction"]) * 1e3


def case_seconds(kind, arch, spec, gpu_results, tune_runs=0, only=None):
    """Seconds of the benchmark work of one step's cases (not counting process start and compiles);
    ``only``: the model modes, or the bottleneck stages (``stage1``), its ``-k`` keeps."""
    from benchmarks.shapes import ARCHS, block_shapes, bottleneck_shapes, regnet_shapes

    c = COSTS
    if kind == "block":
        modes, providers = spec
        total = 0.0
        for shape in block_shapes(arch) if arch in ARCHS else regnet_shapes(arch):
            for mode in modes:
                for provider in providers:
                    variants = 1 if provider == "compile" else 4 if (provider, mode) == ("cudnn", "inference") else 2
                    call = _call_ms(kind, arch, shape, mode, provider, gpu_results)
                    total += variants * c["calls_per_variant"] * (c["sleep_ms"] + c["flush_ms"] + call) / 1e3
                    total += c["profile_s"] if provider == "fused" else 0.0
                    total += 20.0 if provider == "compile" else 0.0  # Inductor compiling the module (guess)
        return total
    if kind == "bottleneck":
        modes, providers = spec
        total = 0.0
        for s in (s for s in bottleneck_shapes() if s[0] == arch and (not only or f"stage{s[1]}" in only)):
            for mode in modes:
                call = _call_ms(kind, arch, s, mode, None, gpu_results)
                for provider in providers:
                    variants = 2 if provider == "cudnn" else 1
                    total += variants * c["calls_per_variant"] * (c["sleep_ms"] + c["flush_ms"] + call) / 1e3
                    total += 30.0 if provider == "compile" else 0.0
        return total
    if kind == "model":
        batch, providers = spec
        rates = {(r["mode"], r["provider"]): r["images_per_s"] for r in gpu_results if r["op"] == "model"}
        total = 0.0
        for mode in only or ("inference", "train"):
            for provider in providers:
                default = 3000.0 if mode == "train" else 10000.0  # images/s, H100 eager, batch 256
                rate = rates.get((mode, provider)) or rates.get((mode, "cudnn")) or default
                gpu_s = batch / rate
                host_s = 16 * c["host_ms_per_fused_block"] / 1e3 if provider != "cudnn" else 0.0
                total += c["model_build_s"] + c["model_steps"] * max(gpu_s, host_s)
                total += 60.0 if provider == "compile" else 0.0
        return total
    if kind == "tune":
        return tune_runs * c["tune_bench_s"]
    if kind == "trainer":  # runs of 40 steps of 32 images, host-bound: build, warm-up, steps
        return spec * (c["python_torch_start"] + c["model_build_s"] + 40 * 16 * c["host_ms_per_fused_block"] / 1e3)
    if kind == "smoke":
        return c["smoke_gpu_s"]
    if kind == "profile":
        return 60.0
    if kind == "report":
        return c["report_s"]
    raise ValueError(kind)


def plan(name, out=None):
    """Print the plan of ``name``'s steps; returns (compiles, benchmark runs, estimated seconds)."""
    out = out or sys.stdout
    op_meta, op_records = _report(False)
    block_meta, block_records = _report(True)
    records = op_records + block_records
    cold = op_meta.get("cold_cache") and block_meta.get("cold_cache")
    gpu_json = sorted(RESULTS.glob("nvidia-*.json"))
    gpu_results = json.loads(gpu_json[-1].read_text())["records"] if gpu_json else []
    compiled, total_compiles, total_runs, total_s, notes = set(), 0, 0, 0.0, []
    print(f"# {name}: planned from {'cold' if cold else 'NOT cold (compile_s guessed)'} compile reports of triton "
          f"{op_meta['triton']}, GPU call times from {gpu_json[-1].name if gpu_json else 'the roofline'}", file=out)
    print(f"{'step':<20} {'cap s':>6} {'compiles':>9} {'bench runs':>10} {'est. s':>7}", file=out)
    rows = []
    for step in PLANS[name]:
        new_units, runs, seconds = {}, 0, 0.0
        for arch, dtypes, modes, which, jobs in step.compiles:
            units = compile_units(records, cold, arch, dtypes, modes, which)
            fresh = {k: v for k, v in units.items() if k not in compiled}
            if which == "kept":  # tuning times every kept config of each autotuned kernel's key
                runs += sum(1 for _, autotuned in units.values() if autotuned)
            compile_s = sum(seconds for seconds, _ in fresh.values())
            seconds += (COSTS["python_torch_start"] + compile_s / jobs) if jobs else compile_s
            new_units.update(fresh)
            compiled.update(fresh)
        if step.argv[:len(PYTEST)] == PYTEST:
            seconds += COSTS["pytest_start"]
        elif step.name not in ("versions",):
            seconds += COSTS["python_torch_start"] if not step.compiles else 0.0
        for kind, arch, spec, *only in step.cases:
            seconds += case_seconds(kind, arch, spec, gpu_results, runs, *only)
            if kind == "block" and arch not in op_meta["archs"]:
                notes.append(f"# {step.name}: {arch} is not in the compile reports: its compiles are not counted")
        rows.append((step, len(new_units), runs, max(seconds, 2.0)))
    # a fill step gets what the others leave (its tuning stops at its budget): planned at the lesser
    left = BUDGETS[name] - sum(seconds for step, _, _, seconds in rows if not step.fill)
    for step, compiles, runs, seconds in rows:
        note = ""
        if step.fill:
            note = f"  (needs ~{seconds:.0f}, gets what is left)" if seconds > max(left, 0) else ""
            seconds = min(seconds, max(left, 0.0))
            left -= seconds
        total_compiles += compiles
        total_runs += runs
        total_s += seconds
        cap = "fill" if step.fill else str(step.cap_s)
        print(f"{step.name:<20} {cap:>6} {compiles:>9} {runs:>10} {seconds:>7.0f}{note}", file=out)
    for note in dict.fromkeys(notes):
        print(note, file=out)
    print(f"{name} plan: {total_compiles} compiles, {total_runs} benchmark runs, estimated {total_s:.0f} s "
          f"(budget {BUDGETS[name]} s)", file=out)
    return total_compiles, total_runs, total_s


# ---------------------------------------------------------------------------------------------
# running it on the GPU machine


def versions_text():
    import platform

    import torch
    import triton

    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if _has("nvidia-smi") else ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"{smi}\ntorch {torch.__version__} (CUDA {torch.version.cuda}), cuDNN {cudnn}, "
            f"triton {triton.__version__}, "
            f"python {platform.python_version()}, GPU {gpu}, commit {os.environ.get('RESNEXT_GIT_SHA', 'unknown')}\n")


def _has(cmd):
    from shutil import which

    return which(cmd) is not None


def _cache_files():
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in cache.rglob("*.cubin")) if cache.is_dir() else 0


def _pack(out):
    """``window.tar.gz``: every step's output so far (written aside, then moved in: a call cut off
    mid-write still returns the previous one)."""
    tmp = out / ".window.tar.gz"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out / "raw", arcname="raw")
    tmp.replace(out / "window.tar.gz")


def run(name, out):
    """Run ``name``'s steps under their caps within BUDGETS[name]; see the module docstring."""
    from benchmarks.report import gpu_slug

    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # OUT for the steps is raw/: everything a step writes goes into the tarball, not beside it
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OUT=str(out / "raw"))
    env.pop("TRITON_INTERPRET", None)
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001  (the versions step says what is wrong)
        gpu = "cpu"
    from kernels.configs import table_name

    slug, table = gpu_slug(gpu), f"{table_name(gpu)}.json"
    log = open(out / "window.log", "a")
    steps = PLANS[name]
    reserve = next((s.cap_s for s in steps if s.name == "report"), 0)
    for step in steps:
        if step.name == "report":  # its cap was held back from the others: a late or slow-to-stop step
            cap = step.cap_s       # (SIGINT's grace) must not cost the window its report
        else:
            left = BUDGETS[name] - (time.perf_counter() - start) - reserve
            cap = int(left) if step.fill else int(min(step.cap_s, left))
            if cap < (MIN_STEP_S if step.fill else min(MIN_STEP_S, step.cap_s)):
                print(f"{step.name}: skipped, {left:.0f} s left", file=log, flush=True)
                continue
        argv = [a.format(out=out, budget=max(1, cap - 15), table=table) for a in step.argv]
        target = out / "raw" / (step.log or f"{step.name}.log")
        before, t0 = _cache_files(), time.perf_counter()
        with open(target, "w") as f:
            if step.name == "smoke":
                f.write(versions_text() + "\n")
                f.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # pytest and pytest-benchmark still write what finished
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                rc = f"cut at {cap} s (rc {rc})"
        print(f"{step.name}: {rc}, {time.perf_counter() - t0:.0f} s, triton cache +{_cache_files() - before} cubins",
              file=log, flush=True)
        if step.name == "smoke":
            (out / f"{slug}-tests.txt").write_text(target.read_text())
        _pack(out)
    print(f"{name}: {time.perf_counter() - start:.0f} s of {BUDGETS[name]}", file=log, flush=True)
    log.close()
    return 0


def report(out):
    """The report of every benchmark JSON under ``out/raw``, written to ``out``."""
    from benchmarks import report as rep

    jsons = sorted(str(p) for p in Path(out, "raw").glob("*.json"))
    if not jsons:
        print("report: no benchmark JSON to report", file=sys.stderr)
        return 1
    return rep.main([*jsons, "--out-dir", str(out)]) or 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("plan", "run"):
        p = sub.add_parser(command)
        p.add_argument("window", choices=tuple(PLANS))
    sub.add_parser("versions")
    sub.add_parser("report").add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "plan":
        _, _, seconds = plan(args.window)
        return 1 if seconds > BUDGETS[args.window] else 0
    if args.command == "run":
        return run(args.window, os.environ.get("OUT") or RESULTS / "raw" / args.window)
    if args.command == "versions":
        print(versions_text())
        return 0
    return report(args.out)


if __name__ == "__main__":
    sys.exit(main())
