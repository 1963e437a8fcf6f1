"""Faults of the state folder: an acknowledged update whose file is corrupt or gone by commit time,
and a disk that fills while clients upload and while a round opens (a real small tmpfs).

In-process (a real SQLite store and blob folder, the real engine and intake); no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedgen.coordinator import errors
from fedgen.coordinator.assignments import TrainAssignment
from fedgen.coordinator.config import parse_config
from fedgen.coordinator.federation import Federation
from fedgen.coordinator.intake import UploadHeader
from fedgen.coordinator.records import ClientProfile
from fedgen.coordinator.server import build_federation
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state

TOKEN = "state-faults-token"


def _config(
    state: Path,
    clients: int,
    rounds: int = 1,
    min_completed: int | None = None,
    timeout_s: float = 30,
    strategy: str = "fedavg",
) -> Any:
    return parse_config(
        {
            "state_dir": str(state),
            "data": {"test_data_dir": "builtin"},
            "federation": {
                "strategy": strategy,
                "rounds": rounds,
                "clients_per_round": clients,
                "min_clients": clients,
                "min_completed": min_completed or clients,
                "round_timeout_s": timeout_s,
            },
            "bandwidth": {"policy": "fixed"},
            "auth": {"enrollment_tokens": [TOKEN]},
        }
    )


async def _joined(fed: Federation, client_id: str) -> str:
    cid, credential = await fed.join(TOKEN, ClientProfile(), client_id)
    fed.authenticate(credential)  # it has called once: it may be sampled
    return cid


def _update(fed: Federation, task: TrainAssignment, key: str, scale: float = 1.0) -> tuple[UploadHeader, bytes]:
    model = decode_state(bundle_from_bytes(fed.blobs.get(task.model.sha256)))
    state = {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in model.items()}
    payload = bundle_to_bytes(encode_state(state, Encoding()))
    header = UploadHeader(
        round=task.round,
        task_id=task.task_id,
        idempotency_key=key,
        num_examples=100,
        label_counts=(10,) * 10,
        payload_bytes=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        metrics={"loss": 1.0},
        train_seconds=0.1,
    )
    return header, payload


def test_an_unreadable_acknowledged_update_is_reported_and_quarantined(tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, Any, list[Path]]:
        fed = await build_federation(_config(tmp_path / "state", clients=3))
        ids = [await _joined(fed, f"c{i}") for i in range(3)]
        engine = asyncio.create_task(fed.run())
        tasks = [await fed.poll(cid, 30) for cid in ids]
        assert all(isinstance(t, TrainAssignment) for t in tasks)
        updates = []
        for cid, task, scale in zip(ids, tasks, (0.9, 1.1, 1.3), strict=True):
            assert isinstance(task, TrainAssignment)
            header, payload = _update(fed, task, f"{cid}:0", scale)
            if cid == "c0":  # corrupt on disk after it was acknowledged
                await fed.accept_upload(cid, header, payload, len(payload))
                (record,) = [u for u in await fed.store.updates_for(0, 0) if u.client_id == cid]
                fed.blobs.path(record.payload_sha256).write_bytes(b"bit rot")  # type: ignore[attr-defined]
            elif cid == "c1":  # gone from disk after it was acknowledged
                await fed.accept_upload(cid, header, payload, len(payload))
                (record,) = [u for u in await fed.store.updates_for(0, 0) if u.client_id == cid]
                fed.blobs.path(record.payload_sha256).unlink()  # type: ignore[attr-defined]
            else:
                await fed.accept_upload(cid, header, payload, len(payload))
            updates.append(header)
        await asyncio.wait_for(engine, 60)  # the round commits: no exception, no crash loop
        (row,) = await fed.ledger()
        quarantined = list((tmp_path / "state" / "blobs" / "quarantine").iterdir())
        await fed.close()
        return row, {c.client_id: (c.outcome, c.reason) for c in row.clients}, quarantined

    row, outcomes, quarantined = asyncio.run(scenario())
    assert outcomes["c2"] == ("completed", "")
    assert outcomes["c0"][0] == "rejected" and "acknowledged, but its stored update" in outcomes["c0"][1]
    assert "corrupt on disk" in outcomes["c0"][1] and "quarantined as" in outcomes["c0"][1]
    assert outcomes["c1"][0] == "rejected" and "No such file or directory" in outcomes["c1"][1]
    assert row.extras["unreadable_updates"] == 2.0 and len(quarantined) == 1


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> Path:
    """Fills the disk to the last byte with one file (deleted to free it)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 10, 1):  # unbuffered: a write that does not fit fails at once
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(size))
    return filler


@pytest.mark.integration  # mounts a tmpfs (a process)
def test_a_full_disk_refuses_uploads_with_a_retry_time_and_pauses_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _small_disk(tmp_path / "disk", "16m") as disk:

        async def scenario() -> dict[str, Any]:
            # Two sampled, one needed: the round commits at its 3 s deadline, after the disk filled.
            fed = await build_federation(_config(disk / "state", 2, rounds=2, min_completed=1, timeout_s=3))
            cid = await _joined(fed, "dev")
            await _joined(fed, "silent")
            engine = asyncio.create_task(fed.run())
            task = await fed.poll(cid, 30)
            assert isinstance(task, TrainAssignment)
            header, payload = _update(fed, task, "dev:0", 1.01)
            filler = _fill(disk)
            with pytest.raises(errors.ResourceExhausted, match="the coordinator's disk is full") as refused:
                await fed.accept_upload(cid, header, payload, len(payload))
            filler.unlink()  # space again: the same upload, retried, is accepted
            ack = await fed.accept_upload(cid, header, payload, len(payload))
            filler = _fill(disk)  # and the disk fills before the round's deadline: the commit cannot be written
            await asyncio.sleep(5)
            paused = not engine.done() and fed.current_round == 0
            filler.unlink()
            while fed.current_round < 1 and not engine.done():
                await asyncio.sleep(0.1)
            rows = await fed.ledger()
            engine.cancel()
            await fed.close()
            return {
                "retry_after_s": refused.value.retry_after_s,
                "ack_round": ack.round,
                "paused": paused,
                "outcomes": {c.client_id: c.outcome for c in rows[0].clients} if rows else {},
            }

        out = asyncio.run(scenario())
    assert out["retry_after_s"] and out["retry_after_s"] > 0
    assert out["ack_round"] == 0 and out["paused"], out
    assert out["outcomes"] == {"dev": "completed", "silent": "dropped"}  # the acknowledged update counted
    assert any("committing round 0: the disk is full" in r.getMessage() for r in caplog.records)


def test_a_lost_global_model_is_recovered_from_the_newest_readable_one(tmp_path: Path) -> None:
    """A deleted model file made the coordinator exit at the first round, and at every restart."""

    async def one_round(rounds: int) -> Any:
        fed = await build_federation(_config(tmp_path / "state", clients=1, rounds=rounds))
        cid = await _joined(fed, f"dev-{rounds}")  # a new device each run (a known id needs its credential)
        engine = asyncio.create_task(fed.run())
        task = await fed.poll(cid, 30)
        assert isinstance(task, TrainAssignment)
        header, payload = _update(fed, task, f"dev:{task.round}", 1.01)
        await fed.accept_upload(cid, header, payload, len(payload))
        await asyncio.wait_for(engine, 60)
        rows = await fed.ledger()
        await fed.close()
        return rows, task

    (first,), _ = asyncio.run(one_round(1))
    (tmp_path / "state" / "blobs" / first.model_sha256[:2] / first.model_sha256).unlink()
    rows, task = asyncio.run(one_round(2))  # round 1 opens on the initial model (round 0's is gone)
    assert task.round == 1 and rows[-1].extras["global_model_recovered_from_round"] == -1.0
    assert "global_model_recovered_from_round" not in rows[0].extras


def test_a_round_left_open_whose_model_is_lost_is_opened_again_with_its_updates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash with a round open, then its model file gone: the restart reopened the round on the
    missing model and exited, at every restart. Now the attempt fails, the next opens on the
    newest readable model, and the update acknowledged before the crash counts in it."""
    state = tmp_path / "state"

    async def crash_mid_round() -> str:
        fed = await build_federation(_config(state, clients=2, timeout_s=3))
        a, _ = await _joined(fed, "a"), await _joined(fed, "b")
        engine = asyncio.create_task(fed.run())
        task = await fed.poll(a, 30)
        assert isinstance(task, TrainAssignment)
        header, payload = _update(fed, task, "a:0", 1.01)
        await fed.accept_upload(a, header, payload, len(payload))  # acknowledged, then the "crash"
        assert fed.engine.open_round is not None
        model_sha = fed.engine.open_round.model_sha256
        engine.cancel()
        await fed.close()
        return model_sha

    async def restart() -> Any:
        fed = await build_federation(_config(state, clients=2, timeout_s=3))
        engine = asyncio.create_task(fed.run())
        _, task = await asyncio.gather(fed.poll("a", 30), fed.poll("b", 30))
        assert isinstance(task, TrainAssignment) and task.round == 0
        header, payload = _update(fed, task, "b:0", 0.99)
        await fed.accept_upload("b", header, payload, len(payload))
        await asyncio.wait_for(engine, 60)  # a answers nothing more: its acknowledged update counts
        (row,) = await fed.ledger()
        await fed.close()
        return row

    model_sha = asyncio.run(crash_mid_round())
    (state / "blobs" / model_sha[:2] / model_sha).unlink()
    row = asyncio.run(restart())
    assert row.attempt == 1 and {c.client_id: c.outcome for c in row.clients} == {"a": "completed", "b": "completed"}
    assert row.extras["carried_from_failed_attempts"] == 1.0
    assert row.extras["global_model_recovered_from_round"] == -1.0
    assert any("round 0 attempt 0 cannot be reopened" in r.getMessage() for r in caplog.records)


def test_a_lost_strategy_state_starts_the_generator_afresh(tmp_path: Path) -> None:
    """FedGen's generator state unreadable at start: the coordinator exited at every restart."""
    state = tmp_path / "state"

    async def rounds(total: int) -> Any:
        fed = await build_federation(_config(state, clients=1, rounds=total, strategy="fedgen"))
        cid = await _joined(fed, f"dev-{total}")
        engine = asyncio.create_task(fed.run())
        task = await fed.poll(cid, 30)
        assert isinstance(task, TrainAssignment)
        header, payload = _update(fed, task, f"dev:{task.round}", 1.01)
        await fed.accept_upload(cid, header, payload, len(payload))
        await asyncio.wait_for(engine, 120)
        rows = await fed.ledger()
        digest = await fed.store.get_meta("strategy_state")
        await fed.close()
        return rows, digest

    _, digest = asyncio.run(rounds(1))
    assert digest is not None
    path = state / "blobs" / digest[:2] / digest
    path.write_bytes(b"not a generator" + path.read_bytes()[15:])  # corrupt: quarantined on read
    rows, _ = asyncio.run(rounds(2))
    assert [r.round for r in rows] == [0, 1]
    assert rows[-1].extras["strategy_state_reset"] == 1.0 and "strategy_state_reset" not in rows[0].extras
    assert list((state / "blobs" / "quarantine").iterdir())


def test_retention_removes_old_rounds_updates_and_keeps_every_model(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[Any], list[Any], Any]:
        config = _config(tmp_path / "state", clients=2, rounds=3)
        config = config.model_copy(update={"retention": config.retention.model_copy(update={"keep_update_rounds": 1})})
        fed = await build_federation(config)
        ids = [await _joined(fed, "a"), await _joined(fed, "b")]
        engine = asyncio.create_task(fed.run())
        for round_ in range(3):
            for k, cid in enumerate(ids):  # two different updates: the mean is neither of them
                task = await fed.poll(cid, 30)
                assert isinstance(task, TrainAssignment) and task.round == round_
                header, payload = _update(fed, task, f"{cid}:{round_}", 1.0 + 0.01 * (k + 1))
                await fed.accept_upload(cid, header, payload, len(payload))
            while fed.current_round <= round_ and not engine.done():
                await asyncio.sleep(0.02)
        await asyncio.wait_for(engine, 60)
        updates = [u for q in range(3) for u in await fed.store.updates_for(q, 0)]
        rows = await fed.ledger()
        blobs = fed.blobs
        await fed.close()
        return updates, rows, blobs

    updates, rows, blobs = asyncio.run(scenario())
    # Rounds 0 and 1 fell out of the window of 1; round 2's updates and every model stay.
    assert [(u.round, blobs.has(u.payload_sha256)) for u in sorted(updates, key=lambda u: u.round)] == [
        (0, False),
        (0, False),
        (1, False),
        (1, False),
        (2, True),
        (2, True),
    ]
    assert all(blobs.has(r.model_sha256) for r in rows)


def test_an_update_acknowledged_in_a_failed_attempt_counts_in_the_next(tmp_path: Path) -> None:
    """Before, when a round attempt failed for want of updates, the ones it had acknowledged vanished."""

    async def scenario() -> Any:
        config = _config(tmp_path / "state", clients=2, rounds=1, timeout_s=1.5)
        fed = await build_federation(config)
        a, b = await _joined(fed, "a"), await _joined(fed, "b")
        engine = asyncio.create_task(fed.run())
        first = await fed.poll(a, 30)
        assert isinstance(first, TrainAssignment) and first.round == 0
        header, payload = _update(fed, first, "a:0", 1.01)
        await fed.accept_upload(a, header, payload, len(payload))  # acknowledged; b never answers
        while await fed.store.max_attempt(0) < 1:  # attempt 0 fails at its deadline, attempt 1 opens
            await asyncio.sleep(0.05)
        second = await fed.poll(b, 30)
        assert isinstance(second, TrainAssignment) and second.round == 0 and second.task_id != first.task_id
        header, payload = _update(fed, second, "b:0", 0.99)
        await fed.accept_upload(b, header, payload, len(payload))
        await asyncio.wait_for(engine, 60)  # a's update from attempt 0 and b's: 2 of 2, it commits
        (row,) = await fed.ledger()
        await fed.close()
        return row

    row = asyncio.run(scenario())
    assert row.attempt == 1 and {c.client_id: c.outcome for c in row.clients} == {"a": "completed", "b": "completed"}
    assert row.extras["carried_from_failed_attempts"] == 1.0
