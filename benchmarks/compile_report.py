"""Compile the conv kernels for a GPU that is not here, and report what the GPU compiler made.

Triton's NVIDIA backend (with its bundled ptxas) compiles ahead of time on any machine, so a
session without a GPU can still catch what the interpreter never sees: shared memory past the
per-block limit, register spills, scalar instead of vector loads. Nothing is launched::

    python -m benchmarks.compile_report                       # bf16, ResNeXt widths, sm_90
    python -m benchmarks.compile_report --dtype float32 --per-group 4 64

One line per (kernel, channels per group, shipped config): shared bytes, registers, spill
bytes, vector/scalar global loads and async copies in the PTX. Exits 1 when a config that
autotuning would keep does not fit the shared-memory limit.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

# the GPU compiler, not the interpreter, is what this reports on
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import _bwd, _fwd  # noqa: E402
from kernels._conv_tiles import (channel_tiles, config_fits, conv_configs, dot_options,  # noqa: E402
                                 even_groups)

H100_SHARED_LIMIT = 232_448  # bytes per block (227 KiB) on sm_90
_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _signature(fn, pointers, constexprs):
    return {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}


def kernel_specs(name, dtype, per_group, groups=32):
    """(jit function, pointer types, constexprs, BLOCK_CO, BLOCK_CI) as the launchers pass them,
    for a stride-1 ResNeXt block with ``per_group`` channels per group in and out."""
    t, f32 = "*" + _TL[dtype], "*fp32"
    c = per_group * groups
    base = dict(dot_options(dtype), STRIDE=1, PAD=1)  # as the launchers pass them
    if name == "fwd":
        block_co, block_ci = channel_tiles(per_group, per_group)
        ptrs = dict(x_ptr=t, w_ptr=t, scale_ptr=f32, shift_ptr=f32, y_ptr=t, mean_part_ptr=f32,
                    m2_part_ptr=f32, count_part_ptr=f32)
        consts = dict(base, STORE=1, COMPUTE_STATS=True, BLOCK_CO=block_co, BLOCK_CI=block_ci,
                      EVEN_GROUPS=even_groups(c, per_group, per_group, block_co, block_ci))
        return _fwd._fwd_kernel.fn, ptrs, consts, block_co, block_ci
    ptrs = dict(dy_ptr=t, z_ptr=t, dz_ptr=f32, scale_ptr=f32, shift_ptr=f32, k1_ptr=f32, k0_ptr=f32)
    if name == "dx":
        block_ci, block_co = channel_tiles(per_group, per_group)
        ptrs.update(w_ptr=t, dx_ptr=t)
        consts = dict(base, BLOCK_CO=block_co, BLOCK_CI=block_ci, DZ_IN_MEMORY=False,
                      EVEN_GROUPS=even_groups(c, per_group, per_group, block_ci, block_co))
        return _bwd._bwd_dx_kernel.fn, ptrs, consts, block_co, block_ci
    block_co, block_ci = channel_tiles(per_group, per_group)
    ptrs.update(x_ptr=t, dw_part_ptr=f32)
    consts = dict(base, BLOCK_CO=block_co, BLOCK_CI=block_ci, DZ_IN_MEMORY=False,
                  EVEN_GROUPS=even_groups(c, per_group, per_group, block_co, block_ci))
    return _bwd._bwd_dw_kernel.fn, ptrs, consts, block_co, block_ci


def compile_config(fn, pointers, constexprs, config, arch=90):
    """Compile one config; returns a dict of what the compiler produced."""
    consts = dict(constexprs, BLOCK_M=config.kwargs["BLOCK_M"])
    # as Triton specialises at launch: pointers and channel counts divisible by 16
    aligned = [n for n in fn.arg_names if n in pointers or n in ("C_in", "C_out", "N_BUCKET")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, _signature(fn, pointers, consts), constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = kernel.asm["ptx"]
    out = dict(shared=kernel.metadata.shared,
               vector_loads=len(re.findall(r"ld\.global[^\n]*\.v\d", ptx)),
               scalar_loads=len(re.findall(r"ld\.global(?![^\n]*\.v\d)", ptx)),
               async_copies=ptx.count("cp.async.ca") + ptx.count("cp.async.cg"),
               registers=None, spill_bytes=None)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        if m := re.search(r"REG:(\d+)", usage):
            out["registers"] = int(m.group(1))
        if m := re.search(r"STACK:(\d+)", usage):
            out["spill_bytes"] = int(m.group(1))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16")
    parser.add_argument("--per-group", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--kernels", nargs="+", choices=("fwd", "dx", "dw"), default=["fwd", "dx", "dw"])
    parser.add_argument("--all-configs", action="store_true", help="also the configs autotuning prunes")
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    too_big = 0
    for name in args.kernels:
        for per_group in args.per_group:
            fn, ptrs, consts, block_co, block_ci = kernel_specs(name, dtype, per_group)
            for cfg in conv_configs(interpret=False):
                kept = config_fits(cfg, block_co, block_ci, elem)
                if not (kept or args.all_configs):
                    continue
                r = compile_config(fn, ptrs, consts, cfg)
                over = r["shared"] > H100_SHARED_LIMIT
                too_big += kept and over
                print(f"{name:3s} {args.dtype} {per_group:3d}/group BLOCK_M={cfg.kwargs['BLOCK_M']:3d} "
                      f"w{cfg.num_warps} s{cfg.num_stages}{'' if kept else ' (pruned)'}: "
                      f"shared {r['shared']:>7,}{' OVER LIMIT' if over else ''}  regs {r['registers']}  "
                      f"spill {r['spill_bytes']}  ld.vec {r['vector_loads']}  ld.scalar {r['scalar_loads']}  "
                      f"cp.async {r['async_copies']}", flush=True)
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
