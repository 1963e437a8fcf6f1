"""What the coordinator keeps about clients, rounds and updates: typed records, one shape from the
round engine through the store to the wire (``wire`` converts them, nothing else does)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ClientProfile:
    """What a device declared about itself when it joined (``fleet.proto`` DeviceProfile)."""

    memory_budget_mb: int = 0
    link_down_bps: int = 0
    link_up_bps: int = 0
    supported_encodings: tuple[str, ...] = ()
    platform: str = ""
    num_examples: int = 0
    available_memory_mb: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientProfile:
        raw: dict[str, Any] = json.loads(text)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        known["supported_encodings"] = tuple(str(e) for e in known.get("supported_encodings", ()))
        return cls(**known)


@dataclass(frozen=True)
class StoredClient:
    client_id: str
    credential_sha256: str
    profile: ClientProfile
    issued_ms: int  # when its credential was issued (it survives restarts)
    left_ms: int | None = None


@dataclass(frozen=True)
class ArtifactRecord:
    """Something besides the global model that every client of a round must hold (e.g. FedGen's
    generator), as the round recorded it when it opened."""

    kind: str  # the strategy's artifact kind, as ``fleet.proto`` ArtifactKind names it (lower case)
    sha256: str
    size: int


@dataclass(frozen=True)
class RoundRecord:
    round: int
    attempt: int
    status: str  # open | committed | failed
    cohort: dict[str, str]  # client_id -> task_id
    model_sha256: str  # the global model the round trains from
    opened_ms: int
    deadline_ms: int
    artifacts: tuple[ArtifactRecord, ...] = ()


@dataclass(frozen=True)
class UpdateRecord:
    """An accepted update: persisted before it is acknowledged."""

    idempotency_key: str
    round: int
    attempt: int
    client_id: str
    task_id: str
    payload_sha256: str  # a whole fp32 state (a delta upload is applied before it is stored)
    num_examples: int
    label_counts: tuple[int, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    bytes_up: int = 0
    received_ms: int = 0
