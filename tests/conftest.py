"""Test setup: without a CUDA GPU, run the Triton kernels through Triton's interpreter.

This must happen before anything imports ``kernels.grouped_conv_bn_relu`` (Triton reads the
switch when the kernels are decorated), so it lives at the top of the root conftest.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
