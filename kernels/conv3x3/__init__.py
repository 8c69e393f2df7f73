"""The grouped 3x3 convolution as an implicit GEMM over channels-last activations.

* ``tiles``: channel tiles over the groups, autotune configs and the budgets that prune them.
* ``weights``: the grouped weight packed once per call into dense block-diagonal tiles.
* ``forward``: ``_fwd_kernel`` (conv, optional BN + ReLU prologue on the input, BN statistics or
  BN + ReLU in the epilogue) and its launcher ``conv_forward``.
* ``backward``: ``_bwd_dx_kernel`` (dgrad, optional ReLU mask + BN sums epilogue) and
  ``_bwd_dw_kernel`` (wgrad), which rebuild BatchNorm's dz as they load it; ``conv_dx``, ``conv_dw``.
"""
