"""Checkpoints: torchvision / timm / training checkpoints loaded into the ResNeXt models, and the
trainer's own (written atomically, read with a plain-words reason when they cannot be, and the RNG
states every rank resumes from).

Our state_dict keys are torchvision's, so a torchvision or timm ``tv_in1k`` checkpoint loads as
is. What differs between sources is the wrapping: training scripts save ``{"state_dict": ...}``
or ``{"model": ...}``, DataParallel/DDP add ``module.``, wrapper modules ``model.`` and
``torch.compile`` ``_orig_mod.``.
:func:`load_state_dict` undoes those and otherwise reports precisely what does not match.
"""

import codecs
import io
import os
import random
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Dict, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["load_state_dict", "clean_state_dict", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "check_resumable", "load_weights", "rng_state", "set_rng_state", "gather_rng_states"]

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


# ---------------------------------------------------------------------------------------------
# The trainer's checkpoints (resnext.train)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from or loaded, with the reason in plain words (the
    trainer prints it as its one ``error:`` line)."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world_size: int) -> list:
    """Every rank's RNG states, so that each resumes its own stream (ranks augment differently)."""
    if world_size == 1:
        return [rng_state()]
    buf = io.BytesIO()
    torch.save(rng_state(), buf)  # all_gather_object cannot carry tensors on torch 2.13
    blobs = [None] * world_size
    dist.all_gather_object(blobs, buf.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint (``weights_only``); a missing or unreadable file raises :class:`CheckpointError`
    that says why in plain words."""
    if not os.path.exists(path):
        raise CheckpointError(f"--resume {path}: no such file")
    reason = None
    if os.path.isdir(path):
        hint = " (did you mean its last.pt?)" if os.path.isfile(os.path.join(path, "last.pt")) else ""
        reason = f"is a directory{hint}"
    elif os.path.getsize(path) == 0:
        reason = "is empty (0 bytes)"
    else:
        try:
            with warnings.catch_warnings():  # about pickle protocols: noise beside the one error line
                warnings.simplefilter("ignore")
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's messages run to paragraphs; say which case this is instead
            reason = why_unloadable(path, e)
        else:
            if not isinstance(ckpt, dict):
                reason = f"holds a {type(ckpt).__name__}, not a checkpoint dict"
    if reason:
        raise CheckpointError(f"--resume {path}: not a readable checkpoint: it {reason}")
    return ckpt


def why_unloadable(path: str, error: Exception) -> str:
    """Why ``torch.load(path)`` raised ``error``, as a predicate of the file."""
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or error})"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        if not zipfile.is_zipfile(path):
            return "is truncated or corrupt (not a complete zip archive)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "is a zip archive, but not one that torch.save wrote (no data.pkl)"
        return "is corrupt (a file inside its zip archive cannot be read)"
    if head.startswith(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"):  # torch < 1.6's magic number
        return "is truncated or corrupt (torch's legacy format)"
    unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if unsafe:
        return f"holds a {unsafe.group(1)} object, which weights_only loading refuses (tensors and plain data)"
    if head.startswith(b"\x80"):
        return "is a plain Python pickle, not a file that torch.save wrote"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # tolerates a character cut at 4096 bytes
        return "is a text file, not a file that torch.save wrote"
    except UnicodeDecodeError:
        return "is not a file that torch.save wrote (neither a zip archive nor torch's legacy format)"


# What a training resume reads from ``last.pt``; ``best.pt`` and bare state dicts hold weights only.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "partial", "best_top1", "rng",
               "config")


def check_resumable(ckpt: dict, path: str) -> None:
    """Training resumes only from a full checkpoint (``last.pt``): say what a lesser one lacks."""
    if "optimizer" not in ckpt and ("model" in ckpt or ckpt and all(map(torch.is_tensor, ckpt.values()))):
        raise CheckpointError(f"--resume {path}: holds weights only (no config or optimizer state); use it with "
                              "--eval-only")
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path}: not a training checkpoint: it lacks {', '.join(missing)}")
    if not all(isinstance(ckpt[key], kind) for key, kind in (("epoch", int), ("step", int), ("config", dict))):
        raise CheckpointError(f"--resume {path}: not a training checkpoint: its epoch, step or config is malformed")


def load_weights(model: nn.Module, ckpt: dict, path: str) -> None:
    try:
        load_state_dict(model, ckpt)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"--resume {path}: {'; '.join(line.strip() for line in str(e).splitlines())}") from None
