"""The benchmark suite's CPU-checkable parts: shape table, FLOP/byte formulas, report tool, skipping."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from benchmarks import report
from benchmarks.shapes import ARCHS, MODES, BlockShape, block_shapes, conv_flops, min_bytes, throughput
from kernels.reference import ConvBNReLU

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available() and not kernels.interpreter_enabled()


# ---------------------------------------------------------------- shape table

# (stage, stride, channels, input size), from the architecture (KERNEL-NOTES): widths double per
# stage, spatial 56/28/14/7, the stride-2 first block reads the previous stage's size
EXPECTED = {
    "resnext50_32x4d": [(1, 1, 128, 56), (2, 2, 256, 56), (2, 1, 256, 28), (3, 2, 512, 28),
                        (3, 1, 512, 14), (4, 2, 1024, 14), (4, 1, 1024, 7)],
    "resnext101_32x8d": [(1, 1, 256, 56), (2, 2, 512, 56), (2, 1, 512, 28), (3, 2, 1024, 28),
                         (3, 1, 1024, 14), (4, 2, 2048, 14), (4, 1, 2048, 7)],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_shape_table(arch):
    shapes = block_shapes(arch)
    assert [(s.stage, s.stride, s.channels, s.size) for s in shapes] == EXPECTED[arch]
    assert all(s.groups == 32 for s in shapes)
    assert [s.out_size for s in shapes] == [56, 28, 28, 14, 14, 7, 7]
    assert len({s.id for s in block_shapes()}) == 14


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shape_table_matches_model(arch):
    """Every grouped conv the model runs, seen by forward hooks, is in the table, and vice versa."""
    resnext = pytest.importorskip("resnext")
    if not hasattr(resnext, "create_model"):
        pytest.skip("resnext.create_model not written yet")
    with torch.device("meta"):  # shapes only: no weights initialised, no arithmetic done
        model = resnext.create_model(arch, fused_kernels=False).eval()
    seen = set()

    def hook(conv, args):
        seen.add((conv.in_channels, conv.out_channels, conv.groups, conv.stride[0], args[0].shape[-1]))

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1:
            mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert seen == {(s.channels, s.channels, s.groups, s.stride, s.size) for s in block_shapes(arch)}


# ---------------------------------------------------------------- FLOPs and bytes

SMALL = [BlockShape("small", 2, 1, 16, 4, 9), BlockShape("small", 2, 2, 16, 4, 9)]  # odd size: stride-2 rounding


def _run(shape, batch, mode, dtype=torch.float32, frozen_weight=False):
    """Run the eager reference once in ``mode``; returns (module, x, y, dy)."""
    torch.manual_seed(0)
    m = ConvBNReLU(shape.channels, shape.channels, shape.stride, shape.groups).to(dtype)
    m.bn.float()
    m.conv.weight.requires_grad_(not frozen_weight)
    m.train(mode != "inference")
    x = torch.randn(shape.input_shape(batch), dtype=dtype, requires_grad=mode != "inference")
    with torch.set_grad_enabled(mode != "inference"):
        y = m(x)
    dy = torch.randn_like(y)
    if mode == "train_fwd_bwd":
        y.backward(dy)
    return m, x, y, dy


@pytest.mark.parametrize("shape", SMALL + [BlockShape("small", 1, 2, 8, 1, 9)], ids=["stride1", "stride2", "dense"])
@pytest.mark.parametrize("mode", ["inference", "train_fwd", "train_fwd_bwd"])
def test_conv_flops_match_flop_counter(shape, mode):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _run(shape, 3, mode)
    if mode == "train_fwd_bwd" and shape.groups > 1:
        # torch's counter forgets the groups in the weight gradient (fixed upstream in pytorch
        # PR 183405, 2026); count forward + dgrad with the weight frozen, and take wgrad = forward,
        # which the groups=1 case checks against the counter
        with FlopCounterMode(display=False) as fwd_dgrad:
            _run(shape, 3, mode, frozen_weight=True)
        with FlopCounterMode(display=False) as fwd:
            _run(shape, 3, "train_fwd")
        assert conv_flops(shape, 3, mode) == fwd_dgrad.get_total_flops() + fwd.get_total_flops() > 0
    else:
        assert conv_flops(shape, 3, mode) == counter.get_total_flops() > 0


@pytest.mark.parametrize("shape", SMALL, ids=["stride1", "stride2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_min_bytes_counts_each_tensor_once(shape, dtype):
    """The formula against the tensors themselves, named as in min_bytes' docstring."""
    m, x, y, dy = _run(shape, 2, "train_fwd_bwd", dtype)
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    w, bn = m.conv.weight, m.bn
    vec = bn.weight  # one float32 per channel: gamma, beta, running and saved statistics alike
    inference = size(x, w, bn.weight, bn.bias, bn.running_mean, bn.running_var, y)
    train_fwd = size(x, w, bn.weight, bn.bias) + 2 * size(bn.running_mean, bn.running_var) + size(y) + 2 * size(vec)
    backward = size(dy, x, w, bn.weight, bn.bias) + 2 * size(vec) + size(x.grad, w.grad, bn.weight.grad, bn.bias.grad)
    assert min_bytes(shape, 2, dtype, "inference") == inference
    assert min_bytes(shape, 2, dtype, "train_fwd") == train_fwd
    assert min_bytes(shape, 2, dtype, "train_fwd_bwd") == train_fwd + backward


def test_min_bytes_stage1_matches_kernel_notes():
    """KERNEL-NOTES: ResNeXt-50 stage 1, bf16, batch 256: ~123 us at 3.35 TB/s (x and y, 205 MB
    each), ~7.4 GFLOP."""
    s = block_shapes("resnext50_32x4d")[0]
    assert 122e-6 < min_bytes(s, 256, torch.bfloat16, "inference") / 3.35e12 < 124e-6
    assert 7.3e9 < conv_flops(s, 256, "inference") < 7.5e9


def test_throughput():
    t = throughput(flops=2e12, nbytes=3e9, median_ms=1000.0, copy_gbps=6.0)
    assert t == pytest.approx({"tflops": 2.0, "gbps": 3.0, "roofline": 0.5})
    assert throughput(1, 1, 1.0, None)["roofline"] is None


# ---------------------------------------------------------------- report tool

BATCH = 256
COPY_GBPS = 3000.0
ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cudnn": "91002",
       "copy_gbps": COPY_GBPS}
# (stage index in the table, mode) -> median ms per provider
BLOCK_MS = {
    (0, "inference"): {"cudnn": 1.0, "compile": 0.8, "fused": 0.5},  # 2x
    (1, "inference"): {"cudnn": 1.0, "compile": 0.5, "fused": 0.25},  # 4x
    (0, "train_fwd_bwd"): {"cudnn": 3.0, "compile": 2.5, "fused": 2.0},  # 1.5x
    (1, "train_fwd_bwd"): {"cudnn": 3.0, "compile": 2.5, "fused": 2.0},
}
MODEL_SLEEP_S = {"cudnn": 0.02, "compile": 0.015, "fused": 0.01, "fused_block": 0.008}
# (bottleneck index in bottleneck_shapes(): 0 stage1-proj, 1 stage1-identity, mode) -> ms per provider
BOTTLENECK_MS = {
    (0, "inference"): {"cudnn": 2.0, "compile": 1.6, "fused_conv": 1.8, "fused_block": 1.0},  # 2x
    (1, "inference"): {"cudnn": 1.5, "compile": 1.2, "fused_conv": 1.4, "fused_block": 1.0},  # 1.5x
    (0, "train_fwd_bwd"): {"cudnn": 6.0, "compile": 5.0, "fused_conv": 5.5, "fused_block": 4.0},  # 1.5x, 1.25x
    (1, "train_fwd_bwd"): {"cudnn": 4.5, "compile": 4.0, "fused_conv": 4.2, "fused_block": 2.5},  # 1.8x, 1.6x
}
ELEMENTWISE = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
               "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)")
# the fused stage-1 inference case's extra_info["kernels"], deliberately not slowest first
KERNELS = {"_bn_relu_kernel": 0.005, "Memcpy DtoD (Device -> Device)": 0.02, "_fwd_kernel": 0.45, ELEMENTWISE: 0.01}


def _block_info(index, mode, provider, ms):
    s = block_shapes("resnext50_32x4d")[index]
    flops, nbytes = conv_flops(s, BATCH, mode), min_bytes(s, BATCH, torch.bfloat16, mode)
    info = dict(ENV, op="block", arch=s.arch, stage=s.stage, shape=list(s.input_shape(BATCH)), groups=s.groups,
                stride=s.stride, dtype="bfloat16", mode=mode, provider=provider, median_ms=ms, flops=flops,
                bytes=nbytes, **throughput(flops, nbytes, ms, COPY_GBPS), variant="channels_last")
    if (index, mode, provider) == (0, "inference", "fused"):
        info["kernels"] = KERNELS
    return info


def _bottleneck_info(index, mode, provider, ms):
    from benchmarks.test_bottleneck_bench import bottleneck_shapes, flops_and_bytes

    s = bottleneck_shapes()[index]
    arch, stage, stride, inplanes, planes, groups, _, size = s
    flops, nbytes = flops_and_bytes(s, BATCH, mode)
    return dict(ENV, op="bottleneck", arch=arch, stage=stage, stride=stride, inplanes=inplanes, planes=planes,
                groups=groups, size=size, batch=BATCH, dtype="bfloat16", mode=mode, provider=provider,
                layout="nchw" if provider == "cudnn" and index == 1 else "channels_last", median_ms=ms,
                flops=flops, bytes=nbytes)


FAKE_BENCH = textwrap.dedent("""
    import json, time
    import pytest

    CASES = json.load(open("cases.json"))

    @pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
    def test_fake(benchmark, case):
        benchmark.extra_info.update(case["info"])
        benchmark.pedantic(time.sleep, args=(case["sleep"],), rounds=3)
""")


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """A JSON written by pytest-benchmark itself (its real schema), with our benchmarks' extra_info."""
    pytest.importorskip("pytest_benchmark")
    d = tmp_path_factory.mktemp("bench")
    cases = [{"info": _block_info(i, mode, p, ms), "sleep": 0.0}
             for (i, mode), by_p in BLOCK_MS.items() for p, ms in by_p.items()]
    cases += [{"info": dict(ENV, op="model", arch="resnext50_32x4d", mode=mode, batch=BATCH, dtype="bfloat16",
                            provider=p, images_per_s=-1.0), "sleep": t}  # images_per_s: the report recomputes it
              for mode in ("inference", "train") for p, t in MODEL_SLEEP_S.items()]
    cases += [{"info": _bottleneck_info(i, mode, p, ms), "sleep": 0.0}
              for (i, mode), by_p in BOTTLENECK_MS.items() for p, ms in by_p.items()]
    (d / "cases.json").write_text(json.dumps(cases))
    (d / "test_fake.py").write_text(FAKE_BENCH)
    (d / "pytest.ini").write_text("[pytest]\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "test_fake.py",
                          "--benchmark-json=out.json"], cwd=d, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((d / "out.json").read_text())


@pytest.fixture(scope="module")
def written(bench_json, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("results")
    return report.write_results(bench_json, out_dir)


def test_report_writes_schema(written, bench_json):
    assert written["json"].name == "nvidia-h100-80gb-hbm3.json"
    result = json.loads(written["json"].read_text())
    assert set(result) == {"meta", "records"}
    assert result["meta"] == {"gpu": ENV["gpu"], "torch": "2.11.0", "triton": "3.6.0", "cudnn": "91002",
                              "git_sha": report.meta(bench_json)["git_sha"], "date": bench_json["datetime"]}
    blocks = [r for r in result["records"] if r["op"] == "block"]
    models = [r for r in result["records"] if r["op"] == "model"]
    bottlenecks = [r for r in result["records"] if r["op"] == "bottleneck"]
    assert len(blocks) == 12 and len(models) == 8 and len(bottlenecks) == 16
    assert all(list(r) == list(report.BOTTLENECK_KEYS) for r in bottlenecks)
    r = next(r for r in bottlenecks if (r["stage"], r["inplanes"], r["mode"], r["provider"])
             == (1, 64, "inference", "fused_block"))
    assert (r["median_ms"], r["layout"], r["planes"], r["stride"]) == (1.0, "channels_last", 64, 1)
    assert r["roofline"] == pytest.approx(r["gbps"] / COPY_GBPS) and r["tflops"] > 0
    profiled = [r for r in blocks if "kernels" in r]
    assert [(r["stage"], r["mode"], r["provider"]) for r in profiled] == [(1, "inference", "fused")]
    assert list(profiled[0]) == [*report.BLOCK_KEYS, "kernels"]
    assert all(list(r) == list(report.BLOCK_KEYS) for r in blocks if r is not profiled[0])
    assert all(list(r) == list(report.MODEL_KEYS) for r in models)


def test_report_block_figures(written):
    blocks = [r for r in json.loads(written["json"].read_text())["records"] if r["op"] == "block"]
    s = block_shapes("resnext50_32x4d")[0]
    r = next(r for r in blocks if (r["stage"], r["mode"], r["provider"]) == (1, "inference", "fused"))
    assert r["shape"] == [256, 128, 56, 56] and (r["groups"], r["stride"], r["dtype"]) == (32, 1, "bfloat16")
    assert r["median_ms"] == 0.5
    assert r["tflops"] == pytest.approx(conv_flops(s, BATCH, "inference") / 0.5e-3 / 1e12)
    assert r["gbps"] == pytest.approx(min_bytes(s, BATCH, torch.bfloat16, "inference") / 0.5e-3 / 1e9)
    assert r["roofline"] == pytest.approx(r["gbps"] / COPY_GBPS)


def test_report_model_images_per_s(written, bench_json):
    """images/s = batch / pytest-benchmark's median, not whatever extra_info said."""
    models = [r for r in json.loads(written["json"].read_text())["records"] if r["op"] == "model"]
    medians = {(b["extra_info"]["mode"], b["extra_info"]["provider"]): b["stats"]["median"]
               for b in bench_json["benchmarks"] if b["extra_info"]["op"] == "model"}
    for r in models:
        assert r["images_per_s"] == pytest.approx(BATCH / medians[(r["mode"], r["provider"])])
        assert r["images_per_s"] < BATCH / MODEL_SLEEP_S[r["provider"]]  # sleep() is the least it took


def test_report_goals(written):
    recs = json.loads(written["json"].read_text())["records"]
    g = {name: (value, met) for name, _, value, met in report.goals(recs)}
    value, met = g["block inference: geomean speedup of fused over cudnn"]
    assert value == pytest.approx(math.sqrt(2.0 * 4.0)) and met
    value, met = g["block train_fwd_bwd: geomean speedup of fused over cudnn"]
    assert value == pytest.approx(1.5) and met
    roofs = [r["roofline"] for r in recs
             if r["op"] == "block" and r["mode"] == "inference" and r["provider"] == "fused"]
    assert g["block inference: lowest fused roofline fraction"] == (pytest.approx(min(roofs)), False)
    assert g["resnext50_32x4d train batch 256: fused (faster level) over cudnn images/s"][0] > 1.0
    # the fused bottleneck's: the least speedup over the blocks measured
    assert g["bottleneck train_fwd_bwd: fused_block over cudnn, least of resnext50_32x4d's blocks"] == (
        pytest.approx(1.5), True)
    assert g["bottleneck train_fwd_bwd: fused_block over compile, least of resnext50_32x4d's blocks"] == (
        pytest.approx(1.25), True)
    assert g["bottleneck inference: fused_block over cudnn, least of resnext50_32x4d's blocks"] == (
        pytest.approx(1.5), True)
    value, met = g["resnext50_32x4d train batch 256: fused (faster level) over compile images/s"]
    assert value > 1.0 and met is not None
    # goals without data are reported as such, not as met or missed
    assert all(met is None for _, _, _, met in report.goals([r for r in recs if r["op"] == "block"])[3:])


def test_report_markdown_and_chart(written):
    text = written["md"].read_text()
    assert text.startswith("# Benchmark results: NVIDIA H100 80GB HBM3")
    assert "| block inference: geomean speedup of fused over cudnn | >= 2.0x | 2.83x | met |" in text
    assert "| stage2/s2 | 256, 256, 56, 56 | 32 | 1.000 | 0.500 | 0.250 |" in text
    assert "## Models" in text and "![" in text
    assert text.index("## Bottlenecks") < text.index("## Models")
    assert "| stage1-identity | 1.500 (nchw) | 1.200 | 1.400 | 1.000 |" in text
    assert "| stage1-proj | 6.000 (cl) | 5.000 | 5.500 | 4.000 |" in text
    assert text.index("## Fused kernels") < text.index("## Models")
    # the kernels' sum 0.485 ms; shares of it; the fourth kernel summed as "1 more"
    assert ("| resnext50_32x4d | bfloat16 | inference | stage1 | 0.500 | 0.485 | "
            "`_fwd_kernel` 0.450 (93%) · `Memcpy DtoD (Device -> Device)` 0.020 (4%) · "
            "`vectorized_elementwise_kernel<4, FillFunctor<float>, std::a…` 0.010 (2%) · "
            "1 more 0.005 (1%) |") in text
    section = text[text.index("## Fused kernels"):text.index("## Models")]
    assert section.count("\n| resnext") == 1  # one row per fused record with kernels, none for the others
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = json.loads(written["json"].read_text())["records"]
    labels, bars = report.chart_data(recs, "bfloat16")[("resnext50_32x4d", "inference")]
    assert labels == ["s1", "s2/2"]
    assert bars == {"cudnn": [1.0, 1.0], "compile": [1.25, 2.0], "fused": [2.0, 4.0]}


def test_report_kernels_carried_slowest_first(written):
    """extra_info["kernels"] goes into the fused record as recorded, re-sorted slowest first."""
    rec = next(r for r in json.loads(written["json"].read_text())["records"] if "kernels" in r)
    assert rec["kernels"] == KERNELS
    assert list(rec["kernels"]) == ["_fwd_kernel", "Memcpy DtoD (Device -> Device)", ELEMENTWISE, "_bn_relu_kernel"]


def test_short_kernel_name():
    assert report.short_kernel_name("_bwd_dx_kernel") == "_bwd_dx_kernel"  # Triton: the function name
    assert report.short_kernel_name("Memset (Device)") == "Memset (Device)"  # not a C++ signature
    assert report.short_kernel_name("void at::native::(anonymous namespace)::f<(int)3>(float*, int)") == "f<(int)3>"
    short = report.short_kernel_name(ELEMENTWISE, width=30)
    assert short == "vectorized_elementwise_kernel…" and len(short) == 30


def test_top_kernels():
    top, rest = report.top_kernels({"a": 1.0, "b": 6.0, "c": 2.0, "d": 1.0}, n=2)
    assert top == [("b", 6.0, 0.6), ("c", 2.0, 0.2)]
    assert rest == (2, 2.0, pytest.approx(0.2))
    assert report.top_kernels({"a": 1.0}, n=2) == ([("a", 1.0, 1.0)], None)


def test_report_cli(bench_json, tmp_path, capsys):
    (tmp_path / "in.json").write_text(json.dumps(bench_json))
    report.main([str(tmp_path / "in.json"), "--out-dir", str(tmp_path / "out")])
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".json", ".md", ".png"]
    captured = capsys.readouterr()
    assert "wrote" in captured.out and not captured.err


# input the report can't use -> (file content, or None: no file, or "/": a directory; what the line says)
BAD_INPUTS = {
    "missing": (None, "cannot read: No such file or directory"),
    "directory": ("/", "cannot read: Is a directory"),
    "empty": ("", "empty: no benchmark ran"),  # what pytest-benchmark leaves when every case skipped
    "blank": ("\n  \n", "empty: no benchmark ran"),
    "invalid JSON": ('{"benchmarks": [', "not JSON: "),
    "not UTF-8": (b"\xff\xfe{", "cannot read: "),
    "other JSON": ('[{"benchmarks": []}]', "not a pytest-benchmark JSON"),
    "no results": ('{"benchmarks": [{"name": "test_x", "extra_info": {}}]}', "no benchmark carries results"),
}


def _bad_input(tmp_path, case) -> Path:
    content, _ = BAD_INPUTS[case]
    path = tmp_path / "in.json"
    if content == "/":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_report_cli_bad_input(case, tmp_path, capsys):
    """One line on stderr, ``error: <file>: <why>``, and exit status 2; nothing written."""
    path = _bad_input(tmp_path, case)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(path), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n") and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"error: {path}: ") and BAD_INPUTS[case][1] in captured.err, captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_report_cli_bad_input_subprocess(case, tmp_path):
    """The same through ``python -m benchmarks.report``: no traceback, exit status 2."""
    path = _bad_input(tmp_path, case)
    out = subprocess.run([sys.executable, "-m", "benchmarks.report", str(path), "--out-dir", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert out.stdout == "" and len(lines) == 1, out.stderr  # no traceback
    assert lines[0].startswith(f"error: {path}: ") and BAD_INPUTS[case][1] in lines[0], lines[0]


def test_report_merges_runs(bench_json, tmp_path):
    """Blocks, bottlenecks and models come from separate device calls: one report holds them all."""
    parts = []
    for op in ("block", "bottleneck", "model"):
        part = dict(bench_json, benchmarks=[b for b in bench_json["benchmarks"] if b["extra_info"]["op"] == op])
        assert part["benchmarks"]
        (tmp_path / f"{op}.json").write_text(json.dumps(part))
        parts.append(str(tmp_path / f"{op}.json"))
    report.main([*parts, "--out-dir", str(tmp_path / "out")])
    merged = json.loads(next((tmp_path / "out").glob("*.json")).read_text())["records"]
    assert merged == report.records(bench_json)


def test_gpu_slug():
    assert report.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert report.gpu_slug("NVIDIA H100 PCIe") == "nvidia-h100-pcie"


# ---------------------------------------------------------------- the suite without a GPU

def _bench_cases() -> int:
    from benchmarks import test_block_bench, test_bottleneck_bench, test_model_bench, test_patch_bench
    from benchmarks.conftest import ALL_DTYPES
    from benchmarks.shapes import MODES, regnet_shapes

    shapes = len(block_shapes()) + len(regnet_shapes())
    blocks = shapes * len(ALL_DTYPES) * len(MODES) * len(test_block_bench.PROVIDERS)
    models = len(test_model_bench.ARCHS) * len(test_model_bench.MODES) * len(test_model_bench.PROVIDERS)
    bottlenecks = (len(test_bottleneck_bench.bottleneck_shapes()) * len(test_bottleneck_bench.MODES)
                   * len(test_bottleneck_bench.PROVIDERS))
    return blocks + models + bottlenecks + len(test_patch_bench.MODES) * len(test_patch_bench.PROVIDERS)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU this would run the whole benchmark suite")
def test_benchmarks_skip_without_gpu():
    """`pytest benchmarks/ --benchmark-only -q` collects every case, skips each, exits 0, and says
    why in one line (under -q pytest shows no header, and no skip reason without -rs)."""
    from benchmarks.conftest import NO_GPU_REASON

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    cases = _bench_cases()
    # (14 ResNeXt + 16 RegNetY shapes) x 3 dtypes x 3 modes x 3 providers + 2 models x 2 modes x 4 providers
    # + torchvision's resnext50_32x4d patched and not, 2 modes
    # + 16 bottlenecks x 2 modes x 4 providers
    assert cases == 810 + 16 + 4 + 128
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{cases} skipped"), lines[-1]
    assert "passed" not in lines[-1] and "failed" not in lines[-1], lines[-1]
    why = [line for line in lines if line.startswith("resnext-fused benchmarks:")]
    assert why == [f"resnext-fused benchmarks: all {cases} cases skipped: {NO_GPU_REASON}"], out.stdout
    assert NO_GPU_REASON.startswith("needs a CUDA GPU with Triton's interpreter off")


def test_skip_summary_line():
    from benchmarks.conftest import skip_summary

    assert skip_summary(12, 12, "why") == "resnext-fused benchmarks: all 12 cases skipped: why"
    assert skip_summary(3, 12, "why") == "resnext-fused benchmarks: 3 of 12 cases skipped: why"
    assert skip_summary(0, 12, "why") is None  # nothing skipped for lack of a GPU: no line


def test_report_lists_cases_not_measured(written):
    """The .md names every case the GPU issue asks for that the JSONs lack (a part cut off by its
    time limit shows), and none that is there."""
    text = written["md"].read_text()
    section = text[text.index("## Cases not measured"):text.index("## Models")]
    # the fake measured stage1 and stage2/s2 of resnext50_32x4d, inference and train_fwd_bwd, all providers
    assert "- blocks resnext50_32x4d bfloat16 inference `fused`: stage2, stage3/s2, stage3, stage4/s2, stage4\n" in section
    assert ("- blocks resnext50_32x4d bfloat16 train_fwd `compile`: stage1, stage2/s2, stage2, stage3/s2, stage3, "
            "stage4/s2, stage4\n") in section
    assert "- blocks resnext101_32x8d bfloat16 train_fwd_bwd `cudnn`: stage1," in section
    assert "resnext101_32x8d bfloat16 inference `compile`" not in section  # compile: resnext50_32x4d only
    assert "- model" not in section  # both model modes, every provider
    assert ("- bottlenecks resnext50_32x4d bfloat16 train_fwd_bwd `fused_block`: stage2-proj/s2, stage2-identity, "
            "stage3-proj/s2") in section  # the fake measured stage 1's two blocks only


def test_report_lists_nothing_when_complete():
    recs = [dict(op="block", arch=s.arch, stage=s.stage, stride=s.stride, dtype="bfloat16", mode=mode, provider=p)
            for s in block_shapes() for mode in MODES for p in ("fused", "cudnn", "compile")]
    recs += [dict(op="model", arch="resnext50_32x4d", mode=mode, provider=p)
             for mode in ("inference", "train") for p in ("fused", "fused_block", "cudnn", "compile")]
    from benchmarks.shapes import BOTTLENECK_MODES, bottleneck_shapes

    recs += [dict(op="bottleneck", arch=b[0], stage=b[1], stride=b[2], inplanes=b[3], planes=b[4], mode=mode,
                  provider=p) for b in bottleneck_shapes() for mode in BOTTLENECK_MODES
             for p in ("cudnn", "compile", "fused_conv", "fused_block")]
    assert report.missing_cases(recs) == []
    assert report.missing_cases(recs[1:]) == ["- blocks resnext50_32x4d bfloat16 inference `fused`: stage1"]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["stage1-proj", "stage1-identity", "stage2-proj-s2"])
@pytest.mark.parametrize("mode", ["inference", "train_fwd_bwd"])
def test_bottleneck_flops_match_flop_counter(index, mode):
    """The bottleneck benchmark's FLOPs are the convolutions' as torch.utils.flop_counter counts them
    (forward, and forward + backward with every input requiring grad), at a small batch."""
    import torch.nn as nn
    from torch.utils.flop_counter import FlopCounterMode

    import resnext
    from benchmarks.test_bottleneck_bench import bottleneck_shapes, flops_and_bytes

    s = bottleneck_shapes()[index]
    _, _, stride, inplanes, planes, groups, wpg, size = s
    down = None
    if stride != 1 or inplanes != planes * 4:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    block = resnext.Bottleneck(inplanes, planes, stride, down, groups, wpg)
    x = torch.randn(2, inplanes, size, size, requires_grad=mode != "inference")
    # torch's counter forgets the groups in the grouped conv's weight gradient (see
    # test_conv_flops_match_flop_counter): count with conv2's weight frozen, and add its wgrad as
    # its forward, counted on its own
    block.conv2.weight.requires_grad_(mode == "inference")
    with FlopCounterMode(display=False) as counter:
        y = block(x)
        if mode != "inference":
            y.sum().backward()
    total = counter.get_total_flops()
    if mode != "inference":
        with FlopCounterMode(display=False) as conv2, torch.no_grad():
            block.conv2(torch.randn(2, block.conv2.in_channels, size, size))
        total += conv2.get_total_flops()
    assert flops_and_bytes(s, 2, mode)[0] == total > 0
