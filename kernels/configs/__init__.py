"""Which config an autotuned kernel launches with: shipped tables, then a heuristic, no benchmarking.

Every launch of an autotuned kernel goes through ``launch``. Unless a config is forced (tests), it
takes, in order:

1. the table of the GPU in use, ``kernels/configs/<name>.json``, name = ``torch.cuda.get_device_name()``
   with every run of other characters than letters and digits made one ``_`` (``NVIDIA_H200``), as
   vLLM and SGLang ship theirs;
2. the table of its architecture family, ``kernels/configs/sm_<major><minor>.json`` (``sm_90``);
3. the kernel's heuristic: the first shipped config its own pruning keeps (the smallest tile, so the
   most CTAs per SM; the pruning budgets come from the compile report: no spills, shared memory that
   fits), or a kernel-specific choice (``kernels.conv3x3.tiles.prefer_l1_loads``).

A table entry is keyed by kernel, the activation dtype and a shape key: the kernel's autotune key
without the batch and spatial sizes (channels, channels per group, stride, mode flags, precision),
plus ``M=2^k``, the bucket of the pixel count. Where a table lacks a launch's bucket, its entry for the
nearest bucket of the same key is used. A table that cannot be read, or that was tuned with another
Triton (major.minor), is ignored with one warning, and so is an entry whose config the kernel does
not ship or prunes for that launch. ``python -m benchmarks.tune`` writes the tables.

``RESNEXT_AUTOTUNE=1`` (read on import) brings back Triton's autotuner: every config benchmarked at
the first call of each tuning key, the choice kept on disk (``kernels/_autotune.py``). Under Triton's
interpreter the kernels launch their one interpreter config, or with ``kernels.common.gpu_tiles()``
the heuristic's GPU config.

Table format::

    {"device": "NVIDIA H200", "triton": "3.6.0", "made_by": "python -m benchmarks.tune ...",
     "kernels": {"_fwd_kernel": {"bfloat16 M=2^20 C_in=128 ...": {"kwargs": {"BLOCK_M": 128},
                                                                  "num_warps": 4, "num_stages": 1, "ms": 0.21}}}}
"""

import json
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import triton

from ..common import INTERPRET, TILES

TABLES = Path(__file__).parent
# read on import; the compile report (benchmarks/_aot.py) sets it to compile every config
AUTOTUNE = os.environ.get("RESNEXT_AUTOTUNE", "0") == "1"
# autotune key arguments that size the problem rather than shape it: replaced by the pixel bucket
_SIZE_KEYS = ("N_BUCKET", "M_BUCKET", "H", "W")
_CHOSEN = {}  # (kernel, device, dtype, tuning key) -> triton.Config, per process
_KEY_POSITIONS = {}  # kernel -> positions of its tuning key's arguments
# ``tuner(kernel, grid, args, meta) -> config`` replaces ``choose`` while benchmarks.tune runs
TUNER = None


def triton_release(version=triton.__version__):
    """(major, minor) of a Triton version string."""
    return tuple(int(v) for v in re.findall(r"\d+", version)[:2])


def table_name(device_name):
    """File stem of a GPU's table: ``NVIDIA H200`` -> ``NVIDIA_H200``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def config_entry(config, ms=None):
    """A table entry for ``config`` (and its measured time)."""
    entry = {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}
    if ms is not None:
        entry["ms"] = round(float(ms), 5)
    return entry


def _same(config, entry):
    return (config.kwargs == entry.get("kwargs") and config.num_warps == entry.get("num_warps")
            and config.num_stages == entry.get("num_stages"))


@lru_cache(maxsize=None)
def load_table(path):
    """The ``kernels`` mapping of the table at ``path``, or None (absent; unreadable or from another
    Triton: one warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        kernels = table["kernels"]
        tuned_with = str(table["triton"])
        if not isinstance(kernels, dict) or not all(isinstance(v, dict) for v in kernels.values()):
            raise ValueError("'kernels' must map kernel names to {key: entry}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring config table {path} ({type(e).__name__}: {e}); using the heuristic configs",
                      stacklevel=2)
        return None
    if triton_release(tuned_with) != triton_release():
        warnings.warn(f"ignoring config table {path}: tuned with triton {tuned_with}, this is triton "
                      f"{triton.__version__}; using the heuristic configs (re-tune: python -m benchmarks.tune)",
                      stacklevel=2)
        return None
    return kernels


def tables_of(device_name, capability):
    """Table paths of a GPU, most specific first: its own, then its architecture family's."""
    major, minor = capability
    return TABLES / f"{table_name(device_name)}.json", TABLES / f"sm_{major}{minor}.json"


@lru_cache(maxsize=None)
def device_tables(device):
    """``tables_of`` the CUDA GPU ``device``; none elsewhere."""
    if device.type != "cuda":
        return ()
    return tables_of(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def table_key(kernel, named):
    """``(kernel name, shape key without the bucket, log2 of the pixel bucket)`` of a launch."""
    dtype = next(v.dtype for v in named.values() if isinstance(v, torch.Tensor))
    pixels = named["M"] if "M" in named else named["N"] * named["H"] * named["W"]
    fields = " ".join(f"{k}={named[k]}" for k in kernel.keys if k not in _SIZE_KEYS)
    bucket = max(0, int(pixels) - 1).bit_length()
    return kernel.base_fn.__name__, f"{str(dtype).removeprefix('torch.')} {fields}", bucket


def format_key(shape_key, bucket):
    dtype, _, fields = shape_key.partition(" ")
    return f"{dtype} M=2^{bucket} {fields}".rstrip()


def _parse_key(key):
    match = re.fullmatch(r"(\S+) M=2\^(\d+)(.*)", key)
    return (f"{match[1]}{match[3]}", int(match[2])) if match else (None, None)


def kept_configs(kernel, named, meta):
    """The kernel's GPU configs that its pruning keeps for a launch (at least one)."""
    prune = kernel.early_config_prune
    configs = kernel.gpu_configs
    return prune(configs, named, **meta) if prune and len(configs) > 1 else list(configs)


def _from_table(kernels, name, shape_key, bucket, kept, path):
    entries = (kernels or {}).get(name)
    if not entries:
        return None
    key = format_key(shape_key, bucket)
    if key not in entries:  # the nearest pixel bucket of the same shape key
        near = [(abs(b - bucket), k) for k in entries for s, b in [_parse_key(k)] if s == shape_key]
        key = min(near)[1] if near else None
    if key is None:
        return None
    config = next((c for c in kept if _same(c, entries[key])), None)
    if config is None:
        _warn_once(f"ignoring {path.name}'s {name} entry for '{key}': {entries[key]} is not a config the kernel "
                   f"ships and keeps there; using the next table or the heuristic")
    return config


@lru_cache(maxsize=None)
def _warn_once(message):
    warnings.warn(message, stacklevel=3)


def pick(kernel, named, meta, paths):
    """The config a launch with positional arguments ``named`` (by name) and ``meta`` takes from the
    tables at ``paths`` (in order), else from the kernel's heuristic. Not cached."""
    name, shape_key, bucket = table_key(kernel, {**named, **meta})
    kept = kept_configs(kernel, named, meta)
    for path in paths:
        config = _from_table(load_table(path), name, shape_key, bucket, kept, path)
        if config is not None:
            return config
    return kernel.heuristic(kept)


def choose(kernel, args, meta):
    """The config a launch of autotuned ``kernel`` runs with (``pick``, cached per tuning key and
    device), or None under RESNEXT_AUTOTUNE=1 (Triton's autotuner decides)."""
    if INTERPRET and not TILES.gpu_configs:
        return kernel.configs[0]  # the interpreter's one config
    if AUTOTUNE:
        return None
    # the tuning key's positional arguments, the activation (first argument) and the constexprs:
    # what decides the config, hashed without building the table key on every launch
    positions = _KEY_POSITIONS.get(kernel)
    if positions is None:
        positions = _KEY_POSITIONS[kernel] = tuple(i for i, name in enumerate(kernel.arg_names) if name in kernel.keys
                                                   and i < len(args))
    first = args[0]
    cache_key = (kernel, first.device, first.dtype, *(args[i] for i in positions), *meta.items())
    config = _CHOSEN.get(cache_key)
    if config is None:
        named = dict(zip(kernel.arg_names, args))
        config = _CHOSEN[cache_key] = pick(kernel, named, meta, device_tables(first.device))
    return config


def launch(kernel, grid, config, *args, **meta):
    """Launch an autotuned kernel with ``config``, or with the one ``choose`` picks (None: the autotuner).

    Tests force each shipped config in turn through ``config``."""
    if config is None:
        config = TUNER(kernel, grid, args, meta) if TUNER is not None else choose(kernel, args, meta)
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def first_kept(kept):
    """The default heuristic: the first (smallest) config the pruning keeps."""
    return kept[0]
