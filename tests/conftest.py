"""Test setup: without a CUDA GPU, run the Triton kernels through Triton's interpreter.

This must happen before anything imports ``kernels.grouped_conv_bn_relu`` (Triton reads the
switch when the kernels are decorated), so it lives at the top of the root conftest.
"""

import os

import pytest
import torch

import kernels

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = kernels.interpreter_enabled()  # the kernels' own rule for the switch
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def device():
    """Where the kernels run: ``cuda`` on a GPU with the interpreter off, else ``cpu``."""
    return DEVICE


@pytest.fixture(autouse=True)
def _strict_fp32():
    """The float32 references must not use TF32 on the GPU (our kernels follow the same flag)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture(params=["interpreter-tiles", "gpu-tiles"])
def tiles(request):
    """Run the test with the interpreter's tiles, then with the GPU's (``kernels.common.gpu_tiles``:
    the GPU's pixel tiles and configs, so their loops and masked tails, its pixel splits and its
    backward composition, dz rebuilt in the conv kernels, all on the CPU). A GPU has its own only."""
    from kernels.common import gpu_tiles

    if request.param == "interpreter-tiles":
        if not INTERPRET:
            pytest.skip("a GPU runs its own tiles only (the gpu-tiles case)")
        yield request.param
    else:
        with gpu_tiles():
            yield request.param


def _fixed_order_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """The interpreter's ``tl.dot`` with each output's sum in the order of K alone: a float32 product
    added for k = 0, 1, ..., K-1 (exact products, one rounding per addition), then ``d`` added, as
    Triton's own ``create_dot`` adds it after ``np.matmul``."""
    import numpy as np

    if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
        raise NotImplementedError("fixed_order_dot: 8-bit operands")
    out = d.data.dtype
    a_data, b_data = a.data.astype(out, copy=False), b.data.astype(out, copy=False)
    acc = a_data[..., :, 0:1] * b_data[..., 0:1, :]
    product = np.empty_like(acc)
    for k in range(1, a_data.shape[-1]):
        np.multiply(a_data[..., :, k:k + 1], b_data[..., k:k + 1, :], out=product)
        acc += product
    return type(d)(acc + d.data, d.dtype.scalar)


@pytest.fixture
def fixed_order_dot(monkeypatch):
    """For tests that compare the bits of two configs: under the interpreter ``tl.dot`` is numpy's
    ``matmul``, and whether an output's sum depends on the tile's M and N is the BLAS kernel's choice
    (OpenBLAS's Haswell sgemm, picked on an AMD EPYC: a row of A @ B changes with the rows beside it;
    the machines before gave the same bits). A GPU's MMA sums each output in an order set by K,
    whatever the tile: this makes the interpreter's dot do the same (16x slower than matmul, so only
    where asked)."""
    if INTERPRET:
        from triton.runtime.interpreter import InterpreterBuilder

        monkeypatch.setattr(InterpreterBuilder, "create_dot", _fixed_order_dot)
    yield
