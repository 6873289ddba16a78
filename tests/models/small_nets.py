"""Small networks that are not LeNet-5, for the model-description, cost-model and export tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyConvNet(nn.Module):
    """conv(3x3, padding 1) -> ReLU -> 2x2 avg pool, twice, then two linear layers; functional ReLU and flatten.

    Only ops the ort-step graph supports today (groups=1 convs, ReLU, 2x2 average pools, linear, flatten)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 8, kernel_size=3, padding=1)  # (B,1,28,28) -> (B,8,28,28)
        self.pool = nn.AvgPool2d(2)  # reused: no parameters, so sharing it is fine
        self.conv_b = nn.Conv2d(8, 12, kernel_size=3, padding=1, stride=1)  # (B,8,14,14) -> (B,12,14,14)
        self.hidden = nn.Linear(12 * 7 * 7, 32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv_a(x)))
        x = self.pool(F.relu(self.conv_b(x)))
        x = torch.flatten(x, 1)
        return self.classifier(F.relu(self.hidden(x)))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw(F.relu6(self.bn(self.dw(x))))  # a residual around a depthwise-separable pair


class WideNet(nn.Module):
    """Every kind the cost model knows: strided, grouped and 1x1 convs, BatchNorm, residual add, concat,
    ReLU6, Hardswish, max and adaptive pools, dropout; the head is a Linear inside a Sequential."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.branch = nn.Conv2d(8, 4, 1)
        self.act = nn.Hardswish()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(12, num_classes))

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.cat([x, self.act(self.branch(x))], dim=1)
        x = self.gap(self.pool(x))
        return self.head(torch.flatten(x, 1))


class Gated(nn.Module):
    """A forward with an op edge-ft does not describe (sigmoid gating)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.sigmoid(x.flatten(1)))
