"""Triton kernels for ResNeXt's grouped 3x3 conv + BatchNorm + ReLU, and for its whole bottleneck.

Public: ``kernels.grouped_conv_bn_relu`` (the fused op, function and module) and
``kernels.bottleneck`` (the fused bottleneck, function and module). The kernels live by family in
``conv3x3/``, ``conv1x1/`` and ``batchnorm/``, with shared Triton helpers in ``common.py``; which
config each autotuned kernel launches with (shipped tables, else a heuristic) in ``configs/``.

The kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter. Triton decides
which when a kernel is *decorated*, i.e. when ``kernels.grouped_conv_bn_relu`` is imported, so the
switch has to be thrown first::

    import kernels
    kernels.enable_interpreter()          # or: export TRITON_INTERPRET=1
    from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu

This package's ``__init__`` deliberately imports nothing heavy so that the switch can be thrown
before the kernels exist.
"""

import os
import sys

__all__ = ["enable_interpreter", "interpreter_enabled", "auto_select_backend", "clear_caches"]

# any of these imported means Triton kernels are already decorated (kernels.common: every family's)
_KERNEL_MODULES = ("kernels.grouped_conv_bn_relu", "kernels.bottleneck", "kernels.common")


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def enable_interpreter() -> None:
    """Run the Triton kernels on CPU tensors through Triton's interpreter.

    Must be called before ``kernels.grouped_conv_bn_relu`` is imported; raises RuntimeError
    otherwise, because kernels already decorated for the GPU would ignore the switch.
    """
    if interpreter_enabled():
        return
    loaded = [m for m in _KERNEL_MODULES if m in sys.modules]
    if loaded:
        raise RuntimeError(
            f"enable_interpreter() was called after {loaded[0]} was imported; Triton reads "
            "TRITON_INTERPRET when kernels are decorated. Set TRITON_INTERPRET=1 in the "
            "environment, or call kernels.enable_interpreter() before importing the kernels."
        )
    os.environ["TRITON_INTERPRET"] = "1"


def auto_select_backend(verbose: bool = True) -> str:
    """Pick ``"cuda"`` when a GPU is present, else switch on the interpreter and pick ``"cpu"``.

    Prints a one-line notice when it switches the interpreter on.
    """
    import torch

    if interpreter_enabled():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    enable_interpreter()
    if verbose:
        print("no CUDA GPU found: running the Triton kernels on the CPU through Triton's interpreter "
              "(TRITON_INTERPRET=1; slow, for correctness and demos)")
    return "cpu"


def clear_caches() -> None:
    """Forget the packed weights and folded BatchNorms that inference reuses while the tensors keep
    their version: needed only after writing to a weight or BatchNorm buffer through ``.data``, which
    does not bump the version (``kernels.common.VersionedCache``)."""
    if "kernels.common" in sys.modules:  # nothing is cached before the kernels exist
        sys.modules["kernels.common"].clear_caches()
