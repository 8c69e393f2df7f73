"""One switch, one rule: what turns Triton's interpreter on for the kernels turns it on everywhere.

``kernels.interpreter_enabled`` reads ``TRITON_INTERPRET`` as Triton does; the launchers
(``kernels.common.INTERPRET``), the tests' device (``tests/conftest.py``) and the trainer all ask it.
"""

import pytest
import triton

import kernels
import kernels.common as common
from conftest import DEVICE, INTERPRET


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes", "0", "false", "off", "", "2"])
def test_interpreter_switch_reads_the_variable_as_triton_does(value, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert kernels.interpreter_enabled() == triton.knobs.runtime.interpret, value


def test_everyone_asks_the_same_rule():
    assert common.INTERPRET == INTERPRET == kernels.interpreter_enabled()
    assert DEVICE == ("cpu" if INTERPRET else "cuda")
    assert common.CPU_TENSORS_OK == INTERPRET


def test_gpu_tiles_switch_and_restore():
    """``gpu_tiles()`` runs the GPU's tiles and composition and puts back what was there."""
    before = common.Tiles(**vars(common.TILES))
    with common.gpu_tiles() as tiles:
        assert tiles is common.TILES and tiles == common.GPU_TILES
        assert not tiles.materialize_dz and tiles.wgrad_block_k == 64
    assert common.TILES == before
    assert common.TILES == (common.INTERPRETER_TILES if INTERPRET else common.GPU_TILES)
