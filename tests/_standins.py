"""Stand-ins for torchvision's and timm's model classes, for tests that run without either package.

``resnext.fuse_kernels`` recognises a library's block by its class's module and name (it imports
neither library), and checks what is inside by the libraries' own module names and structure. So
each class here carries the real one's ``__module__`` and ``__qualname__`` (``@_named``), the same
attributes under the same names, and the same ``forward``, copied from the library's source:

* torchvision 0.13 to 0.2x: ``models/resnet.py`` (``Bottleneck``, ``ResNet``'s ``_make_layer``),
  ``models/regnet.py`` (``SimpleStemIN``, ``BottleneckTransform``, ``ResBottleneckBlock``,
  ``AnyStage``), ``ops/misc.py`` (``ConvNormActivation``/``Conv2dNormActivation``,
  ``SqueezeExcitation``, ``FrozenBatchNorm2d``);
* timm 1.0 (``timm/layers``: ``norm_act.py``, ``conv_bn_act.py``, ``squeeze_excite.py``;
  ``timm/models/regnet.py``, ``timm/models/resnet.py``), and timm 0.5 where RegNet's layout differed
  (``timm.models.layers``: ``ConvBnAct`` with ``aa`` None, ``BatchNormAct2d`` without ``drop``; the
  block's ``x += shortcut`` with ``se``/``drop_path`` None when off).

What is left out is what the patch never reads: weight init, feature-info bookkeeping, heads,
torchscript branches, ``device``/``dtype`` arguments, and the builders' width arithmetic (the tiny
model builders below take explicit widths, and each stage's depth is 1 unless asked). The models
return their last feature map (no pooling or classifier), so a test's loss reaches every pixel.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


def _named(module, name):
    """Give a class the real library's module and name, which is what ``fuse_kernels`` keys on."""
    def wrap(cls):
        cls.__module__ = module
        cls.__qualname__ = cls.__name__ = name
        return cls
    return wrap


# ---------------------------------------------------------------------------------------------
# torchvision.ops.misc


@_named("torchvision.ops.misc", "FrozenBatchNorm2d")
class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (detection backbones)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        # move reshapes to the beginning to make it fuser-friendly
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


@_named("torchvision.ops.misc", "ConvNormActivation")
class ConvNormActivation(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1,
                 norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, dilation=1, inplace=True, bias=None,
                 conv_layer=nn.Conv2d):
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers = [conv_layer(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation,
                             groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


@_named("torchvision.ops.misc", "Conv2dNormActivation")
class Conv2dNormActivation(ConvNormActivation):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1,
                 norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, dilation=1, inplace=True, bias=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, norm_layer,
                         activation_layer, dilation, inplace, bias, nn.Conv2d)


@_named("torchvision.ops.misc", "SqueezeExcitation")
class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


# ---------------------------------------------------------------------------------------------
# torchvision.models.resnet


def _tv_conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def _tv_conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


@_named("torchvision.models.resnet", "Bottleneck")
class TvBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _tv_conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _tv_conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _tv_conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


@_named("torchvision.models.resnet", "ResNet")
class TvResNet(nn.Module):
    """torchvision's ResNet with ``_make_layer`` as written there; a 3x3 stride-1 stem and any number
    of stages instead of the 7x7/2 stem, max-pool and four stages, so that tiny inputs suffice."""

    def __init__(self, layers=(1, 1), planes=(8, 16), groups=4, width_per_group=32, norm_layer=None, stem=16):
        super().__init__()
        self._norm_layer = norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = stem, 1, groups, width_per_group
        self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        for i, (p, n) in enumerate(zip(planes, layers)):
            self.add_module(f"layer{i + 1}", self._make_layer(TvBottleneck, p, n, stride=1 if i == 0 else 2))

    def _make_layer(self, block, planes, blocks, stride=1):
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_tv_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, self.dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for name, stage in self.named_children():
            if name.startswith("layer"):
                x = stage(x)
        return x


# ---------------------------------------------------------------------------------------------
# torchvision.models.regnet


@_named("torchvision.models.regnet", "SimpleStemIN")
class SimpleStemIN(Conv2dNormActivation):
    def __init__(self, width_in, width_out, norm_layer, activation_layer):
        super().__init__(width_in, width_out, kernel_size=3, stride=2, norm_layer=norm_layer,
                         activation_layer=activation_layer)


@_named("torchvision.models.regnet", "BottleneckTransform")
class BottleneckTransform(nn.Sequential):
    def __init__(self, width_in, width_out, stride, norm_layer, activation_layer, group_width,
                 bottleneck_multiplier, se_ratio):
        layers = OrderedDict()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        layers["a"] = Conv2dNormActivation(width_in, w_b, kernel_size=1, stride=1, norm_layer=norm_layer,
                                           activation_layer=activation_layer)
        layers["b"] = Conv2dNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=g, norm_layer=norm_layer,
                                           activation_layer=activation_layer)
        if se_ratio:
            # The SE reduction ratio is defined with respect to the beginning of the block
            width_se_out = int(round(se_ratio * width_in))
            layers["se"] = SqueezeExcitation(input_channels=w_b, squeeze_channels=width_se_out,
                                             activation=activation_layer)
        layers["c"] = Conv2dNormActivation(w_b, width_out, kernel_size=1, stride=1, norm_layer=norm_layer,
                                           activation_layer=None)
        super().__init__(layers)


@_named("torchvision.models.regnet", "ResBottleneckBlock")
class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in, width_out, stride, norm_layer, activation_layer, group_width=1,
                 bottleneck_multiplier=1.0, se_ratio=None):
        super().__init__()
        # Use skip connection with projection if shape changes
        self.proj = None
        should_proj = (width_in != width_out) or (stride != 1)
        if should_proj:
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride,
                                             norm_layer=norm_layer, activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, norm_layer, activation_layer, group_width,
                                     bottleneck_multiplier, se_ratio)
        self.activation = activation_layer(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


@_named("torchvision.models.regnet", "AnyStage")
class AnyStage(nn.Sequential):
    def __init__(self, width_in, width_out, stride, depth, block_constructor, norm_layer, activation_layer,
                 group_width, bottleneck_multiplier, se_ratio=None, stage_index=0):
        super().__init__()
        for i in range(depth):
            block = block_constructor(width_in if i == 0 else width_out, width_out, stride if i == 0 else 1,
                                      norm_layer, activation_layer, group_width, bottleneck_multiplier, se_ratio)
            self.add_module(f"block{stage_index}-{i}", block)


@_named("torchvision.models.regnet", "RegNet")
class TvRegNet(nn.Module):
    """torchvision's RegNet trunk (stem, ``trunk_output`` of AnyStages), the stages given explicitly
    instead of through ``BlockParams``."""

    def __init__(self, widths, group_widths, strides, depths=None, se_ratio=None, stem_width=16,
                 norm_layer=nn.BatchNorm2d, activation=nn.ReLU, bottleneck_multiplier=1.0):
        super().__init__()
        self.stem = SimpleStemIN(3, stem_width, norm_layer, activation)
        current_width, blocks = stem_width, []
        for i, (width_out, stride, depth, group_width) in enumerate(
                zip(widths, strides, depths or [1] * len(widths), group_widths)):
            blocks.append((f"block{i + 1}", AnyStage(current_width, width_out, stride, depth, ResBottleneckBlock,
                                                     norm_layer, activation, group_width, bottleneck_multiplier,
                                                     se_ratio, stage_index=i + 1)))
            current_width = width_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))

    def forward(self, x):
        return self.trunk_output(self.stem(x))


# ---------------------------------------------------------------------------------------------
# timm.layers (timm 1.0)


@_named("timm.layers.norm_act", "BatchNormAct2d")
class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + Activation, a BatchNorm2d subclass (so its state_dict keys are BatchNorm2d's)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        # cut & paste of torch.nn.BatchNorm2d.forward impl to avoid issues with torchscript and tracing
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # use cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # use exponential moving average
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            # If buffers are not to be tracked, ensure that they won't be updated
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


@_named("timm.layers.norm_act", "SyncBatchNormAct")
class SyncBatchNormAct(nn.SyncBatchNorm):
    """What timm's own ``convert_sync_batchnorm`` turns a BatchNormAct2d into (act and drop moved over)."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def timm_convert_sync_batchnorm(module):
    """timm's ``convert_sync_batchnorm`` for the BatchNormAct2d layers (the others left as they are)."""
    out = module
    if isinstance(module, BatchNormAct2d):
        out = SyncBatchNormAct(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.act, out.drop = module.act, module.drop
        with torch.no_grad():
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, timm_convert_sync_batchnorm(child))
    return out


@_named("timm.layers.norm_act", "FrozenBatchNormAct2d")
class FrozenBatchNormAct2d(nn.Module):
    """BatchNormAct2d with fixed statistics and affine parameters (timm's ``freeze_batch_norm_2d``)."""

    def __init__(self, num_features, eps=1e-5, apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True,
                 drop_layer=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        x = self.act(self.drop(x))
        return x


@_named("timm.layers.norm_act", "GroupNormAct")
class GroupNormAct(nn.GroupNorm):
    # NOTE num_channel and num_groups order flipped for easier layer swaps / binding of fixed args
    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, group_size=None, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None):
        super().__init__(num_channels // group_size if group_size else num_groups, num_channels, eps=eps,
                         affine=affine)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


@_named("timm.layers.drop", "DropBlock2d")
class DropBlock2d(nn.Module):
    """Stand-in for timm's DropBlock2d: only its name matters (the patch refuses it)."""

    def forward(self, x):
        return x


@_named("timm.layers.drop", "DropPath")
class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor


@_named("timm.layers.conv2d_same", "Conv2dSame")
class Conv2dSame(nn.Conv2d):
    """TensorFlow-like 'SAME' convolution (padding computed per input in its own forward)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pad = [max((-(-s // st) - 1) * st + (k - 1) * d + 1 - s, 0)
               for s, k, st, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation)]
        x = F.pad(x, [pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def _norm_act(norm_layer, act_layer):
    """timm's ``get_norm_act_layer`` for what the tests use: BatchNorm2d -> BatchNormAct2d, else as given."""
    if norm_layer in (None, nn.BatchNorm2d):
        norm_layer = BatchNormAct2d
    return lambda c, **kw: norm_layer(c, act_layer=act_layer, **kw)


@_named("timm.layers.conv_bn_act", "ConvNormAct")
class ConvNormAct(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding="", dilation=1, groups=1,
                 bias=False, apply_norm=True, apply_act=True, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU,
                 aa_layer=None, drop_layer=None, conv_layer=nn.Conv2d):
        super().__init__()
        use_aa = aa_layer is not None and stride > 1
        stride_ = 1 if use_aa else stride
        if padding == "":  # timm's get_padding: ((stride - 1) + dilation * (kernel_size - 1)) // 2
            padding = ((stride_ - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = conv_layer(in_channels, out_channels, kernel_size, stride=stride_, padding=padding,
                               dilation=dilation, groups=groups, bias=bias)
        if apply_norm:
            norm_kwargs = {"drop_layer": drop_layer} if drop_layer else {}
            self.bn = _norm_act(norm_layer, act_layer)(out_channels, apply_act=apply_act, **norm_kwargs)
        else:
            self.bn = nn.Sequential()
        self.aa = aa_layer(channels=out_channels, stride=stride) if use_aa else None

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        if aa is not None:
            x = self.aa(x)
        return x


def _make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


@_named("timm.layers.squeeze_excite", "SEModule")
class SEModule(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8, add_maxpool=False, bias=True,
                 act_layer=nn.ReLU, norm_layer=None):
        super().__init__()
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = _make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = norm_layer(rd_channels) if norm_layer else nn.Identity()
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


@_named("timm.layers.blur_pool", "BlurPool2d")
class BlurPool2d(nn.Module):
    """Anti-aliasing: a fixed binomial depthwise filter with the stride, after the activation."""

    def __init__(self, channels, filt_size=3, stride=2, pad_mode="reflect"):
        super().__init__()
        self.channels, self.stride, self.pad_mode = channels, stride, pad_mode
        self.padding = [(filt_size - 1) // 2] * 4
        coeffs = torch.tensor([1.0, 2.0, 1.0]) / 4
        self.register_buffer("filt", (coeffs[:, None] * coeffs[None, :])[None, None].repeat(channels, 1, 1, 1),
                             persistent=False)

    def forward(self, x):
        x = F.pad(x, self.padding, mode=self.pad_mode)
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)


# ---------------------------------------------------------------------------------------------
# timm.models.regnet (timm 1.0)


def _regnet_shortcut(downsample, in_chs, out_chs, stride, norm_layer):
    """timm's ``create_shortcut``: a ConvNormAct 1x1 without activation ('conv1x1') or no shortcut at all
    (None) where the shape changes, else nn.Identity."""
    if in_chs != out_chs or stride != 1:
        if not downsample:
            return None
        return ConvNormAct(in_chs, out_chs, 1, stride=stride, norm_layer=norm_layer, apply_act=False)
    return nn.Identity()


@_named("timm.models.regnet", "Bottleneck")
class TimmRegNetBottleneck(nn.Module):
    """RegNet Bottleneck: a ResNet bottleneck with the SE module after conv2."""

    def __init__(self, in_chs, out_chs, stride=1, dilation=(1, 1), bottle_ratio=1, group_size=1, se_ratio=0.25,
                 downsample="conv1x1", linear_out=False, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 drop_block=None, drop_path_rate=0.0):
        super().__init__()
        bottleneck_chs = int(round(out_chs * bottle_ratio))
        groups = bottleneck_chs // group_size
        cargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv1 = ConvNormAct(in_chs, bottleneck_chs, kernel_size=1, **cargs)
        self.conv2 = ConvNormAct(bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride, dilation=dilation[0],
                                 groups=groups, drop_layer=drop_block, **cargs)
        if se_ratio:
            se_channels = int(round(in_chs * se_ratio))
            self.se = SEModule(bottleneck_chs, rd_channels=se_channels, act_layer=act_layer)
        else:
            self.se = nn.Identity()
        self.conv3 = ConvNormAct(bottleneck_chs, out_chs, kernel_size=1, apply_act=False, **cargs)
        self.act3 = nn.Identity() if linear_out else act_layer()
        self.downsample = _regnet_shortcut(downsample, in_chs, out_chs, stride, norm_layer)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        if self.downsample is not None:
            # NOTE stuck with downsample as the attr name due to weight compatibility
            # now represents the shortcut, no shortcut if None, and non-downsample shortcut == nn.Identity()
            x = self.drop_path(x) + self.downsample(shortcut)
        x = self.act3(x)
        return x


@_named("timm.models.regnet", "RegStage")
class RegStage(nn.Module):
    def __init__(self, depth, in_chs, out_chs, stride, dilation=1, block_fn=TimmRegNetBottleneck, **block_kwargs):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", block_fn(in_chs if i == 0 else out_chs, out_chs,
                                                  stride=stride if i == 0 else 1, dilation=(dilation, dilation),
                                                  **block_kwargs))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


@_named("timm.models.regnet", "RegNet")
class TimmRegNet(nn.Module):
    """timm's RegNet trunk (``stem``, ``s1``..``sN``), the stages given explicitly instead of by a RegNetCfg."""

    def __init__(self, widths, group_sizes, strides, depths=None, se_ratio=0.0, stem_width=16,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, block_fn=TimmRegNetBottleneck, stem_fn=ConvNormAct,
                 **block_kwargs):
        super().__init__()
        self.stem = stem_fn(3, stem_width, 3, stride=2, act_layer=act_layer, norm_layer=norm_layer)
        prev = stem_width
        for i, (width, gs, stride, depth) in enumerate(zip(widths, group_sizes, strides,
                                                           depths or [1] * len(widths))):
            self.add_module(f"s{i + 1}", RegStage(depth, prev, width, stride, block_fn=block_fn, group_size=gs,
                                                  se_ratio=se_ratio, act_layer=act_layer, norm_layer=norm_layer,
                                                  **block_kwargs))
            prev = width

    def forward(self, x):
        x = self.stem(x)
        for name, stage in self.named_children():
            if name.startswith("s") and name[1:].isdigit():
                x = stage(x)
        return x


# ---------------------------------------------------------------------------------------------
# timm 0.5: timm.models.layers and timm.models.regnet as they were then


@_named("timm.models.layers.norm_act", "BatchNormAct2d")
class BatchNormAct2dV05(nn.BatchNorm2d):
    """timm 0.5's BatchNormAct2d: no ``drop`` attribute (its drop_block argument was ignored)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, inplace=True, drop_block=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        if act_layer is not None and apply_act:
            self.act = act_layer(**(dict(inplace=True) if inplace else {}))
        else:
            self.act = nn.Identity()

    def _forward_python(self, x):
        return super().forward(x)

    def forward(self, x):
        x = self._forward_python(x)
        x = self.act(x)
        return x


@_named("timm.models.layers.conv_bn_act", "ConvBnAct")
class ConvBnActV05(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding="", dilation=1, groups=1,
                 bias=False, apply_act=True, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, aa_layer=None,
                 drop_block=None):
        super().__init__()
        use_aa = aa_layer is not None
        stride_ = 1 if use_aa else stride
        padding = ((stride_ - 1) + dilation * (kernel_size - 1)) // 2 if padding == "" else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride_, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.bn = BatchNormAct2dV05(out_channels, apply_act=apply_act, act_layer=act_layer, drop_block=drop_block)
        self.aa = aa_layer(channels=out_channels) if stride == 2 and use_aa else None

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        if self.aa is not None:
            x = self.aa(x)
        return x


@_named("timm.models.regnet", "Bottleneck")
class TimmRegNetBottleneckV05(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, dilation=1, bottleneck_ratio=1, group_width=1, se_ratio=0.25,
                 downsample=None, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, aa_layer=None, drop_block=None,
                 drop_path=None):
        super().__init__()
        bottleneck_chs = int(round(out_chs * bottleneck_ratio))
        groups = bottleneck_chs // group_width
        cargs = dict(act_layer=act_layer, norm_layer=norm_layer, aa_layer=aa_layer, drop_block=drop_block)
        self.conv1 = ConvBnActV05(in_chs, bottleneck_chs, kernel_size=1, **cargs)
        self.conv2 = ConvBnActV05(bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride, dilation=dilation,
                                  groups=groups, **cargs)
        if se_ratio:
            se_channels = int(round(in_chs * se_ratio))
            self.se = SEModule(bottleneck_chs, rd_channels=se_channels)
        else:
            self.se = None
        cargs["act_layer"] = None
        self.conv3 = ConvBnActV05(bottleneck_chs, out_chs, kernel_size=1, **cargs)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        if self.se is not None:
            x = self.se(x)
        x = self.conv3(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


def timm05_regnet(widths, group_widths, strides, se_ratio=0.0, stem_width=16):
    """timm 0.5's RegNet trunk: ``stem``, then stages whose first block projects with a ConvBnAct 1x1."""
    model = nn.Sequential()
    model.add_module("stem", ConvBnActV05(3, stem_width, 3, stride=2))
    prev = stem_width
    for i, (width, gw, stride) in enumerate(zip(widths, group_widths, strides)):
        proj = (ConvBnActV05(prev, width, 1, stride=stride, act_layer=None) if prev != width or stride != 1
                else None)
        stage = nn.Sequential()
        stage.add_module("b1", TimmRegNetBottleneckV05(prev, width, stride, group_width=gw, se_ratio=se_ratio,
                                                       downsample=proj))
        model.add_module(f"s{i + 1}", stage)
        prev = width
    return model


# ---------------------------------------------------------------------------------------------
# timm.models.resnet (timm 1.0)


@_named("timm.models.resnet", "Bottleneck")
class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64, reduce_first=1,
                 dilation=1, first_dilation=None, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, attn_layer=None,
                 aa_layer=None, drop_block=None, drop_path=None):
        super().__init__()
        width = int((planes * (base_width / 64)) // 1 * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(first_planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(first_planes, width, kernel_size=3, stride=1 if use_aa else stride,
                               padding=first_dilation, dilation=first_dilation, groups=cardinality, bias=False)
        self.bn2 = norm_layer(width)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = aa_layer(channels=width, stride=stride) if use_aa else nn.Identity()  # create_aa
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.se = SEModule(outplanes) if attn_layer == "se" else None  # create_attn
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


def _timm_downsample(in_channels, out_channels, stride, norm_layer, avg_down):
    """timm's ``downsample_conv`` (kernel 1) or ``downsample_avg`` (ResNet-D)."""
    if not avg_down:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=False),
                             norm_layer(out_channels))
    pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, bias=False),
                         norm_layer(out_channels))


@_named("timm.models.resnet", "ResNet")
class TimmResNet(nn.Module):
    """timm's ResNet with ``make_blocks`` as written there; a 3x3 stride-1 stem and any number of stages
    instead of the 7x7/2 stem, max-pool and four stages. ``drop_path`` gets one DropPath per block."""

    def __init__(self, layers=(1, 1), planes=(8, 16), cardinality=4, base_width=32, stem_width=16, avg_down=False,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, drop_path=0.0, drop_block=None, **block_args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.act1 = act_layer(inplace=True)
        inplanes = stem_width
        for i, (p, n) in enumerate(zip(planes, layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != p * TimmBottleneck.expansion):
                    down = _timm_downsample(inplanes, p * TimmBottleneck.expansion, stride, norm_layer, avg_down)
                blocks.append(TimmBottleneck(
                    inplanes, p, stride if j == 0 else 1, down, cardinality=cardinality, base_width=base_width,
                    act_layer=act_layer, norm_layer=norm_layer, drop_block=drop_block,
                    drop_path=DropPath(drop_path) if drop_path else None, **block_args))
                inplanes = p * TimmBottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        for name, stage in self.named_children():
            if name.startswith("layer"):
                x = stage(x)
        return x
