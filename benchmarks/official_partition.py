"""The partition FedGen's official runs use, drawn the way the official script draws it.

The official ``data/Mnist/generate_niid_dirichlet.py`` (README command: ``--n_class 10
--sampling_ratio 0.5 --alpha 0.1 --n_user 20``) seeds Python's ``random`` and numpy's global RNG
with 42 at import, shuffles the class order with ``random``, then for each class in that order
shuffles the class's indices, keeps the first ``min(ratio * N / users, int(ratio * class size))``
of them, and splits them over the users by a Dirichlet draw whose share is zeroed for users already
at the per-user cap; the whole draw is repeated until every user has at least 10 examples. Each
user's test split is, for each label it trains on, ``int(test class size / users)`` consecutive
test examples of that label in file order, disjoint across users. This module re-implements that
sequence of RNG calls (same generators, same order), so one fixed partition serves every seed,
as in the official runs: MNIST alpha 0.1 gives 15,000 training and 5,307 local test examples.
"""

from __future__ import annotations

import random

import numpy as np

OFFICIAL_SEED = 42
MIN_SAMPLES_PER_USER = 10


def official_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    n_users: int = 20,
    alpha: float = 0.1,
    sampling_ratio: float = 0.5,
    n_classes: int = 10,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train indices per user, local test indices per user), both into the given label arrays."""
    class_order = list(range(n_classes))
    random.Random(OFFICIAL_SEED).shuffle(class_order)
    rng = np.random.RandomState(OFFICIAL_SEED)  # the legacy global stream np.random.seed(42) starts
    by_class = [np.flatnonzero(train_labels == c) for c in range(n_classes)]
    cap = sampling_ratio * len(train_labels) / n_users
    while True:
        chosen: list[dict[int, np.ndarray]] = [{} for _ in range(n_users)]
        per_user = np.zeros(n_users, dtype=np.int64)
        for c in class_order:
            order = list(range(len(by_class[c])))
            rng.shuffle(order)
            if sampling_ratio < 1:
                order = order[: int(min(cap, int(sampling_ratio * len(by_class[c]))))]
            shares = rng.dirichlet(np.repeat(alpha, n_users)) * (per_user < cap)
            shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * len(order)).astype(int)[:-1]
            for u, part in enumerate(np.split(np.asarray(order, dtype=np.int64), cuts)):
                chosen[u][c] = by_class[c][part]
                per_user[u] += len(part)
        if per_user.min() >= MIN_SAMPLES_PER_USER:
            break
    # The official user data lists classes in the order they were drawn.
    train = [np.concatenate([chosen[u][c] for c in class_order]) for u in range(n_users)]
    test_by_class = [np.flatnonzero(test_labels == c) for c in range(n_classes)]
    taken = dict.fromkeys(range(n_classes), 0)
    test = []
    for u in range(n_users):
        parts = []
        for c in sorted(c for c in class_order if len(chosen[u][c])):  # a set of small ints iterates sorted
            n = len(test_by_class[c]) // n_users
            parts.append(test_by_class[c][taken[c] : taken[c] + n])
            taken[c] += n
        test.append(np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))
    return train, test
