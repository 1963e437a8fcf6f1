"""PNG plots of a ledger: accuracy and bytes per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from fedgen.coordinator.ledger import LedgerRow


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Writes a figure as PNG (creating its folder) and frees it: the tail every plot shares."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_ledger(rows: Sequence[LedgerRow], path: Path, title: str = "") -> Path:
    rounds = [r.round for r in rows]
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    ax_acc.plot(rounds, [100 * r.test_accuracy for r in rows], marker=".")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("global model on the held-out test set")
    ax_acc.grid(alpha=0.3)
    ax_bytes.plot(rounds, [r.bytes_down / 1e6 for r in rows], label="down (coordinator → clients)")
    ax_bytes.plot(rounds, [r.bytes_up / 1e6 for r in rows], label="up (clients → coordinator)")
    ax_bytes.set_xlabel("round")
    ax_bytes.set_ylabel("MB per round (serialized gRPC messages)")
    ax_bytes.set_title("communication per round")
    ax_bytes.set_ylim(bottom=0)
    ax_bytes.legend()
    ax_bytes.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
