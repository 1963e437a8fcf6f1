"""Which global model to export (the latest, a given round's, or the best-evaluated one), and the
export itself: the same for ``fedgen export`` on a state folder and for Control.ExportModel."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Literal

from fedgen.coordinator import errors
from fedgen.coordinator.ledger import LedgerRow
from fedgen.coordinator.store import BlobStore, StateStore
from fedgen.core.task import PreparedTask
from fedgen.export.codec import bundle_from_bytes, decode_state, sha256_hex
from fedgen.export.model_export import ExportFormat, export_model

Which = Literal["latest", "round", "best"]


@dataclass(frozen=True)
class ModelChoice:
    which: Which = "latest"
    round: int | None = None  # for which == "round"

    def describe(self) -> str:
        return f"round {self.round}" if self.which == "round" else f"the {self.which} model"


@dataclass(frozen=True)
class ChosenModel:
    model_sha256: str
    round: int
    committed: bool  # False: the initial model (no round committed yet)
    test_accuracy: float


@dataclass(frozen=True)
class ExportedModel:
    model: ChosenModel
    format: ExportFormat
    data: bytes

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)


def _committed_span(rows: list[LedgerRow]) -> str:
    return f"committed rounds are {rows[0].round}..{rows[-1].round}" if rows else "no round is committed yet"


async def choose_model(store: StateStore, choice: ModelChoice) -> ChosenModel:
    """The chosen global model; NOT_FOUND for a round that is not committed, FAILED_PRECONDITION for
    "best" before any committed round was evaluated."""
    rows = await store.ledger(0)
    if choice.which == "round":
        row = next((r for r in rows if r.round == choice.round), None)
        if row is None or not row.model_sha256:
            raise errors.NotFound(f"round {choice.round} is not committed: {_committed_span(rows)}")
        return ChosenModel(row.model_sha256, row.round, True, row.test_accuracy)
    if choice.which == "best":
        evaluated = [r for r in rows if math.isfinite(r.test_accuracy) and r.model_sha256]
        if not evaluated:
            raise errors.FailedPrecondition(f"no committed round has been evaluated ({_committed_span(rows)})")
        best = max(evaluated, key=lambda r: (r.test_accuracy, -r.round))
        return ChosenModel(best.model_sha256, best.round, True, best.test_accuracy)
    latest = await store.get_meta("global_model")
    if latest is None:
        raise errors.NotFound("the state holds no federation")
    if rows and rows[-1].model_sha256 == latest:
        return ChosenModel(latest, rows[-1].round, True, rows[-1].test_accuracy)
    return ChosenModel(latest, 0, False, math.nan)


async def export_chosen(
    store: StateStore, blobs: BlobStore, task: PreparedTask, choice: ModelChoice, fmt: ExportFormat
) -> ExportedModel:
    chosen = await choose_model(store, choice)
    description = {
        "round": chosen.round if chosen.committed else None,
        "model_sha256": chosen.model_sha256,
        "test_accuracy": chosen.test_accuracy if math.isfinite(chosen.test_accuracy) else None,
    }

    def build() -> bytes:
        state = decode_state(bundle_from_bytes(blobs.get(chosen.model_sha256)))
        return export_model(task, state, fmt, description)

    return ExportedModel(chosen, fmt, await asyncio.to_thread(build))
