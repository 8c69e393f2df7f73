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
