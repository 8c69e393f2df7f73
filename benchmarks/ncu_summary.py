"""Summarise an Nsight Compute raw CSV (``ncu -i REPORT --csv --page raw``) as a markdown table.

One row per kernel name (launches of the same kernel averaged): GPU time, achieved DRAM
throughput, DRAM bytes, L2 and L1 hit rates, tensor-pipe utilisation, achieved occupancy and the
three largest warp-stall reasons. Metric names differ between Nsight Compute versions and GPU
generations (e.g. ``hmma`` vs ``gmma`` tensor pipes), so each column is looked up by pattern and
left blank when the report lacks it::

    python -m benchmarks.ncu_summary stage1-train.csv [more.csv ...] > profile.md
"""

import csv
import io
import re
import sys
from collections import defaultdict

# (column title, unit shown, regexes tried in order against the raw metric names)
COLUMNS = [
    ("time µs", "", [r"^gpu__time_duration\.sum$"]),
    ("DRAM %peak", "%", [r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
                         r"^gpu__dram_throughput\.avg\.pct_of_peak_sustained_elapsed$"]),
    ("DRAM MB", "", [r"^dram__bytes\.sum$"]),
    ("L2 hit", "%", [r"^lts__t_sector_hit_rate\.pct$"]),
    ("L1 hit", "%", [r"^l1tex__t_sector_hit_rate\.pct$"]),
    ("tensor pipe", "%", [r"^sm__pipe_tensor_op_gmma_cycles_active\.avg\.pct_of_peak_sustained_active$",
                          r"^sm__pipe_tensor_op_hmma_cycles_active\.avg\.pct_of_peak_sustained_active$",
                          r"^sm__pipe_tensor_cycles_active\.avg\.pct_of_peak_sustained_active$"]),
    ("occupancy", "%", [r"^sm__warps_active\.avg\.pct_of_peak_sustained_active$"]),
]
STALL = [re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$"),
         re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+)$")]


def read_raw_csv(text: str):
    """(header, units, rows) of ncu's raw page; lines before the header (==PROF== ...) skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("not an ncu raw-page CSV (no header line starting with \"ID\")")
    table = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    return table[0], table[1], table[2:]


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarise(header, units, rows):
    """{kernel name: {column: value, "stalls": [(reason, value)], "launches": n}}."""
    col = {name: i for i, name in enumerate(header)}
    name_col = col.get("Kernel Name", col.get("Function Name"))
    per_kernel = defaultdict(list)
    for row in rows:
        if len(row) == len(header):
            per_kernel[row[name_col]].append(row)
    out = {}
    for kernel, launches in per_kernel.items():
        entry = {"launches": len(launches)}
        for title, _, patterns in COLUMNS:
            for pattern in patterns:
                match = next((n for n in header if re.match(pattern, n)), None)
                if match:
                    values = [v for v in (_number(r[col[match]]) for r in launches) if v is not None]
                    if values:
                        value = sum(values) / len(values)
                        unit = units[col[match]].lower()
                        if title == "time µs":  # ncu reports ns, us or ms depending on its version
                            value *= {"ns": 1e-3, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(unit, 1.0)
                        if title == "DRAM MB":
                            value *= {"byte": 1e-6, "kbyte": 1e-3, "gbyte": 1e3}.get(unit, 1.0)
                        entry[title] = value
                    break
        stalls = []
        for pattern in STALL:
            for n in header:
                m = pattern.match(n)
                if m and not m.group(1).endswith("not_issued"):
                    values = [v for v in (_number(r[col[n]]) for r in launches) if v is not None]
                    if values:
                        stalls.append((m.group(1), sum(values) / len(values)))
            if stalls:
                break
        entry["stalls"] = sorted(stalls, key=lambda kv: -kv[1])[:3]
        out[kernel] = entry
    return out


def markdown(summary, title=""):
    lines = [f"### {title}", ""] if title else []
    heads = [t for t, _, _ in COLUMNS]
    lines.append("| kernel | launches | " + " | ".join(heads) + " | top warp stalls |")
    lines.append("|---|---|" + "---|" * len(heads) + "---|")
    order = sorted(summary.items(), key=lambda kv: -kv[1].get("time µs", 0))
    for kernel, e in order:
        short = kernel if len(kernel) <= 48 else kernel[:47] + "…"
        cells = [f"{e[t]:.1f}" if t in e else "—" for t in heads]
        stalls = ", ".join(f"{r} {v:.2f}" for r, v in e["stalls"]) or "—"
        lines.append(f"| `{short}` | {e['launches']} | " + " | ".join(cells) + f" | {stalls} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print("usage: python -m benchmarks.ncu_summary RAW.csv [...]", file=sys.stderr)
        return 2
    for path in paths:
        try:
            with open(path) as f:
                header, units, rows = read_raw_csv(f.read())
        except (OSError, ValueError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
        print(markdown(summarise(header, units, rows), title=path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
