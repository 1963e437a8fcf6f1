"""The round's artifacts in every encoding and the per-client plans (coordinator.transfers), no network."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.config import parse_config
from coordinator.generator import Generator, GeneratorConfig
from coordinator.store import StateStore
from coordinator.transfers import TransferPlanner
from edge_client.generator_runtime import OnnxGenerator
from export import generator_artifacts
from export.codec import EncodingSpec, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from export.onnx_export import export_generator_onnx
from fedcore.models import Classifier, state_spec, state_to_numpy


def _planner(tmp_path: Path, **bandwidth: object) -> tuple[TransferPlanner, StateStore, str, str]:
    store = StateStore(tmp_path)
    spec = state_spec(Classifier())
    planner = TransferPlanner(parse_config({"bandwidth": bandwidth}).bandwidth, store.blobs,
                              {k: (shape, dtype.kind == "f") for k, (shape, dtype) in spec.items()})
    torch.manual_seed(0)
    model = store.blobs.put(bundle_to_bytes(encode_state(state_to_numpy(Classifier()), EncodingSpec())))
    generator = store.blobs.put(export_generator_onnx(Generator(), GeneratorConfig().to_dict()))
    return planner, store, model, generator


def test_fixed_policy_makes_and_plans_only_the_configured_encodings(tmp_path: Path) -> None:
    planner, store, model, generator = _planner(tmp_path, policy="fixed", model_encoding="int8+zstd",
                                                generator_encoding="int8+zstd", upload_encoding="topk10+zstd")
    variants = planner.prepare(model, generator)
    assert list(variants.model) == ["int8+zstd"] and list(variants.generator) == ["int8+zstd"]
    plan = planner.plan("slowpoke", variants)
    assert (plan.model.name, plan.generator.name, plan.upload_encoding) == ("int8+zstd", "int8+zstd", "topk10+zstd")
    # The variants are real artifacts in the store: the model decodes close to the original,
    # the generator loads in onnxruntime.
    original = decode_state(bundle_from_bytes(store.blobs.get(model)))
    sent = decode_state(bundle_from_bytes(store.blobs.get(plan.model.sha256)))
    assert max(float(np.abs(sent[k] - original[k]).max()) for k in original) < 0.01
    path = tmp_path / "g"
    path.write_bytes(store.blobs.get(plan.generator.sha256))
    assert OnnxGenerator(path).manifest.encoding == "int8"
    store.close()


def test_adaptive_policy_plans_from_the_declared_then_measured_link(tmp_path: Path) -> None:
    planner, store, model, generator = _planner(tmp_path, policy="adaptive", transfer_budget_s=1.0)
    variants = planner.prepare(model, generator)
    assert list(variants.model) == ["fp32+zstd", "fp16+zstd", "int8+zstd"]
    planner.estimator.seed("fast", 100e6, 100e6)
    planner.estimator.seed("slow", 0.3e6, 0.3e6)
    fast, slow = planner.plan("fast", variants), planner.plan("slow", variants)
    assert (fast.model.name, fast.generator.name, fast.upload_encoding) == ("fp32+zstd", "fp32+zstd", "fp32")
    assert slow.model.name == "int8+zstd" and slow.upload_encoding.startswith("topk")
    assert fast.expected_s <= 1.0
    # The fast client's link turns out slow: its next plan follows the measurement.
    planner.observe_upload("fast", "fp32", 200_000, 4.0)
    assert planner.plan("fast", variants).upload_encoding != "fp32"
    store.close()


def test_int4_rung_is_skipped_with_a_warning_where_the_quantiser_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(generator_artifacts, "int4_available", lambda: False)
    planner, store, model, generator = _planner(tmp_path)
    variants = planner.prepare(model, generator)
    assert "int4+zstd" not in variants.generator and "int8+zstd" in variants.generator
    assert "onnx-ir is not installed" in caplog.text
    store.close()
