"""Reference blocks for placement tests, written out so fx node names are predictable."""

from __future__ import annotations

import math

import torch
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c, c)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(c, c)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + x
        return self.relu2(out)


class Bottleneck(nn.Module):
    def __init__(self, cin=8, width=4, cout=16):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, width, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = conv_bn(width, cout, 1)
        self.downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride=2))
        self.relu3 = nn.ReLU()

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu3(out)


class InvertedResidual(nn.Module):
    def __init__(self, c=8, expand=6):
        super().__init__()
        hidden = c * expand
        self.conv = nn.Sequential(
            *conv_bn(c, hidden, 1),
            nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, groups=hidden),
            nn.ReLU6(),
            *conv_bn(hidden, c, 1),
        )

    def forward(self, x):
        return x + self.conv(x)


class ConcatBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv_a, self.bn_a = conv_bn(c, 4, 1)
        self.relu_a = nn.ReLU()
        self.conv_b, self.bn_b = conv_bn(c, 4, 3)
        self.relu_b = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(4 + 4 + c, c, 1)

    def forward(self, x):
        a = self.relu_a(self.bn_a(self.conv_a(x)))
        b = self.relu_b(self.bn_b(self.conv_b(x)))
        return self.conv_out(torch.cat([a, b, self.pool(x)], 1))


class EncoderBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.norm2 = nn.LayerNorm(d)
        self.scale = 1 / math.sqrt(d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(scores, dim=-1)
        x = self.norm1(x + self.out_proj(torch.matmul(attn, v)))
        return self.norm2(x + self.fc2(self.act(self.fc1(x))))


def randomize_bn(model: nn.Module, seed: int = 0, *, positive_scales: bool = False) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding is really exercised;
    `positive_scales` keeps every weight above 0, as trained BN scales mostly are."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
            if positive_scales:
                m.weight.data.abs_()
    return model


class GhostBlock(nn.Module):
    """GhostNet's second ghost module (no activation): a primary Conv+BN whose output both
    feeds a cheap depthwise Conv and is concatenated with that Conv's output (one value read by
    a Conv and a Concat)."""

    def __init__(self, c=8):
        super().__init__()
        self.primary, self.bn_p = conv_bn(c, c // 2, 1)
        self.cheap, self.bn_c = conv_bn(c // 2, c // 2, 3, groups=c // 2)
        self.conv_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        a = self.bn_p(self.primary(x))
        b = self.bn_c(self.cheap(a))
        return self.conv_out(torch.cat([a, b], 1))


class InceptionStem(nn.Module):
    """GoogLeNet's stem and branches: Conv -> ReLU -> MaxPool read by two Convs and by a
    second MaxPool branch; then ShuffleNetV2's head, x.mean([2, 3]) without keepdim -> Linear."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, c, 3), nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2)
        self.branch_a, self.branch_b = nn.Conv2d(c, 4, 1), nn.Conv2d(c, 4, 3, padding=1)
        self.branch_pool, self.branch_c = nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, 4, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = self.pool(self.relu(self.stem(x)))
        a, b = self.branch_a(y), self.branch_b(y)
        out = torch.cat([a, b, self.branch_c(self.branch_pool(y))], 1)
        return self.fc(out.mean([2, 3]))


class FusedQKVAttention(nn.Module):
    """timm's ViT attention: one qkv Linear, reshaped to (B, N, 3, heads, dim), permuted and
    unbound into q, k, v, then scaled-dot-product attention and an output projection;
    indexed: qkv[0], qkv[1], qkv[2] instead of the unbind (torchvision's Swin)."""

    def __init__(self, d=64, heads=2, indexed=False):
        super().__init__()
        self.heads, self.head_dim, self.indexed = heads, d // heads, indexed
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.indexed else qkv.unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TokenMeanHead(nn.Module):
    """LeViT's tail and classifier: a residual Linear over tokens, the tokens' mean (no
    keepdim), BatchNorm1d with its initial affine parameters (as random-weight timm models
    have them) and measured statistics, Linear."""

    def __init__(self, c=32, classes=10):
        super().__init__()
        self.proj, self.bn, self.fc = nn.Linear(c, c), nn.BatchNorm1d(c), nn.Linear(c, classes)
        self.bn.running_mean.normal_(0, 0.1)
        self.bn.running_var.uniform_(0.02, 0.3)

    def forward(self, x):
        return self.fc(self.bn((x + self.proj(x)).mean(1)))


class UpBlock(nn.Module):
    """A U-Net decoder step: ConvTranspose2d x2 upsampling, concat with the skip, Conv."""

    def __init__(self, c=16):
        super().__init__()
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.fuse = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        return self.fuse(torch.cat([self.up(self.relu(self.down(x))), x], 1))


class RepVGGBlock(nn.Module):
    """RepVGG's training form (timm RepVggBlock): 3x3 Conv+BN + 1x1 Conv+BN + identity BN,
    summed, then ReLU; `dilation` spreads the 3x3 taps (the 1x1 still sits on the centre)."""

    def __init__(self, c=8, dilation=1):
        super().__init__()
        self.conv_kxk = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_kxk = nn.BatchNorm2d(c)
        self.conv_1x1, self.bn_1x1 = conv_bn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn_1x1(self.conv_1x1(x)) + self.bn_kxk(self.conv_kxk(x))
        return torch.relu(y + self.identity(x))


class ChannelGate(nn.Module):
    """timm's ECA gate: pooled channels -> `gate` ("conv": a Conv1d across channels,
    "linear_bn": Linear + BatchNorm1d, None: nothing) -> sigmoid, viewed back to
    [N, C, 1, 1] and multiplied into the feature map. `expand`: None (the Mul broadcasts),
    "as" (timm's y.expand_as(x)) or a batch size the gate is expanded to, which the Mul
    alone would not do."""

    def __init__(self, c=8, gate="conv", expand=None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gate = {
            "conv": lambda: nn.Conv1d(1, 1, 3, padding=1, bias=False),
            "linear_bn": lambda: nn.Sequential(nn.Linear(c, c), nn.BatchNorm1d(c)),
            None: lambda: None,
        }[gate]()
        self.expand = expand

    def forward(self, x):
        x = self.conv(x)
        y = x.mean((2, 3))
        if isinstance(self.gate, nn.Conv1d):
            y = self.gate(y.view(x.shape[0], 1, -1))
        elif self.gate is not None:
            y = self.gate(y)
        y = torch.sigmoid(y).view(x.shape[0], -1, 1, 1)
        if self.expand == "as":
            return x * y.expand_as(x)
        if self.expand is not None:
            return x * y.expand(self.expand, -1, *x.shape[2:])
        return x * y


class SamePaddingStem(nn.Module):
    """timm's "same" padding on strided Convs (Conv2dSame, EfficientNetV2): an explicit
    bottom/right zero Pad, then an unpadded stride-2 Conv; a full and a depthwise one."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, 2, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, 2, groups=c, bias=False)
        self.bn_dw = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = nn.functional.silu(self.bn(self.conv(nn.functional.pad(x, (0, 1, 0, 1)))))
        x = nn.functional.silu(self.bn_dw(self.dw(nn.functional.pad(x, (0, 1, 0, 1)))))
        return self.pw(x)


class SqueezeExcite(nn.Module):
    """EfficientNet's MBConv tail in small: a SiLU feature map, squeeze-excite (channel means
    by `pool`: "mean" as timm, "adaptive" as torchvision's AdaptiveAvgPool2d -> Conv -> SiLU
    -> Conv -> sigmoid) multiplied into it, and the projection Conv reading the product.
    gate=False multiplies by the second Conv's output itself, which has no [0, 1] bound."""

    def __init__(self, c=8, pool="mean", gate=True):
        super().__init__()
        self.stem, self.bn = conv_bn(3, c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.pool, self.gate = pool, gate

    def forward(self, x):
        x = nn.functional.silu(self.bn(self.stem(x)))
        if self.pool == "mean":
            s = x.mean((2, 3), keepdim=True)
        else:
            s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = self.fc2(nn.functional.silu(self.fc1(s)))
        return self.proj(x * (torch.sigmoid(s) if self.gate else s))


class ResNetDShortcut(nn.Module):
    """A ResNet-D downsampling block as timm writes it: the shortcut average-pools (2x2,
    stride 2, ceil_mode=True, count_include_pad=False) before its 1x1 Conv, the main path is a
    strided 3x3 Conv."""

    def __init__(self, cin=8, cout=16):
        super().__init__()
        self.stem, self.bn = conv_bn(3, cin)
        self.conv, self.bn_conv = conv_bn(cin, cout, 3, stride=2)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.down, self.bn_down = conv_bn(cin, cout, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        shortcut = self.bn_down(self.down(self.pool(x)))
        return torch.relu(self.bn_conv(self.conv(x)) + shortcut)


class DenseBlock(nn.Module):
    """Three DenseNet layers as torchvision writes them: each concatenates every earlier
    feature map, then BN -> ReLU -> 1x1 Conv -> BN -> ReLU -> 3x3 Conv (pre-activation); a
    transition (BN -> ReLU -> 1x1 Conv) reads the last concatenation."""

    def __init__(self, cin=16, growth=8, layers=3):
        super().__init__()
        self.stem, self.bn = conv_bn(3, cin)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(cin + i * growth),
                nn.ReLU(),
                nn.Conv2d(cin + i * growth, 2 * growth, 1, bias=False),
                nn.BatchNorm2d(2 * growth),
                nn.ReLU(),
                nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False),
            )
            for i in range(layers)
        )
        width = cin + layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False)
        )

    def forward(self, x):
        features = [torch.relu(self.bn(self.stem(x)))]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.transition(torch.cat(features, 1))
