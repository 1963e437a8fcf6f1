"""CIFAR-10-shaped images: a small residual network and a reader for the official binary layout.

The binary version of CIFAR-10 (``cifar-10-batches-bin``) holds ``data_batch_1.bin`` ..
``data_batch_5.bin`` and ``test_batch.bin``: 10,000 records each, a record being one label byte
then 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, each 32x32 in row-major order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgen.core.data import DataError, Dataset
from fedgen.core.task import GeneratorHint, InputSpec, Task
from fedgen.core.tasks.resnet import small_resnet

RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
#: Per-channel mean and standard deviation of the CIFAR-10 training set (the usual normalisation).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_cifar_binary(path: Path) -> Dataset:
    """One file of the binary layout, every length checked."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records")
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: a record has label {int(labels.max())}; CIFAR-10 labels are 0..9")
    return Dataset(np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32)), labels, name=path.name)


class Cifar10ResNet(Task):
    name = "cifar10"
    input = InputSpec(shape=(3, 32, 32), dtype="uint8")
    n_classes = 10
    # The official GENERATORCONFIGS for CIFAR: 512 hidden units, 64-d noise.
    generator = GeneratorHint(hidden_dims=(512,), noise_dim=64)

    def build_model(self) -> nn.Module:
        return small_resnet(3, (24, 48, 96), self.n_classes)  # about 0.18 M parameters, a 96-d latent

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random horizontal flips (half the batch), the standard CIFAR augmentation that needs no padding."""
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def read_source(self, source: str, split: str) -> Dataset:
        folder = Path(source)
        if (folder / "cifar-10-batches-bin").is_dir():
            folder = folder / "cifar-10-batches-bin"
        names = TRAIN_FILES if split == "train" else TEST_FILES
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder}: missing CIFAR-10 binary file(s) {missing} (the 'binary version' layout)")
        parts = [read_cifar_binary(folder / n) for n in names]
        return Dataset(
            np.concatenate([p.samples for p in parts]),
            np.concatenate([p.labels for p in parts]),
            name=f"cifar10-{split}",
        )
