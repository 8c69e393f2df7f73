"""SyncBatchNorm through the fused op: ranks that each hold part of a batch compute what one process
computes on the whole batch.

Two gloo processes on the CPU (the kernels through Triton's interpreter; NCCL on a machine with two
GPUs), each with its slice of a global batch, against one process running the fused op with a
plain BatchNorm2d on the whole batch: the outputs and dx (concatenated over the ranks), the weight
and BatchNorm gradients (summed over the ranks, as DistributedDataParallel's all-reduce does before
averaging) and the running statistics (the same on every rank). Unequal slices, an empty rank,
momentum=None, stride 2 and channels_last included. Outside a process group, or in eval mode, a
SyncBatchNorm is a BatchNorm2d: the very same bits.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from _helpers import INTERPRET
from _sync_bn_worker import make_case, run_rank
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU, grouped_conv_bn_relu_modules

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = "cpu" if INTERPRET else "cuda"

CASES = [
    # unequal slices, NCHW, stride 1, several groups per channel tile; two steps (the running
    # statistics update twice)
    dict(id="unequal-3-2", split=[3, 2], c_in=8, c_out=16, groups=2, stride=1, hw=6, momentum=0.1,
         channels_last=False, steps=2, seed=0),
    # an empty rank (it still joins both collectives), stride 2, channels_last, cumulative average
    dict(id="empty-rank-stride2", split=[4, 0], c_in=8, c_out=8, groups=4, stride=2, hw=7, momentum=None,
         channels_last=True, steps=1, seed=1),
    # one image each, odd spatial size
    dict(id="one-each", split=[1, 1], c_in=4, c_out=8, groups=1, stride=1, hw=5, momentum=0.3,
         channels_last=False, steps=1, seed=2),
]

# float32 throughout; the ranks' sums are combined in another order than one process's (Chan over
# two ranks in float64 vs the kernels' chunk tree), so agreement is to float32 rounding (~1e-6
# relative), where a wrong count or a missing all-reduce errs by > 1e-2.
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each case run by two gloo (or NCCL) ranks: {case id: [rank 0's results, rank 1's]}."""
    if not INTERPRET and torch.cuda.device_count() < 2:
        pytest.skip("SyncBatchNorm over NCCL needs 2 GPUs (the CPU run, with gloo, covers the logic)")
    tmp = tmp_path_factory.mktemp("sync_bn")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1" if INTERPRET else "0")
    cases = json.dumps([{k: v for k, v in c.items() if k != "id"} for c in CASES])
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_sync_bn_worker.py"), str(rank), "2",
                               str(tmp / "init"), str(tmp / f"rank{rank}.pt"), cases],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} did not finish in 600 s (a collective left waiting?)")
        assert proc.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
    ranks = [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    return {case["id"]: [ranks[0][i], ranks[1][i]] for i, case in enumerate(CASES)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_two_ranks_equal_one_process_on_the_whole_batch(case, two_ranks):
    module, x, dy = make_case({k: v for k, v in case.items() if k != "id"}, DEVICE)
    whole = {k: v.cpu() if torch.is_tensor(v) else v for k, v in run_rank(module, x, dy, case["steps"]).items()}
    r0, r1 = two_ranks[case["id"]]
    torch.testing.assert_close(torch.cat((r0["y"], r1["y"])), whole["y"], **TOL)
    torch.testing.assert_close(torch.cat((r0["dx"], r1["dx"])), whole["dx"], **TOL)
    for r in (r0, r1):
        if r["y"].shape[0]:  # y in conv2d's layout, dx in x's: the strides past the batch dimension
            assert r["y_stride"][1:] == whole["y_stride"][1:] and r["dx_stride"][1:] == whole["dx_stride"][1:]
    for key in whole:
        if key.startswith("grad."):
            torch.testing.assert_close(r0[key] + r1[key], whole[key], **TOL, msg=lambda m: f"{key}: {m}")
        elif key.startswith("buffer."):
            assert torch.equal(r0[key], r1[key]), f"{key}: the ranks disagree"
            torch.testing.assert_close(r0[key], whole[key], **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_a_process_group_sync_bn_is_batch_norm(training):
    """No process group (and eval mode in one): nn.SyncBatchNorm behaves as nn.BatchNorm2d, bit for bit."""
    torch.manual_seed(0)
    plain = GroupedConvBNReLU(8, 16, groups=4).to(DEVICE).train(training)
    synced = copy.deepcopy(plain)
    synced.bn = nn.SyncBatchNorm.convert_sync_batchnorm(synced.bn)
    assert isinstance(synced.bn, nn.SyncBatchNorm)
    x = torch.randn(3, 8, 5, 5, device=DEVICE)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for m, xi in zip((plain, synced), xs):
        m(xi).square().sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    for (k, p), q in zip(plain.named_parameters(), synced.parameters()):
        assert torch.equal(p.grad, q.grad), k
    for (k, b), c in zip(plain.named_buffers(), synced.buffers()):
        assert torch.equal(b, c), k


def test_sync_bn_modules_accepted_and_checked():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    GroupedConvBNReLU.from_modules(conv, nn.SyncBatchNorm(8))
    with pytest.raises(ValueError, match=r"bn.num_features \(4\) must equal conv.out_channels \(8\)"):
        grouped_conv_bn_relu_modules(torch.randn(1, 8, 4, 4), conv, nn.SyncBatchNorm(4))
    with pytest.raises(TypeError, match="nn.BatchNorm2d or nn.SyncBatchNorm"):
        GroupedConvBNReLU.from_modules(conv, nn.LayerNorm(8))
