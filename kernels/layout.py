"""Memory layouts as conv2d chooses them: the op's output follows its inputs' layout, and a gradient
its input's, exactly as PyTorch's own convolution does (so that a fused model's tensors have the
strides of the unfused one's)."""

import torch


def suggest_memory_format(t):
    """``t.suggest_memory_format()`` of a 4-D tensor, as PyTorch computes it from the exact strides.

    conv2d picks its output layout with this rule (channels_last when the input or the weight
    suggests it; c10's ``is_channels_last_strides_2d``). ``t.is_contiguous(memory_format=...)`` is
    no substitute: a tensor with one channel, or 1x1 pixels, is "contiguous" in both formats.
    """
    size, stride = t.shape, t.stride()
    if stride[1] == 0:
        return torch.contiguous_format
    least = 0
    for d in (1, 3, 2, 0):  # channels innermost, then W, H, N
        if size[d] == 0 or stride[d] < least:
            return torch.contiguous_format
        if d == 0 and least == stride[1]:  # N111-like: ambiguous, PyTorch defaults to NCHW
            return torch.contiguous_format
        least = stride[d] * size[d]
    return torch.channels_last


def standard_strides(shape, memory_format):
    n, c, h, w = shape
    if memory_format == torch.channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def is_dense(t):
    """Non-overlapping and dense: some permutation of ``t``'s dims is contiguous."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def with_strides(t, strides):
    """``t`` laid out with exactly ``strides``: a free restride when the memory order is already
    that one (dims of size 1 differ only in name), else a copy."""
    if t.stride() == tuple(strides):
        return t
    if all(a == b for a, b, sz in zip(t.stride(), strides, t.shape) if sz != 1):
        return t.as_strided(t.shape, strides)
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def output_strides(x, weight, shape):
    """conv2d's output layout: channels_last when x or the weight suggests it, else NCHW."""
    cl = torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight))
    return standard_strides(shape, torch.channels_last if cl else torch.contiguous_format)


def grad_strides(x):
    """dx gets the layout x had (its exact strides when x is dense, else its suggested format)."""
    return x.stride() if is_dense(x) else standard_strides(x.shape, suggest_memory_format(x))
