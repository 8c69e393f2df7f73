"""Compile every kernel the op launches for sm_90 (H100) without a GPU, and report what came out.

Triton's NVIDIA backend and its bundled ptxas compile ahead of time on any machine. This runs the
public op on CPU tensors of ResNeXt's real grouped-conv shapes in every mode (inference, training
forward + backward, training under no_grad, frozen BatchNorm with grad) and turns each kernel
launch into a compile with the JIT's own specialisation for that launch; autotuned kernels
compile every shipped config (``benchmarks/_aot.py`` has the hooks). Nothing is launched::

    python -m benchmarks.compile_report                   # everything, ~10 min on 2 cores cold
    python -m benchmarks.compile_report --quick           # 2 shapes, bfloat16 + float16 (the test)
    python -m benchmarks.compile_report --dtype bfloat16 --arch resnext50_32x4d --batch 64
    python -m benchmarks.compile_report --blocks --cold   # the fused bottleneck's kernels, cold compile times

Writes ``compile-sm90-triton<X.Y>.json`` (``{"meta": {"triton", "kernels_hash", ...}, "records":
[...]}``, one record per compiled kernel) and the ``.md`` beside it for reviewers, ``-blocks`` in the
name with ``--blocks``; X.Y is the Triton that compiled, so that the reports of the GPU machine's
Triton (3.6: run this under it, e.g. from a venv with ``triton==3.6.0``) and of this machine's sit
side by side. Regenerate whenever ``kernels/`` changes: ``kernels_hash`` (sha256 of
``kernels/**/*.py`` in sorted path order) is how a test tells a stale report. Each record says
whether autotuning keeps its config (``kept``), whether ``kernels.configs`` launches it on the GPU
machine without benchmarking (``chosen``: its tables, else the heuristic) and how long it took
(``compile_s``; ``--cold`` compiles into an empty Triton cache, so that these are what a fresh GPU
machine pays: ``benchmarks/window.py`` plans with them). Exits 1 when a config autotuning keeps
overflows shared memory or fails to compile, or the op fails in some mode.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.shapes import ARCHS, block_shapes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "compile-sm90"


def report_name(blocks=False, triton_version=None):
    """``compile-sm90[-blocks]-triton<major.minor>``: the file stem of a report."""
    version = ".".join(re.findall(r"\d+", triton_version or metadata.version("triton"))[:2])
    return f"{NAME}{'-blocks' if blocks else ''}-triton{version}"


DTYPES = ("bfloat16", "float16", "float32")
# narrowest groups at stride 1 and widest groups at stride 2: the extremes of tiles and paths
QUICK_SHAPES = (("resnext50_32x4d", "stage1"), ("resnext101_32x8d", "stage4/s2"))
QUICK_DTYPES = ("bfloat16", "float16")


def kernels_hash(root=ROOT):
    """sha256 of the bytes of ``kernels/**/*.py`` concatenated in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted((Path(root) / "kernels").rglob("*.py"), key=lambda p: p.as_posix()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


BLOCK_MODES = ("block_inference", "block_train")


def _job(shape, batch, dtype, blocks=False):
    from benchmarks import _aot  # heavy (torch, triton, the kernels): only in the workers

    start = time.perf_counter()
    records, failures = _aot.run_job(shape, batch, dtype, **({"modes": BLOCK_MODES} if blocks else {}))
    return records, [dict(f, shape=shape.id, dtype=dtype) for f in failures], time.perf_counter() - start


_LIMITER = {"registers": "regs", "shared": "smem", "threads": "threads", "ctas": "max CTAs"}


def config_label(config):
    """``M128 w4 s3`` for {"BLOCK_M": 128, "num_warps": 4, "num_stages": 3}."""
    parts = []
    for k, v in config.items():
        if k == "num_warps":
            parts.append(f"w{v}")
        elif k == "num_stages":
            parts.append(f"s{v}")
        else:
            parts.append(f"{k.removeprefix('BLOCK_')}{v}")
    return " ".join(parts)


def add_variants(records):
    """``variant``: the constexprs (outside the config) that tell apart the launches of one kernel
    at one shape and dtype, e.g. ``STORE=1 COMPUTE_STATS=True``; empty when there is one kind."""
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["shape"]["arch"], r["shape"]["stage"], r["dtype"]), []).append(r)
    for recs in groups.values():
        keys = sorted({k for r in recs for k in r["constexprs"]} - {k for r in recs for k in r["config"]})
        varying = [k for k in keys if len({json.dumps(r["constexprs"].get(k)) for r in recs}) > 1]
        for r in recs:
            r["variant"] = " ".join(f"{k}={r['constexprs'].get(k)}" for k in varying)


def usable(r):
    """A config that compiled, fits shared memory and does not spill."""
    return r["error"] is None and not r["over_shared"] and r["spill_bytes"] == 0


def best(recs):
    """The kept config a reviewer looks at first: usable, then most resident warps per SM, then
    fewest registers (there are no timings here; the autotuner picks on the GPU)."""
    kept = [r for r in recs if r["kept"]] or recs
    return min(kept, key=lambda r: (not usable(r), -(r["ctas_per_sm"] or 0) * (r["config"].get("num_warps") or 0),
                                    r["registers"] or 0))


def problems(records, failures):
    """Lines that make the run fail: kept configs over shared memory or failing to compile, and
    modes in which the op itself failed."""
    out = [f"{f['shape']} {f['dtype']} {f['mode']}: the op failed: {f['error']}" for f in failures]
    for r in records:
        where = f"{r['kernel']} {r['shape']['arch']} {r['shape']['stage']} {r['dtype']} [{config_label(r['config'])}]"
        if r["kept"] and r["error"]:
            out.append(f"{where}: kept config failed to compile: {r['error']}")
        elif r["kept"] and r["over_shared"]:
            out.append(f"{where}: kept config needs {r['shared_bytes']:,} B of shared memory")
    return out


def write_json(path, meta, records):
    lines = ",\n".join("    " + json.dumps(r, sort_keys=False) for r in records)
    path.write_text('{\n  "meta": ' + json.dumps(meta) + ',\n  "records": [\n' + lines + "\n  ]\n}\n")


def _sort_key(r, order):
    return (order[(r["shape"]["arch"], r["shape"]["stage"])], DTYPES.index(r["dtype"]), r["kernel"], r["variant"],
            not r["kept"], json.dumps(r["config"]))


def write_markdown(path, meta, records, failures):
    what = "the fused bottleneck launches" if meta.get("blocks") else "the op launches"
    flags = "".join(f" {f}" for f in meta.get("flags", [])) or (" --quick" if meta["quick"] else "")
    fp32 = "in TF32 (torch.backends.cudnn.allow_tf32, on by default)" if meta["float32_tf32"] else "in IEEE float32"
    md = [f"# sm_90 compile report: every kernel {what}, compiled without a GPU", "",
          f"`python -m benchmarks.compile_report{flags}` with triton {meta['triton']} "
          f"for `{meta['target']}`, batch {meta['batch']}, {len(records)} compiles in {meta['runtime_s']:.0f} s; "
          f"float32 convs {fp32}. "
          f"kernels_hash `{meta['kernels_hash'][:16]}…`: stale when it differs from the hash of `kernels/**/*.py` "
          "(`tests/test_compile_sm90.py` checks).", "",
          "Each row is one kernel (and the constexpr variant that tells its launches apart) at one ResNeXt "
          "grouped-conv shape, with the *kept* config (autotuning's prune keeps it) that neither spills nor "
          "overflows shared memory and keeps the most warps resident; `kept` counts kept / compiled configs; "
          "`launched` is the config `kernels.configs` launches without benchmarking on the GPU machine. "
          "Registers and spills are ptxas' (`-v`); spill = spill stores + loads in bytes; CTAs/SM from "
          "registers, shared memory (+1 KiB reserved per CTA, 228 KiB per SM) and threads on an H100; loads: "
          "the global loads of tensors in the activation dtype (every tensor in float32), per pointer, traced "
          "from the PTX (`cp.async.cg` bypasses L1; `ld.global.b16` is a scalar 2-byte gather). Flags list "
          "kept configs that spill (`spill`), overflow shared memory (`SHARED`) or fail to compile (`ERROR`).", ""]
    issues = problems(records, failures)
    spills = [r for r in records if r["kept"] and r["error"] is None and r["spill_bytes"]]
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["shape"]["arch"], r["shape"]["stage"], r["dtype"]), []).append(r)
    unusable = [k for k, recs in groups.items() if k[3] != "float32" and not any(r["kept"] and usable(r) for r in recs)]
    md += ["## Findings", ""]
    md += [f"- **fails the run**: {p}" for p in issues] or ["- every kept config compiles within shared memory"]
    md += [f"- no kept, spill-free config within shared memory: {' '.join(k[:3])} {k[3]}" for k in unusable] or [
        "- every bfloat16/float16 (kernel, shape) has a kept config that neither spills nor overflows shared memory"]
    md += [f"- kept configs that spill: {len(spills)}"
           + (": " + ", ".join(sorted({f"{r['kernel']} {r['dtype']}" for r in spills})) if spills else ""), ""]
    md += ["## Kernels launched", "", "| kernel | variant | modes | configs kept / compiled |", "|---|---|---|---|"]
    seen = {}
    for r in records:
        entry = seen.setdefault((r["kernel"], r["variant"]), [set(), 0, 0])
        entry[0].update(r["modes"])
        entry[1] += r["kept"]
        entry[2] += 1
    for (kernel, variant), (modes, kept, total) in seen.items():
        md.append(f"| `{kernel}` | {variant or '-'} | {', '.join(sorted(modes))} | {kept} / {total} |")
    if meta.get("not_launched"):
        md += ["", f"Defined in `kernels/` but launched in no mode on the GPU path: "
               f"{', '.join(f'`{k}`' for k in meta['not_launched'])}."]
    for dtype in meta["dtypes"]:
        md += ["", f"## {dtype}", "",
               "| model | stage | kernel | variant | kept | config | regs | spill | shared KiB | CTAs/SM | mma | loads "
               "| launched | flags |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = {}
        for r in records:
            if r["dtype"] == dtype:
                rows.setdefault((r["shape"]["arch"], r["shape"]["stage"], r["kernel"], r["variant"]), []).append(r)
        # kernel by kernel, each down the shapes in network order
        for (arch, stage, kernel, variant), recs in sorted(
                rows.items(), key=lambda kv: (kv[0][2], kv[0][3], meta["shapes"].index(f"{kv[0][0]} {kv[0][1]}"))):
            b = best(recs)
            chosen = next((r for r in recs if r.get("chosen")), None)
            launched = "same" if chosen is b else config_label(chosen["config"]) if chosen else "-"
            flags = [f"spill {config_label(r['config'])} ({r['spill_bytes']} B)" for r in recs
                     if r["kept"] and not r["error"] and r["spill_bytes"]]
            flags += [f"SHARED {config_label(r['config'])}" for r in recs
                      if r["kept"] and not r["error"] and r["over_shared"]]
            flags += [f"ERROR {config_label(r['config'])}" for r in recs if r["kept"] and r["error"]]
            head = f"| {arch} | {stage} | `{kernel}` | {variant or '-'} | {sum(r['kept'] for r in recs)}/{len(recs)} "
            tail = f"| {launched} | {'; '.join(flags)} |"
            if b["error"]:
                md.append(f"{head}| {config_label(b['config'])} | | | | | | | {tail}")
                continue
            mma = b["mma"] + (" " + b["mma_shape"] if b["mma_shape"] else "")
            md.append(
                f"{head}| {config_label(b['config'])} | {b['registers']} | {b['spill_bytes']} "
                f"| {b['shared_bytes'] / 1024:.1f} | {b['ctas_per_sm']} ({_LIMITER[b['ctas_limited_by']]}) | {mma} "
                f"| {b['loads'].replace('_ptr', '') or '-'} {tail}")
    path.write_text("\n".join(md) + "\n")


def _defined_kernels():
    """Module-level Triton kernels of ``kernels/`` (named ``*_kernel``, the house style), found
    without importing them: their source's ``def`` lines under a Triton decorator."""
    names = set()
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        names.update(re.findall(r"@triton\.jit[^\n]*\ndef\s+(\w+_kernel)\s*\(", path.read_text()))
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: all three (--quick: bfloat16 float16)")
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHS), default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=256, help="N of the launches (default 256)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(' '.join(s) for s in QUICK_SHAPES)}, for the test")
    parser.add_argument("--blocks", action="store_true",
                        help="compile the whole fused bottleneck (kernels/bottleneck.py: the 1x1 GEMMs, the "
                             "tail, the grouped conv with its prologue) whose grouped conv has each shape, into "
                             f"{NAME}-blocks.{{json,md}}")
    parser.add_argument("--cold", action="store_true",
                        help="compile into an empty Triton cache (compile_s as on a fresh machine)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="compile processes (default: CPU count, at most 8; each may use ~2.5 GB)")
    args = parser.parse_args(argv)
    dtypes = args.dtype or (QUICK_DTYPES if args.quick else DTYPES)
    shapes = [s for s in block_shapes() if s.arch in args.arch]
    order = {(s.arch, s.label): i for i, s in enumerate(shapes)}
    if args.quick:
        shapes = [s for s in shapes if (s.arch, s.label) in QUICK_SHAPES]
    # widest groups first: their compiles are the slowest, so the pool ends evenly
    jobs = sorted(((s, d) for s in shapes for d in dtypes), key=lambda j: -j[0].channels_per_group)
    if args.cold:  # read by the spawned workers' Triton
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    start, source_hash = time.perf_counter(), kernels_hash()
    records, failures = [], []
    ctx = multiprocessing.get_context("spawn")  # fresh workers: nothing decorated for the interpreter
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs))), mp_context=ctx) as pool:
        futures = {pool.submit(_job, s, args.batch, d, args.blocks): (s, d) for s, d in jobs}
        for i, fut in enumerate(as_completed(futures), 1):
            (shape, dtype), (recs, fails, seconds) = futures[fut], fut.result()
            records += recs
            failures += fails
            print(f"[{i}/{len(jobs)}] {shape.arch} {shape.label} {dtype}: {len(recs)} compiles, "
                  f"{seconds:.0f} s{' FAILED: ' + str(fails) if fails else ''}", flush=True)
    runtime = time.perf_counter() - start
    add_variants(records)
    records.sort(key=lambda r: _sort_key(r, order))
    launched = {r["kernel"] for r in records}
    meta = {
        "triton": metadata.version("triton"), "torch": metadata.version("torch"), "kernels_hash": source_hash,
        "target": "cuda sm_90 (H100 SXM: 132 SMs, 64K registers and 228 KiB shared memory per SM, 227 KiB per CTA)",
        # the op's float32 convs use TF32 exactly when cuDNN would: PyTorch's default, here too
        "float32_tf32": torch.backends.cudnn.allow_tf32,
        "batch": args.batch, "dtypes": list(dtypes), "archs": list(args.arch), "quick": args.quick,
        "shapes": [f"{s.arch} {s.label}" for s in shapes], "not_launched": sorted(_defined_kernels() - launched),
        "failures": failures, "runtime_s": round(runtime, 1), "python": platform.python_version(),
        "blocks": args.blocks, "cold_cache": args.cold, "jobs": args.jobs,
        "flags": [a for a in (argv if argv is not None else sys.argv[1:])],
    }
    name = report_name(args.blocks)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / f"{name}.json", meta, records)
    write_markdown(args.out_dir / f"{name}.md", meta, records, failures)
    issues = problems(records, failures)
    if kernels_hash() != source_hash:
        issues.append("kernels/ changed during the run: run again")
    for line in issues:
        print("FAIL:", line)
    print(f"{len(records)} compiles ({sum(r['kept'] for r in records)} kept) of {len(launched)} kernels in "
          f"{runtime:.0f} s -> {args.out_dir / name}.{{json,md}}")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
