"""The round's artifacts in every encoding and the per-client plans (fedgen.coordinator.transfers), no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedgen.coordinator.config import FedGenConfig, TrainingConfig, parse_config
from fedgen.coordinator.evaluation import task_contract
from fedgen.coordinator.fedgen import GENERATOR_ONNX, FedGen
from fedgen.coordinator.file_blobs import FileBlobStore
from fedgen.coordinator.generator import Generator, GeneratorConfig
from fedgen.coordinator.records import ArtifactRecord
from fedgen.coordinator.transfers import RoundVariants, TransferPlanner
from fedgen.core.models import Classifier, state_to_numpy
from fedgen.core.task import prepare
from fedgen.edge.generator_runtime import OnnxGenerator
from fedgen.export import generator_artifacts
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.export.onnx_export import export_generator_onnx


def _planner(tmp_path: Path, **bandwidth: object) -> tuple[TransferPlanner, FileBlobStore, str, ArtifactRecord]:
    blobs = FileBlobStore(tmp_path / "blobs")
    config = parse_config({"bandwidth": bandwidth})
    specs = FedGen(
        TrainingConfig(), FedGenConfig(device="cpu"), task_contract(prepare("mnist")), config.bandwidth
    ).artifact_specs()
    planner = TransferPlanner(config.bandwidth, blobs, task_contract(prepare("mnist")).tensor_shapes(), specs)
    torch.manual_seed(0)
    model = blobs.put(bundle_to_bytes(encode_state(state_to_numpy(Classifier()), Encoding())))
    onnx = export_generator_onnx(Generator(), GeneratorConfig().to_dict())
    return planner, blobs, model, ArtifactRecord(GENERATOR_ONNX, blobs.put(onnx), len(onnx))


def _names(variants: RoundVariants) -> tuple[list[str], list[str]]:
    return [e.name for e in variants.model], [e.name for e in variants.artifacts[GENERATOR_ONNX]]


def test_fixed_policy_makes_and_plans_only_the_configured_encodings(tmp_path: Path) -> None:
    planner, blobs, model, generator = _planner(
        tmp_path,
        policy="fixed",
        model_encoding="int8+zstd",
        generator_encoding="int8+zstd",
        upload_encoding="topk10+zstd",
    )
    variants = planner.prepare(model, [generator])
    assert _names(variants) == (["int8+zstd"], ["int8+zstd"])
    plan = planner.plan("slowpoke", variants)
    sent_generator = plan.artifacts[GENERATOR_ONNX]
    assert (plan.model.name, sent_generator.name, plan.upload.name) == ("int8+zstd", "int8+zstd", "topk10+zstd")
    # The variants are real artifacts in the store: the model decodes close to the original,
    # the generator loads in onnxruntime.
    original = decode_state(bundle_from_bytes(blobs.get(model)))
    sent = decode_state(bundle_from_bytes(blobs.get(plan.model.sha256)))
    assert max(float(np.abs(sent[k] - original[k]).max()) for k in original) < 0.01
    path = tmp_path / "g"
    path.write_bytes(blobs.get(sent_generator.sha256))
    assert OnnxGenerator(path).manifest.encoding == "int8"


def test_adaptive_policy_plans_from_the_declared_then_measured_link(tmp_path: Path) -> None:
    planner, _, model, generator = _planner(tmp_path, policy="adaptive", transfer_budget_s=1.0)
    variants = planner.prepare(model, [generator])
    assert _names(variants)[0] == ["fp32+zstd", "fp16+zstd", "int8+zstd"]
    planner.estimator.seed("fast", 100e6, 100e6)
    planner.estimator.seed("slow", 0.3e6, 0.3e6)
    fast, slow = planner.plan("fast", variants), planner.plan("slow", variants)
    assert (fast.model.name, fast.artifacts[GENERATOR_ONNX].name, fast.upload.name) == (
        "fp32+zstd",
        "fp32+zstd",
        "fp32",
    )
    assert slow.model.name == "int8+zstd" and slow.upload.sparse
    assert fast.expected_s <= 1.0
    # The fast client's link turns out slow: its next plan follows the measurement.
    planner.observe_upload("fast", Encoding(), 200_000, 4.0)
    assert planner.plan("fast", variants).upload != Encoding()


def test_int4_rung_is_skipped_with_a_warning_where_the_quantiser_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(generator_artifacts, "int4_available", lambda: False)
    planner, _, model, generator = _planner(tmp_path)
    made = _names(planner.prepare(model, [generator]))[1]
    assert "int4+zstd" not in made and "int8+zstd" in made
    assert "onnx-ir is not installed" in caplog.text


def test_a_delta_upload_is_added_to_the_full_precision_model(tmp_path: Path) -> None:
    """A client trained from the int8 copy it downloaded and uploads (trained - copy) as an int8
    delta: the coordinator must store full-precision model + that delta, within one int8 step."""
    import asyncio
    import hashlib

    from fedgen.coordinator.assignments import TrainAssignment
    from fedgen.coordinator.intake import UploadHeader
    from fedgen.coordinator.records import ClientProfile
    from fedgen.coordinator.server import build_federation
    from fedgen.export.codec import ErrorFeedback, state_delta

    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "federation": {"strategy": "fedavg", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
            "auth": {"enrollment_tokens": ["delta-test-token"]},
            "bandwidth": {"policy": "fixed", "model_encoding": "int8+zstd", "upload_encoding": "int8+zstd"},
        }
    )

    async def scenario() -> tuple[dict, dict, dict, dict]:
        fed = await build_federation(config)
        round_model = await fed.store.get_meta("global_model")  # what round 0 trains from, in fp32
        assert round_model is not None
        client_id, _ = await fed.join("delta-test-token", ClientProfile(), "dev-1")
        engine = asyncio.create_task(fed.run())  # recovers nothing, opens round 0 for the one client
        task = await fed.poll(client_id, 30)
        assert isinstance(task, TrainAssignment)
        assert task.model.name == "int8+zstd" and task.upload_encoding.name == "int8+zstd"
        received = decode_state(bundle_from_bytes(fed.blobs.get(task.model.sha256)))
        rng = np.random.default_rng(0)
        trained = {
            k: (v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) if v.dtype.kind == "f" else v + 3)
            for k, v in received.items()
        }
        payload = bundle_to_bytes(
            ErrorFeedback().encode(state_delta(trained, received), Encoding.parse("int8+zstd"), task.model.sha256)
        )
        header = UploadHeader(
            round=0,
            task_id=task.task_id,
            idempotency_key="dev-1:k",
            num_examples=100,
            label_counts=(10,) * 10,
            payload_bytes=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            metrics={"loss": 1.0},
            train_seconds=0.1,
        )
        await fed.accept_upload(client_id, header, payload, len(payload))
        await asyncio.wait_for(engine, 60)  # the only client delivered: round 0 commits, the federation ends
        (update,) = await fed.store.updates_for(0, 0)
        stored = fed.load_state(update.payload_sha256)
        full = fed.load_state(round_model)
        await fed.close()
        return received, trained, stored, full

    received, trained, stored, full = asyncio.run(scenario())
    for key, value in stored.items():
        expected = full[key] + (trained[key] - received[key])
        assert value.dtype == full[key].dtype and value.shape == full[key].shape
        if value.dtype.kind == "f":
            step = float(np.abs(trained[key] - received[key]).max()) / 127  # one int8 step of the delta
            assert float(np.abs(value - expected).max()) <= step + 1e-6, key
        else:
            assert np.array_equal(value, expected), key
    # The coordinator rebuilt from its own fp32 model, not from the client's int8 copy.
    assert any(float(np.abs(full[k] - received[k]).max()) > 0 for k in full if full[k].dtype.kind == "f")


def test_a_delta_against_the_held_model_is_offered_and_decodes_to_the_new_model(tmp_path: Path) -> None:
    planner, blobs, model, generator = _planner(tmp_path, policy="adaptive", transfer_budget_s=1.0)
    first = planner.prepare(model, [generator])
    planner.estimator.seed("slow", 0.3e6, 0.3e6)
    held = planner.plan("slow", first).model  # what the client downloaded in round 0
    assert held.name == "int8+zstd"  # nothing held yet: no delta rung
    torch.manual_seed(1)
    new_state = {
        k: (v + np.float32(0.01) if v.dtype.kind == "f" else v + 1)
        for k, v in decode_state(bundle_from_bytes(blobs.get(model))).items()
    }
    new_model = blobs.put(bundle_to_bytes(encode_state(new_state, Encoding())))
    second = planner.prepare(new_model, [generator])
    plain_int8 = second.model[Encoding.parse("int8+zstd")]
    plan = planner.plan("slow", second, held=[held.sha256])
    assert plan.model.name == "delta-int8+zstd" and plan.model.size < 1.1 * plain_int8.size
    delta = bundle_from_bytes(blobs.get(plan.model.sha256))
    assert delta.base_sha256 == held.sha256
    client_copy = decode_state(bundle_from_bytes(blobs.get(held.sha256)))
    rebuilt = {k: client_copy[k] + v for k, v in decode_state(delta).items()}
    plain = decode_state(bundle_from_bytes(blobs.get(plain_int8.sha256)))
    err_delta = max(float(np.abs(rebuilt[k] - new_state[k]).max()) for k in new_state if new_state[k].dtype.kind == "f")
    err_plain = max(float(np.abs(plain[k] - new_state[k]).max()) for k in new_state if new_state[k].dtype.kind == "f")
    assert err_delta < err_plain  # closer to the coordinator's model than a fresh int8 copy
    # A model the planner cannot rebuild (e.g. from before a restart) gets no delta.
    assert planner.plan("slow", second, held=["f" * 64]).model.name == "int8+zstd"


def test_a_model_that_an_encoding_cannot_hold_skips_that_rung(tmp_path: Path) -> None:
    """A diverged model (a BatchNorm variance beyond float16's range) must not stop the round: the
    fp16 rungs sit it out, the others carry it, and a fixed fp16 policy falls back to fp32."""
    state = state_to_numpy(Classifier())
    state["body.bn1.running_var"][:] = 5.1e6
    for policy in ({"policy": "adaptive"}, {"policy": "fixed", "model_encoding": "fp16+zstd"}):
        planner, blobs, _, generator = _planner(tmp_path / policy["policy"], **policy)
        model = blobs.put(bundle_to_bytes(encode_state(state, Encoding())))
        variants = planner.prepare(model, [generator])
        assert "fp16+zstd" not in _names(variants)[0]
        assert planner.plan("c", variants).model.name in ("fp32+zstd", "int8+zstd", "fp32")
    planner, blobs, _, generator = _planner(tmp_path / "fixed16", policy="fixed", model_encoding="fp16")
    model = blobs.put(bundle_to_bytes(encode_state(state, Encoding())))
    assert planner.plan("c", planner.prepare(model, [generator])).model.name == "fp32"
