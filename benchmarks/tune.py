"""Tune the autotuned kernels on the GPU in use and write its config table (``kernels.configs``).

    python -m benchmarks.tune --arch resnext50_32x4d --dtype bfloat16 [--budget-s 120] [--batch 256 32]

Runs, at every grouped-conv shape of the named models and each batch, the op in inference and in
training (forward + backward) and the fused bottleneck whose grouped conv has that shape, in
training and inference. Each launch of an autotuned kernel whose table key the table lacks is timed
in every config the kernel's pruning keeps (``triton.testing.do_bench``, median of repeated
launches; the kernels only write their outputs, so repeating them is safe), and the fastest is
recorded. Within ``--budget-s``: once spent, the remaining launches take the table's or the
heuristic's config and nothing more is tuned; what was tuned is written (merged into the table at
``--out``, default ``kernels/configs/<GPU>.json``; an existing table of another Triton is replaced).
A progress bar counts the (shape, batch, mode) runs. Needs a CUDA GPU; first compiles every kept
config in parallel (``benchmarks.precompile --configs kept``) unless ``--no-precompile``.
"""

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.shapes import ARCHS, block_shapes, bottleneck_of

DTYPES = ("bfloat16", "float16", "float32")
MODES = ("inference", "train", "block_train", "block_inference")


class Tuner:
    """``kernels.configs.TUNER``: times every kept config of each new table key, within a budget."""

    def __init__(self, table, budget_s, warmup_ms=3, rep_ms=15):
        from kernels import configs

        self.configs, self.table, self.deadline = configs, table, time.perf_counter() + budget_s
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.tuned = self.skipped = self.runs = 0

    def __call__(self, kernel, grid, args, meta):
        import triton

        c = self.configs
        named = dict(zip(kernel.arg_names, args))
        name, shape_key, bucket = c.table_key(kernel, {**named, **meta})
        key = c.format_key(shape_key, bucket)
        entries = self.table.setdefault(name, {})
        kept = c.kept_configs(kernel, named, meta)
        if key in entries:
            entry = entries[key]
            return next((k for k in kept if k.kwargs == entry["kwargs"] and k.num_warps == entry["num_warps"]
                         and k.num_stages == entry["num_stages"]), kernel.heuristic(kept))
        if time.perf_counter() > self.deadline:
            self.skipped += 1
            return kernel.heuristic(kept)
        timings = []
        for config in kept:
            def call(config=config):
                kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)
            timings.append((triton.testing.do_bench(call, warmup=self.warmup_ms, rep=self.rep_ms,
                                                    return_mode="median"), config))
            self.runs += 1
        ms, best = min(timings, key=lambda t: t[0])
        entries[key] = c.config_entry(best, ms)
        self.tuned += 1
        return best


def run_mode(shape, batch, dtype, mode):
    """One call (and backward) of the op or the fused bottleneck at ``shape``, on the GPU."""
    from kernels.bottleneck import fused_bottleneck
    from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu

    training, grad = mode in ("train", "block_train"), mode in ("train", "block_train")
    if mode.startswith("block"):  # as models run it: float32 parameters, autocast to ``dtype``
        block = bottleneck_of(shape).cuda().train(training).to(memory_format=torch.channels_last)
        x = torch.randn(batch, block.conv1.in_channels, shape.size, shape.size, device="cuda")
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(grad)
        with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
            y = fused_bottleneck(x, block)
    else:
        c = shape.channels
        x = torch.randn(shape.input_shape(batch), device="cuda", dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(grad)
        w = (torch.randn(c, c // shape.groups, 3, 3, device="cuda") * 0.1).to(dtype).requires_grad_(grad)
        gamma = torch.rand(c, device="cuda").add_(0.5).requires_grad_(grad)
        beta = torch.randn(c, device="cuda").requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = grouped_conv_bn_relu(x, w, gamma, beta, torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"),
                                     stride=shape.stride, groups=shape.groups, training=training)
    if grad:
        y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


def load_existing(path, triton_version):
    """The ``kernels`` of the table at ``path`` when it was tuned with this Triton, else {}."""
    from kernels.configs import triton_release

    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
        if triton_release(table["triton"]) == triton_release(triton_version):
            return dict(table["kernels"])
        print(f"tune: {path} was tuned with triton {table['triton']}: starting a new table", file=sys.stderr)
    except (ValueError, KeyError, TypeError) as e:
        print(f"tune: {path} is unreadable ({e}): starting a new table", file=sys.stderr)
    return {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHS), default=["resnext50_32x4d"])
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bfloat16"])
    parser.add_argument("--batch", nargs="+", type=int, default=[256])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--budget-s", type=float, default=120.0, help="tuning stops after this (default 120)")
    parser.add_argument("--out", type=Path, help="table to write or merge (default kernels/configs/<GPU>.json)")
    parser.add_argument("--jobs", type=int, default=16, help="precompile processes (default 16)")
    parser.add_argument("--no-precompile", action="store_true")
    args = parser.parse_args(argv)

    import kernels

    if kernels.interpreter_enabled() or not torch.cuda.is_available():
        print("error: benchmarks.tune needs a CUDA GPU with Triton's interpreter off", file=sys.stderr)
        return 2
    import triton
    from tqdm import tqdm

    from kernels import configs

    start = time.perf_counter()
    device = torch.cuda.get_device_name()
    out = args.out or configs.TABLES / f"{configs.table_name(device)}.json"
    if not args.no_precompile:
        from benchmarks import precompile

        what = [w for w in ("op", "block") if any(m.startswith("block") == (w == "block") for m in args.modes)]
        precompile.main(["--arch", *args.arch, "--dtype", *args.dtype, "--configs", "kept", "--jobs",
                         str(args.jobs), "--what", *what])
    table = load_existing(out, triton.__version__)
    tuner = Tuner(table, args.budget_s - (time.perf_counter() - start))
    runs = [(s, b, d, m) for a in args.arch for b in args.batch for s in block_shapes(a) for d in args.dtype
            for m in args.modes]
    configs.TUNER = tuner
    try:
        for shape, batch, dtype, mode in tqdm(runs, desc="tune", unit="run", file=sys.stderr):
            if time.perf_counter() - start > args.budget_s:
                break
            run_mode(shape, batch, getattr(torch, dtype), mode)
    finally:
        configs.TUNER = None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "device": device, "triton": triton.__version__, "torch": torch.__version__,
            "made_by": "python -m benchmarks.tune " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kernels": {k: dict(sorted(v.items())) for k, v in sorted(table.items())},
        }, indent=1) + "\n")
    print(f"tune: {tuner.tuned} keys tuned ({tuner.runs} benchmark runs), {tuner.skipped} left to the heuristic "
          f"(budget), {sum(len(v) for v in table.values())} entries -> {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
