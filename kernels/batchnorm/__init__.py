"""BatchNorm around the convolutions: statistics, reductions and pointwise kernels.

* ``stats``: per-chunk (mean, M2) from the conv epilogues merged with Chan's formula into the batch
  statistics, the folded scale/shift and the running statistics; the dgrad epilogues' backward sums.
* ``pointwise``: relu(bn(z)), BatchNorm's backward sums as a pass of their own, and the affine form
  of BatchNorm's backward (``bn_backward_coeffs``) that the conv kernels rebuild dz from.
* ``tail``: the bottleneck's relu(bn3(z3) + identity), forward and backward.
"""
