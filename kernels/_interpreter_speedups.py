"""Make Triton's interpreter fast enough to train a small model on a CPU (triton 3.6-3.9).

Imported only when TRITON_INTERPRET=1. None of this changes a computed value. The two interpreter
patches touch private API, so each is applied only where the attribute it replaces exists.
"""

import dataclasses

import numpy as np
from triton.runtime import interpreter as _interpreter

# The interpreter's tl.dot is numpy's matmul on skinny (pixels x 16) operands, for which a
# multi-threaded OpenBLAS spends its time waiting on its own threads: 100x slower than one thread
# on a busy 2-core machine (0.08 ms vs 7.6 ms for 8192x16 @ 16x16). Only numpy's BLAS is limited;
# torch's own threads (OpenMP) are left alone.
try:
    from threadpoolctl import threadpool_limits
except ImportError:  # an optional speed-up only
    threadpool_limits = None
if threadpool_limits is not None:
    threadpool_limits(limits=1, user_api="blas")

# The GPU compiler drops Triton's integer-overflow checks unless debugging; the interpreter always
# runs them, and they were about half of its time on these index-heavy kernels. Match the GPU.
_builder = getattr(_interpreter, "interpreter_builder", None)
if _builder is not None and hasattr(_builder.options, "sanitize_overflow"):
    _builder.options = dataclasses.replace(_builder.options, sanitize_overflow=False)

# Its float16 tl.dot calls np.matmul(f16, f16, dtype=float32), a slow non-BLAS loop (~7x slower
# here than the product of the exactly widened float32 operands we substitute).
_slow_dot = getattr(getattr(_interpreter, "InterpreterBuilder", None), "create_dot", None)


def _fast_f16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.data.dtype == np.float16 and b.data.dtype == np.float16 and d.data.dtype == np.float32:
        prod = np.matmul(a.data.astype(np.float32), b.data.astype(np.float32))
        return _interpreter.TensorHandle(prod + d.data, d.dtype.scalar)
    return _slow_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


if _slow_dot is not None and hasattr(_interpreter, "TensorHandle"):
    _interpreter.InterpreterBuilder.create_dot = _fast_f16_dot
