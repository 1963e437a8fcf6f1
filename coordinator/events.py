"""What happens in a federation, told to whoever listens: round events for operators (the Control
stream) and a change signal the round engine sleeps on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from fedgen.coordinator.ledger import LedgerRow

EventKind = Literal["opened", "accepted", "rejected", "committed", "failed", "finished", "joined"]
#: Events a watcher may fall behind by before it is dropped (a stuck watcher must not stall anything).
QUEUE_SIZE = 10_000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    round: int
    client_id: str = ""
    message: str = ""
    cohort_size: int = 0
    updates_received: int = 0
    eligible: int = 0  # "opened": clients the cohort was sampled from
    connected: int = 0  # "opened": clients alive then
    ledger_row: LedgerRow | None = None
    unix_ms: int = field(default_factory=now_ms)


class EventBus:
    """Fan-out of events to subscribers' queues, and to listeners called in line (metrics)."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._listeners: list[Callable[[Event], None]] = []

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Calls ``listener`` with every event as it is emitted (it must be quick and must not raise)."""
        self._listeners.append(listener)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            listener(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)


class ChangeSignal:
    """Something the round engine waits for may have changed (a join, an upload, a decline, Pause).

    ``notify`` never blocks; ``wait`` returns at the next notification after it was called, or
    after ``timeout`` seconds.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        self._event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class PollWakers:
    """One event per client holding a long poll, set only when that client's answer may have changed
    (a round opened with it in the cohort, or the federation finished): with N clients polling, an
    upload or a join wakes no poll at all, instead of all N."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    async def wait(self, client_id: str, timeout: float) -> None:
        event = self._events.setdefault(client_id, asyncio.Event())
        event.clear()  # callers check their answer right before, with no await between: nothing is missed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def wake(self, client_ids: Iterable[str] | None = None) -> None:
        """Wakes the long polls of these clients (all when None) to look at their answer again."""
        for client_id in list(self._events if client_ids is None else client_ids):
            event = self._events.get(client_id)
            if event is not None:
                event.set()
