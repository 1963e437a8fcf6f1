"""Task assignment: what a client's long poll answers (TRAIN, WAIT or DONE) and when it answers.

A client of the open round's cohort that has not delivered gets its TRAIN task, with its own
encodings, planned from its link estimate the first time it asks; everyone else waits. A poll
is held until its own answer may have changed (``PollWakers``) or its time is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from fedgen.coordinator.engine import RoundEngine
from fedgen.coordinator.events import PollWakers
from fedgen.coordinator.registry import ClientRegistry
from fedgen.coordinator.strategy import RoundPlan
from fedgen.coordinator.transfers import Variant
from fedgen.export.encoding import Encoding

#: A WAIT that ends a long poll asks the client to poll again at once.
RETRY_AFTER_POLL_MS = 100


@dataclass(frozen=True)
class ArtifactOffer:
    kind: str
    variant: Variant


@dataclass(frozen=True)
class TrainAssignment:
    round: int
    task_id: str
    deadline_unix_ms: int
    plan: RoundPlan
    strategy: str
    model: Variant
    label_space: tuple[int, ...]
    artifacts: tuple[ArtifactOffer, ...] = ()
    upload_encoding: Encoding = Encoding()


@dataclass(frozen=True)
class WaitAssignment:
    retry_after_ms: int
    reason: str


@dataclass(frozen=True)
class DoneAssignment:
    reason: str


Assignment = TrainAssignment | WaitAssignment | DoneAssignment


class TaskBoard:
    def __init__(self, engine: RoundEngine, registry: ClientRegistry, wakers: PollWakers) -> None:
        self._engine = engine
        self._registry = registry
        self._wakers = wakers
        #: Clients that have heard DONE (the server may exit once every eligible one has).
        self.told_done: set[str] = set()

    async def poll(self, client_id: str, max_wait_s: float, held_models: Iterable[str] = ()) -> Assignment:
        """A task as soon as there is one for this client, WAIT after ``max_wait_s``."""
        self._registry.set_held_models(client_id, held_models)
        loop = asyncio.get_running_loop()
        until = loop.time() + max_wait_s
        self._registry.begin_poll(client_id)
        try:
            while True:
                assignment = self.assignment_for(client_id)
                if assignment is not None:
                    return assignment
                remaining = until - loop.time()
                if remaining <= 0:
                    return WaitAssignment(RETRY_AFTER_POLL_MS, self._wait_reason(client_id))
                await self._wakers.wait(client_id, remaining)
        finally:
            self._registry.end_poll(client_id)

    def assignment_for(self, client_id: str) -> Assignment | None:
        """The client's answer now; None while it has nothing to do but wait."""
        engine = self._engine
        if engine.finished:
            self.told_done.add(client_id)
            return DoneAssignment("federation finished")
        r = engine.open_round
        if r is None or r.closed or client_id not in r.cohort or r.answered(client_id) or client_id in r.pending:
            return None
        plan = r.plans.get(client_id)
        if plan is None:
            plan = r.assign(
                client_id, engine.transfers.plan(client_id, r.variants, self._registry[client_id].held_models)
            )
        return TrainAssignment(
            round=r.round,
            task_id=r.cohort[client_id],
            deadline_unix_ms=r.deadline_ms,
            plan=r.plan,
            strategy=engine.strategy.name,
            model=plan.model,
            label_space=tuple(engine.strategy.label_space(engine.model.n_classes)),
            artifacts=tuple(ArtifactOffer(kind, variant) for kind, variant in plan.artifacts.items()),
            upload_encoding=plan.upload,
        )

    def _wait_reason(self, client_id: str) -> str:
        r = self._engine.open_round
        if self._engine.paused:
            return "federation paused"
        if r is None:
            return "waiting for enough clients to open a round"
        if client_id in r.accepted:
            return f"update for round {r.round} received; waiting for the next round"
        return f"not sampled for round {r.round}"
