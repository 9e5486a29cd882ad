"""PyTorch references for `benchmarks/speed.py`: the plain torchvision formulations of the
backbones busjax implements, written here so that no torchvision (and no download) is needed.

Each matches busjax's model parameter for parameter (the benchmark checks the counts): ResNet-18
(BasicBlock, 7x7/2 stem + max pool), MobileNetV2 (width 1.0, ReLU6, inverted residuals) and
DenseNet121 (growth 32, bottleneck 4, compression 0.5) and the two fused with CBAM (the
feature-fusion model), one input channel, a linear head. Only
the benchmark imports torch (``pip install 'busjax[speed]'``, a CPU build).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def _conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU):
  layers = [
    nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
    nn.BatchNorm2d(cout),
  ]
  return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


class _Basic(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = _conv_bn(cin, cout, 3, stride)
    self.conv2 = _conv_bn(cout, cout, 3, act=None)
    self.down = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

  def forward(self, x):
    shortcut = x if self.down is None else self.down(x)
    return torch.relu(self.conv2(self.conv1(x)) + shortcut)


class ResNet18(nn.Module):
  def __init__(self, in_channels=1, num_classes=2, width=1.0):
    super().__init__()
    base = max(1, round(64 * width))  # busjax's `scaled_channels`.
    self.stem = nn.Sequential(_conv_bn(in_channels, base, 7, 2), nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], base
    for i in range(4):
      cout = max(1, round(64 * 2**i * width))
      for j in range(2):
        blocks.append(_Basic(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class _Inverted(nn.Module):
  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = cin * t
    layers = [] if t == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6)]
    layers += [
      _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
      _conv_bn(hidden, cout, 1, act=None),
    ]
    self.body = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
  SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

  def __init__(self, in_channels=1, num_classes=2):
    super().__init__()
    layers, cin = [_conv_bn(in_channels, 32, 3, 2, act=nn.ReLU6)], 32
    for t, c, n, s in self.SETTING:
      for i in range(n):
        layers.append(_Inverted(cin, c, s if i == 0 else 1, t))
        cin = c
    layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


class _DenseLayer(nn.Module):
  def __init__(self, cin, growth=32, bottleneck=4):
    super().__init__()
    width = bottleneck * growth
    self.body = nn.Sequential(
      nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, width, 1, bias=False),
      nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, growth, 3, 1, 1, bias=False),
    )  # fmt: skip

  def forward(self, features):
    return self.body(torch.cat(features, 1))


class _DenseBlock(nn.Module):
  def __init__(self, n, cin):
    super().__init__()
    self.layers = nn.ModuleList(_DenseLayer(cin + 32 * i) for i in range(n))

  def forward(self, x):
    features = [x]
    for layer in self.layers:
      features.append(layer(features))
    return torch.cat(features, 1)


class DenseNet121(nn.Module):
  def __init__(self, in_channels=1, num_classes=2, blocks=(6, 12, 24, 16)):
    super().__init__()
    layers, c = [_conv_bn(in_channels, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for i, n in enumerate(blocks):
      layers.append(_DenseBlock(n, c))
      c += 32 * n
      if i < len(blocks) - 1:
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
                   nn.AvgPool2d(2, 2)]  # fmt: skip
        c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(c, num_classes)

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


class _CBAM(nn.Module):
  """CBAM as busjax's: a shared MLP on avg- and max-pooled channels, a 7x7 gate on [mean, max]."""

  def __init__(self, c, reduction=16):
    super().__init__()
    self.mlp = nn.Sequential(
      nn.Linear(c, c // reduction), nn.ReLU(inplace=True), nn.Linear(c // reduction, c)
    )
    self.spatial = nn.Conv2d(2, 1, 7, padding=3)

  def forward(self, x):
    gate = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
    x = x * gate[:, :, None, None]
    stacked = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    return x * torch.sigmoid(self.spatial(stacked))


class Fusion(nn.Module):
  """Asif et al.'s fusion as busjax's `FusionModel` (configs/fusion.py): MobileNetV2 and
  DenseNet121 last maps, each 1x1 conv + BN + ReLU to 256, concatenated, CBAM, pooled, dropout
  0.2, linear. busjax builds each backbone with a 1-output head it never calls; so does this
  (unused parameters get no gradient and AdamW skips them), to keep the counts equal."""

  def __init__(self, in_channels=1, num_classes=2, projection=256):
    super().__init__()
    self.mobilenet = MobileNetV2(in_channels, 1)
    self.densenet = DenseNet121(in_channels, 1)
    self.project = nn.ModuleList(
      [_conv_bn(1280, projection, 1), _conv_bn(self.densenet.classifier.in_features, projection, 1)]
    )
    self.attention = _CBAM(2 * projection)
    self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * projection, num_classes))

  def forward(self, x):
    maps = [self.mobilenet.features(x), self.densenet.features(x)]
    fused = torch.cat([p(m) for p, m in zip(self.project, maps, strict=True)], 1)
    return self.head(self.attention(fused).mean((2, 3)))


MODELS = {
  "resnet18": ResNet18,
  "resnet18_w05": functools.partial(ResNet18, width=0.5),
  "mobilenet_v2": MobileNetV2,
  "densenet121": DenseNet121,
  "fusion": Fusion,
}


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
