"""Benchmarks for the fused grouped conv + BN + ReLU op and the ResNeXt models built on it.

Run on a GPU (every case skips, with a reason, without one)::

    PYTHONPATH=. pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    python -m benchmarks.report out.json            # -> benchmarks/results/<gpu>.{json,md,png}

Options (``benchmarks/conftest.py``): ``--bench-batch`` (default 256), ``--bench-dtypes``
(default ``bfloat16,float16,float32``), ``--bench-max-autotune`` (torch.compile mode for the
``compile`` provider). ``benchmarks/shapes.py`` holds the shape table and the FLOP/byte formulas.
"""
