"""Train or evaluate any ResNeXt, with or without the fused grouped conv + BN + ReLU kernels.

Runs from a laptop without a GPU (the Triton kernels then run through Triton's interpreter) to a
multi-GPU node (``torchrun``: DistributedDataParallel, NCCL on GPUs, gloo on CPUs)::

    # Offline, no GPU, a few minutes: scikit-learn's bundled digits on a tiny ResNeXt.
    python -m resnext.train --fused-kernels

    # ImageNet with the paper's recipe (SGD, lr 0.1 per 256 images, x0.1 every 30 of 100 epochs).
    torchrun --nproc_per_node=8 -m resnext.train --data /data/imagenet --fused-kernels --amp bf16 \\
        --channels-last

    # Throughput: random data, one epoch; the step captured in one CUDA graph (no per-launch host cost).
    python -m resnext.train --synthetic --arch resnext101_32x8d --batch-size 128 --amp bf16
    python -m resnext.train --synthetic --fused-kernels --amp bf16 --channels-last --cuda-graphs

    # Continue after Ctrl-C, a crash or a preemption; evaluate a checkpoint.
    python -m resnext.train --resume runs/digits-resnext_tiny/last.pt
    python -m resnext.train --resume runs/digits-resnext_tiny/best.pt --eval-only

Defaults depend on the dataset (``DATASET_DEFAULTS``); every flag given on the command line
overrides them. ``--lr`` is the absolute peak learning rate; left out, it is ``lr_base`` per 256
images scaled linearly with the global batch (``--batch-size`` is per process). ``--resume``
restores the checkpoint's config, and flags given alongside it override that config. A resumed
run prints ``resumed from PATH at epoch E/N, S of T steps done`` (E counted from 1, as in the
progress bar; S steps of epoch E were run before). Resuming a run that has finished all its
epochs says so and exits 0 without building anything or rewriting any file (so a requeue loop
that always passes ``--resume last.pt`` ends cleanly); ``--eval-only`` evaluates it.

Writes to ``--out`` (rank 0 only): ``metrics.jsonl`` (one JSON line per epoch), ``last.pt``
(every epoch and on Ctrl-C/SIGTERM, written atomically), ``best.pt`` (best top-1 weights) and
``curves.png``. The row of an epoch resumed part-way has ``"partial_epoch": true`` and
``"resumed_at_step": S``, and ``images_per_s_since_resume`` / ``epoch_time_since_resume`` in place
of ``images_per_s`` / ``epoch_time``: they cover only the steps this process ran. Bad input
(flags, ``--out``, the ``--resume`` file) exits with one ``error: ...`` line and status 2 before
any file is written; a NaN loss stops the run with status 1 and keeps the last good checkpoint;
an interrupted run exits with status 130.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import resnext
from resnext import data as data_lib
from resnext.checkpoint import (CheckpointError, check_resumable, gather_rng_states, load_checkpoint, load_weights,
                                save_checkpoint, set_rng_state)
from resnext.data import DataError

__all__ = ["TrainConfig", "TrainError", "NonFiniteLossError", "DATASET_DEFAULTS", "build_parser",
           "parse_args", "resolve_config", "setup_runtime", "prepare_out_dir", "build_data", "build_model",
           "build_optimizer", "build_scheduler", "train_one_epoch", "recompute_bn_stats", "evaluate",
           "save_checkpoint", "load_checkpoint", "plot_curves", "main"]


class TrainError(ValueError):
    """Bad input to the trainer (flags, checkpoint); main() prints it on one line and exits 2."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    # data
    data: Optional[str] = None          # ImageFolder root with train/ and val/; None: bundled digits
    synthetic: bool = False             # random images (throughput runs); overrides --data
    synthetic_samples: int = 2560       # training images per epoch with --synthetic
    image_size: Optional[int] = None    # input side in pixels (train crop / val centre crop)
    workers: Optional[int] = None       # DataLoader worker processes per rank
    # model
    arch: Optional[str] = None          # any name in resnext.list_models()
    fused_kernels: Union[bool, str] = False  # False, "conv" (grouped conv + BN + ReLU) or "block"
    channels_last: bool = False         # NHWC activations and weights
    compile: bool = False               # torch.compile the model
    cuda_graphs: bool = False           # capture the whole training step in one CUDA graph, replay it
                                        # (static shapes: the last partial batch is dropped; GPU only)
    sync_bn: bool = False               # SyncBatchNorm: BN statistics of the global batch (torchrun)
    # optimisation (torch's optimizers and schedulers; the schedule steps every iteration)
    opt: Optional[str] = None           # "sgd" (with momentum) | "adamw"
    epochs: Optional[int] = None        # total epochs
    batch_size: Optional[int] = None    # images per step per process (global = x world size)
    lr: Optional[float] = None          # peak learning rate; None: lr_base * global batch / 256
    lr_base: Optional[float] = None     # learning rate per 256 images, used when lr is None
    momentum: float = 0.9               # SGD momentum
    weight_decay: Optional[float] = None  # on every parameter, as in the paper (decoupled for adamw)
    schedule: Optional[str] = None      # "step": x lr_gamma every lr_step_epochs; "cosine": to 0
    lr_step_epochs: int = 30            # step schedule period
    lr_gamma: float = 0.1               # step schedule factor
    warmup_epochs: Optional[float] = None  # linear warmup from 1% of lr, before either schedule
    label_smoothing: float = 0.0        # cross-entropy label smoothing
    precise_bn: Optional[int] = None    # before each evaluation, recompute BN statistics over this
                                        # many training images (0: keep the running averages)
    amp: Optional[str] = None           # autocast dtype: "bf16" | "fp16" (with a GradScaler) | None
    # run
    seed: int = 0                       # model init, shuffling and augmentation
    out: Optional[str] = None           # output directory; None: runs/<dataset>-<arch>
    resume: Optional[str] = None        # checkpoint to continue from (or to evaluate)
    eval_only: bool = False             # evaluate and exit


# Defaults per dataset; a flag given on the command line always wins.
_SEED_RECIPE = dict(arch="resnext50_32x4d", image_size=224, opt="sgd", batch_size=32, lr_base=0.1,
                    weight_decay=1e-4, schedule="step", warmup_epochs=0, precise_bn=0)
DATASET_DEFAULTS = {
    # The seed's recipe (Xie et al. 2017): SGD, 32 per GPU x 8 GPUs at lr 0.1, x0.1 every 30 epochs.
    "imagenet": dict(_SEED_RECIPE, epochs=100, workers=8),
    "synthetic": dict(_SEED_RECIPE, epochs=1, workers=2),
    # Digits on 2 CPU cores through Triton's interpreter, where a step costs seconds: ~22 AdamW
    # steps of 128 images at 16x16. BatchNorm's running averages (momentum 0.1) lag far behind
    # weights that change this fast, so BN statistics are recomputed before each evaluation.
    "digits": dict(arch="resnext_tiny", image_size=16, opt="adamw", epochs=2, batch_size=128,
                   lr_base=0.012, weight_decay=0.05, schedule="cosine", warmup_epochs=0.25,
                   precise_bn=512, workers=0),
}
_RUN_ONLY = ("resume", "eval_only")  # never restored from a checkpoint's config
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dataset_name(cfg: TrainConfig) -> str:
    return "synthetic" if cfg.synthetic else "imagenet" if cfg.data else "digits"


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # main() prints one "error: ..." line and exits 2, as for every other bad input; argparse
        # would print the whole usage text first.
        raise TrainError(message.removeprefix("argument "))


def _one_of(*choices):
    """An argparse ``type`` naming the choices in its error, in place of argparse's ``choices=``."""
    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _default_help(name: str) -> str:
    """``name``'s default for ``--help``, from ``DATASET_DEFAULTS`` or ``TrainConfig``, so it cannot drift."""
    datasets_by_value = {}
    for dataset, defaults in DATASET_DEFAULTS.items():
        if name in defaults:
            datasets_by_value.setdefault(defaults[name], []).append(dataset)
    if len(datasets_by_value) == 1:
        return f"default: {next(iter(datasets_by_value))}"
    if datasets_by_value:
        return "default: " + ", ".join(f"{v} for {' and '.join(d)}" for v, d in datasets_by_value.items())
    value = TrainConfig.__dataclass_fields__[name].default
    return f"default: {'off' if value is False else value}"


def build_parser() -> argparse.ArgumentParser:
    """The command line: every option is left out of the result unless given (``default=None``)."""
    p = _ArgumentParser(
        prog="python -m resnext.train", description=__doc__.split("\n")[0], argument_default=None,
        epilog="Defaults 'for imagenet' apply with --data, 'for synthetic' with --synthetic, 'for digits' "
               "otherwise. With --resume, the checkpoint's config takes the place of the defaults.")
    on_off = argparse.BooleanOptionalAction

    def add(flag, help, default=None, **kwargs):
        text = f"{help} ({default or _default_help(flag[2:].replace('-', '_'))})"
        p.add_argument(flag, help=text.replace("%", "%%"), **kwargs)

    add("--data", "ImageFolder root with train/ and val/", "default: none, scikit-learn's bundled digits",
        metavar="DIR")
    add("--synthetic", "random images, for throughput runs; overrides --data", action=on_off)
    add("--synthetic-samples", "training images per epoch with --synthetic", type=int, metavar="N")
    add("--image-size", "input side in pixels: train crop and val centre crop", type=int, metavar="PX")
    add("--workers", "DataLoader worker processes per process", type=int, metavar="N")
    add("--arch", f"one of {', '.join(resnext.list_models())}", metavar="NAME")
    add("--fused-kernels", "Triton kernels: conv (alone: each block's grouped conv + BN + ReLU as one "
        "kernel) or block (each whole bottleneck, no PyTorch conv or BatchNorm inside); without a GPU, "
        "through Triton's interpreter", nargs="?", const="conv", type=_one_of("conv", "block"),
        metavar="{conv,block}")
    add("--no-fused-kernels", "PyTorch's own ops everywhere (e.g. to resume a fused run without them)",
        "default: off", action="store_false", dest="fused_kernels")
    add("--channels-last", "NHWC activations and weights", action=on_off)
    add("--compile", "torch.compile the model", action=on_off)
    add("--cuda-graphs", "capture the whole training step (forward, backward, optimizer step, BatchNorm "
        "buffers) in one CUDA graph after 3 warm-up steps and replay it: no host cost per launch. Static "
        "shapes, so each epoch's last partial batch is dropped; a GPU, one process, bf16 or no autocast, "
        "no --compile", action=on_off)
    add("--sync-bn", "BatchNorm statistics over the global batch of every process (nn.SyncBatchNorm; "
        "under torchrun on GPUs); a single process trains as without it", action=on_off)
    add("--opt", "sgd (with --momentum) or adamw", type=_one_of("sgd", "adamw"), metavar="{sgd,adamw}")
    add("--epochs", "total epochs", type=int, metavar="N")
    add("--batch-size", "images per step per process; the global batch is this x the number of processes",
        type=int, metavar="N")
    add("--lr", "peak learning rate", "default: --lr-base x global batch / 256", type=float)
    add("--lr-base", "learning rate per 256 images, used when --lr is not given", type=float, metavar="LR")
    add("--momentum", "SGD momentum", type=float)
    add("--weight-decay", "on every parameter, as in the paper (decoupled with adamw)", type=float,
        metavar="WD")
    add("--schedule", "step: x --lr-gamma every --lr-step-epochs; cosine: decay to 0",
        type=_one_of("step", "cosine"), metavar="{step,cosine}")
    add("--lr-step-epochs", "step schedule period in epochs", type=int, metavar="N")
    add("--lr-gamma", "step schedule factor", type=float, metavar="GAMMA")
    add("--warmup-epochs", "linear warmup from lr/100, before either schedule", type=float, metavar="E")
    add("--label-smoothing", "cross-entropy label smoothing", type=float, metavar="EPS")
    add("--precise-bn", "before each evaluation, recompute BN statistics over N training images; 0 keeps "
        "the running averages", type=int, metavar="N")
    add("--amp", "autocast dtype; fp16 adds a GradScaler", "default: none, float32",
        type=_one_of(*_AMP_DTYPES), metavar="{" + ",".join(_AMP_DTYPES) + "}")
    add("--seed", "model init, shuffling and augmentation", type=int)
    add("--out", "output directory", "default: runs/<dataset>-<arch>", metavar="DIR")
    add("--resume", "checkpoint to continue from (last.pt), or to evaluate with --eval-only",
        "default: none", metavar="PATH")
    add("--eval-only", "evaluate the --resume checkpoint and exit", action=on_off)
    return p


def parse_args(argv=None) -> dict:
    """The flags actually given, as ``{field: value}`` (absent flags are left out); a bad flag
    raises :class:`TrainError`."""
    return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}


def resolve_config(overrides: dict, base: Optional[dict] = None, world_size: int = 1) -> TrainConfig:
    """``base`` (a resumed run's config), then ``overrides``, then the dataset's defaults; checked."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in (base or {}).items() if k in names and k not in _RUN_ONLY}
    values.update(overrides)
    cfg = TrainConfig(**values)
    for key, value in DATASET_DEFAULTS[dataset_name(cfg)].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.arch not in resnext.list_models():
        raise TrainError(f"unknown --arch {cfg.arch!r}; choose from {', '.join(resnext.list_models())}")
    for name in ("batch_size", "epochs", "image_size", "synthetic_samples"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("workers", "precise_bn"):
        if getattr(cfg, name) < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not 0 <= cfg.label_smoothing < 1:
        raise TrainError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise TrainError(f"--warmup-epochs must be in [0, epochs={cfg.epochs}), got {cfg.warmup_epochs}")
    if cfg.lr is None:
        cfg.lr = cfg.lr_base * cfg.batch_size * world_size / 256
    if not cfg.lr > 0:
        raise TrainError(f"--lr must be positive, got {cfg.lr}")
    if cfg.cuda_graphs:
        clash = {"compile": "--compile (its own graphs: torch.compile(mode='reduce-overhead'))",
                 "sync_bn": "--sync-bn (collectives inside the step)",
                 "amp": "--amp fp16 (the GradScaler checks for inf on the host every step)"}
        for name, why in clash.items():
            if getattr(cfg, name) and (name != "amp" or cfg.amp == "fp16"):
                raise TrainError(f"--cuda-graphs cannot be combined with {why}")
        if world_size > 1:
            raise TrainError("--cuda-graphs runs in one process (DistributedDataParallel's collectives are "
                             "not captured)")
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{dataset_name(cfg)}-{cfg.arch}")
    return cfg


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def all_reduce(self, values, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or ``op``) a list of numbers over the ranks; a float64 tensor on this device."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t


def setup_runtime() -> Runtime:
    """One process per device; under torchrun, join the process group (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank() if world_size > 1 else 0, world_size)


def prepare_out_dir(out: str, rt: Runtime) -> None:
    """Create ``out`` (rank 0) before any training work, so that a bad ``--out`` fails at once and
    not after the first epoch; every rank learns the outcome, so none waits for one that quit."""
    problem = None
    if rt.is_main:
        try:
            os.makedirs(out, exist_ok=True)
        except FileExistsError:
            problem = "exists and is not a directory"
        except OSError as e:
            parent = os.path.dirname(os.path.abspath(out))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            problem = (f"cannot create it: {parent} is a file" if not os.path.isdir(parent)
                       else f"cannot create it ({e.strerror.lower()})")
        else:
            if not os.access(out, os.W_OK | os.X_OK):
                problem = "is not writable"
    if rt.all_reduce([problem is not None]).item():
        raise TrainError(f"--out {out}: {problem or 'rank 0 cannot write there'}")


def build_data(cfg: TrainConfig, rt: Runtime):
    """Train and validation loaders: the train set shuffled and sharded per rank by a
    :class:`~resnext.data.ResumableSampler`, the validation set split evenly with no padding."""
    name = dataset_name(cfg)
    if name == "digits":
        splits = data_lib.build_digits(cfg.image_size)
    elif name == "imagenet":
        splits = data_lib.build_imagefolder(cfg.data, cfg.image_size)
    else:
        splits = data_lib.build_synthetic(cfg.image_size, cfg.synthetic_samples)
    sampler = data_lib.ResumableSampler(splits.train, rt.world_size, rt.rank, cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=rt.device.type == "cuda")
    # Workers are seeded from the loader's own generator, reseeded every epoch (not from the
    # global RNG), so a run resumed at an epoch boundary augments exactly as an uninterrupted one.
    # a graph replays one shape: every batch full (--cuda-graphs)
    drop_last = cfg.cuda_graphs or len(sampler) >= 2 * cfg.batch_size
    train = DataLoader(splits.train, sampler=sampler, drop_last=drop_last, generator=torch.Generator(), **common)
    val = DataLoader(Subset(splits.val, range(rt.rank, len(splits.val), rt.world_size)), **common)
    return train, val, splits.num_classes


def build_model(cfg: TrainConfig, num_classes: int, rt: Runtime) -> nn.Module:
    """The unwrapped model on ``rt.device`` (seeded: every rank builds the same weights)."""
    if cfg.fused_kernels:
        import kernels

        try:
            kernels.auto_select_backend()  # no GPU: Triton's interpreter, with a one-line notice
        except RuntimeError as e:
            raise TrainError(" ".join(str(e).split())) from None
    torch.manual_seed(cfg.seed)
    try:
        model = resnext.create_model(cfg.arch, num_classes=num_classes, fused_kernels=cfg.fused_kernels)
    except ImportError as e:
        raise TrainError(f"--fused-kernels: the fused kernels cannot be imported ({e})") from None
    if cfg.sync_bn:
        if rt.distributed and rt.device.type != "cuda":
            raise TrainError("--sync-bn needs one GPU per process: PyTorch's SyncBatchNorm, which the "
                             "BatchNorms outside the fused blocks use, refuses CPU tensors")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the fused op syncs bn2 itself
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; with --cuda-graphs their fused CUDA implementations, the learning rate a tensor on
    the device (the schedule updates it in place, and the captured step reads it there)."""
    extra = {}
    if cfg.cuda_graphs:
        device = next(model.parameters()).device
        extra = dict(fused=True, lr=torch.tensor(cfg.lr, device=device))
        if cfg.opt == "adamw":
            extra["capturable"] = True
    if cfg.opt == "adamw":
        return torch.optim.AdamW(model.parameters(), **{"lr": cfg.lr, "weight_decay": cfg.weight_decay, **extra})
    return torch.optim.SGD(model.parameters(), **{"lr": cfg.lr, "momentum": cfg.momentum,
                                                  "weight_decay": cfg.weight_decay, **extra})


def _lr_on(optimizer, device: Optional[torch.device]) -> None:
    """Every param group's learning rate as a tensor on ``device`` (--cuda-graphs), or as a float
    (None): a checkpoint resumes with or without --cuda-graphs, whichever it was saved with."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if device is None:
            group["lr"] = float(lr)
        elif isinstance(lr, torch.Tensor):
            group["lr"] = lr.to(device)
        else:
            group["lr"] = torch.tensor(lr, device=device)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-iteration schedule: optional linear warmup, then step decay or cosine decay to 0."""
    from torch.optim import lr_scheduler as S

    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "cosine":
        main_sched = S.CosineAnnealingLR(optimizer, T_max=total - warmup)
    else:
        main_sched = S.StepLR(optimizer, step_size=cfg.lr_step_epochs * steps_per_epoch, gamma=cfg.lr_gamma)
    if warmup == 0:
        return main_sched
    warm = S.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return S.SequentialLR(optimizer, [warm, main_sched], milestones=[warmup])


class _StopSignal:
    """Ctrl-C / SIGTERM during training asks the loop to stop at the next step boundary (so the
    checkpoint is consistent); a second signal more than 2 s later stops at once."""

    def __init__(self):
        self.requested_at = None
        self._previous = {}

    def __enter__(self):
        self.requested_at = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested_at is not None and time.monotonic() - self.requested_at > 2:
            raise KeyboardInterrupt
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            print("\nstopping after this step and saving a checkpoint (signal again to abort)",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None


def _autocast(cfg: TrainConfig, rt: Runtime, cache_enabled: bool = True):
    return torch.autocast(rt.device.type, dtype=_AMP_DTYPES.get(cfg.amp), enabled=cfg.amp is not None,
                          cache_enabled=cache_enabled)


def train_step(model, images, labels, criterion, optimizer, scheduler, scaler, cfg, rt) -> torch.Tensor:
    """One SGD step; returns the (detached) loss."""
    with _autocast(cfg, rt):
        loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


class GraphedStep:
    """``train_step`` with the whole step captured in one CUDA graph (``--cuda-graphs``).

    The first WARMUP steps run eagerly on a side stream (what capture asks for: kernels compiled,
    the optimizer's state allocated); the next is captured — forward under autocast without its
    cache, backward, the optimizer step, every BatchNorm's buffers — and replayed for its batch;
    later batches are copied into the captured inputs and the graph replayed. The schedule steps
    outside the graph, updating the learning-rate tensor the graph reads. Returns the loss, which
    the next replay overwrites (read it before then, in stream order, as train_one_epoch does).
    """

    WARMUP = 3

    def __init__(self, model, criterion, optimizer, scheduler, cfg, rt):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.cfg, self.rt = cfg, rt
        self.warm, self.graph = 0, None

    def _step(self, images, labels, cache_enabled=True):
        with _autocast(self.cfg, self.rt, cache_enabled):
            loss = self.criterion(self.model(images), labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def __call__(self, images, labels) -> torch.Tensor:
        if self.warm < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step(images, labels).detach()
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
        else:
            if self.graph is None:
                self.images, self.labels = images.clone(), labels.clone()
                self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes the gradients
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.loss = self._step(self.images, self.labels, cache_enabled=False).detach()
            else:
                self.images.copy_(images)
                self.labels.copy_(labels)
            self.graph.replay()
            loss = self.loss
        self.scheduler.step()
        return loss


def _to_device(images, labels, cfg, rt):
    images = images.to(rt.device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(rt.device, non_blocking=True)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, cfg: TrainConfig, rt: Runtime,
                    epoch: int, start_step: int = 0, partial=(0.0, 0, None), stop: Optional[_StopSignal] = None,
                    graphed: Optional[GraphedStep] = None):
    """Train one epoch (from ``start_step``, after a resume); returns a dict of metrics.

    ``partial`` is the (loss sum, image count, last lr) of the steps done before a resume. Raises
    :class:`NonFiniteLossError` on a NaN/inf loss. If ``stop`` is requested, returns early with
    ``"stopped": True`` and the step reached. ``graphed`` (``--cuda-graphs``) runs the steps.
    """
    model.train()
    loader.sampler.set_epoch(epoch, start=start_step * cfg.batch_size)
    loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
    log_every = 1 if rt.device.type == "cpu" else 20  # each check syncs the device
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    seen, step = 0, start_step
    lr = partial[2] if partial[2] is not None else optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=start_step,
               total=start_step + len(loader), disable=not rt.is_main, dynamic_ncols=True, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 5.0)  # keep logs short
    rt.sync()
    t0 = time.perf_counter()
    stopped = False
    for images, labels in bar:
        images, labels = _to_device(images, labels, cfg, rt)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):  # --cuda-graphs: read at the next log, not now (no sync)
            lr = lr.detach().clone()
        if graphed is not None:
            loss = graphed(images, labels)
        else:
            loss = train_step(model, images, labels, criterion, optimizer, scheduler, scaler, cfg, rt)
        loss_sum += loss.double() * len(labels)
        seen += len(labels)
        step += 1
        if step % log_every == 0 or step == start_step + len(loader):
            # The same steps on every rank, so all of them stop (or raise) together.
            total_loss, stop_votes = rt.all_reduce([loss_sum.item(), float(bool(stop and stop.requested))])
            if not math.isfinite(total_loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}")
            rt.sync()
            rate = seen * rt.world_size / (time.perf_counter() - t0)
            lr = float(lr)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.4g}")
            if stop_votes > 0:
                stopped = True
                break
    bar.close()
    rt.sync()
    elapsed = time.perf_counter() - t0
    loss_total, count, images_total = rt.all_reduce([partial[0] + loss_sum.item(), partial[1] + seen, seen])
    lr = float(lr)
    return {"train_loss": float(loss_total / max(count, 1)), "lr": lr,
            "images_per_s": float(images_total / max(elapsed, 1e-9)), "train_time": elapsed,
            "stopped": stopped, "step": step, "partial": (partial[0] + loss_sum.item(), partial[1] + seen, lr)}


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, dataset, cfg: TrainConfig, rt: Runtime) -> None:
    """"Precise BN" (Wu & Johnson, arXiv:2105.07576): replace every BatchNorm's running mean and
    variance by their average over the batches of the first ``cfg.precise_bn`` training images
    (split over the ranks, then averaged), with the weights as they are now."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or cfg.precise_bn == 0:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    shard = Subset(dataset, range(rt.rank, min(cfg.precise_bn, len(dataset)), rt.world_size))
    model.train()
    for images, _ in DataLoader(shard, batch_size=cfg.batch_size, num_workers=cfg.workers):
        images, _ = _to_device(images, torch.empty(0), cfg, rt)
        with _autocast(cfg, rt):
            model(images)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        if rt.distributed:
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce(buf)
                buf /= rt.world_size


@torch.no_grad()
def evaluate(model, loader, criterion, cfg: TrainConfig, rt: Runtime) -> dict:
    """Validation loss, top-1 and top-5 (%) over the whole validation set, reduced over ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, top-1, top-5, count
    for images, labels in loader:
        images, labels = _to_device(images, labels, cfg, rt)
        with _autocast(cfg, rt):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        sums += torch.stack([criterion(logits, labels).double() * len(labels), hits[:, :1].sum().double(),
                             hits.sum().double(), torch.tensor(len(labels), dtype=torch.float64,
                                                               device=rt.device)])
    loss, top1, top5, n = rt.all_reduce(sums.tolist()).tolist()
    n = max(n, 1)
    return {"val_loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_images": int(n)}


def plot_curves(metrics_path: str, png_path: str) -> None:
    """Losses, accuracies and learning rate per epoch from ``metrics.jsonl``, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [r["top1"] for r in rows], "o-", label="top-1")
    ax_acc.plot(epochs, [r["top5"] for r in rows], "o-", label="top-5")
    ax_acc.set(title="validation accuracy (%)", xlabel="epoch")
    ax_lr.plot(epochs, [r["lr"] for r in rows], "o-")
    ax_lr.set(title="learning rate (last step)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    FigureCanvasAgg(fig).print_png(png_path)


def _final_line(m: dict, epochs: Optional[int] = None) -> str:
    return (f"final top-1: {m['top1']:.2f}% (top-5 {m['top5']:.2f}%, val loss {m['val_loss']:.4f}) "
            f"on {m['val_images']} held-out images" + (f" after {epochs} epochs" if epochs else ""))


def _run(argv) -> int:
    overrides = parse_args(argv)
    if overrides.get("eval_only") and not overrides.get("resume"):
        raise TrainError("--eval-only needs --resume CHECKPOINT (there is nothing else to evaluate)")
    rt = setup_runtime()
    ckpt = load_checkpoint(overrides["resume"]) if overrides.get("resume") else None
    if ckpt is not None and not overrides.get("eval_only"):
        check_resumable(ckpt, overrides["resume"])
    base = ckpt.get("config") if ckpt else None
    cfg = resolve_config(overrides, base, rt.world_size)
    if cfg.cuda_graphs and rt.device.type != "cuda" and not cfg.eval_only:
        raise TrainError("--cuda-graphs needs a CUDA GPU (the step is captured with torch.cuda.graph)")
    if ckpt is not None and base is not None and base.get("arch") != cfg.arch:
        raise TrainError(f"--resume {cfg.resume}: trained as {base.get('arch')}, not {cfg.arch}")
    if ckpt is not None and not cfg.eval_only and ckpt["epoch"] >= cfg.epochs:
        # Not an error (a requeue loop resumes until the run is done), but nothing to do or rewrite.
        if rt.is_main:
            print(f"resumed from {cfg.resume}: the run is already complete after epoch {ckpt['epoch']} of "
                  f"{cfg.epochs}; nothing trained or rewritten (--epochs N trains further, --eval-only "
                  "evaluates it)", flush=True)
        return 0
    if not cfg.eval_only:
        prepare_out_dir(cfg.out, rt)

    train_loader, val_loader, num_classes = build_data(cfg, rt)
    model = build_model(cfg, num_classes, rt)
    if ckpt is not None:
        load_weights(model, ckpt, cfg.resume)
    raw_model = model
    if rt.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    if cfg.eval_only:
        m = evaluate(model, val_loader, criterion, cfg, rt)
        if rt.is_main:
            print(_final_line(m), flush=True)
        return 0

    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(cfg, raw_model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.amp == "fp16")
    start_epoch, start_step, partial, best = 0, 0, (0.0, 0, None), -1.0
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
            partial, best = tuple(ckpt["partial"]), float(ckpt["best_top1"])
            rngs = ckpt["rng"]
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise TrainError(f"--resume {cfg.resume}: optimizer/scheduler state does not match "
                             f"({' '.join(str(e).split())})") from None
        _lr_on(optimizer, rt.device if cfg.cuda_graphs else None)
        if start_step > steps_per_epoch:
            raise TrainError(f"--resume {cfg.resume}: stopped at step {start_step} of an epoch that now "
                             f"has {steps_per_epoch} steps; keep the batch size and world size")
        set_rng_state(rngs[rt.rank] if len(rngs) == rt.world_size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # augmentation differs between ranks
        random.seed(cfg.seed + rt.rank)
        np.random.seed(cfg.seed + rt.rank)

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    last_path, best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")
    if rt.is_main:
        kept = []
        if ckpt is not None and os.path.exists(metrics_path):  # drop epochs past the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= start_epoch]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
        print(f"{cfg.arch} on {dataset_name(cfg)}: {len(train_loader.dataset)} train / "
              f"{len(val_loader.dataset) * rt.world_size} val images, {cfg.epochs} epochs of {steps_per_epoch} "
              f"steps, global batch {cfg.batch_size * rt.world_size}, lr {cfg.lr:g}, {rt.world_size} x "
              f"{rt.device.type}{', fused kernels' if cfg.fused_kernels else ''}; writing to {cfg.out}", flush=True)
        if ckpt is not None:
            print(f"resumed from {cfg.resume} at epoch {start_epoch + 1}/{cfg.epochs}, {start_step} of "
                  f"{steps_per_epoch} steps done", flush=True)

    def checkpoint(epoch, step, partial_sums):
        rngs = gather_rng_states(rt.world_size)
        if rt.is_main:
            save_checkpoint(last_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "step": step, "partial": list(partial_sums), "best_top1": best,
                "config": dataclasses.asdict(cfg), "rng": rngs})

    graphed = GraphedStep(model, criterion, optimizer, scheduler, cfg, rt) if cfg.cuda_graphs else None
    with _StopSignal() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            try:
                tm = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, cfg, rt,
                                     epoch, start_step, partial, stop, graphed)
            except NonFiniteLossError as e:
                if rt.is_main:
                    kept = f"; the last good checkpoint is {last_path}" if os.path.exists(last_path) else ""
                    print(f"error: stopping: {e}{kept}", file=sys.stderr, flush=True)
                return 1
            if tm["stopped"]:
                checkpoint(epoch, tm["step"], tm["partial"])
                if rt.is_main:
                    print(f"interrupted at epoch {epoch + 1} step {tm['step']}: saved {last_path}; "
                          f"continue with --resume {last_path}", file=sys.stderr, flush=True)
                    plot_curves(metrics_path, os.path.join(cfg.out, "curves.png"))
                return 130
            resumed_at, start_step, partial = start_step, 0, (0.0, 0, None)
            recompute_bn_stats(raw_model, train_loader.dataset, cfg, rt)
            m = evaluate(model, val_loader, criterion, cfg, rt)
            row = {"epoch": epoch + 1, "train_loss": tm["train_loss"], "val_loss": m["val_loss"],
                   "top1": m["top1"], "top5": m["top5"], "lr": tm["lr"]}
            # Resumed part-way, this process ran only the epoch's last steps: its rate and time are
            # not the epoch's, so they go under names that a reader of full epochs will not pick up.
            suffix = "_since_resume" if resumed_at else ""
            if resumed_at:
                row.update(partial_epoch=True, resumed_at_step=resumed_at)
            row.update({f"images_per_s{suffix}": tm["images_per_s"],
                        f"epoch_time{suffix}": time.perf_counter() - t0})
            is_best = m["top1"] > best
            best = max(best, m["top1"])
            checkpoint(epoch + 1, 0, (0.0, 0, None))
            if rt.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if is_best:
                    save_checkpoint(best_path, {"model": raw_model.state_dict(), "epoch": epoch + 1,
                                                "top1": m["top1"], "config": dataclasses.asdict(cfg)})
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                           f"val loss {m['val_loss']:.4f}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  "
                           f"lr {row['lr']:.4g}  {tm['images_per_s']:.0f} img/s  "
                           f"{row['epoch_time' + suffix]:.1f} s"
                           + (f" ({steps_per_epoch - resumed_at} of {steps_per_epoch} steps in this process)"
                              if resumed_at else ""))
            if stop.requested:  # a signal during evaluation: the epoch's checkpoint is saved
                if rt.is_main:
                    print(f"interrupted after epoch {epoch + 1}: continue with --resume {last_path}",
                          file=sys.stderr, flush=True)
                return 130
    if rt.is_main:
        plot_curves(metrics_path, os.path.join(cfg.out, "curves.png"))
        print(f"wrote {metrics_path}, {last_path}, {best_path} and curves.png")
        print(_final_line(m, cfg.epochs), flush=True)
    return 0


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (2 with one ``error:`` line on bad input)."""
    try:
        return _run(argv)
    except (TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
