"""Prometheus metrics: what the federation did and what its RPCs cost, for the operator's scraper.

Round figures come from the same ledger row the store commits (so a dashboard and the ledger
never disagree); live counters (joins, accepted updates, bytes as they are served) from the
events the round engine already emits; RPC latency from a server interceptor. Label sets are
bounded: methods, status codes, artifact kinds, encodings and reason categories, never a client
id. Every federation has its own registry, so two in one process do not share counters.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from threading import Thread
from typing import Any, TypeAlias
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedgen.coordinator.events import Event
from fedgen.coordinator.ledger import LedgerRow

_LOGGER = logging.getLogger(__name__)

#: Seconds buckets for RPCs: a heartbeat takes milliseconds, a long poll up to its 20 s cap.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
#: Seconds buckets for rounds, transfers and generator training.
WORK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

#: Skip reasons (free text in the ledger) as a bounded label: the text's prefix names the category.
SKIP_CATEGORIES = (
    ("refused at join", "refused_at_join"),
    ("joined again with", "wrong_task"),
    ("not ready", "not_ready"),
    ("declined this kind of task", "declined_task_kind"),
)


def skip_category(reason: str) -> str:
    for prefix, category in SKIP_CATEGORIES:
        if reason.startswith(prefix):
            return category
    return "other"


class FederationMetrics:
    """The coordinator's metrics, in a registry of their own (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.rounds_committed = Counter("fedgen_rounds_committed", "Rounds committed.", registry=reg)
        self.rounds_failed = Counter(
            "fedgen_rounds_failed", "Round attempts that failed for want of updates.", registry=reg
        )
        self.current_round = Gauge("fedgen_current_round", "The round open or next to open.", registry=reg)
        self.round_seconds = Histogram(
            "fedgen_round_duration_seconds", "Rounds from opening to commit.", buckets=WORK_BUCKETS, registry=reg
        )
        self.cohort_clients = Gauge("fedgen_round_cohort_clients", "Clients sampled for the open round.", registry=reg)
        self.eligible_clients = Gauge(
            "fedgen_clients_eligible", "Clients eligible when the last round opened.", registry=reg
        )
        self.connected_clients = Gauge(
            "fedgen_clients_connected", "Clients alive when the last round opened.", registry=reg
        )
        self.clients_joined = Counter("fedgen_clients_joined", "Successful Joins (rejoins included).", registry=reg)
        self.clients_skipped = Counter(
            "fedgen_clients_skipped",
            "Connected clients left out of a committed round's sample, by reason.",
            ["reason"],
            registry=reg,
        )
        self.client_outcomes = Counter(
            "fedgen_round_clients",
            "Cohort members of committed rounds by outcome (completed, dropped, rejected, declined).",
            ["outcome"],
            registry=reg,
        )
        self.updates_accepted = Counter(
            "fedgen_updates_accepted", "Updates accepted (durable and acknowledged).", registry=reg
        )
        self.updates_rejected = Counter(
            "fedgen_updates_rejected", "UploadUpdate calls refused, by gRPC status code.", ["code"], registry=reg
        )
        self.round_bytes = Counter(
            "fedgen_round_bytes",
            "Bytes on the wire for committed rounds' cohorts, as the ledger counts them.",
            ["direction"],
            registry=reg,
        )
        self.artifact_bytes = Counter(
            "fedgen_artifact_bytes",
            "Artifact and update bytes as they are served or received (retries and late clients included).",
            ["direction", "artifact", "encoding"],
            registry=reg,
        )
        self.transfer_seconds = Histogram(
            "fedgen_transfer_duration_seconds",
            "Each completed client's time on the link per committed round.",
            ["direction"],
            buckets=WORK_BUCKETS,
            registry=reg,
        )
        self.generator_seconds = Histogram(
            "fedgen_generator_training_seconds",
            "FedGen's generator training per committed round.",
            buckets=WORK_BUCKETS,
            registry=reg,
        )
        self.test_accuracy = Gauge(
            "fedgen_test_accuracy_ratio", "The global model's test accuracy at the last evaluation.", registry=reg
        )
        self.test_loss = Gauge("fedgen_test_loss", "The global model's test loss at the last evaluation.", registry=reg)
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method and status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=reg,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "RPC handling time on the server, by method and status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            buckets=RPC_BUCKETS,
            registry=reg,
        )

    # ----------------------------------------------------------------- events
    def observe(self, event: Event) -> None:
        """Counts one round-engine event (an EventBus listener: called on the event loop, never blocks)."""
        if event.kind == "joined":
            self.clients_joined.inc()
        elif event.kind == "accepted":
            self.updates_accepted.inc()
        elif event.kind == "opened":
            self.current_round.set(event.round)
            self.cohort_clients.set(event.cohort_size)
            self.eligible_clients.set(event.eligible)
            self.connected_clients.set(event.connected)
        elif event.kind == "failed":
            self.rounds_failed.inc()
        elif event.kind == "committed" and event.ledger_row is not None:
            self.observe_commit(event.ledger_row)

    def observe_commit(self, row: LedgerRow) -> None:
        self.rounds_committed.inc()
        self.current_round.set(row.round + 1)
        self.round_seconds.observe(row.round_seconds)
        self.round_bytes.labels("down").inc(row.bytes_down)
        self.round_bytes.labels("up").inc(row.bytes_up)
        for outcome, count in (
            ("completed", row.completed),
            ("dropped", row.dropped),
            ("rejected", row.rejected),
            ("declined", row.declined),
        ):
            self.client_outcomes.labels(outcome).inc(count)
        for skipped in row.skipped:
            self.clients_skipped.labels(skip_category(skipped.reason)).inc()
        for client in row.clients:
            if client.outcome == "completed":
                self.transfer_seconds.labels("down").observe(client.down_seconds)
                self.transfer_seconds.labels("up").observe(client.up_seconds)
        generator_s = row.extras.get("generator_seconds")
        if generator_s is not None and math.isfinite(generator_s):
            self.generator_seconds.observe(generator_s)
        if not math.isnan(row.test_accuracy):
            self.test_accuracy.set(row.test_accuracy)
            self.test_loss.set(row.test_loss)

    def count_artifact(self, direction: str, artifact: str, encoding: str, nbytes: int) -> None:
        self.artifact_bytes.labels(direction, artifact, encoding).inc(nbytes)


# Generic in the type stubs only: aliases by name, so nothing subscripts them at run time.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _ended_with(context: Context, err: BaseException | None) -> str:
    """The status code a call ended with: what the handler set or aborted with, else from how it ended."""
    code: object = context.code()  # None until something sets it (the stubs say otherwise)
    if isinstance(code, grpc.StatusCode):
        return code.name
    if err is None:
        return grpc.StatusCode.OK.name
    return (grpc.StatusCode.CANCELLED if isinstance(err, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN).name


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every call to the services under ``prefixes`` (by default every service on the server)
    and counts it by status code. Put it first, so refusals by later interceptors are counted too."""

    def __init__(self, metrics: FederationMetrics, prefixes: tuple[str, ...] = ("/",)) -> None:
        self.metrics = metrics
        self.prefixes = prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(self.prefixes):
            return handler
        return self._timed(handler, method)

    def _timed(self, handler: Handler, method: str) -> Handler:
        service, _, name = method.lstrip("/").rpartition("/")
        kind = _RPC_TYPES[(handler.request_streaming, handler.response_streaming)]
        handled, seconds = self.metrics.rpc_handled, self.metrics.rpc_seconds
        inner: Any = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary

        def done(context: Context, started: float, err: BaseException | None) -> None:
            code = _ended_with(context, err)
            handled.labels(kind, service, name, code).inc()
            seconds.labels(kind, service, name, code).observe(time.monotonic() - started)

        async def unary_response(request: Any, context: Context) -> Any:
            started, err = time.monotonic(), None
            try:
                return await inner(request, context)
            except BaseException as raised:
                err = raised
                raise
            finally:
                done(context, started, err)

        async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
            started, err = time.monotonic(), None
            try:
                async for item in inner(request, context):
                    yield item
            except BaseException as raised:
                err = raised
                raise
            finally:
                done(context, started, err)

        kwargs: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
        return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)


_RPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


class MetricsPortError(OSError):
    """The metrics address cannot be served (taken, or not an address of this machine)."""


@dataclass
class MetricsEndpoint:
    """The HTTP server Prometheus scrapes (``/metrics``), on a thread of its own."""

    server: WSGIServer
    thread: Thread
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(metrics: FederationMetrics, address: str) -> MetricsEndpoint:
    """Starts ``/metrics`` on ``address`` (``host:port``; port 0 picks a free one)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise MetricsPortError(f"metrics.address {address!r} is not host:port (e.g. 127.0.0.1:9464)")
    host = host.strip("[]") or "0.0.0.0"
    try:
        server, thread = start_http_server(int(port_text), addr=host, registry=metrics.registry)
    except OSError as err:
        raise MetricsPortError(
            f"cannot serve metrics on {address} ({err.strerror or err}): is another process on that port? "
            "Set metrics.address to a free port, or leave it unset to serve no metrics"
        ) from err
    port = int(server.server_address[1])
    _LOGGER.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return MetricsEndpoint(server, thread, port)
