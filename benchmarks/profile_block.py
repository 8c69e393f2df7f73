"""Run one ResNeXt block's fused op a few times between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --profile-from-start off --set full -f -o stage1-train \\
        python -m benchmarks.profile_block --arch resnext50_32x4d --stage 1 --mode train
    ncu -i stage1-train.ncu-rep --csv --page raw > stage1-train.csv
    python -m benchmarks.ncu_summary stage1-train.csv      # a markdown table per kernel

Warm-up calls (autotuning, compilation) run before the profiler starts, so only ``--iters``
steady-state calls are captured: in ``inference`` one forward under no_grad in eval mode, in
``train`` one training-mode forward and backward. Needs a CUDA GPU.
"""

import argparse
import sys

import torch

from benchmarks.shapes import ARCHS, block_shapes


def _shape(arch, stage, stride):
    for shape in block_shapes(arch):
        if shape.stage == stage and shape.stride == stride:
            return shape
    raise SystemExit(f"error: {arch} has no stage {stage} block with stride {stride}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(ARCHS), default="resnext50_32x4d")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), default=1)
    p.add_argument("--stride", type=int, choices=(1, 2), default=1)
    p.add_argument("--mode", choices=("inference", "train"), default="inference")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--iters", type=int, default=2, help="profiled calls (default: 2)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from kernels.grouped_conv_bn_relu import GroupedConvBNReLU

    shape = _shape(args.arch, args.stage, args.stride)
    dtype = getattr(torch, args.dtype)
    block = GroupedConvBNReLU(shape.channels, shape.channels, stride=shape.stride, groups=shape.groups)
    block = block.cuda().to(memory_format=torch.channels_last)
    block.conv.weight.data = block.conv.weight.data.to(dtype)
    x = torch.randn(shape.input_shape(args.batch), device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)

    if args.mode == "inference":
        block.eval()

        def call():
            with torch.no_grad():
                block(x)
    else:
        block.train()
        x.requires_grad_(True)
        dy = torch.randn(shape.output_shape(args.batch), device="cuda", dtype=dtype)
        dy = dy.contiguous(memory_format=torch.channels_last)

        def call():
            block(x).backward(dy)

    for _ in range(3):  # autotuning and compilation, outside the profiled range
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.iters):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {args.iters} {args.mode} calls of {shape.id} ({args.dtype}, batch {args.batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
