"""How many calls are in flight, overall and per client.

A connection's streams are capped by HTTP/2 (`server.max_streams_per_connection`), but a client
may open many connections, and a long poll or a slow download holds its stream for seconds: a
client that keeps hundreds of them open would hold the coordinator's memory and event loop for
everyone. Each call takes a slot when it is admitted and gives it back when it ends; past either
cap a new call is refused with RESOURCE_EXHAUSTED and a time to retry, and the calls already in
flight go on.
"""

from __future__ import annotations

from fedgen.coordinator import errors

#: When a call refused for want of a slot may try again.
RETRY_AFTER_S = 1.0


class CallSlots:
    def __init__(self, overall: int, per_client: int) -> None:
        self.overall = overall
        self.per_client = per_client
        self.in_flight = 0
        self._by_client: dict[str, int] = {}

    def take(self, client_id: str | None) -> None:
        """Admits one call (of a client, or of a caller with no id yet: Join, Control)."""
        if self.in_flight >= self.overall:
            raise errors.ResourceExhausted(
                f"the coordinator has {self.in_flight} calls in flight (server.max_calls_in_flight): retry shortly",
                RETRY_AFTER_S,
            )
        if client_id is not None:
            held = self._by_client.get(client_id, 0)
            if held >= self.per_client:
                raise errors.ResourceExhausted(
                    f"{client_id} already has {held} calls in flight (server.max_calls_per_client): finish one first",
                    RETRY_AFTER_S,
                )
            self._by_client[client_id] = held + 1
        self.in_flight += 1

    def give_back(self, client_id: str | None) -> None:
        self.in_flight -= 1
        if client_id is not None:
            held = self._by_client.pop(client_id) - 1
            if held:
                self._by_client[client_id] = held
