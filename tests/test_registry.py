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
        _, new = await registry.join(TOKEN, ClientProfile(), "dev", previous_credential=old)
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
        held = {}
        for cid in ("a", "b", "c"):
            _, held[cid] = await registry.join(TOKEN, ClientProfile(memory_budget_mb=256), cid)
        assert registry.eligible(KIND) == [] and registry.connected() == 3  # none has called yet
        for credential in held.values():
            registry.authenticate(credential)
        assert registry.eligible(KIND) == ["a", "b", "c"]
        assert registry.set_readiness("b", True, "on battery (38%)")
        assert not registry.set_readiness("b", True, "on battery (38%)")  # no change, nothing to tell
        registry.decline_kind("c", KIND, "needs 400 MiB, budget 256 MiB")
        assert registry.eligible(KIND) == ["a"]
        assert registry.skipped(KIND) == {
            "b": "not ready: on battery (38%)",
            "c": "declined this kind of task: needs 400 MiB, budget 256 MiB",
        }
        assert registry.eligible("fedgen/batch32") == ["a", "c"]  # a decline is about one kind of task
        _, held["c"] = await registry.join(TOKEN, ClientProfile(memory_budget_mb=256), "c", "", "", held["c"])
        registry.authenticate(held["c"])
        assert "c" not in registry.eligible(KIND)  # the same budget: the decline stands
        _, held["c"] = await registry.join(TOKEN, ClientProfile(memory_budget_mb=1024), "c", "", "", held["c"])
        registry.authenticate(held["c"])
        assert "c" in registry.eligible(KIND)  # more memory declared: it may be sampled again
        with pytest.raises(errors.InvalidArgument, match="held_models must be sha256"):
            registry.set_held_models("a", ["not-a-digest"])
        await store.close()

    asyncio.run(scenario())


def test_an_id_is_bound_to_its_credential(tmp_path: Path) -> None:
    """The fleet's enrollment token does not let anyone take over a device's id."""

    async def scenario() -> None:
        registry, store = await _registry(tmp_path)
        _, owner = await registry.join(TOKEN, ClientProfile(), "pi-01")
        with pytest.raises(errors.AlreadyExists, match="pi-01 is taken: rejoin it with previous_credential"):
            await registry.join(TOKEN, ClientProfile(), "pi-01")
        with pytest.raises(errors.AlreadyExists, match="bound to another credential"):
            await registry.join(TOKEN, ClientProfile(), "pi-01", previous_credential="pi-01.guessed")
        assert registry.authenticate(owner) == "pi-01"  # the owner never noticed
        await store.close()
        registry, store = await _registry(tmp_path)  # the binding survives a restart
        registry.load(await store.clients())
        with pytest.raises(errors.AlreadyExists):
            await registry.join(TOKEN, ClientProfile(), "pi-01")
        await registry.join(TOKEN, ClientProfile(), "pi-01", previous_credential=owner)
        await registry.leave("pi-01")
        _, other = await registry.join(TOKEN, ClientProfile(), "pi-01")  # a left id is free
        assert registry.authenticate(other) == "pi-01"
        await store.close()

    asyncio.run(scenario())


def test_an_expired_credential_still_proves_its_id_and_a_silent_id_is_released(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path, credential_ttl_s=0.05, release_silent_id_s=0.3)
        _, credential = await registry.join(TOKEN, ClientProfile(), "dev")
        await asyncio.sleep(0.1)
        with pytest.raises(errors.Unauthenticated, match="expired"):
            registry.authenticate(credential)
        _, renewed = await registry.join(TOKEN, ClientProfile(), "dev", previous_credential=credential)
        assert registry.authenticate(renewed) == "dev"
        with pytest.raises(errors.AlreadyExists):
            await registry.join(TOKEN, ClientProfile(), "dev")
        await asyncio.sleep(0.4)  # silent past release_silent_id_s: a device that lost its cache gets it back
        await registry.join(TOKEN, ClientProfile(), "dev")
        await store.close()

    asyncio.run(scenario())


def test_caps_on_registered_and_never_called_clients(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path, max_clients=5, max_unproven_clients=3)
        held = [(await registry.join(TOKEN, ClientProfile(), f"c{i}"))[1] for i in range(3)]
        with pytest.raises(errors.ResourceExhausted, match="3 joined clients have not called yet"):
            await registry.join(TOKEN, ClientProfile(), "c3")
        registry.authenticate(held[0])  # one proves it is alive: room for one more
        await registry.join(TOKEN, ClientProfile(), "c3")
        registry.authenticate(held[1])
        await registry.join(TOKEN, ClientProfile(), "c4")
        registry.authenticate(held[2])
        with pytest.raises(errors.ResourceExhausted, match=r"auth\.max_clients allows 5"):
            await registry.join(TOKEN, ClientProfile(), "c5")
        await registry.leave("c0")
        await registry.join(TOKEN, ClientProfile(), "c5")
        assert registry.eligible(KIND) == ["c1", "c2"]  # c3-c5 only joined: never sampled
        await store.close()

    asyncio.run(scenario())


def test_per_device_enrollment_tokens(tmp_path: Path) -> None:
    import hashlib

    own = hashlib.sha256(b"pi-01-own-token").hexdigest()

    async def scenario() -> None:
        registry, store = await _registry(tmp_path, device_token_sha256={"pi-01": own}, require_device_tokens=True)
        with pytest.raises(errors.Unauthenticated):  # the fleet token is not accepted for a device with its own
            await registry.join(TOKEN, ClientProfile(), "pi-01")
        await registry.join("pi-01-own-token", ClientProfile(), "pi-01")
        with pytest.raises(errors.PermissionDenied, match="'pi-02' has none"):
            await registry.join(TOKEN, ClientProfile(), "pi-02")
        with pytest.raises(errors.PermissionDenied, match="'a random id' has none"):
            await registry.join(TOKEN, ClientProfile(), "")
        await store.close()

    asyncio.run(scenario())


def test_a_peer_that_keeps_failing_is_refused_unchecked(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path, failed_auth_per_peer_per_second=0.01, failed_auth_burst_per_peer=3)
        attacker, honest = "ipv4:10.0.0.66:4000", "ipv6:[2001:db8::1]:4000"
        for _ in range(3):
            with pytest.raises(errors.Unauthenticated):
                await registry.join("guess-0000", ClientProfile(), "", peer=attacker)
        for token in ("guess-0001", TOKEN):  # the right token too: the peer is not heard out now
            with pytest.raises(errors.ResourceExhausted, match=r"too many failed authentications from 10\.0\.0\.66"):
                await registry.join(token, ClientProfile(), "", peer="ipv4:10.0.0.66:4999")
        await registry.join(TOKEN, ClientProfile(), "", peer=honest)  # other peers are not affected
        await store.close()

    asyncio.run(scenario())


def test_join_rate_per_peer(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, store = await _registry(tmp_path, joins_per_peer_per_second=0.01, join_burst_per_peer=2)
        for _ in range(2):
            await registry.join(TOKEN, ClientProfile(), "", peer="ipv4:10.0.0.5:1")
        with pytest.raises(errors.ResourceExhausted, match=r"join rate limit: 10\.0\.0\.5 exceeded 0\.01 joins/s"):
            await registry.join(TOKEN, ClientProfile(), "", peer="ipv4:10.0.0.5:2")
        await store.close()

    asyncio.run(scenario())
