"""The client registry: enrollment, credentials, liveness and eligibility (a real SQLite store, no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedgen.coordinator import errors
from fedgen.coordinator.config import AuthConfig
from fedgen.coordinator.records import ClientProfile
from fedgen.coordinator.registry import ClientRegistry
from fedgen.coordinator.sqlite_store import SqliteStateStore

TOKEN = "registry-test-token"
KIND = "fedavg/batch32"


async def _registry(tmp_path: Path, **auth: object) -> tuple[ClientRegistry, SqliteStateStore]:
    store = await SqliteStateStore.open(tmp_path / "s.sqlite3")
    return ClientRegistry(store, AuthConfig(enrollment_tokens=[TOKEN], **auth), heartbeat_timeout_s=60), store


def test_credentials_authenticate_their_client_and_nothing_else(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path)
        for requested in ("pi-kitchen", "pi.kitchen.2", ""):  # a '.' in an id does not confuse the credential
            client_id, credential = await registry.join(TOKEN, ClientProfile(), requested)
            assert registry.authenticate(credential) == client_id
            assert not requested or client_id == requested
        with pytest.raises(errors.Unauthenticated, match="enrollment token is not valid"):
            await registry.join("wrong-token", ClientProfile(), "x")
        with pytest.raises(errors.Unauthenticated, match="unknown client or bad credential"):
            registry.authenticate("pi-kitchen.forged-secret")
        with pytest.raises(errors.Unauthenticated, match="missing credential"):
            registry.authenticate(None)
        with pytest.raises(errors.InvalidArgument, match="requested_client_id must be 1-64 characters"):
            await registry.join(TOKEN, ClientProfile(), "a/b")
        await store.close()

    asyncio.run(scenario())


def test_a_rejoin_replaces_the_credential_and_a_restart_keeps_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path)
        _, old = await registry.join(TOKEN, ClientProfile(), "dev")
        _, new = await registry.join(TOKEN, ClientProfile(), "dev")
        with pytest.raises(errors.Unauthenticated):
            registry.authenticate(old)
        await store.close()
        registry, store = await _registry(tmp_path)  # a restarted coordinator
        registry.load(await store.clients())
        assert registry.authenticate(new) == "dev"
        await registry.leave("dev")
        with pytest.raises(errors.Unauthenticated, match="has left the federation"):
            registry.authenticate(new)
        await store.close()

    asyncio.run(scenario())


def test_expired_credentials_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path, credential_ttl_s=0.05)
        _, credential = await registry.join(TOKEN, ClientProfile(), "dev")
        await asyncio.sleep(0.1)
        with pytest.raises(errors.Unauthenticated, match="expired"):
            registry.authenticate(credential)
        assert registry.eligible(KIND) == []  # an expired client is not sampled either
        await store.close()

    asyncio.run(scenario())


def test_eligibility_follows_readiness_and_memory_declines(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path)
        for cid in ("a", "b", "c"):
            await registry.join(TOKEN, ClientProfile(memory_budget_mb=256), cid)
        assert registry.eligible(KIND) == ["a", "b", "c"] and registry.connected() == 3
        assert registry.set_readiness("b", True, "on battery (38%)")
        assert not registry.set_readiness("b", True, "on battery (38%)")  # no change, nothing to tell
        registry.decline_kind("c", KIND, "needs 400 MiB, budget 256 MiB")
        assert registry.eligible(KIND) == ["a"]
        assert registry.skipped(KIND) == {
            "b": "not ready: on battery (38%)",
            "c": "declined this kind of task: needs 400 MiB, budget 256 MiB",
        }
        assert registry.eligible("fedgen/batch32") == ["a", "c"]  # a decline is about one kind of task
        await registry.join(TOKEN, ClientProfile(memory_budget_mb=256), "c")
        assert "c" not in registry.eligible(KIND)  # the same budget: the decline stands
        await registry.join(TOKEN, ClientProfile(memory_budget_mb=1024), "c")
        assert "c" in registry.eligible(KIND)  # more memory declared: it may be sampled again
        with pytest.raises(errors.InvalidArgument, match="held_models must be sha256"):
            registry.set_held_models("a", ["not-a-digest"])
        await store.close()

    asyncio.run(scenario())
