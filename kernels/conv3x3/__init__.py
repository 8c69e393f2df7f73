"""The grouped 3x3 convolution as an implicit GEMM over channels-last activations.

* ``tiles``: channel tiles over the groups, autotune configs and the budgets that prune them.
* ``weights``: the grouped weight packed into dense block-diagonal tiles (once per training step;
  dgrad reads the forward's packing transposed).
* ``forward``: ``_fwd_kernel`` (conv, optional BN + ReLU prologue on the input, BN statistics or
  BN + ReLU in the epilogue) and its launcher ``conv3x3_forward``.
* ``backward``: ``_bwd_dx_kernel`` (dgrad, optional ReLU mask + BN sums epilogue) and
  ``_bwd_dw_kernel`` (wgrad), which rebuild BatchNorm's dz as they load it; their launchers
  ``conv3x3_dgrad`` and ``conv3x3_wgrad`` (as ``kernels.conv1x1``'s ``conv1x1_dgrad``, ``conv1x1_wgrad``).
* ``compose``: the fused op's forward and backward, composed from these and ``kernels.batchnorm``.
"""
