"""The FedGen strategy: FedAvg aggregation plus a server-trained generator shipped as ONNX.

Per round (official order, serverpFedGen.py): the cohort trains with the generator as a
regulariser; the coordinator trains the generator against the cohort's freshly trained
heads and label counts (all of it from the uploaded updates), averages the models,
exports the generator to ONNX for the next round. Round 0 is plain local training.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from fedgen.coordinator.config import BandwidthConfig, FedGenConfig, StrategyName, TrainingConfig
from fedgen.coordinator.generator import (
    Generator,
    GeneratorConfig,
    GeneratorTrainConfig,
    Teachers,
    make_optimizer,
    train_generator,
)
from fedgen.coordinator.model import ModelContract
from fedgen.coordinator.robust import RobustSettings
from fedgen.coordinator.strategy import Aggregate, ArtifactSpec, ClientResult, FedAvg, RoundArtifact
from fedgen.export import generator_artifacts
from fedgen.export.codec import Encoding, State, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.export.onnx_export import export_generator_onnx

#: The generator's artifact kind (fleet.proto ARTIFACT_KIND_GENERATOR_ONNX).
GENERATOR_ONNX = "generator_onnx"
#: What FedGen adds to every round's ledger row.
METRICS = (
    "generator_diversity_loss",
    "generator_export_seconds",
    "generator_loss",
    "generator_on_cuda",
    "generator_onnx_bytes",
    "generator_qualified_labels",
    "generator_seconds",
    "generator_teacher_loss",
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("fedgen.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def _can_make(encoding: Encoding) -> bool:
    """4-bit weights need onnx-ir, which an installation may lack (looked up at call time)."""
    return encoding.codec != "int4" or generator_artifacts.int4_available()


class FedGen(FedAvg):
    name: StrategyName = "fedgen"

    def __init__(
        self,
        training: TrainingConfig,
        config: FedGenConfig,
        model: ModelContract,
        bandwidth: BandwidthConfig | None = None,
        seed: int = 0,
        robust_settings: RobustSettings | None = None,
    ) -> None:
        super().__init__(training, robust_settings)
        self.config = config
        self.model = model
        n_classes = model.n_classes
        bandwidth = bandwidth or BandwidthConfig()
        self.generator_spec = ArtifactSpec(
            GENERATOR_ONNX,
            tuple(bandwidth.generator_ladder),
            bandwidth.generator_encoding,
            generator_artifacts.generator_variant,
            _can_make,
        )
        makes = [bandwidth.generator_encoding, *(bandwidth.generator_ladder if bandwidth.policy == "adaptive" else ())]
        generator_artifacts.preload_quantisers(e.codec for e in makes)  # start-up pays, not round 0
        self.device = resolve_device(config.device)
        self.gen_config = GeneratorConfig(
            n_classes=n_classes,
            noise_dim=config.noise_dim or model.generator.noise_dim,
            hidden_dims=tuple(config.hidden_dims or model.generator.hidden_dims),
            latent_dim=model.latent_dim,
            noise=config.noise,
        )
        self.train_config = GeneratorTrainConfig(
            steps=config.generator_steps,
            batch_size=config.generator_batch_size,
            learning_rate=config.generator_lr,
            weight_decay=config.generator_weight_decay,
            lr_decay=config.generator_lr_decay,
            diversity_eta=config.diversity_eta,
            weighting=config.teacher_weighting,
        )
        torch.manual_seed(seed)
        self.generator = Generator(self.gen_config).to(self.device)
        self.head = model.make_head()
        self.optimizer = make_optimizer(self.generator, self.train_config)
        self.rng = np.random.default_rng(seed)
        self.noise = torch.Generator(device=self.device).manual_seed(seed)
        self.trained_rounds = 0
        self.labels_seen = np.zeros(n_classes, dtype=bool)
        self._onnx: bytes | None = None

    # ------------------------------------------------------------ per round
    def round_params(self, round_: int) -> dict[str, float]:
        c = self.config
        decay = c.generative_decay**round_
        return {
            # Official schedule: round 0 is plain local training; the regulariser from round 1 on.
            "regularize": 1.0 if round_ > 0 and self.trained_rounds > 0 else 0.0,
            "generative_alpha": max(1e-4, c.generative_alpha * decay),
            "generative_beta": max(1e-4, c.generative_beta * decay),
            "gen_batch_size": float(c.gen_batch_size),
        }

    def artifact_specs(self) -> tuple[ArtifactSpec, ...]:
        return (self.generator_spec,)

    def metric_names(self) -> tuple[str, ...]:
        return (*METRICS, *super().metric_names())

    def round_artifacts(self, round_: int) -> list[RoundArtifact]:
        if self.trained_rounds == 0:
            return []
        if self._onnx is None:
            self._onnx = export_generator_onnx(self.generator, self.gen_config.to_dict())
        return [RoundArtifact(GENERATOR_ONNX, self._onnx)]

    def label_space(self, n_classes: int) -> list[int]:
        """Labels present in any client's data so far (official: the union of the users' labels)."""
        seen = np.flatnonzero(self.labels_seen)
        return seen.tolist() if len(seen) else list(range(n_classes))

    def aggregate_round(self, round_: int, results: Sequence[ClientResult], global_state: State) -> Aggregate:
        # The teachers are the screened heads: clipped, and without those Krum left out. Their
        # label counts are bounded at intake by local steps x batch size, as the weights are here.
        results, screened = self.screen(round_, results, global_state)
        started = time.monotonic()
        heads = Teachers(
            self.head, [{k: torch.from_numpy(v) for k, v in self.model.head_state(r.state).items()} for r in results]
        )
        counts = [list(r.label_counts) for r in results]
        for c in counts:
            self.labels_seen |= np.asarray(c) > 0
        for group in self.optimizer.param_groups:  # ExponentialLR stepped once per round, in closed form
            group["lr"] = self.train_config.learning_rate * self.train_config.lr_decay**round_
        step = train_generator(self.generator, self.optimizer, heads, counts, self.train_config, self.rng, self.noise)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        gen_seconds = time.monotonic() - started
        self.trained_rounds += 1
        t_export = time.monotonic()
        self._onnx = export_generator_onnx(self.generator, self.gen_config.to_dict())
        export_seconds = time.monotonic() - t_export
        aggregate = self.combine(screened)
        return Aggregate(
            aggregate.state,
            {
                **aggregate.extras,
                "generator_seconds": round(gen_seconds, 4),
                "generator_export_seconds": round(export_seconds, 4),
                "generator_teacher_loss": step.teacher_loss,
                "generator_diversity_loss": step.diversity_loss,
                "generator_loss": step.total_loss,
                "generator_qualified_labels": float(step.qualified_labels),
                "generator_onnx_bytes": float(len(self._onnx)),
                "generator_on_cuda": 1.0 if self.device.type == "cuda" else 0.0,
            },
        )

    # ------------------------------------------------------------ durability
    def state_bytes(self) -> bytes:
        """Generator weights, BN buffers and Adam moments as one TensorBundle (no pickle)."""
        tensors: dict[str, np.ndarray] = {
            f"gen.{k}": v.detach().cpu().numpy() for k, v in self.generator.state_dict().items()
        }
        for i, p in enumerate(self.generator.parameters()):
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().cpu().numpy()
                tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().numpy()
                tensors[f"opt.{i}.step"] = np.asarray(float(st["step"]), dtype=np.float32)
        tensors["meta.trained_rounds"] = np.asarray(self.trained_rounds, dtype=np.int64)
        tensors["meta.labels_seen"] = self.labels_seen.astype(np.uint8)
        return bundle_to_bytes(encode_state(tensors, Encoding()))

    def load_state_bytes(self, data: bytes) -> None:
        tensors = decode_state(bundle_from_bytes(data))
        gen = {_current_key(k[4:]): torch.from_numpy(v) for k, v in tensors.items() if k.startswith("gen.")}
        self.generator.load_state_dict(gen)
        for i, p in enumerate(self.generator.parameters()):
            if f"opt.{i}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(tensors[f"opt.{i}.step"])),
                    "exp_avg": torch.from_numpy(tensors[f"opt.{i}.exp_avg"]).to(self.device),
                    "exp_avg_sq": torch.from_numpy(tensors[f"opt.{i}.exp_avg_sq"]).to(self.device),
                }
        self.trained_rounds = int(tensors["meta.trained_rounds"])
        self.labels_seen = tensors["meta.labels_seen"].astype(bool)
        self._onnx = None


def _current_key(key: str) -> str:
    """Generator keys of state written before hidden layers were configurable (``fc.*``, ``bn.*``:
    the one hidden block) under today's names (``blocks.0.fc.*``)."""
    return f"blocks.0.{key}" if key.startswith(("fc.", "bn.")) else key
