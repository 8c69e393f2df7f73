"""BatchNorm around the convolutions: statistics, reductions and pointwise kernels.

* ``stats``: per-chunk (mean, M2) from the conv epilogues merged with Chan's formula into the batch
  statistics, the folded scale/shift, the running statistics and num_batches_tracked; frozen
  BatchNorms folded (``bn_fold``); the dgrad epilogues' backward sums; ``bn_grad``, which sums any
  of those partials and forms the affine form of BatchNorm's backward that the conv kernels rebuild
  dz from.
* ``pointwise``: relu(bn(z)), and BatchNorm's backward sums as a pass of their own.
* ``tail``: the bottleneck's relu(bn3(z3) + identity), forward and backward.
* ``modules``: what nn.BatchNorm2d / nn.SyncBatchNorm does per call besides the arithmetic.
"""
