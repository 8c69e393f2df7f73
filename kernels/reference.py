"""Eager PyTorch reference for the fused op: the baseline shared by the tests and the benchmarks."""

import torch
import torch.nn.functional as F


def conv_bn_relu_reference(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                           stride=1, padding=1, groups=1, eps=1e-5, momentum=0.1, training=False):
    """``relu(batch_norm(conv2d(x, weight)))`` in eager PyTorch (cuDNN on the GPU).

    Same signature and semantics as ``kernels.grouped_conv_bn_relu.grouped_conv_bn_relu``:
    in training mode ``running_mean``/``running_var`` are updated in place.
    """
    z = F.conv2d(x, weight, None, stride, padding, 1, groups)
    z = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(z)


class ConvBNReLU(torch.nn.Module):
    """The unfused module: ``nn.Conv2d`` (no bias) → ``nn.BatchNorm2d`` → ReLU, roles ``conv``/``bn``.

    Its state_dict has the same keys as ``kernels.grouped_conv_bn_relu.GroupedConvBNReLU``.
    """

    def __init__(self, in_channels, out_channels, stride=1, groups=1, padding=1, eps=1e-5, momentum=0.1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, stride, padding, groups=groups, bias=False)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))
