"""ResNeXt models with an optional fused grouped conv + BN + ReLU Triton kernel in every block.

``import resnext`` does not import the Triton kernels: they are loaded by ``fuse_kernels`` (or a
builder's ``fused_kernels=True``), so ``kernels.auto_select_backend()`` can run first.
"""

from .checkpoint import clean_state_dict, load_state_dict
from .models import (
    Bottleneck,
    CifarResNeXt,
    ResNeXt,
    create_model,
    fuse_kernels,
    list_models,
    resnext29_8x64d,
    resnext29_16x64d,
    resnext50_32x4d,
    resnext101_32x4d,
    resnext101_32x8d,
    resnext101_32x16d,
    resnext101_64x4d,
    resnext152_32x4d,
    resnext_tiny,
    unfuse_kernels,
)

__all__ = [
    "Bottleneck", "ResNeXt", "CifarResNeXt",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "resnext152_32x4d", "resnext101_32x16d", "resnext29_8x64d", "resnext29_16x64d", "resnext_tiny",
    "fuse_kernels", "unfuse_kernels", "list_models", "create_model",
    "load_state_dict", "clean_state_dict",
]
