"""The bottleneck's 1x1 convolutions as NHWC GEMMs (stride 1, or 2 for the projection shortcut).

* ``forward``: ``_conv1x1_kernel`` with an optional BN + ReLU prologue on its input and a BatchNorm
  statistics epilogue on its output; ``conv1x1_forward``.
* ``backward``: ``_dgrad_kernel`` (optional residual and ReLU mask + BN sums epilogues) and
  ``_wgrad_kernel`` (recomputes the input's BN + ReLU on load); ``conv1x1_dgrad``, ``conv1x1_wgrad``.
"""
