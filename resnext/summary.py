"""Parameter and compute counts for every ResNeXt builder: ``python -m resnext.summary``.

Two conventions, both counted on the meta device (no memory, no arithmetic):

* **GMACs** -- multiply-accumulates of convolutions and the fc layer, torchvision's convention
  (4.23 / 16.41 / 15.46 for ResNeXt-50 32x4d / 101 32x8d / 101 64x4d). Counted with PyTorch's
  ``torch.utils.flop_counter.FlopCounterMode``, which reports 2 FLOPs per MAC.
* **FLOPs(G)** -- the mmcls/mmcv convention of the seed table (``get_model_complexity_info``):
  the MACs above plus one element operation per BatchNorm input element (two when affine), per
  ReLU input element and per pooling input element. FlopCounterMode does not count those
  element-wise ops, so they come from forward hooks; the residual addition is not counted
  (mmcv hooks modules, and the addition is not one).
"""

import argparse
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .models import CifarResNeXt, create_model, list_models

__all__ = ["count_params", "count_macs", "count_mmcls_flops", "default_input_size", "summarize", "main"]

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def default_input_size(model: nn.Module) -> Tuple[int, int, int, int]:
    """``(1, 3, 32, 32)`` for the CIFAR models, ``(1, 3, 224, 224)`` for the ImageNet ones."""
    return (1, 3, 32, 32) if isinstance(model, CifarResNeXt) else (1, 3, 224, 224)


def _meta_input(model: nn.Module, input_size) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.zeros(input_size or default_input_size(model), device=device)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Optional[Tuple[int, ...]] = None) -> int:
    """Multiply-accumulates of one forward (convolutions and matmuls), by PyTorch's flop counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(_meta_input(model, input_size))
    return counter.get_total_flops() // 2


def _element_ops_hook(module: nn.Module, inputs, output) -> None:
    n = inputs[0].numel()
    if isinstance(module, nn.BatchNorm2d) and module.affine:
        n *= 2  # normalise, then scale-and-shift
    module._resnext_element_ops += n


@torch.no_grad()
def count_mmcls_flops(model: nn.Module, input_size: Optional[Tuple[int, ...]] = None) -> int:
    """MACs plus BatchNorm / ReLU / pooling element operations, as mmcv's complexity counter does.

    Hooks fire on every call, so a ReLU module reused three times in a block counts three times,
    as in mmcv.
    """
    hooked = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.ReLU) + _POOLS)]
    handles = []
    for m in hooked:
        m._resnext_element_ops = 0
        handles.append(m.register_forward_hook(_element_ops_hook))
    try:
        macs = count_macs(model, input_size)
        element_ops = sum(m._resnext_element_ops for m in hooked)
    finally:
        for h in handles:
            h.remove()
        for m in hooked:
            del m._resnext_element_ops
    return macs + element_ops


def summarize(names: Optional[Iterable[str]] = None) -> Dict[str, Dict[str, float]]:
    """``{name: {"params": ..., "macs": ..., "mmcls_flops": ..., "input": H}}`` for each builder."""
    rows = {}
    for name in names or list_models():
        with torch.device("meta"):
            model = create_model(name).eval()
        size = default_input_size(model)
        rows[name] = {"params": count_params(model), "macs": count_macs(model, size),
                      "mmcls_flops": count_mmcls_flops(model, size), "input": size[-1]}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"builders to count (default: all of {list_models()})")
    args = parser.parse_args(argv)
    rows = summarize(args.models or None)
    print(f"{'model':<20} {'input':>7} {'Params(M)':>10} {'GMACs':>8} {'FLOPs(G)':>9}")
    for name, r in rows.items():
        # FLOPs(G) to 3 significant figures, the seed table's precision (4.27, 16.5, 11.8).
        print(f"{name:<20} {r['input']:>4}x{r['input']:<2} {r['params'] / 1e6:>10.2f} "
              f"{r['macs'] / 1e9:>8.2f} {r['mmcls_flops'] / 1e9:>9.3g}")
    print("GMACs: conv + fc multiply-accumulates (torchvision); FLOPs(G): MACs + BN/ReLU/pool "
          "element ops (mmcls); CIFAR models at 32x32, ImageNet models at 224x224.")


if __name__ == "__main__":
    main()
