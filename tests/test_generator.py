"""FedGen's generator: exact torch/onnxruntime parity, the server step, the strategy's state."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedgen.coordinator.config import FedGenConfig, TrainingConfig
from fedgen.coordinator.evaluation import task_contract
from fedgen.coordinator.fedgen import FedGen
from fedgen.coordinator.generator import (
    Generator,
    GeneratorConfig,
    GeneratorTrainConfig,
    Teachers,
    diversity_loss,
    label_weights,
    make_optimizer,
    train_generator,
)
from fedgen.coordinator.model import ModelContract
from fedgen.coordinator.strategy import ClientResult
from fedgen.core.data import Dataset
from fedgen.core.models import Classifier, state_to_numpy
from fedgen.core.task import InputSpec, Task, prepare
from fedgen.edge.generator_runtime import OnnxGenerator
from fedgen.edge.trainer import LocalTrainer, TrainPlan
from fedgen.export.encoding import Encoding
from fedgen.export.generator_manifest import ManifestError
from fedgen.export.onnx_export import export_generator_onnx


def _trained_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator()
    opt = make_optimizer(g, GeneratorTrainConfig())
    heads = Teachers.linear([(torch.randn(10, 32), torch.randn(10)) for _ in range(3)])
    train_generator(g, opt, heads, [[5] * 10] * 3, GeneratorTrainConfig(steps=5), np.random.default_rng(0))
    return g.eval()


@pytest.fixture
def onnx_path(tmp_path: Path) -> tuple[Generator, Path]:
    g = _trained_generator()
    path = tmp_path / "g.onnx"
    path.write_bytes(export_generator_onnx(g, g.config.to_dict()))
    return g, path


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_torch_and_onnxruntime_agree(onnx_path: tuple[Generator, Path], batch: int) -> None:
    g, path = onnx_path
    runtime = OnnxGenerator(path)
    rng = np.random.default_rng(batch)
    labels = rng.integers(0, 10, batch)
    eps = runtime.sample_noise(batch, rng)
    expected = g(torch.from_numpy(labels), torch.from_numpy(eps)).detach().numpy()
    got = runtime.latents(labels, eps)
    assert got.shape == (batch, 32)
    assert np.abs(got - expected).max() <= 1e-5


def test_manifest_travels_inside_the_artifact(onnx_path: tuple[Generator, Path]) -> None:
    runtime = OnnxGenerator(onnx_path[1])
    assert (runtime.n_classes, runtime.noise_dim, runtime.latent_dim, runtime.noise) == (10, 32, 32, "uniform")
    assert runtime.manifest.opset == 17
    with pytest.raises(ValueError, match="labels must be in"):
        runtime.latents(np.array([10]), np.zeros((1, 32), np.float32))


def test_corrupt_artifact_is_a_clear_error(onnx_path: tuple[Generator, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx_path[1].read_bytes()[:1000])
    with pytest.raises(ManifestError, match="cannot load generator"):
        OnnxGenerator(bad)


def test_generator_is_small_as_in_the_paper() -> None:
    assert sum(p.numel() for p in Generator().parameters()) == 19_744


def test_label_weights_normalise_over_clients() -> None:
    qualified, w = label_weights([[3, 0, 1], [1, 0, 1]], min_samples=1)
    assert qualified.tolist() == [0]  # label 1 nowhere, label 2 has no client with > 1 sample
    np.testing.assert_allclose(w[0], [0.75, 0.25])
    np.testing.assert_allclose(w[1], [0.0, 0.0])
    np.testing.assert_allclose(w[2], [0.5, 0.5])


def test_diversity_loss_is_one_for_collapsed_outputs() -> None:
    eps = torch.rand(8, 32)
    assert float(diversity_loss(eps, torch.zeros(8, 32))) == pytest.approx(1.0)
    assert float(diversity_loss(eps, torch.randn(8, 32))) < 1.0


@pytest.mark.parametrize("weighting", ["per_sample", "official"])
def test_server_step_teaches_the_generator_what_heads_agree_on(weighting: str) -> None:
    torch.manual_seed(0)
    g = Generator()
    cfg = GeneratorTrainConfig(weighting=weighting)  # type: ignore[arg-type]
    opt = make_optimizer(g, cfg)
    heads = Teachers.linear([(torch.randn(10, 32), torch.zeros(10)) for _ in range(4)])
    counts = [[30] * 10 for _ in range(len(heads))]
    before = [p.detach().clone() for p in g.parameters()]
    rng = np.random.default_rng(0)
    first = train_generator(g, opt, heads, counts, cfg, rng)
    for _ in range(5):
        last = train_generator(g, opt, heads, counts, cfg, rng)
    assert any(not torch.equal(a, b) for a, b in zip(before, g.parameters(), strict=False))
    assert last.teacher_loss < first.teacher_loss
    assert 0 < last.diversity_loss <= 1


def test_server_step_rejects_mismatched_inputs() -> None:
    g = Generator()
    with pytest.raises(ValueError, match="one label-count vector per head"):
        train_generator(
            g,
            make_optimizer(g, GeneratorTrainConfig()),
            Teachers.linear([(torch.zeros(10, 32), torch.zeros(10))]),
            [],
            GeneratorTrainConfig(),
            np.random.default_rng(0),
        )


MNIST = prepare("mnist")
CONTRACT: ModelContract = task_contract(MNIST)


def _results(n: int = 3) -> list[ClientResult]:
    torch.manual_seed(1)
    return [ClientResult(f"c{i}", state_to_numpy(Classifier()), 100, [10 + i] * 10, {}) for i in range(n)]


def test_fedgen_strategy_schedule_artifacts_and_state() -> None:
    s = FedGen(TrainingConfig(), FedGenConfig(device="cpu"), CONTRACT, seed=0)
    p0 = s.configure_round(0).params
    assert p0["regularize"] == 0.0 and s.round_artifacts(0) == []  # round 0: plain local training
    agg = s.aggregate_round(0, _results(), {})
    for key in ("generator_seconds", "generator_teacher_loss", "generator_diversity_loss", "generator_onnx_bytes"):
        assert key in agg.extras
    assert sorted(agg.extras) == sorted(s.metric_names())  # the ledger's CSV has a column for each
    assert [spec.kind for spec in s.artifact_specs()] == ["generator_onnx"]
    p3 = s.configure_round(3).params
    assert p3["regularize"] == 1.0
    assert p3["generative_alpha"] == pytest.approx(10 * 0.98**3)
    (artifact,) = s.round_artifacts(1)
    assert artifact.kind == "generator_onnx" and artifact.data[:2] == b"\x08\x08"  # an ONNX ModelProto

    # A restarted coordinator restores the generator and its Adam moments exactly.
    restored = FedGen(TrainingConfig(), FedGenConfig(device="cpu"), CONTRACT, seed=99)
    restored.load_state_bytes(s.state_bytes())
    for a, b in zip(s.generator.state_dict().values(), restored.generator.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    p = next(s.generator.parameters())
    q = next(restored.generator.parameters())
    assert torch.equal(s.optimizer.state[p]["exp_avg"], restored.optimizer.state[q]["exp_avg"])
    assert restored.trained_rounds == 1


def test_client_regulariser_is_reported_and_only_the_model_learns(onnx_path: tuple[Generator, Path]) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 64)
    trainer = LocalTrainer(MNIST, images, labels)
    state = state_to_numpy(Classifier())
    plan = TrainPlan(3, 16, 0.01, "fedgen", generative_alpha=9.8, generative_beta=9.8, label_space=tuple(range(10)))
    generator_bytes = onnx_path[1].read_bytes()
    with_reg = trainer.train(state, plan, OnnxGenerator(onnx_path[1]))
    assert with_reg.metrics["regulariser"] > 0
    assert onnx_path[1].read_bytes() == generator_bytes  # the generator is frozen on the client
    without = LocalTrainer(MNIST, images, labels).train(state, plan)
    assert without.metrics["regulariser"] == 0
    assert not np.allclose(with_reg.state["head.weight"], without.state["head.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the coordinator's GPU path)")
def test_fedgen_trains_on_cuda_across_rounds_and_exports() -> None:
    s = FedGen(TrainingConfig(), FedGenConfig(device="cuda"), CONTRACT, seed=0)
    for round_ in range(2):  # the export between rounds must not move the generator off the GPU
        agg = s.aggregate_round(round_, _results(), {})
        assert agg.extras["generator_on_cuda"] == 1.0
        assert all(p.is_cuda for p in s.generator.parameters())
    assert s.round_artifacts(2)[0].data[:2] == b"\x08\x08"


def test_cuda_requested_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        FedGen(TrainingConfig(), FedGenConfig(device="cuda"), CONTRACT, seed=0)


# Measured max |onnxruntime - torch| on this generator: fp16 2e-4, int8 5e-3, int4 6e-2
# (latents span about +-0.5). The bounds leave room for other weights, not for other code.
_VARIANT_BOUNDS = {"fp32+zstd": 1e-5, "fp16+zstd": 2e-3, "int8+zstd": 2e-2, "int4+zstd": 0.15}


@pytest.mark.parametrize("name", list(_VARIANT_BOUNDS))
def test_generator_variants_match_torch_within_their_bounds(name: str, tmp_path: Path) -> None:
    from fedgen.export.generator_artifacts import generator_variant, int4_available

    if name.startswith("int4") and not int4_available():
        pytest.skip("onnx-ir not installed")
    g = _trained_generator()
    fp32 = export_generator_onnx(g, g.config.to_dict())
    data = generator_variant(fp32, Encoding.parse(name))
    assert data[:4] == b"\x28\xb5\x2f\xfd"  # one zstd frame
    path = tmp_path / "g"
    path.write_bytes(data)
    runtime = OnnxGenerator(path)
    assert runtime.manifest.encoding == name.split("+")[0]
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 256)
    eps = runtime.sample_noise(256, rng)
    with torch.no_grad():
        expected = g(torch.from_numpy(labels), torch.from_numpy(eps)).numpy()
    assert np.abs(runtime.latents(labels, eps) - expected).max() <= _VARIANT_BOUNDS[name]
    ratio = len(data) / len(fp32)
    assert ratio <= {"fp32+zstd": 1.0, "fp16+zstd": 0.5, "int8+zstd": 0.30, "int4+zstd": 0.2}[name], ratio


def test_unknown_generator_encoding_and_corrupt_compressed_artifact(tmp_path: Path) -> None:
    from fedgen.export.generator_artifacts import ArtifactEncodingError, generator_variant

    g = _trained_generator()
    fp32 = export_generator_onnx(g, g.config.to_dict())
    with pytest.raises(ValueError, match="unknown encoding 'int3'"):
        Encoding.parse("int3")
    with pytest.raises(ArtifactEncodingError, match="'topk10' is not a generator encoding"):
        generator_variant(fp32, Encoding.parse("topk10"))
    data = generator_variant(fp32, Encoding.parse("int8+zstd"))
    path = tmp_path / "g"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="zstd"):
        OnnxGenerator(path)


def test_generator_keys_from_before_configurable_layers_still_load() -> None:
    """State written by the one-hidden-layer generator (``gen.fc.*``, ``gen.bn.*``) resumes as block 0."""
    s = FedGen(TrainingConfig(), FedGenConfig(device="cpu"), CONTRACT, seed=0)
    s.aggregate_round(0, _results(), {})
    from fedgen.export.codec import Encoding as Enc
    from fedgen.export.codec import bundle_from_bytes, bundle_to_bytes, decode_state, encode_state

    tensors = decode_state(bundle_from_bytes(s.state_bytes()))
    old = {k.replace("gen.blocks.0.", "gen."): v for k, v in tensors.items()}
    assert "gen.fc.weight" in old and "gen.bn.running_mean" in old
    restored = FedGen(TrainingConfig(), FedGenConfig(device="cpu"), CONTRACT, seed=5)
    restored.load_state_bytes(bundle_to_bytes(encode_state(old, Enc())))
    for a, b in zip(s.generator.state_dict().values(), restored.generator.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden", [(64,), (128, 64, 32)])
def test_deeper_generators_export_with_exact_parity(hidden: tuple[int, ...], tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = Generator(GeneratorConfig(n_classes=6, noise_dim=16, hidden_dims=hidden, latent_dim=48))
    opt = make_optimizer(g, GeneratorTrainConfig())
    heads = Teachers.linear([(torch.randn(6, 48), torch.randn(6)) for _ in range(2)])
    train_generator(g, opt, heads, [[5] * 6] * 2, GeneratorTrainConfig(steps=3), np.random.default_rng(0))
    g.eval()
    path = tmp_path / "g.onnx"
    path.write_bytes(export_generator_onnx(g, g.config.to_dict()))
    runtime = OnnxGenerator(path)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 33)
    eps = runtime.sample_noise(33, rng)
    with torch.no_grad():
        expected = g(torch.from_numpy(labels), torch.from_numpy(eps)).numpy()
    got = runtime.latents(labels, eps)
    assert got.shape == (33, 48) and np.abs(got - expected).max() <= 1e-5


class _MlpHead(Task):
    """A task whose head is no single Linear: FedGen's teachers must be the task's own module."""

    name, version = "mlp-head", "1"
    input = InputSpec(shape=(20,), dtype="float32")
    n_classes = 5

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                features=nn.Sequential(nn.Linear(20, 24), nn.ReLU()),
                head=nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5)),
            )
        )

    def read_source(self, source: str, split: str) -> Dataset:
        raise NotImplementedError


def test_fedgen_teaches_the_generator_with_any_head_module() -> None:
    task = prepare(_MlpHead())
    contract = task_contract(task)
    s = FedGen(TrainingConfig(), FedGenConfig(device="cpu", hidden_dims=(32, 32)), contract, seed=0)
    assert s.gen_config.latent_dim == 24 and s.gen_config.hidden_dims == (32, 32)
    torch.manual_seed(0)
    results = [ClientResult(f"c{i}", state_to_numpy(task.model()), 50, [10] * 5, {}) for i in range(3)]
    first = s.aggregate_round(0, results, {}).extras["generator_teacher_loss"]
    for round_ in range(1, 6):
        last = s.aggregate_round(round_, results, {}).extras["generator_teacher_loss"]
    assert last < first  # the generator learns what these MLP heads call each label
    runtime_bytes = s.round_artifacts(6)[0].data
    assert runtime_bytes[:2] == b"\x08\x08"


def test_teachers_agree_on_every_path() -> None:
    """The batched Linear path, the vmap path and one call per teacher give the same logits."""
    torch.manual_seed(0)
    linear = [(torch.randn(5, 8), torch.randn(5)) for _ in range(3)]
    z = torch.randn(7, 8)
    expected = torch.stack([torch.nn.functional.linear(z, w, b) for w, b in linear])
    assert torch.allclose(Teachers.linear(linear).logits(z), expected, atol=1e-6)
    mlp = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    weights = [{k: torch.randn_like(v) for k, v in mlp.state_dict().items()} for _ in range(3)]
    teachers = Teachers(mlp, weights)
    batched = teachers.logits(z)
    teachers._vectorised = False
    assert torch.allclose(batched, teachers.logits(z), atol=1e-6) and batched.shape == (3, 7, 5)
