"""Coordinator configuration: pydantic models parsed once, at the entry point.

A bad value is a `ConfigError` whose message names the key (`federation.rounds: ...`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from fedgen.coordinator.peer_limits import PeerLimits
from fedgen.coordinator.robust import AggregatorName, RobustSettings
from fedgen.export.encoding import ONNX_WEIGHT_CODECS, Encoding, EncodingError
from fedgen.export.tensor_codecs import codec_for

StrategyName = Literal["fedavg", "fedprox", "fedgen"]
#: Tokens printed in this project's documentation and examples: anyone can read them, so the
#: coordinator refuses them on any address beyond loopback.
PUBLIC_TOKENS = frozenset({"fedgen-demo-token", "change-me-enrollment-token", "change-me-operator-token"})
DEMO_ENROLLMENT_TOKEN = "fedgen-demo-token"


def default_state_dir() -> str:
    """Where state lives unless the config says otherwise: the user's state folder, never a checkout."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "fedgen" / "coordinator")


def is_loopback_address(address: str) -> bool:
    """Whether a ``host:port`` (or ``unix:`` path) is reachable from this machine only."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


class _Section(BaseModel):
    # No timeout, rate or bound of ours means anything as NaN or infinity: refused at load, by key.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TlsConfig(_Section):
    """TLS for the coordinator's port; with `client_ca_file`, mutual TLS (clients need a certificate)."""

    cert_file: str | None = None  # PEM certificate chain
    key_file: str | None = None  # PEM private key
    client_ca_file: str | None = None  # PEM CA bundle that client certificates must chain to
    # Under mutual TLS: a client's id is its certificate's common name, and its credential counts
    # only on a connection with that certificate (needs TLS to end at the coordinator).
    client_id_from_certificate: bool = False

    @model_validator(mode="after")
    def _check_pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file")
        if self.client_id_from_certificate and self.client_ca_file is None:
            raise ValueError("client_id_from_certificate needs mutual TLS: set client_ca_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path!r} is not a readable file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


#: Room a chunk's message needs besides its bytes (field tags, offsets, digests).
MESSAGE_OVERHEAD_BYTES = 1024


class ServerConfig(_Section):
    address: str = "127.0.0.1:50051"
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    chunk_bytes: int = Field(64 * 1024, ge=1024, le=4 * 1024 * 1024)
    max_update_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Longest a PollTask may be held open.
    max_poll_wait_s: float = Field(20.0, gt=0, le=300)
    # On SIGTERM: NOT_SERVING at once, then calls in flight (uploads included) get this long to finish.
    shutdown_grace_s: float = Field(10.0, ge=0, le=600)
    # A connection that has sent no HTTP/2 or TLS handshake this long is closed: idle raw sockets
    # cannot pile up until the process runs out of file descriptors.
    handshake_timeout_s: float = Field(10.0, gt=0, le=300)
    # A connection with no call in flight this long gets GOAWAY (clients reconnect when they next
    # call; an edge client's long polls keep its own connection busy).
    idle_connection_s: float = Field(300.0, gt=0, le=86_400)
    # Calls one connection may have in flight at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams_per_connection: int = Field(64, ge=1, le=10_000)
    # Calls one client id may have in flight at once, over all its connections (an edge client
    # needs 3: a long poll, a heartbeat, a transfer), and Fleet and Control calls in flight in all.
    # Past either a new call gets RESOURCE_EXHAUSTED with a time to retry.
    max_calls_per_client: int = Field(8, ge=3, le=10_000)
    max_calls_in_flight: int = Field(50_000, ge=16, le=10_000_000)
    # Calls that have arrived but the event loop has not picked up yet (gRPC's server backlog: a
    # burst of Joins from a fleet coming online). Past `max_pending_calls` gRPC refuses new calls
    # (RESOURCE_EXHAUSTED "Too many pending requests" on its newer call path, CANCELLED on the one
    # grpcio 1.85's asyncio server uses, as measured); one left waiting longer than
    # `max_pending_wait_s` is cancelled (CANCELLED). Both mean "try later": clients retry them with
    # backoff and jitter (`fedgen.core.retry`). gRPC's defaults are 1,000 and 30 s.
    max_pending_calls: int = Field(20_000, ge=1, le=1_000_000)
    max_pending_wait_s: int = Field(20, ge=1, le=600)
    # An upload whose next message does not arrive this long is ended (DEADLINE_EXCEEDED) and
    # what it had sent is dropped: a stalled stream cannot hold its buffer.
    upload_idle_s: float = Field(30.0, gt=0, le=3_600)
    # Payload bytes all uploads in flight may declare together (they are written to scratch files
    # under state_dir/incoming as they arrive, not held in memory); past it a new upload gets
    # RESOURCE_EXHAUSTED (the client retries later). One upload per client at a time.
    max_upload_buffer_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # Received payloads checked (decoded, shapes and values verified) at once: each holds its
    # payload and decoded state in memory; the others wait their turn.
    max_concurrent_upload_checks: int = Field(4, ge=1, le=256)
    tls: TlsConfig = TlsConfig()

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        if address.startswith(("unix:", "unix-abstract:")):
            return address
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port with a port in 0-65535 (0: any free port), got {address!r}")
        return address

    @model_validator(mode="after")
    def _chunk_fits_a_message(self) -> ServerConfig:
        if self.chunk_bytes + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) plus {MESSAGE_OVERHEAD_BYTES} bytes of framing must fit "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        return self


class FederationConfig(_Section):
    strategy: StrategyName = "fedgen"
    rounds: int = Field(20, ge=1, le=1_000_000)
    clients_per_round: int = Field(10, ge=1, le=1_000_000)
    # Eligible clients needed before a round opens (defaults to clients_per_round); a round
    # samples min(clients_per_round, eligible) clients.
    min_clients: int | None = Field(None, ge=1, le=1_000_000)
    # Updates needed to commit a round once its deadline passes.
    min_completed: int = Field(1, ge=1)
    round_timeout_s: float = Field(120.0, gt=0)
    # A client whose last call is older than this is not sampled.
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_counts(self) -> FederationConfig:
        if self.min_completed > self.clients_per_round:
            raise ValueError(
                f"min_completed ({self.min_completed}) exceeds clients_per_round ({self.clients_per_round})"
            )
        if self.min_clients is not None and self.min_clients < self.min_completed:
            raise ValueError(f"min_clients ({self.min_clients}) is below min_completed ({self.min_completed})")
        return self

    @property
    def required_clients(self) -> int:
        return self.min_clients or self.clients_per_round


class TrainingConfig(_Section):
    """Local training hyper-parameters sent to clients (FedGen's official MNIST values)."""

    local_steps: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    learning_rate: float = Field(0.01, gt=0, le=10)
    # Per-round decay of the learning rate: lr = learning_rate * lr_decay**round.
    lr_decay: float = Field(0.99, gt=0, le=1)
    proximal_mu: float = Field(0.001, ge=0)


class FedGenConfig(_Section):
    """FedGen's knobs; defaults are the official MNIST RUNCONFIGS (see shared/FEDGEN_FACTS.md)."""

    # Where the generator trains: "auto" = CUDA when torch sees a GPU, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    noise: Literal["uniform", "normal"] = "uniform"
    # "per_sample" = the paper's label weighting; "official" = the official code's broadcast.
    teacher_weighting: Literal["per_sample", "official"] = "per_sample"
    generator_steps: int = Field(50, ge=1, le=100_000)
    generator_batch_size: int = Field(32, ge=2, le=65_536)
    generator_lr: float = Field(3e-4, gt=0, le=1)
    generator_lr_decay: float = Field(0.98, gt=0, le=1)
    generator_weight_decay: float = Field(1e-2, ge=0)
    diversity_eta: float = Field(1.0, ge=0)
    # Client regulariser: coefficient_r = max(1e-4, coefficient_0 * decay**round).
    generative_alpha: float = Field(10.0, ge=0)
    generative_beta: float = Field(10.0, ge=0)
    generative_decay: float = Field(0.98, gt=0, le=1)
    gen_batch_size: int = Field(32, ge=1, le=65_536)
    # The generator's hidden layers and noise size; unset = the task's hint (MNIST: [256] and 32).
    hidden_dims: tuple[Annotated[int, Field(ge=1, le=65_536)], ...] | None = Field(None, min_length=1, max_length=16)
    noise_dim: int | None = Field(None, ge=1, le=65_536)


class RobustConfig(_Section):
    """``[robust]``: bounds on one client's pull on the global model (``robust.py``); all off by
    default, so the figures of the paper's setting stay FedAvg's."""

    aggregator: AggregatorName = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # trimmed-mean: dropped from each end
    byzantine: int = Field(1, ge=0, le=10_000)  # Krum's f: attackers tolerated
    multi_krum_keep: int | None = Field(None, ge=1)  # multi-krum: updates averaged (default n - f)
    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False)  # L2 bound on each update
    cap_weights: bool = False  # weight = min(claimed examples, local steps x batch size)
    # Keep the previous global model when a new one scores this much (absolute) below it.
    max_accuracy_drop: float | None = Field(None, gt=0, le=1)

    def settings(self) -> RobustSettings:
        return RobustSettings(
            self.aggregator, self.trim_fraction, self.byzantine, self.multi_krum_keep, self.clip_norm, self.cap_weights
        )


class TaskConfig(_Section):
    """The model and data being federated (``fedgen.core.task``): a built-in task's name or an
    import path ``package.module:Class``; every client must run the same task and version."""

    name: str = Field("mnist", min_length=1, max_length=300)
    # A model trained before (a .pt state dict or a TensorBundle): round 0 starts from it, checked
    # against the task's state spec at start-up. Used only when the state folder holds no federation.
    warm_start: str | None = None


class DataConfig(_Section):
    # What the task reads its held-out set from: for the image tasks a folder with the standard
    # IDX (or CIFAR-10 binary) test files; "builtin" = the MNIST subset shipped in the package.
    test_data_dir: str = "builtin"
    # Optional: when given, it must equal the task's number of classes (a check, not a setting).
    n_classes: int | None = Field(None, ge=2, le=100_000)
    # Evaluate the global model every this many rounds (and always on the last).
    evaluate_every: int = Field(1, ge=1)


_SHA256_HEX = r"^[0-9a-f]{64}$"


def _parse_encoding(value: object) -> Encoding:
    return value if isinstance(value, Encoding) else Encoding.parse(str(value))


def _model_encoding(value: object) -> Encoding:
    encoding = _parse_encoding(value)
    if codec_for(encoding).fixed_size is False:
        raise EncodingError(f"{encoding.name!r}: top-k is for uploads (deltas), not for the global model")
    return encoding


def _upload_encoding(value: object) -> Encoding:
    encoding = _parse_encoding(value)
    codec_for(encoding)
    if encoding.delta:
        raise EncodingError(f"{encoding.name!r}: an upload other than fp32 is always a delta; drop the delta- prefix")
    return encoding


def _generator_encoding(value: object) -> Encoding:
    encoding = _parse_encoding(value)
    if encoding.codec not in ONNX_WEIGHT_CODECS or encoding.delta:
        raise EncodingError(
            f"{encoding.name!r} is not a generator encoding; valid: "
            f"{', '.join(ONNX_WEIGHT_CODECS)}, each with an optional +zstd"
        )
    return encoding


def _name(encoding: Encoding) -> str:
    return encoding.name


_AS_NAME = PlainSerializer(_name, return_type=str)
ModelEncoding = Annotated[Encoding, PlainValidator(_model_encoding), _AS_NAME]
UploadEncoding = Annotated[Encoding, PlainValidator(_upload_encoding), _AS_NAME]
GeneratorEncoding = Annotated[Encoding, PlainValidator(_generator_encoding), _AS_NAME]


class BandwidthConfig(_Section):
    """How the global model, the generator and the updates travel.

    "fixed": every client gets `model_encoding`, `generator_encoding` and `upload_encoding`.
    "adaptive": per client and round, the most faithful encodings of the three ladders whose
    expected transfer time, from the client's measured link, fits `transfer_budget_s`.
    """

    policy: Literal["fixed", "adaptive"] = "adaptive"
    # Seconds one client may spend moving the round's artifacts and its update (0 = no budget).
    transfer_budget_s: float = Field(30.0, ge=0)
    # Plans must fit this share of the budget: link estimates are noisy, the budget is a promise.
    budget_headroom: float = Field(0.9, gt=0, le=1)
    model_encoding: ModelEncoding = Encoding()
    generator_encoding: GeneratorEncoding = Encoding()
    upload_encoding: UploadEncoding = Encoding()
    # Most faithful first. Uploads other than fp32 are differences against the downloaded model.
    # "delta-<encoding>": the difference against a model the client holds (only offered when it
    # holds one the coordinator can rebuild; otherwise that rung is skipped, or for the fixed
    # policy the plain <encoding> is sent).
    model_ladder: list[ModelEncoding] = Field(
        default_factory=lambda: [Encoding.parse(n) for n in ("fp32+zstd", "fp16+zstd", "delta-int8+zstd", "int8+zstd")],
        min_length=1,
    )
    generator_ladder: list[GeneratorEncoding] = Field(
        default_factory=lambda: [Encoding.parse(n) for n in ("fp32+zstd", "fp16+zstd", "int8+zstd", "int4+zstd")],
        min_length=1,
    )
    upload_ladder: list[UploadEncoding] = Field(
        default_factory=lambda: [Encoding.parse(n) for n in ("fp32", "fp16+zstd", "int8+zstd", "topk10+zstd")],
        min_length=1,
    )
    # Weight of the newest measurement in the per-client throughput estimate (EWMA).
    ewma_weight: float = Field(0.5, gt=0, le=1)
    # Throughput assumed for a client that declared none and has not been measured yet.
    assumed_link_mbps: float = Field(20.0, gt=0)


class AuthConfig(_Section):
    """Who may join and who may operate. Secrets may be given as their sha256 (hex) instead, so
    the config file need not hold them; the coordinator only ever keeps the hashes in memory."""

    # Tokens a device may present to Join. Empty (and no hashes) = no enrollment possible.
    # The default is the demo's published token: refused on any address beyond loopback.
    enrollment_tokens: list[str] = Field(default_factory=lambda: [DEMO_ENROLLMENT_TOKEN])
    enrollment_token_sha256: list[str] = Field(default_factory=list)
    # Token operators send to the Control service; None (and no hash) = Control needs none.
    operator_token: str | None = None
    operator_token_sha256: str | None = Field(None, pattern=_SHA256_HEX)
    # Per-client request rate on Fleet (token bucket): sustained calls per second and burst.
    # Over it: RESOURCE_EXHAUSTED. 0 = no limit.
    client_requests_per_second: float = Field(20.0, ge=0)
    client_burst: int = Field(60, ge=1)
    # A client credential is refused this long after it was issued (the client joins again by
    # itself, with its enrollment token). 0 = credentials never expire.
    credential_ttl_s: float = Field(86_400.0, ge=0)
    # Per peer address (the proxy's, behind one): Joins per second and burst, and wrong secrets
    # per second and burst before its Join and Control calls are refused unchecked. 0 = no limit.
    joins_per_peer_per_second: float = Field(20.0, ge=0)
    join_burst_per_peer: int = Field(200, ge=1)
    failed_auth_per_peer_per_second: float = Field(1.0, ge=0)
    failed_auth_burst_per_peer: int = Field(30, ge=1)
    # Clients that may be registered (not left) at once, and joined clients that have not yet made
    # a call with their credential (only those are ever sampled): past either, Join is refused.
    max_clients: int = Field(100_000, ge=1, le=10_000_000)
    max_unproven_clients: int = Field(1_000, ge=1, le=1_000_000)
    # A client id is bound to its credential; one silent this long may be claimed by a new Join
    # (a device that lost its cache). 0 = never: only its own credential ever rejoins it.
    release_silent_id_s: float = Field(7 * 86_400.0, ge=0)
    # Per-device enrollment: client id -> sha256 (hex) of that device's own token. Such an id joins
    # only with its token (the fleet tokens are not accepted for it). With require_device_tokens,
    # only these ids may join at all.
    device_token_sha256: dict[str, str] = Field(default_factory=dict)
    require_device_tokens: bool = False

    @model_validator(mode="after")
    def _check_tokens(self) -> AuthConfig:
        for token in self.enrollment_tokens:
            if len(token) < 8:
                raise ValueError("every enrollment token must be at least 8 characters")
        for digest in self.enrollment_token_sha256:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"enrollment_token_sha256 entries must be 64 lowercase hex digits (got {digest!r})")
        if self.operator_token is not None and len(self.operator_token) < 8:
            raise ValueError("operator_token must be at least 8 characters")
        if self.operator_token is not None and self.operator_token_sha256 is not None:
            raise ValueError("give operator_token or operator_token_sha256, not both")
        for client_id, digest in self.device_token_sha256.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"device_token_sha256[{client_id!r}] must be 64 lowercase hex digits")
        if self.require_device_tokens and not self.device_token_sha256:
            raise ValueError("require_device_tokens is set but device_token_sha256 names no device")
        return self

    def peer_limits(self) -> PeerLimits:
        return PeerLimits(
            self.joins_per_peer_per_second,
            self.join_burst_per_peer,
            self.failed_auth_per_peer_per_second,
            self.failed_auth_burst_per_peer,
        )

    def enrollment_hashes(self) -> list[str]:
        return [hashlib.sha256(t.encode()).hexdigest() for t in self.enrollment_tokens] + self.enrollment_token_sha256

    def operator_hash(self) -> str | None:
        if self.operator_token is not None:
            return hashlib.sha256(self.operator_token.encode()).hexdigest()
        return self.operator_token_sha256


def check_exposure(address: str, auth: AuthConfig) -> None:
    """Refuses to listen beyond loopback with a token anyone can read in this project's documentation."""
    if is_loopback_address(address):
        return
    public = sorted(PUBLIC_TOKENS & {*auth.enrollment_tokens, auth.operator_token or ""})
    if public:
        raise ValueError(
            f"auth.enrollment_tokens: address {address!r} is reachable beyond this machine, and the "
            f"token(s) {public} are published in this project's documentation: set your own "
            "auth.enrollment_tokens (and auth.operator_token), or listen on 127.0.0.1"
        )
    if auth.operator_hash() is None:
        raise ValueError(
            f"auth.operator_token: address {address!r} is reachable beyond this machine, and without an "
            "operator token anyone who reaches the port may pause or stop the federation: set "
            "auth.operator_token (or operator_token_sha256), or listen on 127.0.0.1"
        )


class RetentionConfig(_Section):
    """What the state folder keeps of past rounds. Clients' updates are the bulk (a cohort of 10 on
    the MNIST CNN: about 1 MB a round); committed models, the ledger and the current round's
    updates are always kept, so every round stays exportable."""

    # Keep the updates of the last this many committed rounds; older ones are deleted after each
    # commit. 0 = keep every update.
    keep_update_rounds: int = Field(0, ge=0, le=1_000_000)


class MetricsConfig(_Section):
    """Prometheus's scrape endpoint (``http://<address>/metrics``); none unless an address is set."""

    # host:port, e.g. "127.0.0.1:9464" (0 picks a free port). Metrics carry no secrets, but say
    # how many clients there are and what they send: bind beyond loopback only on purpose.
    address: str | None = Field(None, min_length=3, max_length=300)


class CoordinatorConfig(_Section):
    # Default: $XDG_STATE_HOME/fedgen/coordinator (~/.local/state/...); "~" is expanded.
    state_dir: str = Field(default_factory=default_state_dir)
    server: ServerConfig = ServerConfig()
    federation: FederationConfig = FederationConfig()
    training: TrainingConfig = TrainingConfig()
    fedgen: FedGenConfig = FedGenConfig()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    auth: AuthConfig = AuthConfig()
    bandwidth: BandwidthConfig = BandwidthConfig()
    robust: RobustConfig = RobustConfig()
    retention: RetentionConfig = RetentionConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _no_public_tokens_beyond_loopback(self) -> CoordinatorConfig:
        check_exposure(self.server.address, self.auth)
        return self

    @model_validator(mode="after")
    def _robust_cohort_can_be_met(self) -> CoordinatorConfig:
        need = self.robust.settings().min_updates()
        if self.federation.min_completed < need:
            raise ValueError(
                f"robust.aggregator {self.robust.aggregator!r} with byzantine = {self.robust.byzantine} "
                f"needs at least {need} updates a round: set federation.min_completed >= {need} "
                f"(it is {self.federation.min_completed})"
            )
        keep = self.robust.multi_krum_keep
        if keep is not None and keep > self.federation.min_completed - self.robust.byzantine:
            raise ValueError(
                f"robust.multi_krum_keep ({keep}) must leave out the {self.robust.byzantine} possible "
                f"attacker(s) of the smallest round (federation.min_completed = {self.federation.min_completed})"
            )
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        message = str(e["msg"]).removeprefix("Value error, ")
        got = "" if isinstance(e.get("input"), dict) or "input" not in e else f" (got {e['input']!r})"
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"{key}: {message}{got}" if key else message + got)
    return "; ".join(lines)


def parse_config(raw: dict[str, Any]) -> CoordinatorConfig:
    try:
        return CoordinatorConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> CoordinatorConfig:
    """Read and validate a TOML config file (None = defaults), with command-line overrides on top."""
    if path is None:
        return parse_config(_merge({}, overrides or {}))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    try:
        return parse_config(_merge(raw, overrides or {}))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
