"""What each client downloads and uploads this round, in which encoding, and what it cost.

The round's global model and the strategy's artifacts exist in every encoding of their ladders
(content-addressed blobs, made once per round). Each client gets a plan from ``link_policy`` when
it first polls the round's task; the timings of its transfers teach the link estimate for the
next round. Nothing here knows what an artifact is for: the strategy's ``ArtifactSpec`` says how
each kind is re-encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fedgen.coordinator.config import BandwidthConfig
from fedgen.coordinator.ledger import ClientTransfer
from fedgen.coordinator.link_policy import DownloadTiming, LinkEstimator, Rung, Transfer, choose_encodings
from fedgen.coordinator.records import ArtifactRecord
from fedgen.coordinator.store import BlobStore
from fedgen.coordinator.strategy import ArtifactSpec
from fedgen.core.transport import wire_bytes
from fedgen.export.codec import (
    CodecError,
    Encoding,
    State,
    apply_delta,
    bundle_from_bytes,
    bundle_to_bytes,
    decode_state,
    encode_state,
    estimate_encoded_bytes,
    state_delta,
)

_LOGGER = logging.getLogger(__name__)

MODEL, UPLOAD = "model", "upload"
#: Model artifacts whose decoded state the planner remembers (for deltas against them).
MATERIALIZED_KEEP = 4096
_FP32 = Encoding()


@dataclass(frozen=True)
class Variant:
    encoding: Encoding
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.encoding.name


@dataclass
class RoundVariants:
    """The round's model (plain encodings) and each artifact kind, in every encoding the policy may pick."""

    model_sha: str = ""  # the round's model (fp32), which deltas are made from
    model: dict[Encoding, Variant] = field(default_factory=dict)
    artifacts: dict[str, dict[Encoding, Variant]] = field(default_factory=dict)

    def digests(self) -> set[str]:
        variants = [*self.model.values(), *(v for by_encoding in self.artifacts.values() for v in by_encoding.values())]
        return {v.sha256 for v in variants}

    def model_bases(self) -> set[str]:
        """Every artifact a client of this round may have decoded its model from."""
        return {self.model_sha} | {v.sha256 for v in self.model.values()}


@dataclass(frozen=True)
class ClientPlan:
    model: Variant
    artifacts: dict[str, Variant]  # artifact kind -> the variant this client gets
    upload: Encoding
    estimated_down_bps: float
    estimated_up_bps: float
    expected_s: float

    def ledger_transfer(self) -> ClientTransfer:
        return ClientTransfer(
            model_encoding=self.model.name,
            upload_encoding=self.upload.name,
            artifact_encodings={kind: v.name for kind, v in self.artifacts.items()},
            estimated_down_bps=round(self.estimated_down_bps, 1),
            estimated_up_bps=round(self.estimated_up_bps, 1),
            expected_transfer_seconds=round(self.expected_s, 4),
        )


class TransferPlanner:
    def __init__(
        self,
        config: BandwidthConfig,
        blobs: BlobStore,
        tensor_shapes: Mapping[str, tuple[tuple[int, ...], bool]],
        artifact_specs: Sequence[ArtifactSpec] = (),
    ) -> None:
        self.config = config
        self.blobs = blobs
        self.shapes = dict(tensor_shapes)
        self.specs = {spec.kind: spec for spec in artifact_specs}
        self.estimator = LinkEstimator(weight=config.ewma_weight, assumed_bps=config.assumed_link_mbps * 1e6)
        self._upload_sizes: dict[Encoding, int] = {}  # last measured wire size of an upload per encoding
        self._cache: dict[tuple[str, ...], Variant] = {}
        # Model artifact id -> blob of the fp32 state a client holds once it has decoded it.
        self._materialized: dict[str, str] = {}

    @property
    def adaptive(self) -> bool:
        return self.config.policy == "adaptive"

    def _choices(self, ladder: Sequence[Encoding], fixed: Encoding) -> list[Encoding]:
        return list(ladder) if self.adaptive else [fixed]

    # ----------------------------------------------------------- variants
    def _remember(self, artifact_id: str, state: State) -> None:
        """What a client holds after decoding ``artifact_id``, for differences against it later."""
        self._materialized[artifact_id] = self.blobs.put(bundle_to_bytes(encode_state(state, _FP32)))
        while len(self._materialized) > MATERIALIZED_KEEP:
            self._materialized.pop(next(iter(self._materialized)))

    def _model_variant(self, model_sha: str, encoding: Encoding) -> Variant:
        key = (model_sha, encoding.name)
        if key not in self._cache:
            if encoding == _FP32:  # the stored model is already this encoding
                data = self.blobs.get(model_sha)
                self._materialized[model_sha] = model_sha
            else:
                state = decode_state(bundle_from_bytes(self.blobs.get(model_sha)))
                data = bundle_to_bytes(encode_state(state, encoding))
            self._cache[key] = Variant(encoding, self.blobs.put(data), len(data))
            if encoding != _FP32:
                self._remember(self._cache[key].sha256, decode_state(bundle_from_bytes(data)))
        return self._cache[key]

    def delta_variant(self, model_sha: str, held: Sequence[str], encoding: Encoding) -> Variant | None:
        """The round's model as a ``delta-`` encoding: its difference against the first model in
        ``held`` whose decoded state is known here; None when there is none."""
        base_id = next((h for h in held if h in self._materialized), None)
        if base_id is None:
            return None
        key = (model_sha, base_id, encoding.name)
        if key not in self._cache:
            base = decode_state(bundle_from_bytes(self.blobs.get(self._materialized[base_id])))
            target = decode_state(bundle_from_bytes(self.blobs.get(model_sha)))
            data = bundle_to_bytes(encode_state(state_delta(target, base), encoding.plain(), base_sha256=base_id))
            self._cache[key] = Variant(encoding, self.blobs.put(data), len(data))
            self._remember(self._cache[key].sha256, apply_delta(base, decode_state(bundle_from_bytes(data))))
        return self._cache[key]

    def _artifact_variant(self, spec: ArtifactSpec, sha: str, encoding: Encoding) -> Variant:
        key = (sha, encoding.name)
        if key not in self._cache:
            data = self.blobs.get(sha) if encoding == _FP32 else spec.encode(self.blobs.get(sha), encoding)
            self._cache[key] = Variant(encoding, self.blobs.put(data), len(data))
        return self._cache[key]

    def prepare(self, model_sha: str, artifacts: Sequence[ArtifactRecord] = ()) -> RoundVariants:
        """Every encoding the policy may pick this round (blocking: run it in a worker thread)."""
        variants = RoundVariants(model_sha=model_sha)
        for encoding in self._choices(self.config.model_ladder, self.config.model_encoding):
            # A delta is made per client when it polls; its plain encoding is the fallback.
            try:
                variants.model[encoding.plain()] = self._model_variant(model_sha, encoding.plain())
            except CodecError as err:  # e.g. a value beyond float16's range: that rung sits this round out
                _LOGGER.warning("model encoding %s skipped this round: %s", encoding.plain(), err)
        if not variants.model:  # fp32 holds any finite model
            variants.model[_FP32] = self._model_variant(model_sha, _FP32)
        for artifact in artifacts:
            spec = self.specs[artifact.kind]
            made = variants.artifacts[artifact.kind] = {}
            for encoding in self._choices(spec.ladder, spec.fixed):
                if not spec.available(encoding):
                    _LOGGER.warning(
                        "%s encoding %s skipped: this installation cannot make it (for int4: onnx-ir is not installed)",
                        artifact.kind,
                        encoding,
                    )
                    continue
                made[encoding] = self._artifact_variant(spec, artifact.sha256, encoding)
            if not made:
                made[_FP32] = self._artifact_variant(spec, artifact.sha256, _FP32)
        keep = {model_sha, *(a.sha256 for a in artifacts)}
        self._cache = {k: v for k, v in self._cache.items() if k[0] in keep}
        return variants

    def _model_rungs(self, variants: RoundVariants, held: Sequence[str]) -> list[Variant]:
        rungs = []
        for encoding in self._choices(self.config.model_ladder, self.config.model_encoding):
            if encoding.delta:
                try:
                    delta = self.delta_variant(variants.model_sha, held, encoding) if held else None
                except CodecError as err:
                    _LOGGER.warning("model encoding %s skipped for this client: %s", encoding, err)
                    delta = None
                if delta is not None:
                    rungs.append(delta)
                elif not self.adaptive and encoding.plain() in variants.model:  # fixed: the plain one instead
                    rungs.append(variants.model[encoding.plain()])
            elif encoding in variants.model:  # absent: this rung cannot hold this round's model
                rungs.append(variants.model[encoding])
        return rungs or list(variants.model.values())

    # --------------------------------------------------------------- plans
    def _upload_size(self, encoding: Encoding) -> int:
        if encoding in self._upload_sizes:
            return self._upload_sizes[encoding]
        return wire_bytes(estimate_encoded_bytes(self.shapes, encoding))

    def plan(self, client_id: str, variants: RoundVariants, held: Sequence[str] = ()) -> ClientPlan:
        """The client's encodings for this round; ``held``: the models it says it holds decoded."""
        link = self.estimator.link(client_id)
        models = {v.encoding: v for v in self._model_rungs(variants, held)}
        transfers = [Transfer(MODEL, "down", tuple(Rung(v.encoding, v.size) for v in models.values()))]
        transfers += [
            Transfer(kind, "down", tuple(Rung(v.encoding, v.size) for v in by_encoding.values()))
            for kind, by_encoding in variants.artifacts.items()
        ]
        uploads = self._choices(self.config.upload_ladder, self.config.upload_encoding)
        transfers.append(Transfer(UPLOAD, "up", tuple(Rung(e, self._upload_size(e)) for e in uploads)))
        budget = self.config.transfer_budget_s * self.config.budget_headroom if self.adaptive else 0.0
        chosen = choose_encodings(transfers, link, budget)
        if not chosen.fits:
            _LOGGER.warning(
                "%s: even the most compact encodings need %.1fs, over the %.1fs budget",
                client_id,
                chosen.expected_s,
                budget,
            )
        return ClientPlan(
            model=models[chosen.choices[MODEL]],
            artifacts={kind: by_encoding[chosen.choices[kind]] for kind, by_encoding in variants.artifacts.items()},
            upload=chosen.choices[UPLOAD],
            estimated_down_bps=link.down_bps,
            estimated_up_bps=link.up_bps,
            expected_s=chosen.expected_s,
        )

    # ------------------------------------------------------------ learning
    def observe_downloads(self, client_id: str, timings: Iterable[DownloadTiming]) -> float:
        """The client's timed downloads; returns their total seconds."""
        total = 0.0
        for t in timings:
            self.estimator.observe_download(client_id, t)
            total += t.seconds
        return total

    def observe_upload(self, client_id: str, encoding: Encoding, nbytes: int, seconds: float) -> None:
        self.estimator.observe(client_id, "up", nbytes, seconds)
        self._upload_sizes[encoding] = nbytes
