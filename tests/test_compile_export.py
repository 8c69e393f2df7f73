"""The fused op inside PyTorch's compiler stack: the registered op (schema, ``opcheck``),
``torch.compile(fullgraph=True)`` of a fused ResNeXt, ``torch.export``, CUDA graphs and the on-disk
autotune cache.

On the CPU the kernels run through Triton's interpreter and Inductor compiles the rest of the model
to C++; the CUDA-graph tests and the cross-process autotune test need a GPU. Compiled and exported
runs are compared with the same model run eagerly (both with the fused kernels): the fused op
computes the same bits either way, so the only differences left are Inductor's own (BatchNorm
decomposed into its reductions, 1x1 convs and the classifier through other kernels).
"""

import copy
import inspect
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import triton
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

import resnext
from _helpers import INTERPRET, Shape, gpu_only, make_inputs
from kernels import _autotune
from kernels.conv3x3 import backward as conv_bwd, forward as conv_fwd
from kernels.grouped_conv_bn_relu import GroupedConvBNReLU, grouped_conv_bn_relu

OP = torch.ops.resnext_fused.grouped_conv_bn_relu.default
FWD_OP = torch.ops.resnext_fused._grouped_conv_bn_relu_fwd.default
BWD_OP = torch.ops.resnext_fused._grouped_conv_bn_relu_bwd.default
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cpu" if INTERPRET else "cuda"
SHAPE = Shape(2, 8, 16, 2, 5, 6)

# Inductor on the CPU (no effect on the GPU, where Inductor writes Triton): no layout
# optimization. With it, torch 2.13's CPU Inductor miscomputes some conv weight gradients of
# resnext_tiny at 1000 classes and batch 32 by up to 8%, the *unfused* model too (not our op).
# Its scalar C++ (``cpp.vec_isa_ok=False``, half the compile time) is wrong as well: the stem's
# weight gradient of the unfused resnext_tiny off by 4e-3 of its largest entry, where the
# vectorized code and eager are within 3e-7 of a float64 run (torch 2.13.0+cpu).
CPU_INDUCTOR = {"layout_optimization": False} if INTERPRET else {}

# Compiled vs eager, float32. Inductor reorders the sums of the unfused ops (BatchNorm statistics
# over N·H·W pixels, the 1x1 convs, the classifier): ~1e-7 relative per op, a few 1e-6 through
# the 11 layers and back. An error of the op itself (a wrong running-statistics update, a gradient
# of the wrong layout read as another, a missing BN term) is >= 1e-3.
COMPILE_TOL = dict(rtol=1e-4, atol=1e-5)


def assert_models_match(model, twin, what):
    """Every gradient and every buffer (running statistics, num_batches_tracked) of two models."""
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: {name}.grad"
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **COMPILE_TOL, msg=lambda m: f"{what}: d{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, **COMPILE_TOL, msg=lambda m: f"{what}: {name}: {m}")


def op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == OP]


# ---------------------------------------------------------------------------------------------
# The registered op


def test_registered_op_takes_the_python_functions_arguments():
    """Same names, same order, same keyword-only split and defaults as ``grouped_conv_bn_relu``;
    the schema declares the in-place update of the running statistics and of the batch count (and
    nothing else)."""
    params = inspect.signature(grouped_conv_bn_relu).parameters
    args = OP._schema.arguments
    assert [a.name for a in args] == list(params)
    for a in args:
        p = params[a.name]
        assert a.kwarg_only == (p.kind == inspect.Parameter.KEYWORD_ONLY), a.name
        if p.default is not inspect.Parameter.empty:
            assert a.default_value == p.default, a.name
        mutated = a.alias_info is not None and a.alias_info.is_write
        assert mutated == (a.name in ("running_mean", "running_var", "num_batches_tracked")), a.name
    assert str(args[4].type) == "Optional[Tensor]"  # None: track_running_stats=False
    assert len(OP._schema.returns) == 1 and torch.Tag.pt2_compliant_tag in OP.tags


@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_function_and_module_call_the_registered_op(module, training, device):
    """What Dynamo captures from the function and from GroupedConvBNReLU: one graph (fullgraph),
    holding the registered op once, which computes what the eager call computes."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    if module:
        block = GroupedConvBNReLU(8, 16, groups=2).to(device).train(training)
        twin = copy.deepcopy(block)
        fn, args, twin_fn = block, (torch.randn(2, 8, 5, 6, device=device),), twin
    else:
        inputs = make_inputs(SHAPE, device=device, requires_grad=training)
        twin_inputs = {k: v.detach().clone() for k, v in inputs.items()}
        fn = lambda *a: grouped_conv_bn_relu(*a, groups=2, training=training)  # noqa: E731
        args, twin_fn = tuple(inputs.values()), None
    y = torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1 and len(op_nodes(graphs[0])) == 1
    if module:
        y_ref = twin_fn(*args)
        assert int(block.bn.num_batches_tracked) == int(twin.bn.num_batches_tracked) == int(training)
        stats = ((block.bn.running_mean, twin.bn.running_mean), (block.bn.running_var, twin.bn.running_var))
    else:
        y_ref = grouped_conv_bn_relu(*twin_inputs.values(), groups=2, training=training)
        stats = ((inputs["running_mean"], twin_inputs["running_mean"]),
                 (inputs["running_var"], twin_inputs["running_var"]))
    assert torch.equal(y, y_ref)
    for got, expected in stats:
        assert torch.equal(got, expected)


OPCHECK_CASES = [  # (training, with grad, channels_last, what changes)
    pytest.param(False, False, False, {}, id="inference"),
    pytest.param(False, True, True, {}, id="frozen-bn-grad-cl"),
    pytest.param(True, False, True, {}, id="train-no-grad-cl"),
    pytest.param(True, True, False, {}, id="train-grad"),
    pytest.param(True, True, True, {}, id="train-grad-cl"),
    pytest.param(True, True, False, dict(running_mean=None, running_var=None, bn_weight=None),
                 id="train-grad-no-stats-no-gamma"),
    pytest.param(True, True, False, dict(x=lambda x: x[:0]), id="train-grad-empty-batch"),
]


@pytest.mark.parametrize("training, grad, channels_last, changes", OPCHECK_CASES)
def test_opcheck(training, grad, channels_last, changes, device):
    """``torch.library.opcheck``: the schema's mutation annotations hold, the fake implementation
    gives the real one's shapes, dtypes and strides, autograd is registered, and AOTAutograd with
    dynamic shapes computes what eager computes (outputs, gradients, running statistics)."""
    inputs = make_inputs(SHAPE, device=device, channels_last=channels_last, requires_grad=grad)
    for k, v in changes.items():
        inputs[k] = v(inputs[k]).detach().requires_grad_(grad) if callable(v) else v
    utils = ["test_schema", "test_faketensor", "test_aot_dispatch_dynamic"]
    if grad:
        utils.append("test_autograd_registration")
    torch.library.opcheck(OP, tuple(inputs.values()), dict(groups=SHAPE.groups, training=training),
                          test_utils=utils)


@pytest.mark.parametrize("training", [False, True], ids=["frozen-bn", "train"])
def test_opcheck_internal_ops(training, device):
    """The two ops the public op's autograd calls: the forward (which saves z, the statistics and the
    packed weight, and counts the batch in training) and the backward, whose dx follows x's layout
    (NCHW here) and dweight the weight's shape."""
    inputs = make_inputs(SHAPE, device=device)
    tracked = torch.zeros((), dtype=torch.long, device=device)
    args = (*inputs.values(), tracked, 1, 1, SHAPE.groups, 1e-5, 0.1, training)
    torch.library.opcheck(FWD_OP, args, test_utils=["test_schema", "test_faketensor", "test_aot_dispatch_dynamic"])
    before = int(tracked)
    _, z, stats, packed = FWD_OP(*args)
    assert int(tracked) == before + training
    dy = torch.randn(z.shape, device=device)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(BWD_OP, (dy, inputs["x"], inputs["weight"], z, stats, packed, 1, 1, SHAPE.groups,
                                       training, need_x, need_w))


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.export of a fused ResNeXt


def fused_tiny(device):
    """resnext_tiny with fused blocks, shaped like the trainer's synthetic run (tests/test_train.py:
    1000 classes, 32 images of 8x8), so that both compile the same graphs (Inductor's cache)."""
    torch.manual_seed(0)
    return resnext.resnext_tiny(num_classes=1000, fused_kernels=True).to(device)


def batch(device, seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).to(device)


def test_compile_fullgraph_trains_and_evaluates_like_eager(device):
    """torch.compile(model, fullgraph=True) with Inductor: one graph per mode holding every fused
    block, and two SGD steps then an evaluation that match the eager model's outputs, every
    gradient and every buffer."""
    model = fused_tiny(device)
    twin = copy.deepcopy(model)
    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=inductor, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    blocks = sum(isinstance(m, resnext.Bottleneck) for m in model.modules())
    with torch._inductor.config.patch(CPU_INDUCTOR):
        for step in range(2):
            x, target = batch(device, step)
            loss = nn.functional.cross_entropy(compiled(x), target)
            loss.backward()
            twin_loss = nn.functional.cross_entropy(twin(x), target)
            twin_loss.backward()
            torch.testing.assert_close(loss, twin_loss, **COMPILE_TOL)
            assert_models_match(model, twin, f"training step {step}")
            for o in (opt, twin_opt):
                o.step()
                o.zero_grad()
        assert len(graphs) == 1 and len(op_nodes(graphs[0])) == blocks  # no break, no recompile
        model.eval()
        twin.eval()
        x, _ = batch(device, 2)
        with torch.no_grad():
            y = compiled(x)
            torch.testing.assert_close(y, twin(x), **COMPILE_TOL)
    assert len(graphs) == 2 and len(op_nodes(graphs[1])) == blocks
    assert_models_match(model, twin, "after evaluation")  # evaluation leaves the statistics alone


def test_compile_block_under_autocast_and_channels_last(device):
    """The function under torch.autocast (cast inside the traced graph, like conv2d) on channels_last
    input, through AOTAutograd (functionalization of the running-statistics update, the autograd
    kernel's forward and backward ops): the eager call's output, gradients and statistics."""
    dtype = torch.float16
    inputs = make_inputs(SHAPE, device=device, channels_last=True, requires_grad=True)
    twin = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}

    def fn(*args):
        with torch.autocast(device, dtype=dtype):
            return grouped_conv_bn_relu(*args, groups=SHAPE.groups, training=True)

    torch._dynamo.reset()
    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(*inputs.values())
    y_ref = fn(*twin.values())
    assert y.dtype == dtype and y.stride() == y_ref.stride()
    # the same kernels on the same inputs: the same bits
    assert torch.equal(y, y_ref)
    dy = torch.randn(y.shape, device=device, dtype=dtype)
    y.backward(dy)
    y_ref.backward(dy)
    for k, v in inputs.items():
        expected = twin[k].grad if v.requires_grad else twin[k]
        assert torch.equal(v.grad if v.requires_grad else v, expected), k


def test_export_eval_model(device):
    """torch.export.export of a fused model in eval mode: the registered op stays one node per block,
    and the exported program (also after a save/load round trip, and decomposed to the functional
    IR) computes what the model computes, leaving the running statistics alone."""
    model = fused_tiny(device).eval()
    x, _ = batch(device, 0, n=4)
    with torch.no_grad():
        expected = model(x)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    ep = torch.export.export(model, (x,))
    blocks = sum(isinstance(m, resnext.Bottleneck) for m in model.modules())
    assert len(op_nodes(ep.graph_module)) == blocks
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    for program in (ep, torch.export.load(buf), ep.run_decompositions()):
        with torch.no_grad():
            # the fused op and the unfused ops computed in the same order: the same bits
            assert torch.equal(program.module()(x), expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


# ---------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)


def _capture_twins(optimizer):
    """(model, twin, optimizer of each): fused resnext_tiny on the GPU, channels_last."""
    torch.manual_seed(0)
    model = resnext.resnext_tiny(num_classes=10, fused_kernels=True).cuda().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    return model, twin, optimizer(model.parameters()), optimizer(twin.parameters())


def _gpu_batches(steps, n=16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(n, 3, 32, 32, device="cuda", generator=g).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (n,), device="cuda", generator=g)) for _ in range(steps)]


OPTIMIZERS = [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), id="sgd"),
    # eps=1e-3 keeps Adam's step linear in gradients near 0, where a last-bit difference between
    # two runs would otherwise flip a parameter's step between -lr and +lr
    pytest.param(lambda p: torch.optim.AdamW(p, lr=1e-3, eps=1e-3, capturable=True), id="adamw-capturable"),
]


@gpu_only
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cuda_graph_captures_a_training_step(optimizer, monkeypatch):
    """After three warm-up steps (where autotuning happens), ``torch.cuda.graph`` captures a whole
    training step (forward, backward, optimizer step) of a fused model; replays on new batches
    match the same steps run eagerly. Capture itself fails on any host synchronisation (an
    autotuning benchmark, an ``.item()``) in the op's launchers."""
    # deterministic cuDNN for the unfused convs: both runs then execute the same kernels on the
    # same inputs (the fused kernels are deterministic by construction)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model, twin, opt, twin_opt = _capture_twins(optimizer)
    data = _gpu_batches(6)
    static_x, static_target = torch.empty_like(data[0][0]), torch.empty_like(data[0][1])

    def step(m, o, x, target):
        loss = nn.functional.cross_entropy(m(x), target)
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
        for x, target in data[:3]:
            opt.zero_grad(set_to_none=True)
            static_x.copy_(x)
            static_target.copy_(target)
            step(model, opt, static_x, static_target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # .grad then comes from the graph's memory pool
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x, static_target)

    twin_losses = []
    for x, target in data:
        twin_opt.zero_grad(set_to_none=True)
        twin_losses.append(step(twin, twin_opt, x, target).detach())
    for i, (x, target) in enumerate(data[3:]):
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        torch.testing.assert_close(static_loss, twin_losses[3 + i], rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(int(b) == 6 for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))


@gpu_only
def test_compile_reduce_overhead_training(monkeypatch):
    """torch.compile(mode="reduce-overhead"): Inductor's CUDA-graph trees record the compiled
    forward and backward (the fused op inside) without skipping them, and five training steps,
    then an evaluation, match the eager model."""
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)  # a skip raises
    model, twin, opt, twin_opt = _capture_twins(OPTIMIZERS[0].values[0])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for i, (x, target) in enumerate(_gpu_batches(5)):
        losses = []
        for m, o in ((compiled, opt), (twin, twin_opt)):
            torch.compiler.cudagraph_mark_step_begin()
            loss = nn.functional.cross_entropy(m(x), target)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), f"step {i}"
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **COMPILE_TOL, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, **COMPILE_TOL, msg=lambda m: f"{name}: {m}")
    model.eval()
    twin.eval()
    x, _ = _gpu_batches(1)[0]
    with torch.no_grad():
        torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x).clone()
        torch.testing.assert_close(y, twin(x), **COMPILE_TOL)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert not counters["graph_break"]


# ---------------------------------------------------------------------------------------------
# The autotune cache


def test_autotuned_kernels_keep_their_results_on_disk(monkeypatch):
    """Every autotuned kernel of the op is made by ``kernels._autotune.autotune``, which asks Triton
    to cache its results (Triton ignores that under its interpreter, where each kernel has one
    config); ``RESNEXT_AUTOTUNE_CACHE=0`` turns it off."""
    tuners = {name: obj for mod in (conv_fwd, conv_bwd) for name, obj in vars(mod).items()
              if isinstance(obj, triton.runtime.Autotuner)}
    assert {"_fwd_kernel", "_bwd_dx_kernel", "_bwd_dw_kernel"} <= set(tuners)
    assert _autotune.SUPPORTS_CACHE  # triton 3.6 and 3.9 both have cache_results
    for name, tuner in tuners.items():
        assert tuner in _autotune.MADE, f"{name} is not decorated with kernels._autotune.autotune"
        assert tuner.cache_results == (not INTERPRET), name
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)  # as on a GPU
    def configs(interpret=False):
        return [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    kernel = next(iter(tuners.values())).fn
    assert _autotune.autotune(configs, key=["N"])(kernel).cache_results is True
    monkeypatch.setenv("RESNEXT_AUTOTUNE_CACHE", "0")
    assert _autotune.autotune(configs, key=["N"])(kernel).cache_results is False


_TUNE_ONCE = """
import torch
from kernels.grouped_conv_bn_relu import grouped_conv_bn_relu
x = torch.randn(8, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.randn(64, 8, 3, 3, device="cuda", requires_grad=True)
y = grouped_conv_bn_relu(x, w, None, None, torch.zeros(64, device="cuda"), torch.ones(64, device="cuda"),
                         groups=8, training=True)
y.sum().backward()
torch.cuda.synchronize()
"""


@gpu_only
def test_second_process_does_not_retune(tmp_path):
    """Two processes sharing a Triton cache directory: the first benchmarks the configs of the
    forward, dgrad and wgrad kernels and writes them down; the second tunes nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESNEXT_AUTOTUNE_CACHE")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_PRINT_AUTOTUNING="1", PYTHONPATH=ROOT)
    tuned = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _TUNE_ONCE], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=540)
        assert run.returncode == 0, run.stderr[-3000:]
        tuned.append(set(re.findall(r"Triton autotuning for function (\w+)", run.stdout)))
    assert {"_fwd_kernel", "_bwd_dx_kernel", "_bwd_dw_kernel"} <= tuned[0]
    assert not tuned[1], f"re-tuned in the second process: {tuned[1]}"
    assert list((tmp_path / "triton").rglob("_fwd_kernel.autotune.json"))
