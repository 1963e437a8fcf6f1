"""One architecture at four sizes, as tasks: the Fashion-MNIST residual network with its widths
scaled, from about 25 k to about 1 M parameters, so cost can be measured against size alone.
The coordinator and client processes import them by path (``task_family:ResNet25k``)."""

from __future__ import annotations

from torch import nn

from fedgen.core.task import GeneratorHint
from fedgen.core.tasks.images import FashionMnistResNet
from fedgen.core.tasks.resnet import small_resnet


class _Scaled(FashionMnistResNet):
    width = 16
    generator = GeneratorHint(hidden_dims=(256, 256), noise_dim=32)

    def build_model(self) -> nn.Module:
        w = self.width
        return small_resnet(1, (w, 2 * w, 4 * w), self.n_classes)


class ResNet25k(_Scaled):
    name, width = "resnet-25k", 9


class ResNet78k(_Scaled):
    name, width = "resnet-78k", 16


class ResNet308k(_Scaled):
    name, width = "resnet-308k", 32


class ResNet1m(_Scaled):
    name, width = "resnet-1m", 58


FAMILY = ("task_family:ResNet25k", "task_family:ResNet78k", "task_family:ResNet308k", "task_family:ResNet1m")
