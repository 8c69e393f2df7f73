"""Compile the kernels the op really launches, for a GPU that is not here, and read what came out.

The public op runs on CPU tensors of the real shapes (``torch.empty``: nothing is computed) with
Triton's interpreter off, so the kernels are decorated for the GPU. Four small hooks turn every
launch into an ahead-of-time compile for sm_90 and record it:

* a stand-in for Triton's active driver whose target is ``GPUTarget("cuda", 90, 32)`` and which
  can neither load nor launch a binary;
* ``JITFunction.run`` forced to ``warmup=True``: the JIT binds the real arguments, specialises
  them exactly as at a launch (16-byte pointer alignment, integers divisible by 16 or equal to 1,
  constexprs), compiles, and returns before launching;
* ``Autotuner.run`` compiling *every* config instead of benchmarking, with ``kept`` = the config
  survives the autotuner's own ``prune_configs`` (its ``pre_hook``, ``reset_to_zero`` and
  ``restore_value`` never run: nothing is launched, so they have nothing to protect);
* host-side CUDA queries the launchers make (``torch.cuda.get_device_properties`` for the SM
  count) answer for an H100 SXM, and the launchers' refusal of CPU tensors with the interpreter off
  is lifted (``kernels.common.CPU_TENSORS_OK``).

Every hook was checked against triton 3.9.0 and 3.6.0 (line numbers below are 3.9.0's).
Nothing here names a kernel or an argument: kernels and their variants come from the launches.
"""

import contextlib
import contextvars
import hashlib
import io
import json
import os
import re
import time
import types
import warnings

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are decorated

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.cache import get_cache_manager  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# H100 SXM (sm_90): CUDA occupancy calculator figures
SMS = 132
REGS_PER_SM, REG_ALLOC_UNIT, SUB_PARTITIONS = 65536, 256, 4
SHARED_PER_SM, SHARED_PER_BLOCK_MAX, SHARED_RESERVED_PER_CTA, SHARED_ALLOC_UNIT = 233_472, 232_448, 1024, 128
THREADS_PER_SM, CTAS_PER_SM_MAX = 2048, 32

# (jit function, compiled kernel or None, error or None, launch context, compile seconds) of every launch
LAUNCHES = []
# (autotune config, kept, chosen) while the autotuner hook compiles one config
_AUTOTUNE = contextvars.ContextVar("autotune", default=None)
# the GPU whose config tables decide which config a launch takes (kernels.configs): the GPU machine's
GPU_NAME, GPU_CAPABILITY = "NVIDIA H200", (9, 0)
# which configs of an autotuned kernel the hook compiles: "all", "kept" (by its pruning) or "chosen"
COMPILE = "all"


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: an sm_90 target, device 0, stream 0, and nothing that
    loads or launches (any other attribute raises). Installed with ``driver.set_active``
    (triton/runtime/driver.py:42); the JIT reads the target at jit.py:701 and the device and
    stream at jit.py:739-740."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"the compile-only driver has no {name!r}: nothing may load or launch here")


def _jit_run(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` (jit.py:733) as ``warmup=True``: bind, specialise, compile (or take
    the JIT's cache), and return before the launch at jit.py:776."""
    start = time.perf_counter()
    try:
        kernel, error = _ORIGINAL["jit_run"](self, *args, grid=grid, warmup=True, **kwargs), None
    except Exception as e:  # a config the compiler rejects is a finding, not a crash
        kernel, error = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    LAUNCHES.append((self, kernel, error, _AUTOTUNE.get(), time.perf_counter() - start))
    return kernel


def _autotuner_run(self, *args, **kwargs):
    """``Autotuner.run`` (autotuner.py:232) compiling every config in ``self.configs``; ``kept``
    is what the autotuner's own ``prune_configs`` (autotuner.py:299) returns, called as run()
    calls it (``self.nargs`` set, the launch's keyword arguments), and every config when there
    is only one (run() then skips pruning); ``chosen`` is the config ``kernels.configs`` launches
    without benchmarking on the GPU machine (its tables, else the heuristic)."""
    from kernels import configs

    self.nargs = dict(zip(self.arg_names, args))
    kept = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    chosen = configs.pick(self, dict(self.nargs), kwargs, configs.tables_of(GPU_NAME, GPU_CAPABILITY))
    ret = None
    wanted = {"all": self.configs, "kept": kept, "chosen": [chosen]}[COMPILE]
    for config in wanted:
        token = _AUTOTUNE.set((config, config in kept, config is chosen))
        try:
            ret = self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            _AUTOTUNE.reset(token)
    self.nargs = None
    return ret


class _NoDeviceGuard(contextlib.nullcontext):
    """``torch.cuda.device(...)``: one device, nothing to switch."""

    def __init__(self, device=None):
        super().__init__()


_H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (compile-only stand-in)", major=9, minor=0, multi_processor_count=SMS,
    total_memory=80 * 2**30, warp_size=32, max_threads_per_multi_processor=THREADS_PER_SM,
    regs_per_multiprocessor=REGS_PER_SM, shared_memory_per_block_optin=SHARED_PER_BLOCK_MAX,
    shared_memory_per_multiprocessor=SHARED_PER_SM, L2_cache_size=50 * 2**20)

_ORIGINAL = {}


def install():
    """Install the hooks in this process (idempotent) and import the op; returns its module."""
    if not _ORIGINAL:
        _ORIGINAL["jit_run"] = JITFunction.run
        JITFunction.run = _jit_run
        Autotuner.run = _autotuner_run
        _driver.set_active(CompileOnlyDriver())
        # host-side queries of the launchers (e.g. the SM count that sizes split reductions)
        torch.cuda.get_device_properties = lambda device=None: _H100
        torch.cuda.get_device_capability = lambda device=None: (_H100.major, _H100.minor)
        torch.cuda.current_device = lambda: 0
        torch.cuda.device = _NoDeviceGuard
    import kernels.common
    import kernels.configs
    import kernels.grouped_conv_bn_relu as op

    # The launchers refuse CPU tensors with the interpreter off; their stand-ins here are CPU tensors.
    # Every other check still runs.
    kernels.common.CPU_TENSORS_OK = True
    # through the autotuner (hooked above) to compile every config, not only the one kernels.configs picks
    kernels.configs.AUTOTUNE = True
    return op


# ---------------------------------------------------------------------------------------------
# what a compiled kernel holds


def _ptxas_verbose(kernel):
    """ptxas' ``-v`` report for the kernel's PTX: the backend's own ``make_cubin`` run again with
    ``knobs.nvidia.dump_ptxas_log`` (same ptxas, same flags; compiler.py:612-620), memoised in
    Triton's cache by the PTX's hash."""
    ptx = kernel.asm["ptx"]
    key = hashlib.sha256((triton.__version__ + str(TARGET) + ptx).encode()).hexdigest()
    cache = get_cache_manager(key)
    if path := cache.get_file("ptxas.log"):
        with open(path) as f:
            return f.read()
    backend = make_backend(TARGET)
    options = backend.parse_options(kernel.metadata._asdict())
    buf = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            backend.make_cubin(ptx, {}, options, TARGET.arch)
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    cache.put(buf.getvalue(), "ptxas.log", binary=False)
    return buf.getvalue()


def ctas_per_sm(registers, shared, num_warps):
    """Resident CTAs per SM on sm_90 and what limits them (CUDA occupancy calculator rules)."""
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = (REGS_PER_SM // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS if regs_per_warp else 64
    smem = -(-(shared + SHARED_RESERVED_PER_CTA) // SHARED_ALLOC_UNIT) * SHARED_ALLOC_UNIT
    limits = {
        "registers": warps_by_regs // num_warps,
        "shared": SHARED_PER_SM // smem if shared <= SHARED_PER_BLOCK_MAX else 0,
        "threads": THREADS_PER_SM // (32 * num_warps),
        "ctas": CTAS_PER_SM_MAX,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


_DEF64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z][\w.:]*\s+(%rd\d+)\s*,(.*);")
_SOURCE64 = re.compile(r"%rd\d+|_param_\d+\b")
_LD = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s+(?:\{[^}]*\}|%\w+)\s*,\s*\[\s*(%rd\d+)")
_CP = re.compile(r"\bcp\.async\.(ca|cg)\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\],\s*\[\s*(%rd\d+)[^\]]*\],\s*(\w+)")
_TMA = re.compile(r"\bcp\.async\.bulk\.tensor\.(\d)d\.shared[\w.:]*\.global[\w.:]*\s*\[[^\]]*\],\s*\[\s*(%rd\d+)")


def _ld_kind(suffixes):
    """``ld.global.v4.b32 16B`` from an ``ld.global`` suffix list, cache hints dropped."""
    parts = [p for p in suffixes.split(".") if p and "::" not in p and p not in ("nc", "ca", "cg", "cs", "lu", "cv")]
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
    return f"ld.global.{'.'.join(parts)} {vec * bits // 8}B"


def global_loads(ptx, params):
    """{pointer: {instruction: count}} of the global loads in ``ptx``. ``params`` names the
    kernel's PTX parameters in order, None for those that are not pointers; each load's address
    is traced back through the 64-bit registers it is computed from to the pointer parameter(s)
    it offsets (``?`` if none)."""
    defs = {}  # %rdN -> the 64-bit registers and parameters it is computed from (every definition)
    for line in ptx.splitlines():
        if m := _DEF64.match(line):
            defs.setdefault(m.group(1), set()).update(_SOURCE64.findall(m.group(2)))

    def bases(reg):
        seen, todo, found = set(), [reg], set()
        while todo:
            r = todo.pop()
            if r in seen:
                continue
            seen.add(r)
            for src in defs.get(r, ()):
                if src.startswith("_param_"):
                    i = int(src[len("_param_"):])
                    if i < len(params) and params[i] is not None:
                        found.add(params[i])
                else:
                    todo.append(src)
        return "+".join(sorted(found)) or "?"

    out = {}
    for line in ptx.splitlines():
        if m := _CP.search(line):
            kind, reg = f"cp.async.{m.group(1)} {int(m.group(3), 0)}B", m.group(2)
        elif m := _TMA.search(line):  # a TMA load: the register holds the tensor map's address
            kind, reg = f"cp.async.bulk.tensor {m.group(1)}d (TMA)", m.group(2)
        elif m := _LD.search(line):
            kind, reg = _ld_kind(m.group(1)), m.group(2)
        else:
            continue
        counts = out.setdefault(bases(reg), {})
        counts[kind] = counts.get(kind, 0) + 1
    return out


def mma_kind(ptx):
    """("wgmma" | "mma.sync" | "none", instruction shape or None) of the kernel's ``tl.dot``."""
    if m := re.search(r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx):
        return "wgmma", m.group(1)
    if m := re.search(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx):
        return "mma.sync", m.group(1)
    return "none", None


_ANALYSED = {}


def analyse(kernel, params):
    """What the compiler made of one kernel: shared memory, registers, spills, occupancy, MMA and
    global loads. Memoised by the kernel's compile hash."""
    if kernel.hash in _ANALYSED:
        return _ANALYSED[kernel.hash]
    md = kernel.metadata
    log = _ptxas_verbose(kernel)
    regs = re.search(r"Used (\d+) registers", log)
    props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = int(regs.group(1)) if regs else None
    stack, spill_stores, spill_loads = (int(g) for g in props.groups()) if props else (None, None, None)
    ctas, limiter = ctas_per_sm(registers or 0, md.shared, md.num_warps)
    mma, mma_shape = mma_kind(kernel.asm["ptx"])
    loads = global_loads(kernel.asm["ptx"], params)
    result = dict(
        registers=registers,
        spill_bytes=None if props is None else spill_stores + spill_loads,
        spill_stores=spill_stores, spill_loads=spill_loads, stack_bytes=stack,
        shared_bytes=md.shared, over_shared=md.shared > SHARED_PER_BLOCK_MAX,
        ctas_per_sm=ctas, ctas_limited_by=limiter,
        mma=mma, mma_shape=mma_shape,
        load_counts=loads,
    )
    _ANALYSED[kernel.hash] = result
    return result


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


_ANALYSIS_KEYS = ("registers", "spill_bytes", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes",
                  "over_shared", "ctas_per_sm", "ctas_limited_by", "mma", "mma_shape", "load_counts")


def describe_launch(fn, kernel, error, autotune, compile_s, activation_type):
    """The record of one launch, minus the job's shape/dtype/mode: kernel name, config, kept,
    chosen, the JIT's specialisation, the seconds it took to compile (bind, specialise, compile
    or find in Triton's cache) and, when it compiled, ``analyse(kernel)``; ``loads`` summarises the
    loads of the pointers to ``activation_type`` (e.g. ``*bf16``): activations and weights."""
    rec = {"kernel": fn.fn.__name__, "constexprs": {}, "specialization": {}}
    names = fn.arg_names
    num_warps = num_stages = None
    if kernel is not None:
        src, md = kernel.src, kernel.metadata
        types = dict(src.signature)
        consts = {names[k[0]]: _jsonable(v) for k, v in src.constants.items() if len(k) == 1}
        declared = {names[i] for i in fn.constexprs}
        divisible = {names[k[0]] for k, v in src.attrs.items()
                     if len(k) == 1 and ["tt.divisibility", 16] in [list(a) for a in v]}
        rec["constexprs"] = {k: v for k, v in consts.items() if k in declared}
        # what the JIT specialised on at this launch (every pointer here is 16-byte aligned
        # unless listed): integers divisible by 16, integers equal to 1 (compiled as constants)
        rec["specialization"] = {
            "divisible_by_16": [n for n in names if n in divisible and not str(types.get(n)).startswith("*")],
            "equal_to_1": sorted(k for k in consts if k not in declared),
            "unaligned_pointers": [n for n, t in types.items() if str(t).startswith("*") and n not in divisible],
        }
        num_warps, num_stages = md.num_warps, md.num_stages
    if autotune is not None:
        config, kept, chosen = autotune
        rec["config"] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.num_ctas not in (None, 1):
            rec["config"]["num_ctas"] = config.num_ctas
        if config.maxnreg is not None:
            rec["config"]["maxnreg"] = config.maxnreg
        rec["kept"], rec["chosen"], rec["autotuned"] = bool(kept), bool(chosen), True
    else:
        # launched as it is: its meta-parameters are its block sizes (named BLOCK_*)
        blocks = {k: v for k, v in rec["constexprs"].items() if k.startswith("BLOCK")}
        rec["config"] = {**blocks, "num_warps": num_warps, "num_stages": num_stages}
        rec["kept"], rec["chosen"], rec["autotuned"] = True, True, False
    rec["compile_s"] = round(compile_s, 3)
    rec.update(dict.fromkeys(_ANALYSIS_KEYS), loads=None)
    if kernel is not None:
        params = [n if str(t).startswith("*") else None for n, t in types.items() if t != "constexpr"]
        rec.update(analyse(kernel, params))
        rec["loads"] = "; ".join(
            f"{p}: {' + '.join(kinds)}" for p, kinds in rec["load_counts"].items()
            if p == "?" or any(types.get(q) == activation_type for q in p.split("+")))
        rec["hash"] = kernel.hash
    rec["error"] = error
    return rec


# ---------------------------------------------------------------------------------------------
# one job: every mode of the op at one shape and dtype

MODES = {
    # name: (training, needs grad, runs backward)
    "inference": (False, False, False),
    "train": (True, True, True),
    "train_no_grad": (True, False, False),
    "frozen_bn": (False, True, True),
    # the whole bottleneck (kernels/bottleneck.py) whose grouped conv has this shape
    "block_inference": (False, False, False),
    "block_train": (True, True, True),
}


def _run_block(mode, shape, n, dtype):
    """The fused bottlenecks (kernels/bottleneck.py) whose grouped conv is ``shape``
    (``benchmarks.shapes.block_inplanes``)."""
    from benchmarks.shapes import block_inplanes, bottleneck_of
    from kernels.bottleneck import fused_bottleneck

    training, grad, backward = MODES[mode]
    for inplanes in block_inplanes(shape):
        block = bottleneck_of(shape, inplanes).train(training)
        x = torch.empty((n, inplanes, shape.size, shape.size), dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = fused_bottleneck(x, block)
        if backward:
            y.backward(torch.empty_like(y))


def _run_mode(op, mode, n, c, h, w, groups, stride, dtype):
    """One call of the public op (and its backward) on uninitialised channels-last CPU tensors,
    the layout ResNeXt runs in for speed (NCHW only adds PyTorch's own layout copies)."""
    training, grad, backward = MODES[mode]
    x = torch.empty((n, c, h, w), dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.empty((c, c // groups, 3, 3), dtype=dtype)
    gamma, beta = torch.ones(c), torch.zeros(c)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    for t in (x, weight, gamma, beta):
        t.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = op.grouped_conv_bn_relu(x, weight, gamma, beta, running_mean, running_var, stride=stride,
                                    padding=1, groups=groups, training=training)
        if backward:
            y.backward(torch.empty_like(y))


OP_MODES = ("inference", "train", "train_no_grad", "frozen_bn")  # the op's; the block_* modes are --blocks


def compile_job(shape, batch, dtype_name, modes, configs="chosen"):
    """Compile into Triton's cache what the op or block launches in ``modes`` at ``shape`` would,
    ``configs`` ("chosen", "kept", "all") of each autotuned kernel, without analysing it: a
    machine's cache warmed in parallel before its first launch. Returns (compiles, errors)."""
    global COMPILE
    COMPILE = configs
    install()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    compiles, errors = 0, []
    for mode in modes:
        LAUNCHES.clear()
        try:
            if mode.startswith("block"):
                _run_block(mode, shape, batch, getattr(torch, dtype_name))
            else:
                _run_mode(install(), mode, batch, shape.channels, shape.size, shape.size, shape.groups, shape.stride,
                          getattr(torch, dtype_name))
        except Exception as e:
            errors.append(f"{shape.id} {dtype_name} {mode}: {type(e).__name__}: {str(e)[:300]}")
        compiles += len(LAUNCHES)
        errors += [f"{shape.id} {dtype_name} {mode} {fn.fn.__name__}: {err}" for fn, _, err, *_ in LAUNCHES if err]
    return compiles, errors


def run_job(shape, batch, dtype_name, modes=OP_MODES):
    """Records of every kernel launch of the op in each of ``modes`` at ``shape`` (a
    ``benchmarks.shapes.BlockShape``), one per compiled kernel, merged across modes."""
    op = install()
    # triton 3.9 warns that FP fusion stays on by default until 3.10: as at a real launch
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    dtype = getattr(torch, dtype_name)
    activation_type = "*" + {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype_name]
    records, failures = {}, []
    for mode in modes:
        LAUNCHES.clear()
        try:
            if mode.startswith("block"):
                _run_block(mode, shape, batch, dtype)
            else:
                _run_mode(op, mode, batch, shape.channels, shape.size, shape.size, shape.groups, shape.stride,
                          dtype)
        except Exception as e:  # the op itself failed on the way: report, keep going
            failures.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        for launch in LAUNCHES:
            rec = describe_launch(*launch, activation_type)
            key = rec.get("hash") or (rec["kernel"], json.dumps(rec["config"], sort_keys=True), rec["error"])
            if key in records:
                if mode not in records[key]["modes"]:
                    records[key]["modes"].append(mode)
                records[key]["kept"] |= rec["kept"]
                records[key]["chosen"] |= rec["chosen"]
                continue
            rec.pop("hash", None)
            rec = {
                "kernel": rec.pop("kernel"),
                "shape": {"arch": shape.arch, "stage": shape.label, "N": batch, "C": shape.channels,
                          "H": shape.size, "W": shape.size, "groups": shape.groups},
                "stride": shape.stride, "dtype": dtype_name, "modes": [mode], **rec,
            }
            records[key] = rec
    return list(records.values()), failures
