"""How much upload payload the coordinator takes in at once, and one upload per client at a time.

An upload is written to a scratch file until its last chunk arrives (the payload is verified
whole before anything is kept), so without a bound twenty stalled streams of a large model fill
the disk. Each upload reserves the payload size its header declares; past the budget a new upload is refused with
RESOURCE_EXHAUSTED, which clients retry with backoff, and nothing already in flight is harmed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fedgen.coordinator import errors

#: When a refused upload may try again.
RETRY_AFTER_S = 2.0


class UploadBudget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.reserved = 0
        self._uploading: set[str] = set()

    @contextmanager
    def reserve(self, client_id: str, payload_bytes: int) -> Iterator[None]:
        """Holds `payload_bytes` of the budget (and the client's one upload slot) for a block."""
        if client_id in self._uploading:
            raise errors.ResourceExhausted(f"{client_id} already has an upload in flight; one at a time", RETRY_AFTER_S)
        if payload_bytes > self.max_bytes - self.reserved:
            raise errors.ResourceExhausted(
                f"uploads in flight hold {self.reserved} of {self.max_bytes} bytes; this one declares "
                f"{payload_bytes}: retry shortly",
                RETRY_AFTER_S,
            )
        self.reserved += payload_bytes
        self._uploading.add(client_id)
        try:
            yield
        finally:
            self.reserved -= payload_bytes
            self._uploading.discard(client_id)
