"""Building the coordinator's gRPC server, standalone or mounted on a server the user owns."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedgen.coordinator.auth import CONTROL_PREFIX, FLEET_PREFIX, AuthInterceptor, RateLimiter
from fedgen.coordinator.call_slots import CallSlots
from fedgen.coordinator.config import CoordinatorConfig, ServerConfig, check_exposure
from fedgen.coordinator.federation import Federation
from fedgen.coordinator.file_blobs import FileBlobStore
from fedgen.coordinator.metrics import MetricsEndpoint, RpcMetricsInterceptor, serve_metrics
from fedgen.coordinator.servicers import ControlServicer, FleetServicer
from fedgen.coordinator.sqlite_store import SqliteStateStore
from fedgen.coordinator.state_lock import StateDirLock
from fedgen.coordinator.strategy import make_strategy
from fedgen.coordinator.task_setup import load_task_contract
from fedgen.core.transport import server_options, server_tls_credentials
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

_LOGGER = logging.getLogger(__name__)

FLEET_SERVICE = fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].full_name
CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name


async def build_federation(config: CoordinatorConfig) -> Federation:
    """The federation the config describes, its state read from the store (a new one is created)."""
    _, model = await asyncio.to_thread(load_task_contract, config)
    strategy = await asyncio.to_thread(make_strategy, config, model)
    state = config.state_path
    lock = StateDirLock(state).acquire()
    try:
        store = await SqliteStateStore.open(state / "state.sqlite3")
    except BaseException:
        lock.release()
        raise
    federation = Federation(config, store, FileBlobStore(state / "blobs"), strategy, model, lock)
    try:
        await federation.load()
    except BaseException:
        await federation.close()
        raise
    return federation


def coordinator_server_options(server: ServerConfig) -> list[tuple[str, int | str]]:
    """gRPC server options the coordinator's resource limits rely on (pass them to your own
    `grpc.aio.server(options=...)` when you mount it): message size, handshake and idle-connection
    timeouts, concurrent streams per connection, the backlog of calls not yet picked up."""
    return [
        *server_options(server.max_message_bytes),
        ("grpc.server_handshake_timeout_ms", int(server.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(server.idle_connection_s * 1000)),
        ("grpc.max_concurrent_streams", server.max_streams_per_connection),
        ("grpc.server.max_pending_requests", server.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * server.max_pending_calls),
        ("grpc.server_max_unrequested_time_in_server", server.max_pending_wait_s),
    ]


def coordinator_interceptors(federation: Federation) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors the coordinator's services rely on (credentials, operator token, rate limits).

    Pass them to `grpc.aio.server(interceptors=[*yours, *coordinator_interceptors(fed)])` when you
    mount the coordinator on your own server; calls to your other services pass through untouched.
    """
    auth = federation.config.auth
    limiter = RateLimiter(auth.client_requests_per_second, auth.client_burst)
    server = federation.config.server
    slots = CallSlots(server.max_calls_in_flight, server.max_calls_per_client)
    certified_ids = server.tls.client_id_from_certificate
    return [
        # First, so that calls the auth interceptor refuses are timed and counted too.
        RpcMetricsInterceptor(federation.metrics, (FLEET_PREFIX, CONTROL_PREFIX)),
        AuthInterceptor(federation, auth.operator_hash(), limiter, federation.registry.peers, slots, certified_ids),
    ]


def add_servicers(
    server: grpc.aio.Server, federation: Federation, health_servicer: health.aio.HealthServicer | None = None
) -> health.aio.HealthServicer:
    """Adds Fleet and Control (and, unless you pass your own, grpc.health.v1.Health) to a server.

    Use this to mount the coordinator on a grpc.aio server you built (your interceptors, ports and
    credentials, other services beside ours); see `mount`. Returns the health servicer, whose
    Fleet/Control entries the coordinator flips between SERVING and NOT_SERVING.
    """
    cfg = federation.config
    fleet_pb2_grpc.add_FleetServicer_to_server(
        FleetServicer(federation, cfg.server.chunk_bytes, cfg.server.max_poll_wait_s), server
    )
    control_pb2_grpc.add_ControlServicer_to_server(ControlServicer(federation, cfg.auth.operator_hash()), server)
    if health_servicer is None:
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return health_servicer


@dataclass
class RunningCoordinator:
    server: grpc.aio.Server
    port: int
    federation: Federation
    health: health.aio.HealthServicer
    engine_task: asyncio.Task[None] | None = None
    metrics: MetricsEndpoint | None = None  # Prometheus's /metrics, when metrics.address is set

    # Whether this object owns the server (create_server) or only rides on it (mount).
    owns_server: bool = True

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", FLEET_SERVICE, CONTROL_SERVICE) if self.owns_server else (FLEET_SERVICE, CONTROL_SERVICE):
            await self.health.set(name, status)

    async def start_engine(self) -> None:
        """Starts the round engine (after the server has started); NOT_SERVING until state is recovered."""
        await self.set_serving(False)
        self.engine_task = asyncio.create_task(_run_engine(self), name="round-engine")

    async def wait_finished(self) -> None:
        assert self.engine_task is not None
        await self.engine_task

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first (load balancers drain), then stop the engine; a server we own stops
        with `grace_s` for calls in flight (uploads included) to finish."""
        await self.set_serving(False)
        if self.engine_task is not None:
            self.engine_task.cancel()
        if self.owns_server:
            await self.server.stop(grace_s)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        await self.federation.close()


async def mount(
    server: grpc.aio.Server, federation: Federation, health_servicer: health.aio.HealthServicer | None = None
) -> RunningCoordinator:
    """Mounts the coordinator on a server you built and will start yourself.

    server = grpc.aio.server(interceptors=[my_interceptor, *coordinator_interceptors(fed)])
    running = await mount(server, fed)          # Fleet, Control (+ Health unless you pass yours)
    my_pb2_grpc.add_MyServiceServicer_to_server(..., server)
    port = server.add_secure_port(address, my_credentials)
    await server.start()
    await running.start_engine()
    ...
    await running.stop()                          # your server keeps running
    """
    health_servicer = add_servicers(server, federation, health_servicer)
    endpoint = _serve_metrics(federation)
    return RunningCoordinator(server, 0, federation, health_servicer, owns_server=False, metrics=endpoint)


def _serve_metrics(federation: Federation) -> MetricsEndpoint | None:
    address = federation.config.metrics.address
    return serve_metrics(federation.metrics, address) if address is not None else None


async def create_server(
    address: str,
    federation: Federation,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> RunningCoordinator:
    """Starts a standalone coordinator on `address` ("[::]:0" picks a free port) and its round engine.

    TLS comes from `credentials` when given, else from the config's `[server.tls]`, else none.
    """
    check_exposure(address, federation.config.auth)
    tls = federation.config.server.tls
    if credentials is None and tls.enabled:
        assert tls.cert_file is not None and tls.key_file is not None
        credentials = server_tls_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)
    server = grpc.aio.server(
        options=coordinator_server_options(federation.config.server),
        interceptors=[*(interceptors or ()), *coordinator_interceptors(federation)],
    )
    health_servicer = add_servicers(server, federation)
    reflection.enable_server_reflection(
        (FLEET_SERVICE, CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:  # grpcio raises RuntimeError for an unparsable or busy address, or returns 0
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(
            f"cannot bind server.address {address!r} (expected host:port, e.g. 0.0.0.0:50051, and a port that is free)"
        )
    try:
        endpoint = _serve_metrics(federation)
    except OSError:
        await server.stop(0)
        raise
    await server.start()
    running = RunningCoordinator(server, port, federation, health_servicer, metrics=endpoint)
    await running.start_engine()
    _LOGGER.info("coordinator listening on port %d (federation %s)", port, federation.federation_id)
    return running


async def _run_engine(running: RunningCoordinator) -> None:
    fed = running.federation

    async def mark_serving_when_recovered() -> None:
        await fed.wait_recovered()
        await running.set_serving(True)

    watcher = asyncio.create_task(mark_serving_when_recovered())
    try:
        await fed.run()
    finally:
        watcher.cancel()
    # Finished (possibly before the watcher's next look): still serving Control and DONE.
    await running.set_serving(True)
