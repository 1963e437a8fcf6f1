"""The coordinator mounted on a grpc.aio server the user built: their interceptor, their service
beside ours, their port; and the coordinator's own guarantees (auth, rate limits) kept."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgen.coordinator.auth import RateLimiter, TokenBucket
from fedgen.coordinator.config import ConfigError, parse_config
from fedgen.coordinator.server import build_federation, coordinator_interceptors, mount
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

TOKEN = "mount-test-enrollment-token"
OPERATOR = "mount-test-operator-token"
ECHO = "/acme.Echo/Say"


class RecordingInterceptor(grpc.aio.ServerInterceptor):
    """The user's own interceptor: sees every call, ours and theirs."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        self.methods.append(details.method)
        return await continuation(details)


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


async def _scenario(tmp_path: Path) -> None:
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "federation": {
                "strategy": "fedavg",
                "rounds": 1,
                "clients_per_round": 1,
                "min_clients": 1,
                "min_completed": 1,
                "round_timeout_s": 60,
            },
            "data": {"test_data_dir": "builtin"},
            # Secrets given as hashes only: the config holds no token.
            "auth": {
                "enrollment_tokens": [],
                "enrollment_token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()],
                "operator_token_sha256": hashlib.sha256(OPERATOR.encode()).hexdigest(),
                "client_requests_per_second": 1,
                "client_burst": 8,
            },
        }
    )
    federation = await build_federation(config)
    theirs = RecordingInterceptor()
    server = grpc.aio.server(interceptors=[theirs, *coordinator_interceptors(federation)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("acme.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_echo)}),)
    )
    running = await mount(server, federation)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await running.start_engine()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            echo = channel.unary_unary(ECHO)
            assert await echo(b"hi", timeout=5) == b"echo:hi"  # their service: no credential needed
            fleet = fleet_pb2_grpc.FleetStub(channel)
            control = control_pb2_grpc.ControlStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            with pytest.raises(grpc.aio.AioRpcError) as err:  # turned away by our interceptor
                await fleet.PollTask(fleet_pb2.PollTaskRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await control.GetStatus(
                    control_pb2.GetStatusRequest(), timeout=5, metadata=bearer_metadata("wrong-token")
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

            joined = await fleet.Join(
                fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id="dev"), timeout=5
            )
            md = bearer_metadata(joined.credential)
            while True:
                reply = await fleet.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=5000), timeout=10, metadata=md)
                if reply.HasField("train"):
                    break
            task = reply.train
            chunks = [
                c
                async for c in fleet.DownloadArtifact(
                    fleet_pb2.DownloadRequest(artifact_id=task.global_model.artifact_id), timeout=10, metadata=md
                )
            ]
            state = decode_state(bundle_from_bytes(b"".join(c.data for c in chunks)))
            payload = bundle_to_bytes(encode_state(state, Encoding()))
            header = fleet_pb2.UpdateHeader(
                round=task.round,
                task_id=task.task_id,
                idempotency_key="dev:1",
                num_examples=10,
                label_counts=[1] * 10,
                payload_bytes=len(payload),
                payload_sha256=hashlib.sha256(payload).hexdigest(),
            )
            msgs = [fleet_pb2.UploadMessage(header=header), fleet_pb2.UploadMessage(chunk=payload)]
            ack = await fleet.UploadUpdate(iter(msgs), timeout=10, metadata=md)
            assert ack.accepted
            await asyncio.wait_for(running.wait_finished(), 60)  # the engine ran its round on their server
            status = await control.GetStatus(
                control_pb2.GetStatusRequest(), timeout=5, metadata=bearer_metadata(OPERATOR)
            )
            assert status.state == control_pb2.FEDERATION_STATE_FINISHED

            # The per-client budget (1/s, burst 8) is spent by now: a burst of heartbeats is refused.
            codes = []
            for _ in range(12):
                try:
                    await fleet.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5, metadata=md)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}

            check = await health.Check(health_pb2.HealthCheckRequest(service="fedgen.v1.Fleet"), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            await running.stop()
            check = await health.Check(health_pb2.HealthCheckRequest(service="fedgen.v1.Fleet"), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await echo(b"still", timeout=5) == b"echo:still"  # their server is still up
        assert ECHO in theirs.methods and "/fedgen.v1.Fleet/Join" in theirs.methods
    finally:
        await server.stop(1)


@pytest.mark.integration
def test_mounted_on_a_users_server(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.4) is False  # 0.8 token
    assert bucket.take(0.5) is True  # 1.0 token
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]  # capped at the burst


def test_rate_limiter_is_per_client_and_names_it() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=1, clock=lambda: now[0])
    limiter.check("a")
    limiter.check("b")  # a's budget is not b's
    with pytest.raises(Exception, match="rate limit: client a exceeded 1 requests/s"):
        limiter.check("a")
    RateLimiter(rate=0, burst=1).check("a")  # 0 = no limit


def test_hashed_secrets_are_validated() -> None:
    with pytest.raises(ConfigError, match="enrollment_token_sha256 entries must be 64 lowercase hex"):
        parse_config({"auth": {"enrollment_token_sha256": ["abc"]}})
    with pytest.raises(ConfigError, match="operator_token_sha256"):
        parse_config({"auth": {"operator_token_sha256": "XYZ"}})
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"auth": {"operator_token": "operator-1", "operator_token_sha256": "0" * 64}})
