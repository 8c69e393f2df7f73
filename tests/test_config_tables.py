"""Configs without benchmarking (``kernels.configs``): the GPU's table, then its architecture's, then the
kernel's heuristic; bad tables are ignored with one warning; any config gives the same bits.

Run on the CPU with the GPU's tiles and configs (``gpu_tiles``) and temporary tables standing in for
a GPU's: ``device_tables`` is what a CUDA device would look up.
"""

import json
import warnings

import pytest
import torch
import triton

import kernels.configs as configs
from kernels.common import gpu_tiles
from kernels.conv3x3 import forward as conv_fwd


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """(kernel name, config) of every autotuned launch; tables looked up in tmp_path; nothing cached."""
    seen = []
    choose = configs.choose

    def recording(kernel, args, meta):
        config = choose(kernel, args, meta)
        seen.append((kernel, args, meta, config))
        return config

    monkeypatch.setattr(configs, "choose", recording)
    monkeypatch.setattr(configs, "device_tables", lambda device: (tmp_path / "GPU.json", tmp_path / "sm_90.json"))
    monkeypatch.setattr(configs, "_CHOSEN", {})
    configs.load_table.cache_clear()
    configs._warn_once.cache_clear()
    with gpu_tiles():
        yield seen
    configs.load_table.cache_clear()


def _forward(device, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, 9, 7, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(32, 4, 3, 3, generator=g) / 6).to(device)
    return conv_fwd.conv3x3_forward(x, w, 8, 1, 1, store=conv_fwd.STORE_Z, compute_stats=True)


def _table(path, entries, version=triton.__version__):
    path.write_text(json.dumps({"device": "test", "triton": version, "kernels": entries}))
    _forget()


def _forget():
    """What a new process knows: no table read yet, no choice made."""
    configs.load_table.cache_clear()
    configs._CHOSEN.clear()


def _entry_for(seen, config, bucket_shift=0):
    """A table naming ``config`` for the (first) launch in ``seen``, at its bucket shifted by ``bucket_shift``."""
    kernel, args, meta, _ = seen[0]
    name, shape_key, bucket = configs.table_key(kernel, {**dict(zip(kernel.arg_names, args)), **meta})
    return {name: {configs.format_key(shape_key, bucket + bucket_shift): configs.config_entry(config)}}


def _kept(seen):
    kernel, args, meta, _ = seen[0]
    return configs.kept_configs(kernel, dict(zip(kernel.arg_names, args)), meta)


@pytest.mark.usefixtures("fixed_order_dot")
def test_lookup_order_gpu_table_then_architecture_then_heuristic(launched, tmp_path, device):
    z0, _ = _forward(device)
    kernel = launched[0][0]
    kept = _kept(launched)
    assert len(kept) >= 3
    assert launched[0][3] is kernel.heuristic(kept)  # no tables: the heuristic
    others = [c for c in kept if c is not launched[0][3]]
    _table(tmp_path / "sm_90.json", _entry_for(launched, others[0]))
    z1, _ = _forward(device)
    assert launched[-1][3] is others[0]  # the architecture's table
    _table(tmp_path / "GPU.json", _entry_for(launched, others[1]))
    z2, _ = _forward(device)
    assert launched[-1][3] is others[1]  # the GPU's own table first
    assert torch.equal(z0, z1) and torch.equal(z0, z2)  # whichever config: the same bits


def test_nearest_pixel_bucket_of_the_same_key(launched, tmp_path, device):
    _forward(device)
    other = [c for c in _kept(launched) if c is not launched[0][3]][0]
    _table(tmp_path / "GPU.json", _entry_for(launched, other, bucket_shift=3))  # a batch 8x larger
    _forward(device)
    assert launched[-1][3] is other


@pytest.mark.parametrize("problem", ["not json", "no kernels", "other triton", "unshipped config"])
def test_bad_table_warns_once_and_falls_back(problem, launched, tmp_path, device):
    _forward(device)
    heuristic = launched[0][3]
    other = [c for c in _kept(launched) if c is not heuristic][0]
    path = tmp_path / "GPU.json"
    if problem == "not json":
        path.write_text("{'kernels': ")
    elif problem == "no kernels":
        path.write_text(json.dumps({"triton": triton.__version__}))
    elif problem == "other triton":
        _table(path, _entry_for(launched, other), version="2.1.0")
    else:
        entries = _entry_for(launched, other)
        for entry in next(iter(entries.values())).values():
            entry["num_warps"] = 3  # no shipped config has 3 warps
        _table(path, entries)
    _forget()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _forward(device)
        _forward(device, n=3)
    ours = [w for w in caught if "GPU.json" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert launched[-1][3] is heuristic


@pytest.mark.usefixtures("fixed_order_dot")
def test_resnext_autotune_hands_the_choice_to_triton(launched, monkeypatch, device):
    z0, _ = _forward(device)
    monkeypatch.setattr(configs, "AUTOTUNE", True)
    _forget()
    z1, _ = _forward(device)
    assert launched[-1][3] is None  # Triton's autotuner decides (on the CPU: its one config)
    assert torch.equal(z0, z1)


def test_table_name_from_the_device_name():
    assert configs.table_name("NVIDIA H200") == "NVIDIA_H200"
    assert configs.table_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert configs.table_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100_SXM4_80GB"


@pytest.mark.usefixtures("fixed_order_dot")
def test_tune_records_the_fastest_kept_config_within_its_budget(launched, monkeypatch, device):
    """benchmarks.tune's tuner times every kept config of a new key (do_bench stands in here: no GPU),
    records the fastest, launches it, and once its budget is spent tunes nothing more."""
    from benchmarks.tune import Tuner

    z0, _ = _forward(device)
    kept = _kept(launched)
    fastest = kept[-1]
    timed = []

    def fake_do_bench(call, warmup, rep, return_mode):
        config = call.__defaults__[0]
        timed.append(config)
        return 1.0 if config is fastest else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    table = {}
    tuner = Tuner(table, budget_s=60)
    monkeypatch.setattr(configs, "TUNER", tuner)
    z1, _ = _forward(device)
    assert timed == kept and tuner.tuned == 1 and tuner.runs == len(kept)
    (key, entry), = table["_fwd_kernel"].items()
    assert entry == configs.config_entry(fastest, 1.0) and key.startswith("float32 M=2^7 ")
    assert torch.equal(z0, z1)
    _forward(device)  # known key: no more timing
    assert len(timed) == len(kept)
    spent = Tuner({}, budget_s=0)
    monkeypatch.setattr(configs, "TUNER", spent)
    _forward(device)
    assert spent.skipped == 1 and spent.tuned == 0 and len(timed) == len(kept)


def test_tune_needs_a_gpu(capsys):
    from benchmarks.tune import main

    assert main(["--budget-s", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: benchmarks.tune needs a CUDA GPU with Triton's interpreter off"
