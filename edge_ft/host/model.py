"""LeNet-5 exactly as the course activity defines it (module names conv1 ... fc3, so state dicts match)."""

from __future__ import annotations

import torch
import torch.nn as nn

INPUT_SHAPE = (1, 28, 28)  # C, H, W of one example


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5)  # (B,1,28,28) -> (B,6,24,24)
        self.relu1 = nn.ReLU()
        self.avgpool1 = nn.AvgPool2d(kernel_size=2, stride=2)  # -> (B,6,12,12)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)  # -> (B,16,8,8)
        self.relu2 = nn.ReLU()
        self.avgpool2 = nn.AvgPool2d(kernel_size=2, stride=2)  # -> (B,16,4,4)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)  # (B,256) -> (B,120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)  # -> (B,84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)  # -> (B,num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything below the head: (B,1,28,28) -> (B,84). Linear probing caches this."""
        x = self.avgpool1(self.relu1(self.conv1(x)))
        x = self.avgpool2(self.relu2(self.conv2(x)))
        x = x.reshape(-1, 16 * 4 * 4)  # reshape, not view: export graphs may hand us non-contiguous input
        x = self.relu3(self.fc1(x))
        return self.relu4(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))
