"""Datasets for FedGen: IDX readers, FedGen's non-IID partition, and per-client shards.

numpy only (no torch), so an edge client can read its shard without the coordinator's stack.
The partition and local test split follow FedGen's `data/Mnist/generate_niid_dirichlet.py`
(see FEDGEN_FACTS.md section 6); every deliberate difference is named where it happens.
"""

from __future__ import annotations

import gzip
import logging
import operator
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedgen.core.files import atomic_file

_LOGGER = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "Dataset",
    "builtin_data_dir",
    "describe_histogram",
    "dirichlet_partition",
    "label_histogram",
    "label_restricted_test_split",
    "load_idx_dataset",
    "load_shard",
    "read_idx_images",
    "read_idx_labels",
    "save_shard",
]

IMAGE_SHAPE: tuple[int, int] = (28, 28)
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"
_SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SHARD_KEYS = ("train_x", "train_y", "test_x", "test_y")
#: Shard keys before tasks, read as their current names.
_LEGACY_KEYS = {"train_images": "train_x", "train_labels": "train_y", "test_images": "test_x", "test_labels": "test_y"}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and key) at fault."""


# --------------------------------------------------------------------------- IDX files


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a whole file, decompressing by content (not by suffix) so renamed files still work."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def _header(data: bytes, path: Path, n_words: int) -> list[int]:
    if len(data) < 4 * n_words:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {4 * n_words})")
    return [int(v) for v in np.frombuffer(data, dtype=">u4", count=n_words)]


def read_idx_images(path: Path) -> np.ndarray:
    """Read an IDX3 image file (plain or gzipped) into uint8 [N, 28, 28], checking every header field."""
    data = _read_maybe_gzip(path)
    magic, n, rows, cols = _header(data, path, 4)
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"{path}: bad magic {magic} for an IDX image file (expected {_IDX_IMAGES_MAGIC})")
    if (rows, cols) != IMAGE_SHAPE:
        raise DataError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(f"{path}: {kind}: {len(data)} bytes for {n} images, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX1 label file (plain or gzipped) into uint8 [N]."""
    data = _read_maybe_gzip(path)
    magic, n = _header(data, path, 2)
    if magic != _IDX_LABELS_MAGIC:
        raise DataError(f"{path}: bad magic {magic} for an IDX label file (expected {_IDX_LABELS_MAGIC})")
    expected = 8 + n
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(f"{path}: {kind}: {len(data)} bytes for {n} labels, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=8).copy()


# --------------------------------------------------------------------------- Dataset


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class Dataset:
    """Examples and their labels held together so every subset keeps them aligned.

    ``samples`` is [N, ...] in whatever shape and dtype the task stores (uint8 [N, 28, 28] for the
    MNIST tasks); the task checks them against its input spec (``PreparedTask.check``).
    """

    samples: np.ndarray  # [N, *task.input.shape]
    labels: np.ndarray  # int64 [N]
    name: str

    def __post_init__(self) -> None:
        if self.samples.ndim < 2:
            raise DataError(
                f"dataset {self.name!r}: samples must be [N, ...] (one row per example), "
                f"got {self.samples.dtype} {list(self.samples.shape)}"
            )
        if self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise DataError(
                f"dataset {self.name!r}: labels must be int64 [N], got {self.labels.dtype} {list(self.labels.shape)}"
            )
        if len(self.labels) != len(self.samples):
            raise DataError(f"dataset {self.name!r}: {len(self.samples)} examples but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> Dataset:
        """Rows `idx` of this dataset (a copy), same name."""
        idx = np.asarray(idx)
        if idx.dtype != np.bool_ and not np.issubdtype(idx.dtype, np.integer):
            if idx.size:
                raise ValueError(f"subset index must be integer or boolean, got {idx.dtype}")
            idx = idx.astype(np.int64)
        return Dataset(samples=self.samples[idx], labels=self.labels[idx], name=self.name)


def _find_idx_file(data_dir: Path, stem: str) -> Path:
    candidates = [data_dir / f"{stem}.gz", data_dir / stem]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise DataError(f"missing IDX file: looked for {candidates[0]} and {candidates[1]}")


def load_idx_dataset(data_dir: Path, split: Literal["train", "test"]) -> Dataset:
    """Load one split of an MNIST-layout folder (standard file names, .gz or plain)."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir)
    images_stem, labels_stem = _SPLIT_FILES[split]
    images_path = _find_idx_file(data_dir, images_stem)
    labels_path = _find_idx_file(data_dir, labels_stem)
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    _LOGGER.debug("loaded %s split of %s: %d samples", split, data_dir, len(labels))
    return Dataset(samples=images, labels=labels.astype(np.int64), name=data_dir.name)


def builtin_data_dir() -> Path:
    """The MNIST subset shipped in the package, so a demo runs with no download (see datasets/README.md)."""
    return Path(__file__).resolve().parent / "datasets" / "mnist_subset"


# --------------------------------------------------------------------------- partitioning


def _check_label_vector(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} must be non-negative, found {int(labels.min())}")
    return labels


def dirichlet_partition(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    seed: int,
    samples_per_class: int | None = None,
    min_samples: int = 10,
    max_tries: int = 1000,
    max_per_client: float | None = None,
) -> list[np.ndarray]:
    """Split sample indices over clients with FedGen's Dirichlet label skew; sorted, disjoint index arrays.

    Per class (classes visited in one seeded shuffled order), a fresh shuffle keeps
    `samples_per_class` samples (all if None or fewer exist) and splits them by
    Dirichlet([alpha] * n_clients) proportions; clients already holding >= `max_per_client`
    samples get proportion 0 and the rest are renormalised. The whole draw is repeated until every
    client has >= `min_samples`.

    `max_per_client` is the official `max_samples_per_user = sampling_ratio * n_sample / n_user`.
    FedGen's settings always have n_user >= n_class, so that cap equals the per-class cap; hence the
    default: `samples_per_class` if given, else len(labels) / n_clients (the official sampling_ratio=1
    case). It is never allowed below the fair share total / n_clients, so before each class some
    client is still eligible (the official code divides by zero there).
    """
    labels = _check_label_vector(labels, "labels")
    given = n_clients
    try:
        n_clients = operator.index(n_clients)  # ints and numpy integers, not floats
    except TypeError:
        n_clients = 0
    if n_clients < 1:
        raise ValueError(f"n_clients must be an integer >= 1, got {given!r}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if samples_per_class is not None and samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1 or None, got {samples_per_class!r}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples!r}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries!r}")
    n_clients = int(n_clients)

    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))  # official: random.shuffle(SRC_CLASSES), once
    by_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    caps = {c: len(ix) if samples_per_class is None else min(samples_per_class, len(ix)) for c, ix in by_class.items()}
    total = sum(caps.values())
    if max_per_client is None:
        max_per_client = float(samples_per_class) if samples_per_class is not None else len(labels) / n_clients
    threshold = max(float(max_per_client), total / n_clients)
    if total < n_clients * min_samples:
        raise DataError(f"cannot give {n_clients} clients >= {min_samples} samples each from {total} samples")

    for attempt in range(1, max_tries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        held = np.zeros(n_clients, dtype=np.int64)
        for c in classes:
            c = int(c)
            idx_c = rng.permutation(by_class[c])[: caps[c]]
            proportions = rng.dirichlet(np.full(n_clients, alpha))
            proportions = proportions * (held < threshold)  # official re-balancing step
            s = proportions.sum()
            if not s > 0:  # only if every eligible client drew an exact 0.0 (float underflow at tiny alpha)
                proportions = (held < threshold).astype(np.float64)
                s = proportions.sum()
            proportions = proportions / s
            cuts = (np.cumsum(proportions) * len(idx_c)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx_c, cuts)):
                parts[k].append(chunk)
                held[k] += len(chunk)
        if held.min() >= min_samples:
            _LOGGER.debug(
                "dirichlet_partition: %d clients, alpha=%g, seed=%d: %d samples after %d tries",
                n_clients,
                alpha,
                seed,
                total,
                attempt,
            )
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise DataError(
        f"no partition gave all {n_clients} clients >= {min_samples} samples in {max_tries} tries "
        f"(alpha={alpha}, {total} samples); raise alpha or max_tries, or lower min_samples"
    )


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """Per-client label counts, int64 [n_clients, n_classes]: what a client reports and FedGen weights by."""
    labels = _check_label_vector(labels, "labels")
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"label {int(labels.max())} out of range for n_classes={n_classes}")
    hist = np.zeros((len(parts), n_classes), dtype=np.int64)
    for k, idx in enumerate(parts):
        hist[k] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=n_classes)
    return hist


def _label_set(labels: set[int] | np.ndarray) -> list[int]:
    values = np.fromiter(labels, dtype=np.int64) if isinstance(labels, (set, frozenset)) else np.asarray(labels)
    return [int(v) for v in np.unique(values)]


def label_restricted_test_split(
    test_labels: np.ndarray,
    train_label_sets: Sequence[set[int]] | Sequence[np.ndarray],
    seed: int | None = 0,
) -> list[np.ndarray]:
    """FedGen's local test sets: each client is tested only on labels it trains on.

    For each client in order and each of its labels l, take the next len(test_l) // n_clients indices of
    label l (a running offset per label, as the official `divide_test_data`), so slices are consecutive
    and disjoint between clients. `seed` shuffles each label's test indices first (MNIST's test file is
    ordered by writer group); seed=None keeps file order, reproducing FedGen's exact selection.
    A train label set may be a set of labels or an array of a client's training labels.
    """
    test_labels = _check_label_vector(test_labels, "test_labels")
    n_clients = len(train_label_sets)
    if n_clients < 1:
        raise ValueError("train_label_sets must name at least one client")
    rng = None if seed is None else np.random.default_rng(seed)
    by_label: dict[int, np.ndarray] = {}
    for c in np.unique(test_labels):
        ix = np.flatnonzero(test_labels == c)
        by_label[int(c)] = ix if rng is None else rng.permutation(ix)
    offset = dict.fromkeys(by_label, 0)
    out: list[np.ndarray] = []
    for labels_k in train_label_sets:
        present = _label_set(labels_k)
        chunks: list[np.ndarray] = []
        for c in present:
            if c not in by_label:
                continue  # a label with no test images: nothing to test on
            n_take = len(by_label[c]) // n_clients
            chunks.append(by_label[c][offset[c] : offset[c] + n_take])
            offset[c] += n_take
        out.append(np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64))
    return out


def describe_histogram(hist: np.ndarray) -> str:
    """Render a [n_clients, n_classes] count table for logs and the CLI, with a total row."""
    hist = np.asarray(hist)
    if hist.ndim != 2:
        raise ValueError(f"histogram must be 2-D [n_clients, n_classes], got shape {list(hist.shape)}")
    n_classes = hist.shape[1]
    width = max(3, len(str(int(hist.sum(axis=0).max(initial=0)))), len(str(n_classes - 1)))
    n_width = max(5, len(str(int(hist.sum()))))
    head = f"{'client':>6} {'n':>{n_width}} | " + " ".join(f"{c:>{width}}" for c in range(n_classes))
    lines = [head, "-" * len(head)]
    for k, row in enumerate(hist):
        counts = " ".join(f"{int(v):>{width}}" if v else f"{'.':>{width}}" for v in row)
        lines.append(f"{k:>6} {int(row.sum()):>{n_width}} | {counts}")
    lines.append("-" * len(head))
    totals = hist.sum(axis=0)
    lines.append(f"{'total':>6} {int(hist.sum()):>{n_width}} | " + " ".join(f"{int(v):>{width}}" for v in totals))
    return "\n".join(lines)


# --------------------------------------------------------------------------- shards


def save_shard(path: Path, train: Dataset, test: Dataset | None = None) -> None:
    """Write one client's data as a compressed .npz, atomically, so a reader never sees half a file."""
    path = Path(path)
    arrays: dict[str, Any] = {"train_x": train.samples, "train_y": train.labels}
    if test is not None:
        arrays.update(test_x=test.samples, test_y=test.labels)
    with atomic_file(path) as f:
        np.savez_compressed(f, **arrays)  # a file object: savez does not append ".npz"


def _shard_array(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:  # object arrays refuse to load with allow_pickle=False
        raise DataError(f"{path}: key {key!r} cannot be loaded without pickle ({exc})") from exc
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{path}: key {key!r} is corrupt ({exc})") from exc


def _shard_dataset(samples: np.ndarray, labels: np.ndarray, prefix: str, path: Path) -> Dataset:
    xk, yk = f"{prefix}_x", f"{prefix}_y"
    if samples.ndim < 2:
        raise DataError(
            f"{path}: key {xk!r} must be [N, ...] (one row per example), got {samples.dtype} {list(samples.shape)}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: key {yk!r} must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: key {yk!r} has a negative label ({int(labels.min())})")
    if len(labels) != len(samples):
        raise DataError(f"{path}: key {yk!r} has {len(labels)} labels for {len(samples)} examples in {xk!r}")
    return Dataset(samples=samples, labels=labels.astype(np.int64), name=f"{path.stem}:{prefix}")


def load_shard(path: Path) -> tuple[Dataset, Dataset | None]:
    """Read a shard written by save_shard, never unpickling, and validate every array before use.

    Shards written before tasks (keys ``train_images``/``train_labels``...) read the same way.
    """
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"shard not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz shard ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected an .npz archive, found a single .npy array")
    with npz:
        keys = {_LEGACY_KEYS.get(k, k): k for k in npz.files}
        unknown = sorted(set(keys) - set(_SHARD_KEYS))
        if unknown:
            raise DataError(f"{path}: unexpected key {keys[unknown[0]]!r} (allowed: {', '.join(_SHARD_KEYS)})")
        for key in ("train_x", "train_y"):
            if key not in keys:
                raise DataError(f"{path}: missing key {key!r}")
        has_test = {"test_x", "test_y"} & set(keys)
        if has_test and len(has_test) != 2:
            missing = ({"test_x", "test_y"} - set(keys)).pop()
            raise DataError(f"{path}: missing key {missing!r} (test arrays come in pairs)")
        arrays = {k: _shard_array(npz, stored, path) for k, stored in sorted(keys.items())}
    train = _shard_dataset(arrays["train_x"], arrays["train_y"], "train", path)
    test = _shard_dataset(arrays["test_x"], arrays["test_y"], "test", path) if has_test else None
    return train, test
