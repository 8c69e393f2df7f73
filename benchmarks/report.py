"""Turn a pytest-benchmark JSON into the results kept in the repository.

    PYTHONPATH=. pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    python -m benchmarks.report out.json [--out-dir benchmarks/results]

writes ``<gpu>.json`` (``{"meta": {...}, "records": [...]}``), ``<gpu>.md`` (goals, then tables)
and ``<gpu>.png`` (fused vs cudnn vs compile per stage), ``<gpu>`` being the GPU's name as a slug.

Where the numbers come from: a block's ``median_ms`` is the benchmark's ``extra_info["median_ms"]``
(median GPU time over per-call CUDA-event timings, L2 flushed, see ``test_block_bench.py``), and
TFLOP/s, GB/s and the roofline fraction are recomputed here from it with the ``flops``, ``bytes``
and ``copy_gbps`` the benchmark recorded. A model's ``images_per_s`` is ``batch`` divided by
pytest-benchmark's ``stats.median`` (seconds per step). Speedups are computed here, between records
of the same configuration. A fused block's ``kernels`` (GPU time per call of each kernel, from
torch.profiler after the timed calls) is carried over as recorded, slowest first.
"""

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.shapes import ARCHS, BOTTLENECK_MODES, MODES, block_shapes, bottleneck_shapes, throughput

BLOCK_KEYS = ("op", "arch", "stage", "shape", "groups", "stride", "dtype", "mode", "provider",
              "median_ms", "tflops", "gbps", "roofline")
KERNELS_KEY = "kernels"  # optional, after BLOCK_KEYS: {kernel name: ms per call}, fused blocks only
# batch: the one run (halved until it fits); bench_batch: the one asked for; host_ms: CPU time to enqueue a step
MODEL_KEYS = ("op", "arch", "mode", "batch", "dtype", "provider", "images_per_s", "bench_batch", "host_ms")
BOTTLENECK_KEYS = ("op", "arch", "stage", "stride", "inplanes", "planes", "groups", "dtype", "mode", "provider",
                   "layout", "median_ms", "tflops", "gbps", "roofline")
TOP_KERNELS = 3  # kernels named per fused block in the .md; the rest are summed
PROVIDERS = ("cudnn", "compile", "fused")  # blocks: the grouped conv + BN + ReLU alone
MODEL_PROVIDERS = PROVIDERS + ("fused_block",)  # fused: conv level; fused_block: whole bottlenecks
BOTTLENECK_PROVIDERS = ("cudnn", "compile", "fused_conv", "fused_block")
DTYPES = ("bfloat16", "float16", "float32")
GOAL_DTYPE = "bfloat16"
GOAL_ARCH = "resnext50_32x4d"
# the issue's goals, on bfloat16 at batch 256: {mode: least speedup over cudnn}
BLOCK_GOALS = {"inference": 2.0, "train_fwd_bwd": 1.3}
BLOCK_ROOFLINE_GOAL = 0.60
# GOAL_ARCH's images/s, the faster fused level (conv or whole block) over a baseline, at every batch run
MODEL_GOALS = {("inference", "cudnn"): 1.5, ("train", "cudnn"): 1.3, ("train", "compile"): 1.1}
# the fused-bottleneck issue's goals: fused_block's least speedup over a baseline at every GOAL_ARCH
# bottleneck, and GOAL_ARCH's images/s with every bottleneck fused
BOTTLENECK_GOALS = {("train_fwd_bwd", "cudnn"): 1.5, ("train_fwd_bwd", "compile"): 1.2, ("inference", "cudnn"): 1.5}


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


class ReportError(Exception):
    """An input the report cannot use; ``main`` prints it as one ``error:`` line and exits 2."""


def load(path) -> dict:
    """A pytest-benchmark JSON; ReportError naming the file and what is wrong with it."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:  # missing, a directory, unreadable, not text
        raise ReportError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    if not text.strip():
        raise ReportError(f"{path}: empty: no benchmark ran (no GPU?), nothing to report")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def records(data: dict) -> list[dict]:
    """One record per benchmark that carries ``extra_info["op"]``, in the results schema."""
    out = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if info.get("op") == "block":
            rec = {k: info[k] for k in BLOCK_KEYS if k not in ("tflops", "gbps", "roofline")}
            rec["shape"] = list(rec["shape"])
            rec.update(throughput(info["flops"], info["bytes"], rec["median_ms"], info.get("copy_gbps")))
            if info.get(KERNELS_KEY):
                rec[KERNELS_KEY] = dict(sorted(info[KERNELS_KEY].items(), key=lambda kv: (-kv[1], kv[0])))
            out.append({k: rec[k] for k in (*BLOCK_KEYS, KERNELS_KEY) if k in rec})
        elif info.get("op") == "bottleneck":
            rec = {k: info.get(k) for k in BOTTLENECK_KEYS if k not in ("tflops", "gbps", "roofline")}
            rec.update(throughput(info["flops"], info["bytes"], rec["median_ms"], info.get("copy_gbps")))
            out.append({k: rec[k] for k in BOTTLENECK_KEYS})
        elif info.get("op") == "model":
            rec = {k: info.get(k) for k in MODEL_KEYS}
            rec["images_per_s"] = rec["batch"] / bench["stats"]["median"]
            rec["bench_batch"] = rec["bench_batch"] or rec["batch"]
            out.append(rec)
    order = {p: i for i, p in enumerate(PROVIDERS + ("fused_conv", "fused_block"))}
    out.sort(key=lambda r: (r["op"], r["arch"], r.get("dtype", ""), r["mode"], r.get("stage", 0),
                            r.get("stride", 0), order.get(r["provider"], 99)))
    return out


def meta(data: dict) -> dict:
    """GPU and library versions from the benchmarks' extra_info; commit and date from pytest-benchmark."""
    infos = [b.get("extra_info") or {} for b in data["benchmarks"]]
    first = next((i for i in infos if i.get("gpu")), {})
    commit = data.get("commit_info") or {}
    sha = commit.get("id")
    if sha and commit.get("dirty"):
        sha += "-dirty"
    sha = sha or first.get("git_sha")  # a tree copied without .git: the benchmarks recorded it
    return {
        "gpu": first.get("gpu") or (data.get("machine_info") or {}).get("node") or "unknown",
        "torch": first.get("torch"),
        "triton": first.get("triton"),
        "cudnn": first.get("cudnn"),
        "git_sha": sha,
        "date": data.get("datetime"),
    }


def copy_bandwidth(data: dict) -> float | None:
    return next((b["extra_info"]["copy_gbps"] for b in data["benchmarks"]
                 if (b.get("extra_info") or {}).get("copy_gbps")), None)


def _block_key(r):
    return (r["arch"], r["stage"], r["stride"], tuple(r["shape"]), r["groups"], r["dtype"], r["mode"])


def block_table(recs: list[dict]) -> dict:
    """``{(arch, stage, stride, shape, groups, dtype, mode): {provider: record}}``."""
    table = defaultdict(dict)
    for r in recs:
        if r["op"] == "block":
            table[_block_key(r)][r["provider"]] = r
    return table


def speedup(by_provider: dict, over: str, of: str = "fused") -> float | None:
    """How many times faster ``of`` is than ``over`` (time ratio; images/s ratio for models)."""
    a, b = by_provider.get(of), by_provider.get(over)
    if not a or not b:
        return None
    if "median_ms" in a:
        return b["median_ms"] / a["median_ms"]
    return a["images_per_s"] / b["images_per_s"]


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def block_summary(recs, dtype, mode, arch=None, over="cudnn"):
    """(geometric-mean speedup of fused over ``over``, lowest fused roofline fraction) for a mode."""
    rows = [v for k, v in block_table(recs).items()
            if k[5] == dtype and k[6] == mode and (arch is None or k[0] == arch)]
    roofs = [v["fused"]["roofline"] for v in rows if "fused" in v and v["fused"]["roofline"] is not None]
    return geomean(speedup(v, over) for v in rows), (min(roofs) if roofs else None)


def bottleneck_label(r) -> str:
    kind = "proj" if r["stride"] != 1 or r["inplanes"] != 4 * r["planes"] else "identity"
    return f"stage{r['stage']}-{kind}" + ("/s2" if r["stride"] == 2 else "")


def bottleneck_table(recs) -> dict:
    """``{(arch, mode, stage, stride, inplanes, planes): {provider: record}}`` of the bfloat16 bottlenecks."""
    table = defaultdict(dict)
    for r in recs:
        if r["op"] == "bottleneck":
            table[(r["arch"], r["mode"], r["stage"], r["stride"], r["inplanes"], r["planes"])][r["provider"]] = r
    return table


def model_table(recs) -> dict:
    """``{(arch, mode, batch asked for): {provider: record}}``."""
    table = defaultdict(dict)
    for r in recs:
        if r["op"] == "model":
            table[(r["arch"], r["mode"], r.get("bench_batch") or r.get("batch"))][r["provider"]] = r
    return table


def best_fused(row) -> str:
    """The faster fused level of a model row: ``fused`` (conv) or ``fused_block``."""
    levels = [p for p in ("fused", "fused_block") if row.get(p)]
    return max(levels, key=lambda p: row[p]["images_per_s"]) if levels else "fused"


def goals(recs) -> list[tuple[str, str, float | None, bool | None]]:
    """The issue's goals: (goal, target, measured, met) with met None where data is missing."""
    out = []

    def check(name, target, value, ok):
        out.append((name, target, value, None if value is None else ok(value)))

    for mode, target in BLOCK_GOALS.items():
        gm, roof = block_summary(recs, GOAL_DTYPE, mode)
        check(f"block {mode}: geomean speedup of fused over cudnn", f">= {target}x", gm, lambda v: v >= target)
        if mode == "inference":
            check("block inference: lowest fused roofline fraction", f">= {BLOCK_ROOFLINE_GOAL:.0%}", roof,
                  lambda v: v >= BLOCK_ROOFLINE_GOAL)
    models = model_table(recs)
    for batch in sorted({k[2] for k in models if k[0] == GOAL_ARCH}, reverse=True) or [None]:
        for (mode, over), target in MODEL_GOALS.items():
            row = models.get((GOAL_ARCH, mode, batch), {})
            check(f"{GOAL_ARCH} {mode} batch {batch}: fused (faster level) over {over} images/s", f">= {target}x",
                  speedup(row, over, of=best_fused(row)), lambda v, t=target: v >= t)
    bottlenecks = bottleneck_table(recs)
    for (mode, over), target in BOTTLENECK_GOALS.items():
        rows = [row for key, row in bottlenecks.items() if key[:2] == (GOAL_ARCH, mode)]
        ups = [speedup(row, over, of="fused_block") for row in rows]
        least = min(ups) if ups and None not in ups else None  # every block measured, or no figure
        check(f"bottleneck {mode}: fused_block over {over}, least of {GOAL_ARCH}'s blocks", f">= {target}x",
              least, lambda v, t=target: v >= t)
    return out


def short_kernel_name(name: str, width: int = 60) -> str:
    """A kernel name fit for a table cell: a C++ kernel (``void f<...>(args)``) loses ``void``, its
    parameter list and ``at::native::``; at most ``width`` characters. Triton kernels keep their
    function name (``_fwd_kernel``), copies theirs (``Memcpy DtoD (Device -> Device)``)."""
    short = name.strip()
    if short.startswith("void ") and short.endswith(")"):
        short, depth = short[len("void "):], 0
        for i in range(len(short) - 1, 0, -1):  # the "(" that opens the trailing parameter list
            depth += {")": 1, "(": -1}.get(short[i], 0)
            if depth == 0:
                short = short[:i]
                break
    short = short.replace("at::native::", "").replace("(anonymous namespace)::", "")
    return short if len(short) <= width else short[:width - 1] + "…"


def top_kernels(kernels: dict, n: int = TOP_KERNELS):
    """``([(name, ms, share), ...] for the n slowest kernels, (count, ms, share) of the rest or
    None)``; ms per call, share of all the kernels' time."""
    total = sum(kernels.values()) or 1.0
    ranked = sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0]))
    top = [(name, ms, ms / total) for name, ms in ranked[:n]]
    rest_ms = sum(ms for _, ms in ranked[n:])
    return top, ((len(ranked) - n, rest_ms, rest_ms / total) if len(ranked) > n else None)


def kernel_lines(recs) -> list[str]:
    """The .md section: for each fused block that recorded ``kernels``, where its GPU time goes."""
    fused = [r for r in recs if r["op"] == "block" and r["provider"] == "fused" and r.get(KERNELS_KEY)]
    if not fused:
        return []
    fused.sort(key=lambda r: (DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES else 9, r["arch"],
                              MODES.index(r["mode"]) if r["mode"] in MODES else 9, r["stage"], -r["stride"]))
    lines = ["", "## Fused kernels: where a call's GPU time goes", "",
             "From torch.profiler over a few calls after the timed ones: GPU time per call of each kernel "
             "and its share of all the kernels' time. What `fused ms` (the timed median) exceeds the "
             "kernels' sum by is roughly the time the GPU sat idle between kernels.", "",
             "| arch | dtype | mode | block | fused ms | kernels ms | slowest kernels |",
             "|---|---|---|---|---|---|---|"]
    for r in fused:
        top, rest = top_kernels(r[KERNELS_KEY])
        cells = [f"`{short_kernel_name(name)}` {ms:.3f} ({share:.0%})" for name, ms, share in top]
        if rest:
            cells.append(f"{rest[0]} more {rest[1]:.3f} ({rest[2]:.0%})")
        cells = " · ".join(cells).replace("|", "\\|")  # a table cell
        block = f"stage{r['stage']}{'/s2' if r['stride'] == 2 else ''}"
        lines.append(f"| {r['arch']} | {r['dtype']} | {r['mode']} | {block} | {r['median_ms']:.3f} | "
                     f"{sum(r[KERNELS_KEY].values()):.3f} | {cells} |")
    return lines


def missing_cases(recs) -> list[str]:
    """The cases the GPU issue asks for that ``recs`` lacks, one line per (arch, provider, mode)
    with the blocks missing: bfloat16 blocks of every ARCHS shape, all modes, fused and cudnn
    (and compile for GOAL_ARCH), and GOAL_ARCH's model benchmarks."""
    have = {(r["arch"], r["stage"], r["stride"], r["dtype"], r["mode"], r["provider"])
            for r in recs if r["op"] == "block"}
    lines = []
    for arch in ARCHS:
        for provider in ("fused", "cudnn") + (("compile",) if arch == GOAL_ARCH else ()):
            for mode in MODES:
                gone = [s.label for s in block_shapes(arch)
                        if (arch, s.stage, s.stride, GOAL_DTYPE, mode, provider) not in have]
                if gone:
                    lines.append(f"- blocks {arch} {GOAL_DTYPE} {mode} `{provider}`: {', '.join(gone)}")
    models = {(r["arch"], r["mode"], r["provider"]) for r in recs if r["op"] == "model"}
    for mode in dict.fromkeys(mode for mode, _ in MODEL_GOALS):
        gone = [p for p in MODEL_PROVIDERS if (GOAL_ARCH, mode, p) not in models]
        if gone:
            lines.append(f"- model {GOAL_ARCH} {mode}: {', '.join(f'`{p}`' for p in gone)}")
    bottlenecks = bottleneck_table(recs)
    for mode in BOTTLENECK_MODES:
        for provider in BOTTLENECK_PROVIDERS:
            gone = [bottleneck_label(dict(stage=s[1], stride=s[2], inplanes=s[3], planes=s[4]))
                    for s in bottleneck_shapes() if s[0] == GOAL_ARCH
                    and provider not in bottlenecks.get((GOAL_ARCH, mode, *s[1:5]), {})]
            if gone:
                lines.append(f"- bottlenecks {GOAL_ARCH} {GOAL_DTYPE} {mode} `{provider}`: {', '.join(gone)}")
    return lines


def _fmt(v, spec=".2f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def markdown(result: dict, copy_gbps: float | None = None) -> str:
    m, recs = result["meta"], result["records"]
    lines = [f"# Benchmark results: {m['gpu']}", "",
             f"torch {m['torch']} · triton {m['triton']} · cuDNN {m['cudnn']} · git {m['git_sha']} · "
             f"{m['date']} · measured device-to-device copy bandwidth {_fmt(copy_gbps, '.0f', ' GB/s')}", "",
             f"## Goals ({GOAL_DTYPE})", "", "| goal | target | measured | status |", "|---|---|---|---|"]
    for name, target, value, met in goals(recs):
        shown = _fmt(value, ".0%") if "roofline" in name else _fmt(value, ".2f", "x")
        lines.append(f"| {name} | {target} | {shown} | {'—' if met is None else ('met' if met else 'not met')} |")

    table = block_table(recs)
    present = sorted({(k[0], k[5], k[6]) for k in table},
                     key=lambda t: (DTYPES.index(t[1]) if t[1] in DTYPES else 9, t[0], MODES.index(t[2])))
    if present:
        lines += ["", "## Blocks: geometric-mean speedup of fused", "",
                  "| arch | dtype | mode | over cudnn | over compile | lowest fused roofline |",
                  "|---|---|---|---|---|---|"]
        for arch, dtype, mode in present:
            gm, roof = block_summary(recs, dtype, mode, arch)
            gm_compile, _ = block_summary(recs, dtype, mode, arch, over="compile")
            lines.append(f"| {arch} | {dtype} | {mode} | {_fmt(gm, '.2f', 'x')} | {_fmt(gm_compile, '.2f', 'x')} | "
                         f"{_fmt(roof, '.0%')} |")
    for arch, dtype, mode in present:
        lines += ["", f"### {arch}, {dtype}, {mode}", "",
                  "| block | input N, C, H, W | groups | cudnn ms | compile ms | fused ms | fused TFLOP/s | "
                  "fused GB/s | fused roofline | fused / cudnn | fused / compile |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted(k for k in table if (k[0], k[5], k[6]) == (arch, dtype, mode)):
            row, fused = table[key], table[key].get("fused", {})
            ms = [_fmt(row.get(p, {}).get("median_ms"), ".3f") for p in PROVIDERS]
            lines.append(f"| stage{key[1]}{'/s2' if key[2] == 2 else ''} | {', '.join(map(str, key[3]))} | {key[4]} | "
                         f"{' | '.join(ms)} | {_fmt(fused.get('tflops'), '.1f')} | {_fmt(fused.get('gbps'), '.0f')} | "
                         f"{_fmt(fused.get('roofline'), '.0%')} | {_fmt(speedup(row, 'cudnn'), '.2f', 'x')} | "
                         f"{_fmt(speedup(row, 'compile'), '.2f', 'x')} |")

    lines += kernel_lines(recs)

    gone = missing_cases(recs)
    if gone:
        lines += ["", "## Cases not measured", "",
                  "Asked for by the GPU issue but not in these results (a run cut off by its time limit, "
                  "or not run yet):", "", *gone]

    lines += bottleneck_lines(recs)

    models = model_table(recs)
    if models:
        lines += ["", "## Models (bfloat16 autocast, channels_last), images/s", "",
                  "`fused`: every grouped conv + BN + ReLU fused; `fused_block`: every whole bottleneck.", "",
                  "Host ms: the CPU time one step takes to enqueue (median), cudnn / fused / fused_block: where it "
                  "nears the step's time, the GPU waits on Python.", "",
                  "| arch | mode | batch | cudnn | compile | fused | fused_block | fused / cudnn | fused / compile "
                  "| fused_block / cudnn | fused_block / compile | host ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (arch, mode, _), row in sorted(models.items(), key=lambda kv: (kv[0][0], kv[0][1], -(kv[0][2] or 0))):
            batches = sorted({r["batch"] for r in row.values()})
            ips = [_fmt(row.get(p, {}).get("images_per_s"), ".0f") for p in MODEL_PROVIDERS]
            ups = [_fmt(speedup(row, over, of), ".2f", "x") for of in ("fused", "fused_block")
                   for over in ("cudnn", "compile")]
            host = " / ".join(_fmt(row.get(p, {}).get("host_ms"), ".1f") for p in ("cudnn", "fused", "fused_block"))
            lines.append(f"| {arch} | {mode} | {', '.join(map(str, batches))} | {' | '.join(ips)} | {' | '.join(ups)} "
                         f"| {host} |")
    return "\n".join(lines) + "\n"


def bottleneck_lines(recs) -> list[str]:
    """The whole-bottleneck tables: ms per provider (cudnn at its better layout), fused_block's
    roofline fraction and speedups, one table per (arch, mode)."""
    table = bottleneck_table(recs)
    if not table:
        return []
    lines = ["", f"## Bottlenecks ({GOAL_DTYPE} autocast, whole block), ms per call", "",
             "`fused_conv`: the grouped conv + BN + ReLU fused, the rest eager; `fused_block`: the whole block "
             "in Triton (`kernels/bottleneck.py`); cudnn at its faster layout (cl: channels_last)."]
    for arch, mode in sorted({k[:2] for k in table}, key=lambda t: (t[0], t[1])):
        lines += ["", f"### {arch}, {mode}", "",
                  "| block | cudnn ms | compile ms | fused_conv ms | fused_block ms | fused_block roofline "
                  "| fused_block / cudnn | fused_block / compile |", "|---|---|---|---|---|---|---|---|"]
        for key in sorted(k for k in table if k[:2] == (arch, mode)):
            row = table[key]
            cudnn = row.get("cudnn", {})
            layout = {"channels_last": " (cl)", "nchw": " (nchw)"}.get(cudnn.get("layout"), "")
            ms = [_fmt(row.get(p, {}).get("median_ms"), ".3f") for p in BOTTLENECK_PROVIDERS]
            ms[0] += layout if cudnn else ""
            fused = row.get("fused_block", {})
            lines.append(f"| {bottleneck_label(next(iter(row.values())))} | {' | '.join(ms)} | "
                         f"{_fmt(fused.get('roofline'), '.0%')} | {_fmt(speedup(row, 'cudnn', 'fused_block'), '.2f', 'x')} | "
                         f"{_fmt(speedup(row, 'compile', 'fused_block'), '.2f', 'x')} |")
    return lines


def chart_data(recs, dtype) -> dict:
    """``{(arch, mode): (block labels, {provider: [speedup over cudnn per block]})}`` for one dtype."""
    out = {}
    table = block_table(recs)
    for arch, mode in sorted({(k[0], k[6]) for k in table if k[5] == dtype}, key=lambda t: (t[0], MODES.index(t[1]))):
        keys = sorted(k for k in table if (k[0], k[5], k[6]) == (arch, dtype, mode))
        labels = [f"s{k[1]}{'/2' if k[2] == 2 else ''}" for k in keys]
        bars = {p: [speedup(table[k], "cudnn", of=p) for k in keys] for p in PROVIDERS}
        out[(arch, mode)] = (labels, bars)
    return out


def bar_chart(result: dict, path) -> str | None:
    """Grouped bars of speedup over cudnn per block, one panel per (arch, mode); returns the dtype shown."""
    recs = result["records"]
    dtypes = {r["dtype"] for r in recs if r["op"] == "block"}
    dtype = next((d for d in DTYPES if d in dtypes), None)
    if dtype is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = chart_data(recs, dtype)
    archs = sorted({a for a, _ in data})
    modes = [m for m in MODES if any(k[1] == m for k in data)]
    fig, axes = plt.subplots(len(modes), len(archs), figsize=(6 * len(archs), 3 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, arch in enumerate(archs):
            ax = axes[i][j]
            if (arch, mode) not in data:
                ax.set_axis_off()
                continue
            labels, bars = data[(arch, mode)]
            width = 0.8 / len(PROVIDERS)
            for n, p in enumerate(PROVIDERS):
                xs = [x + (n - 1) * width for x in range(len(labels))]
                ax.bar(xs, [v or 0 for v in bars[p]], width, label=p)
            if mode in BLOCK_GOALS:
                ax.axhline(BLOCK_GOALS[mode], color="grey", linestyle="--", linewidth=1, label="goal")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_title(f"{arch}, {mode}", fontsize=10)
            ax.set_ylabel("speedup over cudnn")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['meta']['gpu']}, {dtype}: grouped conv + BN + ReLU blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return dtype


def write_results(data: dict, out_dir, source: str = "the JSON") -> dict:
    """Write ``<gpu>.json``, ``<gpu>.md`` and ``<gpu>.png`` into ``out_dir``; returns their paths.
    ``source`` names the input in the ReportError raised when no benchmark carries results."""
    result = {"meta": meta(data), "records": records(data)}
    if not result["records"]:
        raise ReportError(f"{source}: no benchmark carries results (extra_info['op']): nothing to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / gpu_slug(result["meta"]["gpu"])
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    rows = ",\n".join("  " + json.dumps(r) for r in result["records"])  # one record a line: readable diffs
    paths["json"].write_text(f'{{"meta": {json.dumps(result["meta"])},\n "records": [\n{rows}\n ]}}\n')
    text = markdown(result, copy_bandwidth(data))
    if bar_chart(result, stem.with_suffix(".png")):
        paths["png"] = stem.with_suffix(".png")
        text += f"\n![fused vs cudnn vs compile per block]({paths['png'].name})\n"
    paths["md"].write_text(text)
    return paths


def merge(runs: list) -> dict:
    """Several pytest-benchmark JSONs of one GPU (e.g. blocks and models, run in separate calls)
    as one: the first run's machine and commit info, every run's benchmarks."""
    data = dict(runs[0])
    data["benchmarks"] = [b for run in runs for b in run["benchmarks"]]
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON(s) (from --benchmark-json)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    try:
        paths = write_results(merge([load(p) for p in args.json]), args.out_dir, source=", ".join(args.json))
    except ReportError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever the cause
        raise SystemExit(2) from None  # 2, like argparse's own usage errors
    for path in paths.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
