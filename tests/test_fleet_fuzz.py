"""Property-based fuzzing of every Fleet RPC over a real socket.

One real coordinator process (no edge-client processes). This test process throws random and
mutated bytes at each RPC through raw channels (no serializer, so anything goes on the wire):
pure random bytes (empty, invalid protobuf, up to a bit over `server.max_message_bytes`), bytes
crafted field by field at the protobuf wire level (unknown fields, wrong wire types, 10-byte
negative varints, nested garbage), valid messages from `fedgen.v1.fleet_pb2` with random field
values (unicode and very long strings, huge and boundary integers, NaN/Inf doubles) and byte-level
mutations of valid messages; with a valid credential, none, or garbage metadata.

The property, for every call: it ends within its deadline, either with a well-formed response or
with one of the client-error codes the protocol documents, never UNKNOWN, INTERNAL, UNAVAILABLE
or DEADLINE_EXCEEDED; a call without a valid credential never succeeds, a valid one is never
refused; and a healthy client keeps being served: one Heartbeat on its own channel after every
example, and a thread that heartbeats and long-polls for the whole module, with zero failures.

Four server bugs this fuzzing found are fixed and pinned by the regression tests at the end
(BUG-1 to BUG-4, each described beside its test): malformed protobuf got UNKNOWN/INTERNAL; a NaN
train_seconds got INTERNAL; an update with local_test_total but no local_test_correct crashed the
round engine at commit (and again after every restart); an infinite train_seconds broke GetLedger.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from fedgen.coordinator.config import CoordinatorConfig, parse_config
from fedgen.coordinator.local import LocalFederation
from fedgen.coordinator.servicers import MIN_CHUNK_BYTES
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "fleet-fuzz-enrollment-token"
LIMIT = 1024 * 1024  # server.max_message_bytes
MAX_UPDATE = 512 * 1024  # server.max_update_bytes
CALL_TIMEOUT_S = 20.0  # generous: the machine is shared; the server holds a poll at most 0.25 s
HOLDER_ID = "fuzz-holder-c0ffee"  # the fuzz's own credential
UPLOADER_ID = "fuzz-uploader-9e2a"  # takes real TRAIN tasks and uploads fuzzed updates
HEALTHY_ID = "healthy-sentinel-7f3c"  # must be served throughout
CRED, CID = "{CRED}", "{CID}"  # placeholders in generated metadata, resolved per call
HEX64 = re.compile(r"[0-9a-f]{64}")
S = grpc.StatusCode
ALLOWED = frozenset(
    {
        S.INVALID_ARGUMENT,
        S.UNAUTHENTICATED,
        S.FAILED_PRECONDITION,
        S.NOT_FOUND,
        S.OUT_OF_RANGE,
        S.RESOURCE_EXHAUSTED,
        S.PERMISSION_DENIED,
        S.ALREADY_EXISTS,
    }
)

RPCS: dict[str, tuple[str, Any, Any]] = {
    "Join": ("unary", fleet_pb2.JoinRequest, fleet_pb2.JoinResponse),
    "PollTask": ("unary", fleet_pb2.PollTaskRequest, fleet_pb2.Task),
    "DownloadArtifact": ("server_stream", fleet_pb2.DownloadRequest, fleet_pb2.ArtifactChunk),
    "UploadUpdate": ("client_stream", fleet_pb2.UploadMessage, fleet_pb2.UploadAck),
    "Heartbeat": ("unary", fleet_pb2.HeartbeatRequest, fleet_pb2.HeartbeatResponse),
    "Leave": ("unary", fleet_pb2.LeaveRequest, fleet_pb2.LeaveResponse),
}

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ----------------------------------------------------------------------------- the wire


@dataclass
class Outcome:
    code: grpc.StatusCode  # OK on success
    details: str
    responses: list[bytes]

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details[:300]!r}"


def invoke(
    channel: grpc.Channel,
    rpc: str,
    request: bytes | list[bytes],
    metadata: tuple[tuple[str, str | bytes], ...] = (),
    timeout: float = CALL_TIMEOUT_S,
) -> Outcome:
    """One raw call: bytes in, bytes out, the status whatever it is."""
    kind, _, _ = RPCS[rpc]
    path = f"/fedgen.v1.Fleet/{rpc}"
    try:
        if kind == "unary":
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            out = [call(request, timeout=timeout, metadata=metadata)]
        elif kind == "server_stream":
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            out = list(stream(request, timeout=timeout, metadata=metadata))
        else:
            upload = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
            out = [upload(iter(request), timeout=timeout, metadata=metadata)]
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", [])
    return Outcome(S.OK, "", out)


def _parse(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


@dataclass(frozen=True)
class Client:
    client_id: str
    credential: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.credential)


def join(channel: grpc.Channel, client_id: str) -> Client:
    reply = fleet_pb2_grpc.FleetStub(channel).Join(
        fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=client_id), timeout=CALL_TIMEOUT_S
    )
    return Client(reply.client_id, reply.credential)


def heartbeat(channel: grpc.Channel, client: Client) -> Outcome:
    return invoke(channel, "Heartbeat", fleet_pb2.HeartbeatRequest().SerializeToString(), client.md)


def next_task(channel: grpc.Channel, client: Client, polls: int = 400) -> fleet_pb2.TrainTask:
    """Long-polls (0.25 s each, server-capped) until the engine samples `client`."""
    stub = fleet_pb2_grpc.FleetStub(channel)
    for _ in range(polls):
        task = stub.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=250), timeout=CALL_TIMEOUT_S, metadata=client.md)
        if task.HasField("train"):
            return task.train
    raise AssertionError(f"{client.client_id} was not sampled in {polls} polls: is the round engine still running?")


def download(channel: grpc.Channel, client: Client, artifact_id: str) -> bytes:
    req = fleet_pb2.DownloadRequest(artifact_id=artifact_id).SerializeToString()
    out = invoke(channel, "DownloadArtifact", req, client.md)
    assert out.code == S.OK, out
    return b"".join(fleet_pb2.ArtifactChunk.FromString(c).data for c in out.responses)


def upload_messages(header: fleet_pb2.UpdateHeader, payload: bytes, chunk: int = 65536) -> list[bytes]:
    msgs = [fleet_pb2.UploadMessage(header=header)]
    msgs += [fleet_pb2.UploadMessage(chunk=payload[i : i + chunk]) for i in range(0, len(payload), chunk)]
    return [m.SerializeToString() for m in msgs]


def valid_header(task: fleet_pb2.TrainTask, payload: bytes, key: str, **fields: Any) -> fleet_pb2.UpdateHeader:
    values: dict[str, Any] = {
        "round": task.round,
        "task_id": task.task_id,
        "idempotency_key": key,
        "num_examples": 100,
        "label_counts": [10] * 10,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "train_seconds": 1.5,
    }
    values.update(fields)
    return fleet_pb2.UpdateHeader(**values)


_KEYS = itertools.count()


def fresh_key(prefix: str) -> str:
    return f"{prefix}-{next(_KEYS)}"


# ----------------------------------------------------------------------------- the coordinator


def fuzz_config(work: Path) -> CoordinatorConfig:
    return parse_config(
        {
            "state_dir": str(work / "state"),
            # A poll is held at most 0.25 s, so no call of this test may legitimately run into its deadline.
            "server": {
                "address": "127.0.0.1:0",
                "max_message_bytes": LIMIT,
                "max_update_bytes": MAX_UPDATE,
                "max_poll_wait_s": 0.25,
            },
            # Rounds of one client that time out fast: the engine keeps opening rounds while we fuzz,
            # and clients that stop calling drop out of the sample after 2 s.
            "federation": {
                "strategy": "fedavg",
                "rounds": 1000,
                "clients_per_round": 1,
                "min_clients": 1,
                "min_completed": 1,
                "round_timeout_s": 0.3,
                "heartbeat_timeout_s": 2.0,
                "seed": 11,
            },
            "data": {"test_data_dir": "builtin", "evaluate_every": 1000},
            # The fuzz sends hundreds of calls a second under one identity by design; the per-client
            # rate limit (on, but far above that) is not what it is about. The healthy clients stay
            # under the default 20/s anyway. The per-peer budgets (a peer sending wrong secrets is
            # locked out) are off too: here every fuzzed call must reach its own checks (they are
            # tested in test_hostile_fleet).
            "auth": {
                "enrollment_tokens": [TOKEN],
                "client_requests_per_second": 1000.0,
                "client_burst": 1000,
                "failed_auth_per_peer_per_second": 0,
                "joins_per_peer_per_second": 0,
            },
        }
    )


def fuzz_channel(address: str) -> grpc.Channel:
    # Sends up to 16x the server's limit, so oversized messages reach the server and it must refuse them.
    return grpc.insecure_channel(address, channel_options(16 * LIMIT))


class HealthyLoop(threading.Thread):
    """A well-behaved client on its own channel: Heartbeat, then a short PollTask, over and over."""

    def __init__(self, address: str, client: Client) -> None:
        super().__init__(name="healthy-client", daemon=True)
        self.address, self.client = address, client
        self.stopping = threading.Event()
        self.calls = 0
        self.failures: list[str] = []

    def run(self) -> None:
        channel = grpc.insecure_channel(self.address, channel_options())
        stub = fleet_pb2_grpc.FleetStub(channel)
        try:
            while not self.stopping.is_set():
                try:
                    stub.Heartbeat(
                        fleet_pb2.HeartbeatRequest(busy=False), timeout=CALL_TIMEOUT_S, metadata=self.client.md
                    )
                    task = stub.PollTask(
                        fleet_pb2.PollTaskRequest(max_wait_ms=50), timeout=CALL_TIMEOUT_S, metadata=self.client.md
                    )
                    if task.WhichOneof("kind") not in ("train", "wait"):
                        self.failures.append(f"PollTask answered {task!r}")
                    self.calls += 2
                except grpc.RpcError as err:
                    self.failures.append(f"{err.code().name}: {err.details()}")
                self.stopping.wait(0.25)  # 8 calls a second: well inside the default rate limit
        finally:
            channel.close()


@dataclass
class Fleet:
    fed: LocalFederation
    channel: grpc.Channel  # the fuzz traffic
    probe_channel: grpc.Channel  # the healthy client's per-example Heartbeat
    holder: Client
    uploader: Client
    healthy: Client
    model_id: str
    model: bytes
    loop: HealthyLoop
    throwaways: Iterator[int] = field(default_factory=itertools.count)

    def assert_serving(self) -> None:
        out = heartbeat(self.probe_channel, self.healthy)
        assert out.code == S.OK, f"the healthy client's Heartbeat failed: {out}"
        assert not self.loop.failures, f"the healthy client thread was disturbed: {self.loop.failures[:5]}"
        assert self.fed.coordinator_proc is not None and self.fed.coordinator_proc.poll() is None, (
            "the coordinator process exited"
        )

    def throwaway(self) -> Client:
        return join(self.channel, f"fuzz-leaver-{next(self.throwaways)}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet-fuzz")
    with LocalFederation(fuzz_config(work), [], work) as fed:
        fed.start_coordinator()
        channel, probe_channel = fuzz_channel(fed.address), grpc.insecure_channel(fed.address, channel_options())
        # Alone in the federation, the holder is sampled for round 0: learn the model artifact.
        holder = join(channel, HOLDER_ID)
        task = next_task(channel, holder)
        model = download(channel, holder, task.global_model.artifact_id)
        assert hashlib.sha256(model).hexdigest() == task.global_model.artifact_id
        healthy = join(probe_channel, HEALTHY_ID)
        loop = HealthyLoop(fed.address, healthy)
        loop.start()
        fleet = Fleet(
            fed,
            channel,
            probe_channel,
            holder,
            join(channel, UPLOADER_ID),
            healthy,
            task.global_model.artifact_id,
            model,
            loop,
        )
        try:
            yield fleet
        finally:
            loop.stopping.set()
            loop.join(timeout=CALL_TIMEOUT_S + 5)
            channel.close()
            probe_channel.close()


# ----------------------------------------------------------------------------- strategies


def weighted(**branches: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """one_of with integer weights (the first branch is the one Hypothesis shrinks towards)."""
    names = [name for name, (weight, _) in branches.items() for _ in range(weight)]
    return st.sampled_from(names).flatmap(lambda name: branches[name][1])


def uint(bits: int) -> st.SearchStrategy[int]:
    top = 2**bits - 1
    return st.one_of(st.integers(0, 300), st.sampled_from([0, 1, top // 2, top // 2 + 1, top]), st.integers(0, top))


def _repeat(unit: str | bytes, n: int) -> Any:
    return (unit * (n // len(unit) + 1))[:n]


short_text = st.text(max_size=40)
# Up to a bit over the message limit (in characters: up to 4x that in UTF-8 bytes).
long_text = st.builds(
    _repeat, st.text(min_size=1, max_size=3), st.sampled_from([300, 5000, 70_000, LIMIT // 4 + 10, LIMIT + 64])
)
special_text = st.sampled_from(
    [
        "",
        "\x00",
        "\x00" * 64,
        "🙂" * 17,
        "../../etc/passwd",
        "a" * 64,
        "é" * 64,
        "Bearer x",
        "%s%n",
        "\u202e\ufeff",
        "0" * 64,
        "f" * 65,
    ]
)
text_field = st.one_of(short_text, special_text, long_text)
huge_bytes = st.builds(
    _repeat, st.binary(min_size=1, max_size=8), st.sampled_from([LIMIT - 64, LIMIT - 5, LIMIT, LIMIT + 1, LIMIT + 4096])
)
raw_bytes = st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=64, max_size=2048), huge_bytes)


def _varint(n: int) -> bytes:
    n &= 2**64 - 1  # negative -> the 10-byte two's complement encoding
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


field_numbers = st.one_of(st.integers(1, 9), st.integers(1, 2**29 - 1))
scalar_field = st.one_of(
    st.builds(
        lambda n, v: _key(n, 0) + _varint(v),
        field_numbers,
        st.one_of(st.integers(0, 300), st.integers(-(2**63), -1), st.integers(0, 2**64 - 1)),
    ),
    st.builds(lambda n, v: _key(n, 1) + struct.pack("<Q", v), field_numbers, st.integers(0, 2**64 - 1)),
    st.builds(
        lambda n, v: _key(n, 2) + _varint(len(v)) + v,
        field_numbers,
        st.one_of(st.binary(max_size=32), st.text(max_size=16).map(str.encode)),
    ),
    st.builds(lambda n, v: _key(n, 5) + struct.pack("<I", v), field_numbers, st.integers(0, 2**32 - 1)),
)
# Protobuf built field by field: unknown fields, wrong wire types, nested messages of garbage.
wire_crafted = st.recursive(
    st.lists(scalar_field, max_size=5).map(b"".join),
    lambda inner: st.lists(
        st.one_of(scalar_field, st.builds(lambda n, v: _key(n, 2) + _varint(len(v)) + v, field_numbers, inner)),
        max_size=5,
    ).map(b"".join),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid serialized message with 1-4 byte-level edits."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[pos % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos % len(data)] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


tokens = st.one_of(st.just(TOKEN), text_field, st.sampled_from([TOKEN + "x", TOKEN[:-1], TOKEN.upper(), " " + TOKEN]))
requested_ids = st.one_of(
    st.just(""),
    text_field,
    st.from_regex(r"fz-[A-Za-z0-9._-]{1,40}", fullmatch=True),
    st.sampled_from(["fz-" + "a" * 61, "fz-" + "a" * 62, ".", "..", "-", "fz/x", "fz x"]),
)
profiles = st.builds(
    fleet_pb2.DeviceProfile,
    memory_budget_mb=uint(32),
    link_down_bps=uint(64),
    link_up_bps=uint(64),
    supported_encodings=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
    platform=text_field,
    num_examples=uint(64),
)
metric_keys = st.one_of(st.sampled_from(["loss", "accuracy", "regulariser", "local_test_correct"]), short_text)
headers = st.builds(
    fleet_pb2.UpdateHeader,
    round=uint(64),
    task_id=text_field,
    idempotency_key=st.one_of(st.just(""), short_text, st.just("k" * 129)),
    num_examples=uint(64),
    label_counts=st.lists(uint(64), max_size=12),
    payload_bytes=uint(64),
    payload_sha256=st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), text_field),
    metrics=st.dictionaries(metric_keys, st.floats(), max_size=4),
    train_seconds=st.floats(),
)
upload_message = st.one_of(
    st.builds(fleet_pb2.UploadMessage, header=headers),
    st.builds(fleet_pb2.UploadMessage, chunk=st.one_of(st.binary(max_size=256), huge_bytes)),
    st.just(fleet_pb2.UploadMessage()),  # neither header nor chunk
)


@st.composite
def download_requests(draw: st.DrawFn, model_id: str, size: int) -> fleet_pb2.DownloadRequest:
    artifact_id = draw(
        weighted(
            model=(3, st.just(model_id)),
            hex=(1, st.text("0123456789abcdef", min_size=64, max_size=64)),
            text=(1, text_field),
            near=(
                1,
                st.sampled_from(
                    [
                        model_id.upper(),
                        model_id[:-1],
                        model_id + "0",
                        " " + model_id[1:],
                        TRAVERSAL_MISSING,
                        TRAVERSAL_FILE,
                        TRAVERSAL_DIR,
                    ]
                ),
            ),
        )
    )
    offset = draw(
        st.one_of(st.integers(0, size + 2), uint(64), st.sampled_from([size - 1, size, size + 1, 2**63, 2**64 - 1]))
    )
    max_chunk = draw(st.one_of(st.just(0), st.integers(1024, 2**32 - 1), st.integers(1, 1023)))
    if 0 < max_chunk < 1024 and offset < size:
        # Tiny chunks are served (one message per max_chunk bytes): keep such streams short.
        offset = max(offset, size - 64 * max_chunk)
    return fleet_pb2.DownloadRequest(artifact_id=artifact_id, offset=offset, max_chunk_bytes=max_chunk)


def valid_messages(rpc: str, model_id: str, size: int) -> st.SearchStrategy[Any]:
    if rpc == "Join":
        return st.builds(
            fleet_pb2.JoinRequest,
            enrollment_token=tokens,
            profile=st.none() | profiles,
            requested_client_id=requested_ids,
        )
    if rpc == "PollTask":
        return st.builds(fleet_pb2.PollTaskRequest, max_wait_ms=st.one_of(st.integers(0, 200), uint(32)))
    if rpc == "DownloadArtifact":
        return download_requests(model_id, size)
    if rpc == "UploadUpdate":
        return upload_message
    if rpc == "Heartbeat":
        return st.builds(fleet_pb2.HeartbeatRequest, busy=st.booleans())
    assert rpc == "Leave"
    return st.builds(fleet_pb2.LeaveRequest, reason=text_field)


@functools.cache
def request_strategy(rpc: str, model_id: str, size: int) -> st.SearchStrategy[bytes | list[bytes]]:
    valid = valid_messages(rpc, model_id, size).map(lambda m: m.SerializeToString())
    one = weighted(valid=(3, valid), mutated=(2, mutated(valid)), crafted=(1, wire_crafted), raw=(1, raw_bytes))
    return st.lists(one, max_size=4) if rpc == "UploadUpdate" else one


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
auth_values = st.one_of(
    st.just(f"Bearer {CRED}"),
    printable,
    printable.map(lambda s: "Bearer " + s),
    st.sampled_from(
        [
            f"bearer {CRED}",
            "Bearer",
            "Bearer ",
            f"Bearer  {CRED}  ",
            f"Bearer {CID}.",
            f"Bearer {CID}.wrong-secret",
            f"Bearer {CRED}x",
            f"Basic {CRED}",
            f"Bearer .{CRED}",
            f"Bearer {CID}",
            f"Bearer {CRED}.{CRED}",
            "Bearer healthy-sentinel-7f3c.guess",
        ]
    ),
    # Past gRPC's 8 KiB soft and 16 KiB hard metadata limits.
    st.sampled_from([4000, 9000, 17_000]).map(lambda n: "Bearer " + "a" * n),
)
metadata_entry = st.one_of(
    st.tuples(st.just("authorization"), auth_values),
    st.tuples(
        st.one_of(
            st.sampled_from(["x-client-id", "cookie", "x-forwarded-for", "authorization"]),
            st.from_regex(r"x-[a-z0-9_.-]{0,15}", fullmatch=True),
        ),
        printable,
    ),
    st.tuples(
        st.one_of(st.just("authorization-bin"), st.from_regex(r"x-[a-z0-9]{1,8}-bin", fullmatch=True)),
        st.binary(max_size=32),
    ),
)
metadata_templates = weighted(
    valid=(2, st.just((("authorization", f"Bearer {CRED}"),))),
    none=(1, st.just(())),
    garbage=(1, st.lists(metadata_entry, min_size=1, max_size=4).map(tuple)),
)


def resolve(template: tuple[tuple[str, Any], ...], client: Client) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, v.replace(CRED, client.credential).replace(CID, client.client_id) if isinstance(v, str) else v)
        for k, v in template
    )


def authorized(metadata: tuple[tuple[str, Any], ...], client: Client) -> bool:
    """What the protocol says: the first `authorization: Bearer <secret>` entry carries the credential."""
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip() == client.credential
    return False


# ----------------------------------------------------------------------------- the property

# Artifact ids of 64 characters, like a sha256, that resolve outside the blob store through
# `BlobStore.path(id)` = `blobs/<id[:2]>/<id>` (which now accepts only lowercase hex).
TRAVERSAL_FILE = "../" + "./" * 21 + "state/state.sqlite3"  # -> <work>/state/state.sqlite3 (exists)
TRAVERSAL_DIR = "../" + "./" * 28 + "state"  # -> <work>/state (a directory)
TRAVERSAL_MISSING = "../" + "./" * 21 + "state/nothing.there"  # -> does not exist: NOT_FOUND
assert len(TRAVERSAL_FILE) == len(TRAVERSAL_DIR) == len(TRAVERSAL_MISSING) == 64

BUG_1 = (
    "BUG-1: a request that is not valid protobuf gets UNKNOWN ('Unexpected DecodeError: Error parsing "
    "message') instead of INVALID_ARGUMENT on every unary/server-streaming Fleet RPC, before any "
    "authentication (the interceptor's refusal handler keeps the real deserializer); on UploadUpdate it "
    "gets INTERNAL"
)
BUG_2 = (
    "BUG-2: an update with train_seconds=NaN gets INTERNAL (sqlite3.IntegrityError 'NOT NULL constraint "
    "failed: updates.train_seconds': SQLite stores NaN as NULL) instead of INVALID_ARGUMENT"
)
BUG_3 = (
    "BUG-3: an accepted update whose metrics have a non-zero 'local_test_total' and no 'local_test_correct' "
    "crashes the round engine at commit (TypeError in Federation._ledger_row): the coordinator exits, "
    "every client gets UNAVAILABLE, and a restart on the same state recovers the round with that "
    "acknowledged update and crashes again"
)
BUG_4 = (
    "BUG-4: an update with train_seconds=+/-Inf is accepted; its ledger row then breaks Control.GetLedger "
    "(INTERNAL, json_format.ParseError 'Couldn't parse Infinity' in wire.ledger_row_to_proto) for good"
)


def check_response(fleet: Fleet, rpc: str, request: bytes | list[bytes], out: Outcome) -> None:
    """A successful call's responses are well-formed messages that answer the request."""
    _, req_cls, resp_cls = RPCS[rpc]
    responses = [resp_cls.FromString(r) for r in out.responses]  # DecodeError = malformed response
    if rpc == "DownloadArtifact":
        req = req_cls.FromString(request)
        data = b"".join(c.data for c in responses)
        offset = req.offset
        for chunk in responses:
            assert chunk.artifact_id == req.artifact_id and chunk.offset == offset, chunk
            # The server keeps a client's chunk size between 1 KiB and its own (DownloadRequest docs).
            assert not req.max_chunk_bytes or len(chunk.data) <= max(MIN_CHUNK_BYTES, req.max_chunk_bytes)
            offset += len(chunk.data)
        total = responses[0].total_size if responses else offset
        assert all(c.total_size == total for c in responses) and offset == total, (offset, total)
        if req.artifact_id == fleet.model_id:
            assert data == fleet.model[req.offset :]
        elif req.offset == 0:
            assert hashlib.sha256(data).hexdigest() == req.artifact_id
        return
    assert len(responses) == 1
    (resp,) = responses
    if rpc == "Join":
        req = req_cls.FromString(request)
        assert req.enrollment_token == TOKEN, f"Join with token {req.enrollment_token[:80]!r} succeeded"
        if req.requested_client_id:
            assert resp.client_id == req.requested_client_id
        assert resp.client_id and resp.credential.startswith(resp.client_id + ".")
        assert resp.heartbeat_interval_ms > 0 and resp.federation_id
        assert heartbeat(fleet.channel, Client(resp.client_id, resp.credential)).code == S.OK
    elif rpc == "PollTask":
        kind = resp.WhichOneof("kind")
        assert kind in ("train", "wait"), resp
        if kind == "train":
            assert resp.train.task_id and HEX64.fullmatch(resp.train.global_model.artifact_id)
            assert resp.train.global_model.size_bytes > 0 and resp.train.config.strategy == "fedavg"
    elif rpc == "UploadUpdate":
        assert resp.accepted and resp.received_bytes > 0, resp


def fuzz_call(fleet: Fleet, rpc: str, request: bytes | list[bytes], template: tuple[tuple[str, Any], ...]) -> None:
    # Leave with a valid credential ends it: each Leave gets a client of its own.
    client = fleet.throwaway() if rpc == "Leave" else fleet.holder
    metadata = resolve(template, client)
    out = invoke(fleet.channel, rpc, request, metadata)
    note(f"{rpc} answered {out}")
    event(f"{rpc} -> {out.code.name}")
    if out.code != S.OK:
        assert out.code in ALLOWED, f"{rpc} answered {out}"
    else:
        check_response(fleet, rpc, request, out)
    if rpc != "Join":
        if out.code == S.OK:
            assert authorized(metadata, client), f"{rpc} succeeded without a valid credential: {metadata!r}"
        if template == (("authorization", f"Bearer {CRED}"),):
            assert out.code != S.UNAUTHENTICATED, f"{rpc} refused a valid credential: {out}"
    if rpc == "Leave" and out.code == S.OK:
        after = heartbeat(fleet.channel, client)
        assert after.code == S.UNAUTHENTICATED, f"a credential still works after Leave: {after}"
    fleet.assert_serving()


@pytest.mark.parametrize("rpc", list(RPCS))
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_every_fleet_rpc_answers_random_and_mutated_input_with_a_proper_status(
    fleet: Fleet, rpc: str, data: st.DataObject
) -> None:
    request = data.draw(request_strategy(rpc, fleet.model_id, len(fleet.model)), label="request")
    template = data.draw(metadata_templates, label="metadata")
    fuzz_call(fleet, rpc, request, template)


@st.composite
def real_uploads(draw: st.DrawFn, model: bytes) -> tuple[dict[str, Any], bytes, int, list[bytes]]:
    """Header overrides, payload, chunk size and trailing messages for an upload against a real task."""
    payload = draw(st.one_of(st.just(model), mutated(st.just(model)), st.binary(max_size=512)), label="payload")
    sha = hashlib.sha256(payload).hexdigest()
    overrides: dict[str, Any] = {}
    options = {
        "round": uint(64),
        "task_id": text_field,
        "idempotency_key": st.sampled_from(["", "k" * 129, "deep-reused-key"]),
        "num_examples": st.one_of(st.integers(1, 10**6), st.sampled_from([0, 10**8, 10**8 + 1, 2**63, 2**64 - 1])),
        "label_counts": st.lists(uint(64), max_size=12),
        "payload_bytes": st.one_of(uint(64), st.sampled_from([max(0, len(payload) - 1), len(payload) + 1])),
        "payload_sha256": st.one_of(st.sampled_from([sha.upper(), sha[:-1], "0" * 64]), text_field),
        "metrics": st.dictionaries(metric_keys, st.floats(), max_size=4),
        "train_seconds": st.floats(),
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True), label="mutated fields"):
        overrides[name] = draw(options[name], label=name)
    chunk = draw(st.sampled_from([1024, 65536, LIMIT - 64]), label="chunk size")
    trailing = draw(st.lists(upload_message.map(lambda m: m.SerializeToString()), max_size=2), label="trailing")
    return overrides, payload, chunk, trailing


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_uploads_against_a_real_task_answer_with_a_proper_status(fleet: Fleet, data: st.DataObject) -> None:
    """The uploader takes a real TRAIN task, so fuzzed headers and payloads get past the round and task
    checks into validation (and, when valid, into aggregation and commit)."""
    overrides, payload, chunk, trailing = data.draw(real_uploads(fleet.model), label="upload")
    task = next_task(fleet.channel, fleet.uploader)
    header = valid_header(task, payload, fresh_key("deep"), **overrides)
    request = upload_messages(header, payload, chunk) + trailing
    out = invoke(fleet.channel, "UploadUpdate", request, fleet.uploader.md)
    note(f"UploadUpdate answered {out}")
    event(f"real task upload -> {out.code.name}")
    if out.code != S.OK:
        assert out.code in ALLOWED, f"UploadUpdate answered {out}"
    else:
        ack = fleet_pb2.UploadAck.FromString(out.responses[0])
        assert ack.accepted and ack.received_bytes > 0, ack
        assert ack.duplicate or ack.round == task.round, ack
    fleet.assert_serving()


# ----------------------------------------------------------------------------- bugs this fuzzing found (fixed), pinned

UNDECODABLE = b"\xff\xff\xff"  # an unterminated varint: not a valid encoding of any message


@pytest.mark.parametrize("rpc", list(RPCS))
def test_undecodable_request_is_invalid_argument(fleet: Fleet, rpc: str) -> None:
    request: bytes | list[bytes] = [UNDECODABLE] if rpc == "UploadUpdate" else UNDECODABLE
    out = invoke(fleet.channel, rpc, request, fleet.holder.md)
    fleet.assert_serving()
    assert out.code == S.INVALID_ARGUMENT, f"{rpc}({UNDECODABLE!r}) answered {out}"


@pytest.mark.parametrize(
    "artifact_id",
    [
        pytest.param(TRAVERSAL_FILE, id="file-outside-blobs"),
        pytest.param(TRAVERSAL_DIR, id="directory-outside-blobs"),
        pytest.param(TRAVERSAL_MISSING, id="missing-outside-blobs"),
    ],
)
def test_artifact_id_outside_the_blob_store_is_not_found(fleet: Fleet, artifact_id: str) -> None:
    """Ids of 64 characters, like a sha256, that walk out of the blob store. Before 64de727 the first two
    got UNKNOWN ('blob ... is corrupt on disk', IsADirectoryError) and the third NOT_FOUND: an oracle
    for which files exist on the server. A regression test since."""
    req = fleet_pb2.DownloadRequest(artifact_id=artifact_id).SerializeToString()
    out = invoke(fleet.channel, "DownloadArtifact", req, fleet.holder.md)
    fleet.assert_serving()
    assert out.code in (S.NOT_FOUND, S.INVALID_ARGUMENT), f"DownloadArtifact({artifact_id!r}) answered {out}"


def test_nan_train_seconds_is_invalid_argument(fleet: Fleet) -> None:
    for _ in range(5):  # a task whose round closed before the upload arrived is retried
        task = next_task(fleet.channel, fleet.uploader)
        header = valid_header(task, fleet.model, fresh_key("nan"), train_seconds=math.nan)
        out = invoke(fleet.channel, "UploadUpdate", upload_messages(header, fleet.model), fleet.uploader.md)
        fleet.assert_serving()
        if out.code != S.FAILED_PRECONDITION:
            break
    assert out.code == S.INVALID_ARGUMENT, f"UploadUpdate(train_seconds=nan) answered {out}"


@pytest.fixture
def sacrificial(tmp_path: Path) -> Iterator[tuple[LocalFederation, grpc.Channel, Client]]:
    """A coordinator of its own, for the bugs that break a coordinator for good."""
    with LocalFederation(fuzz_config(tmp_path), [], tmp_path) as fed:
        fed.start_coordinator()
        channel = fuzz_channel(fed.address)
        try:
            yield fed, channel, join(channel, "sacrificial-client")
        finally:
            channel.close()


def _accepted_upload(channel: grpc.Channel, client: Client, **fields: Any) -> tuple[fleet_pb2.TrainTask, Outcome]:
    model = b""
    for _ in range(5):
        task = next_task(channel, client)
        model = model or download(channel, client, task.global_model.artifact_id)
        header = valid_header(task, model, fresh_key("sacrificial"), **fields)
        out = invoke(channel, "UploadUpdate", upload_messages(header, model), client.md)
        if out.code != S.FAILED_PRECONDITION:
            return task, out
    return task, out


def _wait_committed(channel: grpc.Channel, client: Client, round_: int) -> None:
    stub = fleet_pb2_grpc.FleetStub(channel)
    for _ in range(200):
        hb = stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=CALL_TIMEOUT_S, metadata=client.md)
        if hb.current_round > round_:
            return
        stub.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=250), timeout=CALL_TIMEOUT_S, metadata=client.md)
    raise AssertionError(f"round {round_} was not committed")


def test_local_test_total_without_correct_does_not_stop_the_federation(
    sacrificial: tuple[LocalFederation, grpc.Channel, Client],
) -> None:
    fed, channel, client = sacrificial
    task, out = _accepted_upload(channel, client, metrics={"local_test_total": 10.0})
    assert out.code in (S.OK, S.INVALID_ARGUMENT), out
    if out.code == S.OK:
        _wait_committed(channel, client, task.round)  # UNAVAILABLE here: the coordinator process died
    assert heartbeat(channel, client).code == S.OK
    assert fed.coordinator_proc is not None and fed.coordinator_proc.poll() is None


def test_infinite_train_seconds_does_not_break_the_ledger(
    sacrificial: tuple[LocalFederation, grpc.Channel, Client],
) -> None:
    _, channel, client = sacrificial
    task, out = _accepted_upload(channel, client, train_seconds=math.inf)
    assert out.code == S.INVALID_ARGUMENT and "train_seconds must be finite" in out.details, out
    # The client corrects itself within the round: that update is accepted and the round commits.
    task, out = _accepted_upload(channel, client, train_seconds=2.5)
    assert out.code == S.OK, out
    _wait_committed(channel, client, task.round)
    control = control_pb2_grpc.ControlStub(channel)
    try:
        rows = control.GetLedger(control_pb2.GetLedgerRequest(), timeout=CALL_TIMEOUT_S).rows
    except grpc.RpcError as err:
        raise AssertionError(f"GetLedger answered {err.code().name}: {err.details()}") from None
    (entry,) = [c for r in rows if r.round == task.round for c in r.clients if c.client_id == client.client_id]
    assert entry.outcome == "completed" and entry.train_seconds == 2.5
    assert all(math.isfinite(r.round_seconds) and math.isfinite(r.wait_seconds) for r in rows)


# ----------------------------------------------------------------------------- the healthy client


def test_the_healthy_client_was_served_throughout(fleet: Fleet) -> None:
    fleet.assert_serving()
    assert fleet.loop.is_alive() and fleet.loop.calls > 0, fleet.loop.calls
    assert fleet.loop.failures == []
    # The round engine is still running: the uploader is sampled again.
    assert next_task(fleet.channel, fleet.uploader).task_id
