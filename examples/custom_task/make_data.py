"""Writes a vibration data folder (train.npz, test.npz) for the walk-through: synthetic windows.

No public machine-vibration set ships offline, so this draws them from the textbook signatures
of each fault, at 400 Hz for 0.16 s per window with the shaft at 15-35 Hz, under sensor noise:
normal (a weak 1x tone), imbalance (a strong 1x tone, radial axes in quadrature), misalignment
(a strong 2x tone and axial 1x), bearing wear (impacts at the fault rate ringing at 120 Hz).
Replace it with your own recordings: the task reads any folder of that layout.

    python make_data.py --out vib-data [--train 6000 --test 1000 --seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RATE_HZ, STEPS = 400.0, 64


def windows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(STEPS) / RATE_HZ
    y = rng.integers(0, 4, n)
    shaft = rng.uniform(15, 35, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    tone = lambda k, shift=0.0: np.sin(2 * np.pi * k * shaft * t + phase + shift)  # noqa: E731
    x = rng.normal(0, 0.35, (n, 3, STEPS))  # sensor and floor noise
    x[:, 2] += 1.0  # gravity on the axial/vertical axis
    amp = rng.uniform(0.15, 0.3, (n, 1))
    x[:, 0] += amp * tone(1)  # every machine hums at its shaft speed
    strong = rng.uniform(0.4, 0.8, (n, 1))
    m = y == 1  # imbalance: a strong 1x, x and y in quadrature
    x[m, 0] += strong[m] * tone(1)[m]
    x[m, 1] += strong[m] * tone(1, np.pi / 2)[m]
    m = y == 2  # misalignment: 2x radial and 1x axial
    x[m, 0] += strong[m] * tone(2)[m]
    x[m, 2] += 0.6 * strong[m] * tone(1)[m]
    m = y == 3  # bearing wear: impacts at ~3.6x shaft speed, each ringing at 120 Hz
    rate = 3.6 * shaft[m]
    since = (t * rate) % 1.0 / rate  # seconds since the last impact
    ring = np.exp(-since * 60.0) * np.sin(2 * np.pi * 120.0 * since)
    x[m, :2] += strong[m, None] * 1.2 * ring[:, None, :]
    return x.astype(np.float32), y.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        x, y = windows(n, rng)
        np.savez_compressed(args.out / f"{split}.npz", x=x, y=y)
        print(f"{args.out / split}.npz: {n} windows, float32 {list(x.shape)}, labels {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main()
