"""``triton.autotune`` with its choices kept on disk, so that a second process or rank does not re-tune.

Triton 3.6 and 3.9 both cache autotuning results when ``cache_results=True`` (or
``TRITON_CACHE_AUTOTUNING=1``): the first process to meet a tuning key benchmarks the configs
and writes every config's timing to ``<TRITON_CACHE_DIR>/<hash>/<kernel name>.autotune.json``
(``TRITON_CACHE_DIR`` defaults to ``~/.triton/cache``, next to Triton's compiled kernels); a
later process with the same hash reads the best config from there instead of benchmarking. The
hash (``Autotuner.check_disk_cache``) covers Triton's version, the target (backend and GPU
architecture, e.g. cuda sm_90), the kernel's source and the jit functions it calls, the
cache-invalidating ``TRITON_*`` environment variables, the tuning key (our ``key`` arguments,
i.e. shape bucket, channels, stride, mode and precision, plus every tensor argument's dtype) and
the configs left after pruning. So any change to a kernel, a config or the hardware re-tunes.

Limitations: ranks that start together still tune concurrently (the cache helps the next launch,
not the first one); a config chosen on a busy GPU stays chosen until the file is deleted; Triton
switches the cache off under its interpreter, which has one config per kernel anyway.
``RESNEXT_AUTOTUNE_CACHE=0`` (read when the kernels are imported) turns the disk cache off.
"""

import inspect
import os

import triton

# Both supported Triton versions have it; a future one without it tunes in every process.
SUPPORTS_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters
MADE = []  # every Autotuner made here (the tests check that each autotuned kernel is one)


def cache_enabled():
    """Whether autotuned kernels decorated now keep their results on disk."""
    return SUPPORTS_CACHE and os.environ.get("RESNEXT_AUTOTUNE_CACHE", "1") != "0"


def autotune(config_factory, key, heuristic=None, **kwargs):
    """``triton.autotune(configs=config_factory(), key=key, **kwargs)``, with ``cache_results=True``
    where this Triton supports it (see the module docstring). ``config_factory(interpret=...)``
    gives the configs of the interpreter or of a GPU; the tuner keeps the GPU's as ``gpu_configs``
    and ``heuristic(kept configs) -> config`` as ``heuristic`` (default: the first), which
    ``kernels.configs`` launch without benchmarking."""
    from .common import INTERPRET
    from .configs import first_kept

    if cache_enabled():
        kwargs.setdefault("cache_results", True)
    decorate = triton.autotune(configs=config_factory(), key=key, **kwargs)

    def decorator(fn):
        tuner = decorate(fn)
        tuner.gpu_configs = config_factory(interpret=False) if INTERPRET else tuner.configs
        tuner.heuristic = heuristic or first_kept
        MADE.append(tuner)
        return tuner

    return decorator
