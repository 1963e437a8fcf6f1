"""Build the small, class-balanced MNIST subset shipped in fedcore/datasets/mnist_subset/.

The demo and tests then need no download. Output is byte-for-byte reproducible: a seeded choice of
indices (kept in source-file order), standard IDX headers, and gzip with mtime=0 and no file name.
    python tools/make_mnist_subset.py --source ../shared/data/mnist --out fedcore/datasets/mnist_subset
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import sys
from pathlib import Path

import numpy as np

from fedgen.core.data import load_idx_dataset

_LOGGER = logging.getLogger("make_mnist_subset")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of every label, drawn without replacement, returned in file order."""
    chosen = []
    for c in np.unique(labels):
        ix = np.flatnonzero(labels == c)
        if len(ix) < per_class:
            raise SystemExit(f"label {int(c)} has only {len(ix)} samples, fewer than {per_class}")
        chosen.append(rng.choice(ix, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0803/0x0801 (uint8, ndim), big-endian dims, raw data."""
    assert array.dtype == np.uint8
    header = np.array([0x0800 | array.ndim, *array.shape], dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def write_gzip(path: Path, payload: bytes) -> str:
    """Gzip with mtime=0 and an empty FNAME, so reruns give identical bytes; returns the sha256."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with the four original MNIST IDX files")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        ds = load_idx_dataset(args.source, split)  # type: ignore[arg-type]
        keep = balanced_indices(ds.labels, per_class, rng)
        images_name, labels_name = _FILES[split]
        for name, arr in ((images_name, ds.samples[keep]), (labels_name, ds.labels[keep].astype(np.uint8))):
            digest = write_gzip(args.out / name, idx_bytes(arr))
            _LOGGER.info("%s  %9d bytes  sha256 %s", name, (args.out / name).stat().st_size, digest)
        _LOGGER.info("%s: kept %d of %d (%d per class)", split, len(keep), len(ds), per_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
