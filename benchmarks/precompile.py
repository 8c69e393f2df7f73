"""Warm Triton's cache on the GPU machine before its first launch: every kernel compiled in parallel.

Triton compiles a kernel the first time it is launched with a new specialisation, one after another
in the launching process: a cold machine spends minutes of a 15-minute window that way. This runs
the launchers of the op and of the fused bottleneck at the given models' shapes, with
``benchmarks/_aot.py``'s compile-only hooks, in ``--jobs`` processes, so that each kernel is
compiled (for sm_90, the GPU machine's architecture) exactly as its launch would, into the same
Triton cache (``~/.triton/cache`` or ``$TRITON_CACHE_DIR``); the launches that follow find it
there. ``--configs chosen`` (default) compiles the configs ``kernels.configs`` launches without
benchmarking; ``kept``, every config autotuning or ``benchmarks.tune`` may time::

    python -m benchmarks.precompile --arch resnext50_32x4d --dtype bfloat16 --jobs 16

Runs anywhere (nothing is launched); prints one line: compiles, errors, seconds. Exits 1 on an error.
"""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from benchmarks.compile_report import BLOCK_MODES
from benchmarks.shapes import ARCHS, block_shapes

OP_MODES = ("inference", "train", "train_no_grad")  # the op's modes the benchmarks and models launch


def _job(shape, batch, dtype, modes, configs):
    from benchmarks import _aot  # heavy: only in the workers

    return _aot.compile_job(shape, batch, dtype, modes, configs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHS), default=["resnext50_32x4d"])
    parser.add_argument("--dtype", nargs="+", choices=("bfloat16", "float16", "float32"), default=["bfloat16"])
    parser.add_argument("--batch", type=int, default=256, help="N of the launches (specialisation only)")
    parser.add_argument("--what", nargs="+", choices=("op", "block"), default=["op", "block"],
                        help="the op's modes (inference, training with and without grad), the bottleneck's")
    parser.add_argument("--configs", choices=("chosen", "kept", "all"), default="chosen")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16))
    args = parser.parse_args(argv)
    modes = (OP_MODES if "op" in args.what else ()) + (BLOCK_MODES if "block" in args.what else ())
    jobs = [(s, args.batch, d, modes, args.configs) for a in args.arch for s in block_shapes(a) for d in args.dtype]
    start, compiles, errors = time.perf_counter(), 0, []
    ctx = multiprocessing.get_context("spawn")  # fresh workers: kernels decorated for the GPU
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs))), mp_context=ctx) as pool:
        for n, errs in pool.map(_job, *zip(*jobs)):
            compiles += n
            errors += errs
    for e in errors:
        print("error:", e, file=sys.stderr)
    print(f"precompile: {compiles} compiles ({args.configs} configs) for {' '.join(args.arch)} "
          f"{' '.join(args.dtype)} {' '.join(args.what)}, {len(errors)} errors, {time.perf_counter() - start:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
