"""What the metrics count from the round engine's events (no server: the registry is read directly)."""

from __future__ import annotations

import math

from fedgen.coordinator.events import Event
from fedgen.coordinator.ledger import ClientEntry, LedgerRow, SkippedClient
from fedgen.coordinator.metrics import FederationMetrics, skip_category


def _row(round_: int, accuracy: float, **extras: float) -> LedgerRow:
    return LedgerRow(
        round=round_,
        attempt=0,
        strategy="fedgen",
        cohort_size=3,
        completed=2,
        dropped=1,
        rejected=0,
        declined=0,
        bytes_down=1000,
        bytes_up=400,
        wait_seconds=1.0,
        aggregate_seconds=0.1,
        evaluate_seconds=0.2,
        round_seconds=1.5,
        test_accuracy=accuracy,
        test_loss=0.5,
        opened_unix_ms=0,
        committed_unix_ms=1500,
        encoding_policy="adaptive",
        transfer_budget_seconds=30.0,
        clients=(
            ClientEntry("a", "completed", down_seconds=0.2, up_seconds=0.1),
            ClientEntry("b", "completed", down_seconds=0.3, up_seconds=0.1),
            ClientEntry("c", "dropped"),
        ),
        skipped=(SkippedClient("d", "not ready: battery 12%"), SkippedClient("e", "refused at join: task har 1")),
        extras=dict(extras),
    )


def test_commits_count_what_the_ledger_row_says() -> None:
    m = FederationMetrics()
    m.observe(Event("opened", 0, cohort_size=3, eligible=5, connected=7))
    m.observe(Event("committed", 0, ledger_row=_row(0, 0.5, generator_seconds=0.25)))
    m.observe(Event("committed", 1, ledger_row=_row(1, math.nan)))  # not evaluated this round
    value = m.registry.get_sample_value
    assert value("fedgen_rounds_committed_total") == 2
    assert value("fedgen_current_round") == 2
    assert value("fedgen_clients_eligible") == 5 and value("fedgen_clients_connected") == 7
    assert value("fedgen_round_bytes_total", {"direction": "down"}) == 2000
    assert value("fedgen_round_bytes_total", {"direction": "up"}) == 800
    assert value("fedgen_round_clients_total", {"outcome": "completed"}) == 4
    assert value("fedgen_round_clients_total", {"outcome": "dropped"}) == 2
    assert value("fedgen_clients_skipped_total", {"reason": "not_ready"}) == 2
    assert value("fedgen_clients_skipped_total", {"reason": "refused_at_join"}) == 2
    # Only completed clients' transfers are timed; only a round that trained a generator counts.
    assert value("fedgen_transfer_duration_seconds_count", {"direction": "down"}) == 4
    assert value("fedgen_generator_training_seconds_count") == 1
    assert value("fedgen_generator_training_seconds_sum") == 0.25
    # The last evaluated accuracy stays when a round was not evaluated.
    assert value("fedgen_test_accuracy_ratio") == 0.5


def test_live_events_and_bounded_reasons() -> None:
    m = FederationMetrics()
    for kind in ("joined", "joined", "accepted", "failed"):
        m.observe(Event(kind, 0, client_id="client-01"))  # type: ignore[arg-type]
    value = m.registry.get_sample_value
    assert value("fedgen_clients_joined_total") == 2
    assert value("fedgen_updates_accepted_total") == 1
    assert value("fedgen_rounds_failed_total") == 1
    assert skip_category("joined again with task har 1") == "wrong_task"
    assert skip_category("declined this kind of task: needs 300 MB") == "declined_task_kind"
    assert skip_category("something new") == "other"
    exposed = {s.labels.get("reason", "") for family in m.registry.collect() for s in family.samples}
    assert "client-01" not in exposed


def test_two_federations_do_not_share_counters() -> None:
    first, second = FederationMetrics(), FederationMetrics()
    first.observe(Event("joined", 0))
    assert first.registry.get_sample_value("fedgen_clients_joined_total") == 1
    assert second.registry.get_sample_value("fedgen_clients_joined_total") == 0
