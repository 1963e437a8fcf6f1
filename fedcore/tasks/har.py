"""Human-activity-recognition-shaped sensor windows: 9 channels x 128 steps, 6 classes.

The shape of UCI HAR (body acceleration, gyroscope and total acceleration, 3 axes each, 2.56 s
windows at 50 Hz). The reader takes windows stored as arrays: a folder with ``train.npz`` and
``test.npz``, each holding ``x`` (float32 [N, 9, 128]) and ``y`` (integers 0..5).
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch import nn

from fedgen.core.data import DataError, Dataset
from fedgen.core.task import GeneratorHint, InputSpec, Task


def read_windows(path: Path, name: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except FileNotFoundError:
        raise DataError(f"windows file not found: {path}") from None
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not an .npz of windows with arrays 'x' and 'y' ({err})") from None
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must hold integer class labels, got {y.dtype}")
    return Dataset(np.ascontiguousarray(x), y.astype(np.int64), name=name)


class HarConv1d(Task):
    name = "har"
    input = InputSpec(shape=(9, 128), dtype="float32")
    n_classes = 6
    generator = GeneratorHint(hidden_dims=(128,), noise_dim=32)

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                conv1=nn.Conv1d(9, 32, 5, padding=2),
                bn1=nn.BatchNorm1d(32),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool1d(2),
                conv2=nn.Conv1d(32, 64, 5, padding=2),
                bn2=nn.BatchNorm1d(64),
                relu2=nn.ReLU(),
                pool2=nn.AdaptiveAvgPool1d(1),
                flatten=nn.Flatten(),
                fc=nn.Linear(64, 64),  # the 64-d latent
                head=nn.Linear(64, self.n_classes),
            )
        )

    def read_source(self, source: str, split: str) -> Dataset:
        return read_windows(Path(source) / f"{split}.npz", name=f"har-{split}")
