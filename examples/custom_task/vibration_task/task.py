"""A machine-vibration classifier: a user's own model and data reader as a fedgen task.

Each example is a window of a 3-axis accelerometer, 64 samples per axis, stored as float32
[3, 64]; the label is the machine's state: 0 normal, 1 imbalance, 2 misalignment, 3 bearing wear.
Data lives in a folder with train.npz and test.npz, each holding `x` [N, 3, 64] and `y` [N].
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgen.core.data import DataError, Dataset
from fedgen.core.task import GeneratorHint, InputSpec, Task


class VibrationTask(Task):
    name = "vibration"
    version = "1"  # bump when the model or the preprocessing changes
    input = InputSpec(shape=(3, 64), dtype="float32")
    n_classes = 4
    head = "head"  # the layer that maps the 32-d latent to logits (FedGen's generator feeds it)
    generator = GeneratorHint(hidden_dims=(128,), noise_dim=16)

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                features=nn.Sequential(
                    nn.Conv1d(3, 16, kernel_size=7, padding=3),
                    nn.BatchNorm1d(16),
                    nn.ReLU(),
                    nn.MaxPool1d(2),
                    nn.Conv1d(16, 32, kernel_size=5, padding=2),
                    nn.BatchNorm1d(32),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool1d(1),
                    nn.Flatten(),
                ),
                head=nn.Linear(32, self.n_classes),
            )
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Each axis centred (gravity and sensor offset removed) and scaled to unit variance."""
        x = x - x.mean(dim=2, keepdim=True)
        return x / (x.std(dim=2, keepdim=True) + 1e-3)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random circular time shift: where a window starts carries no information."""
        shift = int(torch.randint(0, x.shape[2], (1,), generator=generator))
        return torch.roll(x, shift, dims=2)

    def read_source(self, source: str, split: str) -> Dataset:
        path = Path(source) / f"{split}.npz"
        if not path.is_file():
            raise DataError(f"{path}: no such file (a vibration data folder holds train.npz and test.npz)")
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path}: expected arrays 'x' and 'y', found {sorted(f.files)}")
            return Dataset(f["x"].astype(np.float32), f["y"].astype(np.int64), name=f"vibration-{split}")
