"""The round that is open: its cohort, what each member has done so far, and what it cost.

Every rule about who may still deliver is here, in one place: a client of the cohort may deliver
until it has an update accepted, rejected or declined, and nobody may after the round closes.
An upload holds a reservation (``pending``) from its last check to its durable record, without a
lock: closing the round waits for the reservations to settle, so an update is either counted or
refused, never acknowledged and then left out.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from fedgen.coordinator.ledger import ClientTransfer
from fedgen.coordinator.records import ArtifactRecord, RoundRecord, UpdateRecord
from fedgen.coordinator.strategy import RoundPlan
from fedgen.coordinator.transfers import ClientPlan, RoundVariants


@dataclass
class OpenRound:
    round: int
    attempt: int
    cohort: dict[str, str]  # client_id -> task_id
    model_sha256: str
    opened_ms: int
    deadline_ms: int
    plan: RoundPlan
    artifacts: tuple[ArtifactRecord, ...] = ()
    # The round's artifacts in every encoding, and each client's encodings (fixed at its first poll).
    variants: RoundVariants = field(default_factory=RoundVariants)
    plans: dict[str, ClientPlan] = field(default_factory=dict)
    encode_seconds: float = 0.0  # making those encodings, before the round opened
    # Connected clients left out of the sample when the round opened, and why.
    skipped: dict[str, str] = field(default_factory=dict)
    accepted: dict[str, UpdateRecord] = field(default_factory=dict)
    # Uploads being stored: resolved with the record once durable, or None when storing failed.
    pending: dict[str, asyncio.Future[UpdateRecord | None]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    bytes_down: Counter[str] = field(default_factory=Counter)
    bytes_up: Counter[str] = field(default_factory=Counter)  # requests other than the update
    closed: bool = False
    # What the round's clients may download: its model and artifacts in every encoding, and the
    # deltas made for clients as they were planned.
    published: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.published |= {self.model_sha256, *(a.sha256 for a in self.artifacts), *self.variants.digests()}

    def assign(self, client_id: str, plan: ClientPlan) -> ClientPlan:
        """Fixes a client's encodings for the round and publishes what they name."""
        self.plans[client_id] = plan
        self.published.add(plan.model.sha256)
        self.published.update(v.sha256 for v in plan.artifacts.values())
        return plan

    @property
    def all_in(self) -> bool:
        return len(self.accepted) + len(self.rejected) + len(self.declined) >= len(self.cohort)

    def answered(self, client_id: str) -> bool:
        """Whether the client has nothing more to deliver this round."""
        return client_id in self.accepted or client_id in self.rejected or client_id in self.declined

    def record(self, status: str = "open") -> RoundRecord:
        return RoundRecord(
            self.round,
            self.attempt,
            status,
            dict(self.cohort),
            self.model_sha256,
            self.opened_ms,
            self.deadline_ms,
            self.artifacts,
        )

    def transfers(self) -> dict[str, ClientTransfer]:
        return {cid: plan.ledger_transfer() for cid, plan in self.plans.items()}

    async def close(self) -> None:
        """No upload may start after this; those already reserved finish (accepted or refused) first."""
        self.closed = True
        if self.pending:
            await asyncio.gather(*self.pending.values())
