"""A small residual network for 28x28 and 32x32 images (He et al.'s CIFAR ResNet, one block a stage)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the input (projected when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def small_resnet(in_channels: int, widths: tuple[int, int, int], n_classes: int) -> nn.Sequential:
    """stem -> three stages (the last two halve the resolution) -> global average pool -> latent | head."""
    c1, c2, c3 = widths
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU()),
            stage1=BasicBlock(c1, c1, 1),
            stage2=BasicBlock(c1, c2, 2),
            stage3=BasicBlock(c2, c3, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),  # [B, c3]: the latent FedGen's generator produces
            head=nn.Linear(c3, n_classes),
        )
    )
