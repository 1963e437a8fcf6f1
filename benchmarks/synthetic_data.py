"""Data sets in the layouts the CIFAR-10 and HAR tasks read, written by the tests and benchmarks (no
copy of either is available offline). Each class has its own signal under noise, so a few rounds
of federated training must learn something: what the tests check is the pipeline, not the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedgen.core.tasks.cifar10 import RECORD_BYTES, TEST_FILES, TRAIN_FILES


def write_cifar_binary(folder: Path, per_file: int = 200, test: int = 300, seed: int = 0) -> Path:
    """``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``: 1 label byte + 3,072 pixel
    bytes per record; class c is a colour of its own with a bright stripe at row 3c, under noise."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, (10, 3))
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [*((f, per_file) for f in TRAIN_FILES), *((f, test) for f in TEST_FILES)]:
        labels = rng.integers(0, 10, n)
        pixels = palette[labels][:, :, None, None] + rng.normal(0, 30, (n, 3, 32, 32))
        for i, c in enumerate(labels):
            pixels[i, :, 3 * c : 3 * c + 2, :] += 60
        records = np.empty((n, RECORD_BYTES), dtype=np.uint8)
        records[:, 0] = labels
        records[:, 1:] = np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, -1)
        (folder / name).write_bytes(records.tobytes())
    return folder


def write_har_arrays(folder: Path, train: int = 900, test: int = 300, seed: int = 0) -> Path:
    """``train.npz`` / ``test.npz`` with ``x`` float32 [N, 9, 128] and ``y`` 0..5: activity c moves
    channels c and c+3 at (c + 1) Hz (50 Hz sampling), under sensor noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(128) / 50.0
    for split, n in (("train", train), ("test", test)):
        y = rng.integers(0, 6, n)
        x = rng.normal(0, 0.5, (n, 9, 128))
        phase = rng.uniform(0, 2 * np.pi, n)
        for i, c in enumerate(y):
            wave = np.sin(2 * np.pi * (c + 1) * t + phase[i])
            x[i, c] += wave
            x[i, c + 3] += 0.5 * wave
        np.savez(folder / f"{split}.npz", x=x.astype(np.float32), y=y)
    return folder
