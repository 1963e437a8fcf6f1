"""What each client downloads and uploads this round, in which encoding, and what it cost.

The round's global model and generator exist in every encoding of their ladders (content-
addressed blobs, made once per round). Each client gets a plan from ``link_policy`` when it
first polls the round's task; the timings of its transfers teach the link estimate for the
next round. Only this module and ``link_policy`` know about encodings on the server side.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from coordinator.config import BandwidthConfig
from coordinator.link_policy import DownloadTiming, EncodingPlan, LinkEstimator, Rung, Transfer, choose_encodings
from coordinator.store import BlobStore
from export.codec import (EncodingSpec, apply_delta, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state,
                          estimate_encoded_bytes, state_delta)
from fedcore.transport import wire_bytes

_LOGGER = logging.getLogger(__name__)

MODEL, GENERATOR, UPLOAD = "model", "generator", "upload"
DELTA = "delta-"
#: Model artifacts whose decoded state the planner remembers (for deltas against them).
MATERIALIZED_KEEP = 4096


@dataclass(frozen=True)
class Variant:
    name: str
    sha256: str
    size: int


@dataclass
class RoundVariants:
    """The round's artifacts in each encoding: model (name -> Variant) and generator likewise."""

    model: dict[str, Variant] = field(default_factory=dict)
    generator: dict[str, Variant] = field(default_factory=dict)
    model_sha: str = ""  # the round's model (fp32), which deltas are made from

    def digests(self) -> set[str]:
        return {v.sha256 for v in [*self.model.values(), *self.generator.values()]}


@dataclass(frozen=True)
class ClientPlan:
    model: Variant
    generator: Variant | None
    upload_encoding: str
    estimated_down_bps: float
    estimated_up_bps: float
    expected_s: float

    def ledger_fields(self) -> dict[str, Any]:
        return {
            "model_encoding": self.model.name,
            "generator_encoding": self.generator.name if self.generator else "",
            "upload_encoding": self.upload_encoding,
            "estimated_down_bps": round(self.estimated_down_bps, 1),
            "estimated_up_bps": round(self.estimated_up_bps, 1),
            "expected_transfer_seconds": round(self.expected_s, 4),
        }


class TransferPlanner:
    def __init__(self, config: BandwidthConfig, blobs: BlobStore,
                 tensor_shapes: dict[str, tuple[tuple[int, ...], bool]]) -> None:
        self.config = config
        self.blobs = blobs
        self.shapes = tensor_shapes
        self.estimator = LinkEstimator(weight=config.ewma_weight, assumed_bps=config.assumed_link_mbps * 1e6)
        self._upload_sizes: dict[str, int] = {}  # last measured wire size of an upload per encoding
        self._cache: dict[tuple[str, ...], Variant] = {}
        # Model artifact id -> blob of the fp32 state a client holds once it has decoded it.
        self._materialized: dict[str, str] = {}

    @property
    def adaptive(self) -> bool:
        return self.config.policy == "adaptive"

    def _names(self, ladder: list[str], fixed: str) -> list[str]:
        return list(ladder) if self.adaptive else [fixed]

    # ----------------------------------------------------------- variants
    def _remember(self, artifact_id: str, state: dict[str, Any]) -> None:
        """What a client holds after decoding `artifact_id`, for differences against it later."""
        self._materialized[artifact_id] = self.blobs.put(bundle_to_bytes(encode_state(state, EncodingSpec())))
        while len(self._materialized) > MATERIALIZED_KEEP:
            self._materialized.pop(next(iter(self._materialized)))

    def _model_variant(self, model_sha: str, name: str) -> Variant:
        key = (model_sha, name)
        if key not in self._cache:
            if name == "fp32":  # the stored model is already this encoding
                data = self.blobs.get(model_sha)
                self._materialized[model_sha] = model_sha
            else:
                state = decode_state(bundle_from_bytes(self.blobs.get(model_sha)))
                data = bundle_to_bytes(encode_state(state, EncodingSpec.parse(name)))
            self._cache[key] = Variant(name, self.blobs.put(data), len(data))
            if name != "fp32":
                self._remember(self._cache[key].sha256, decode_state(bundle_from_bytes(data)))
        return self._cache[key]

    def delta_variant(self, model_sha: str, held: list[str], name: str) -> Variant | None:
        """The round's model as ``name`` ("delta-int8+zstd", ...): its difference against the
        first model in ``held`` whose decoded state is known here; None when there is none."""
        base_id = next((h for h in held if h in self._materialized), None)
        if base_id is None:
            return None
        key = (model_sha, base_id, name)
        if key not in self._cache:
            base = decode_state(bundle_from_bytes(self.blobs.get(self._materialized[base_id])))
            target = decode_state(bundle_from_bytes(self.blobs.get(model_sha)))
            data = bundle_to_bytes(encode_state(state_delta(target, base), EncodingSpec.parse(name[len(DELTA):]),
                                                base_sha256=base_id))
            self._cache[key] = Variant(name, self.blobs.put(data), len(data))
            self._remember(self._cache[key].sha256, apply_delta(base, decode_state(bundle_from_bytes(data))))
        return self._cache[key]

    def _generator_variant(self, onnx_sha: str, name: str) -> Variant:
        key = (onnx_sha, name)
        if key not in self._cache:
            if name == "fp32":
                data = self.blobs.get(onnx_sha)
            else:
                from export.generator_artifacts import generator_variant  # onnx + quantisers: coordinator only

                data = generator_variant(self.blobs.get(onnx_sha), name)
            self._cache[key] = Variant(name, self.blobs.put(data), len(data))
        return self._cache[key]

    def prepare(self, model_sha: str, generator_sha: str | None) -> RoundVariants:
        """Every encoding the policy may pick this round (blocking: run it in a worker thread)."""
        from export.generator_artifacts import int4_available

        variants = RoundVariants(model_sha=model_sha)
        for name in self._names(self.config.model_ladder, self.config.model_encoding):
            # A delta is made per client when it polls; its plain encoding is the fallback.
            plain = name.removeprefix(DELTA)
            variants.model[plain] = self._model_variant(model_sha, plain)
        if generator_sha is not None:
            for name in self._names(self.config.generator_ladder, self.config.generator_encoding):
                if name.startswith("int4") and not int4_available():
                    _LOGGER.warning("generator encoding %s skipped: onnx-ir is not installed", name)
                    continue
                variants.generator[name] = self._generator_variant(generator_sha, name)
        self._cache = {k: v for k, v in self._cache.items() if k[0] in (model_sha, generator_sha)}
        return variants

    def _model_rungs(self, client_id: str, variants: RoundVariants, held: list[str]) -> list[Variant]:
        rungs = []
        for name in self._names(self.config.model_ladder, self.config.model_encoding):
            if name.startswith(DELTA):
                delta = self.delta_variant(variants.model_sha, held, name) if held else None
                if delta is not None:
                    rungs.append(delta)
                elif not self.adaptive:  # fixed policy: the plain encoding when nothing is held
                    rungs.append(variants.model[name[len(DELTA):]])
            else:
                rungs.append(variants.model[name])
        return rungs

    # --------------------------------------------------------------- plans
    def _upload_size(self, name: str) -> int:
        if name in self._upload_sizes:
            return self._upload_sizes[name]
        return wire_bytes(estimate_encoded_bytes(self.shapes, EncodingSpec.parse(name)))

    def plan(self, client_id: str, variants: RoundVariants, held: list[str] | None = None) -> ClientPlan:
        """The client's encodings for this round; ``held``: the models it says it holds decoded."""
        link = self.estimator.link(client_id)
        models = {v.name: v for v in self._model_rungs(client_id, variants, held or [])}
        transfers = [Transfer(MODEL, "down", tuple(Rung(v.name, v.size) for v in models.values()))]
        if variants.generator:
            transfers.append(Transfer(GENERATOR, "down",
                                      tuple(Rung(v.name, v.size) for v in variants.generator.values())))
        uploads = self._names(self.config.upload_ladder, self.config.upload_encoding)
        transfers.append(Transfer(UPLOAD, "up", tuple(Rung(n, self._upload_size(n)) for n in uploads)))
        budget = self.config.transfer_budget_s * self.config.budget_headroom if self.adaptive else 0.0
        chosen: EncodingPlan = choose_encodings(transfers, link, budget)
        if not chosen.fits:
            _LOGGER.warning("%s: even the most compact encodings need %.1fs, over the %.1fs budget",
                            client_id, chosen.expected_s, budget)
        return ClientPlan(
            model=models[chosen.choices[MODEL]],
            generator=variants.generator[chosen.choices[GENERATOR]] if variants.generator else None,
            upload_encoding=chosen.choices[UPLOAD],
            estimated_down_bps=link.down_bps, estimated_up_bps=link.up_bps, expected_s=chosen.expected_s,
        )

    # ------------------------------------------------------------ learning
    def observe_downloads(self, client_id: str, timings: Iterable[DownloadTiming]) -> float:
        """The client's timed downloads; returns their total seconds."""
        total = 0.0
        for t in timings:
            self.estimator.observe_download(client_id, t)
            total += t.seconds
        return total

    def observe_upload(self, client_id: str, encoding: str, nbytes: int, seconds: float) -> None:
        self.estimator.observe(client_id, "up", nbytes, seconds)
        self._upload_sizes[encoding] = nbytes
