"""The MNIST-shaped built-in tasks: FedGen's CNN on MNIST and Fashion-MNIST, and a residual network."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedgen.core.data import DataError, Dataset, builtin_data_dir, load_idx_dataset
from fedgen.core.models import Classifier
from fedgen.core.task import GeneratorHint, InputSpec, Task
from fedgen.core.tasks.resnet import small_resnet


def idx_pixels_to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float32 [B, 1, 28, 28] in [-1, 1] (FedGen's ToTensor + Normalize(0.5, 0.5))."""
    return (x.unsqueeze(1).float() / 255.0 - 0.5) / 0.5


class _IdxImages(Task):
    input = InputSpec(shape=(28, 28), dtype="uint8")
    n_classes = 10
    #: Whether "builtin" names the MNIST subset shipped in the package.
    ships_builtin = False

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return idx_pixels_to_input(x)

    def read_source(self, source: str, split: str) -> Dataset:
        if source == "builtin":
            if not self.ships_builtin:
                raise DataError(f"task {self.name!r} ships no data: give a folder of its IDX files")
            return load_idx_dataset(builtin_data_dir(), split)  # type: ignore[arg-type]
        return load_idx_dataset(Path(source), split)  # type: ignore[arg-type]


class MnistCnn(_IdxImages):
    """FedGen's MNIST network (the paper's and the official code's): 26,434 parameters, a 32-d latent."""

    name = "mnist"
    ships_builtin = True

    def build_model(self) -> nn.Module:
        return Classifier()


class FashionMnistCnn(MnistCnn):
    """The same network on Fashion-MNIST (the IDX files have MNIST's layout)."""

    name = "fashion-mnist"
    ships_builtin = False


class FashionMnistResNet(_IdxImages):
    """A residual network on Fashion-MNIST: FedGen beyond the paper's network (about 78 k parameters,
    a 64-d latent). The generator gets more hidden units, as the official code's maintainer advises
    for larger latents."""

    name = "fashion-mnist-resnet"
    generator = GeneratorHint(hidden_dims=(256, 256), noise_dim=32)

    def build_model(self) -> nn.Module:
        return small_resnet(1, (16, 32, 64), self.n_classes)
