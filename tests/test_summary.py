"""Compute counts against published tables: torchvision's GMACs and the seed's mmcls FLOPs table."""

import pytest
import torch
import torch.nn as nn

import resnext
from resnext.summary import count_macs, count_mmcls_flops, main, summarize


@pytest.fixture(scope="module")
def rows():
    return summarize()  # every builder, on the meta device


# torchvision's weights tables (GFLOPS there = GMACs): exact to their 2 decimals.
TORCHVISION_GMACS = {"resnext50_32x4d": 4.23, "resnext101_32x8d": 16.41, "resnext101_64x4d": 15.46}

# The seed table (mmcls model zoo): Params(M), FLOPs(G) at the table's precision.
MMCLS = {
    "resnext50_32x4d": (25.03, "4.27"),
    "resnext101_32x4d": (44.18, "8.03"),
    "resnext101_32x8d": (88.79, "16.5"),
    "resnext152_32x4d": (59.95, "11.8"),
}

# Our exact MAC counts for every builder (conv + fc), a regression guard; the published ones
# above pin the convention.
MACS = {
    "resnext50_32x4d": 4_230_479_872,
    "resnext101_32x4d": 7_969_996_800,
    "resnext101_32x8d": 16_414_015_488,
    "resnext101_64x4d": 15_460_270_080,
    "resnext152_32x4d": 11_709_513_728,
    "resnext101_32x16d": 36_163_289_088,
    "resnext29_8x64d": 5_387_266_048,    # at 32x32
    "resnext29_16x64d": 10_688_866_304,  # at 32x32
    "resnext_tiny": 134_539_264,         # at 32x32
}


def test_every_builder_counted(rows):
    assert sorted(rows) == sorted(resnext.list_models()) == sorted(MACS)


@pytest.mark.parametrize("name", list(MACS))
def test_macs(rows, name):
    assert rows[name]["macs"] == MACS[name]
    if name in TORCHVISION_GMACS:
        assert round(rows[name]["macs"] / 1e9, 2) == TORCHVISION_GMACS[name]


@pytest.mark.parametrize("name", list(MMCLS))
def test_mmcls_table(rows, name):
    params_m, flops_g = MMCLS[name]
    assert round(rows[name]["params"] / 1e6, 2) == params_m
    assert f"{rows[name]['mmcls_flops'] / 1e9:.3g}" == flops_g


def test_mmcls_element_ops_convention():
    """BN counts 2 ops per input element (affine), ReLU and pooling 1; the conv its MACs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                          nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
    size = (2, 3, 8, 8)
    macs = 2 * 4 * 8 * 8 * 3 * 9
    assert count_macs(model, size) == macs
    elements = 2 * 4 * 8 * 8
    assert count_mmcls_flops(model, size) == macs + 2 * elements + elements + elements + elements // 4
    # hooks and counters are gone afterwards
    assert all(not m._forward_hooks and not hasattr(m, "_resnext_element_ops") for m in model)


def test_reused_relu_counts_every_call():
    block = resnext.resnext_tiny().layer1[0]  # one nn.ReLU module called three times
    size = (1, 16, 8, 8)
    macs = count_macs(block, size)
    relu = (32 + 32 + 256) * 64
    bn = 2 * (32 + 32 + 256 + 256) * 64  # bn1, bn2, bn3, downsample.1
    assert count_mmcls_flops(block, size) == macs + relu + bn


def test_cli_prints_table(capsys):
    main(["resnext50_32x4d", "resnext101_32x8d"])
    out = capsys.readouterr().out
    line50 = next(line for line in out.splitlines() if line.startswith("resnext50_32x4d"))
    assert line50.split()[1:] == ["224x224", "25.03", "4.23", "4.27"]
    line101 = next(line for line in out.splitlines() if line.startswith("resnext101_32x8d"))
    assert line101.split()[1:] == ["224x224", "88.79", "16.41", "16.5"]
    assert "Params(M)" in out and "GMACs" in out and "FLOPs(G)" in out
