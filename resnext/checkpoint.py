"""Load torchvision / timm / training checkpoints into the ResNeXt models.

Our state_dict keys are torchvision's, so a torchvision or timm ``tv_in1k`` checkpoint loads as
is. What differs between sources is the wrapping: training scripts save ``{"state_dict": ...}``
or ``{"model": ...}``, DataParallel/DDP add ``module.``, wrapper modules ``model.`` and
``torch.compile`` ``_orig_mod.``.
:func:`load_state_dict` undoes those and otherwise reports precisely what does not match.
"""

import os
from collections.abc import Mapping
from typing import Dict, Union

import torch
import torch.nn as nn

__all__ = ["load_state_dict", "clean_state_dict"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, wrapper modules, torch.compile
_SHOW = 5  # keys listed per kind of mismatch in an error message


def clean_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict"|"model"|"model_state_dict": ...}`` and strip prefixes all keys share."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError("checkpoint must be a path or a state dict (a mapping), "
                        f"got {type(checkpoint).__name__}")
    state = checkpoint
    while not _holds_tensors(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                "checkpoint holds no tensors and none of the wrapper keys "
                f"{list(_WRAPPER_KEYS)}; its top-level keys are {sorted(map(str, state))[:10]}"
            )
        state = inner
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _holds_tensors(state: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in state.values())


def _listing(kind: str, keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"  {len(keys)} {kind}: {shown}"


def load_state_dict(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                    strict: bool = True) -> nn.Module:
    """Load ``checkpoint`` (a file path or a state dict) into ``model`` in place; returns ``model``.

    Files are read with ``torch.load(map_location="cpu", weights_only=True)``. Missing
    ``num_batches_tracked`` buffers are tolerated (torchvision's older checkpoints lack them;
    BatchNorm fills them in). With ``strict=True`` any missing or unexpected key, or any shape
    mismatch, raises ValueError listing the first few of each with their counts; with
    ``strict=False`` only shape mismatches raise and the matching keys are loaded.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = clean_state_dict(checkpoint)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"checkpoint does not match {type(model).__name__} "
                 f"({len(state)} keys in checkpoint, {len(expected)} in model):"]
        for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("shape mismatches", mismatched)):
            if keys:
                lines.append(_listing(kind, keys))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=False)
    return model
