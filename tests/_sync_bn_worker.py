"""One rank of tests/test_sync_bn.py: ``python _sync_bn_worker.py RANK WORLD INIT_FILE OUT CASES``.

Builds the same conv + SyncBatchNorm on every rank (seeded), runs the fused op on this rank's slice
of the global batch and writes what it computed (output, dx, the gradients, the buffers) to OUT.
CASES is a JSON list of test_sync_bn.CASES entries.
"""

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # no-op on the GPU machine, where the test sets it to 0
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

import kernels  # noqa: E402

from kernels.grouped_conv_bn_relu import GroupedConvBNReLU  # noqa: E402


def make_case(case, device):
    """(module, global x, global dy) of one case, the same on every rank and in the test."""
    g = torch.Generator().manual_seed(case["seed"])
    c_in, c_out, groups, stride, hw = case["c_in"], case["c_out"], case["groups"], case["stride"], case["hw"]
    module = GroupedConvBNReLU(c_in, c_out, stride=stride, groups=groups, momentum=case["momentum"])
    with torch.no_grad():
        module.conv.weight.copy_(torch.randn(module.conv.weight.shape, generator=g) * 0.3)
        module.bn.weight.copy_(torch.rand(c_out, generator=g) + 0.5)
        module.bn.bias.copy_(torch.randn(c_out, generator=g) * 0.1)
        module.bn.running_mean.copy_(torch.randn(c_out, generator=g) * 0.1)
        module.bn.running_var.copy_(torch.rand(c_out, generator=g) + 0.5)
    n = sum(case["split"])
    x = torch.randn(n, c_in, hw, hw, generator=g) + 0.5
    ho = (hw + 2 - 3) // stride + 1
    dy = torch.randn(n, c_out, ho, ho, generator=g)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    return module.to(device), x.to(device).contiguous(memory_format=fmt), dy.to(device)


def run_rank(module, x, dy, steps):
    """``steps`` forward/backward calls; returns what the test compares."""
    x = x.detach().requires_grad_()
    for _ in range(steps):
        x.grad = None
        module.zero_grad()
        y = module(x)
        y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "y_stride": y.stride(), "dx_stride": x.grad.stride(),
            **{f"grad.{k}": p.grad for k, p in module.named_parameters()},
            **{f"buffer.{k}": b.clone() for k, b in module.named_buffers()}}


def main():
    rank, world, init_file, out, cases = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    device = "cpu" if kernels.interpreter_enabled() else f"cuda:{rank}"
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    results = []
    for case in json.loads(cases):
        module, x, dy = make_case(case, device)
        module.bn = nn.SyncBatchNorm.convert_sync_batchnorm(module.bn)
        lo = sum(case["split"][:rank])
        hi = lo + case["split"][rank]
        results.append({k: v.cpu() if torch.is_tensor(v) else v
                        for k, v in run_rank(module, x[lo:hi], dy[lo:hi], case["steps"]).items()})
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
