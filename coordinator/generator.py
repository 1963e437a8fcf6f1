"""FedGen's generator G(y, eps) -> latent, and its server-side training step (pure PyTorch).

The generator maps a label and noise to a latent vector that the clients' classifier
heads agree is that label. It is trained on the coordinator from the cohort's heads and
label counts (teacher loss) plus a diversity loss, then shipped to clients as ONNX.
Facts from the paper and official code: ../shared/FEDGEN_FACTS.md sections 1 and 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NoiseKind = Literal["uniform", "normal"]
TeacherWeighting = Literal["per_sample", "official"]


@dataclass(frozen=True)
class GeneratorConfig:
    n_classes: int = 10
    noise_dim: int = 32
    hidden_dim: int = 256
    latent_dim: int = 32
    # The official code draws eps ~ U[0,1) (maintainer, issue #10); the paper writes N(0, I).
    noise: NoiseKind = "uniform"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Generator(nn.Module):
    """Linear(noise+classes, 256) -> BatchNorm1d -> ReLU -> Linear(256, latent); no output activation."""

    onehot: torch.Tensor  # [n_classes, n_classes], a buffer

    def __init__(self, config: GeneratorConfig = GeneratorConfig()) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("onehot", torch.eye(config.n_classes), persistent=False)
        self.fc = nn.Linear(config.noise_dim + config.n_classes, config.hidden_dim)
        self.bn = nn.BatchNorm1d(config.hidden_dim)
        self.out = nn.Linear(config.hidden_dim, config.latent_dim)

    def forward(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """labels int64 [B], eps float [B, noise_dim] -> latent [B, latent_dim]."""
        x = torch.cat([eps, self.onehot[labels]], dim=1)  # [B, noise+classes]
        latent: torch.Tensor = self.out(F.relu(self.bn(self.fc(x))))
        return latent


def sample_noise(
    config: GeneratorConfig, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    if config.noise == "uniform":
        return torch.rand(batch, config.noise_dim, generator=generator, device=device)
    return torch.randn(batch, config.noise_dim, generator=generator, device=device)


def diversity_loss(eps: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """exp(-mean_ij( mean_d (eps_i-eps_j)^2 * mean_d |z_i-z_j| )) (official DiversityLoss, metric l1)."""
    noise_dist = (eps.unsqueeze(0) - eps.unsqueeze(1)).pow(2).mean(dim=2)
    layer_dist = (latent.unsqueeze(0) - latent.unsqueeze(1)).abs().mean(dim=2)
    return torch.exp(-(noise_dist * layer_dist).mean())


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """The official MNIST RUNCONFIGS: 50 steps of batch 32 per round, Adam(3e-4, wd 1e-2), decay 0.98."""

    steps: int = 50
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 1e-2
    lr_decay: float = 0.98
    teacher_alpha: float = 1.0
    diversity_eta: float = 1.0
    # Labels need more than this many samples at some client to be trained on (official: 1).
    min_samples_per_label: int = 1
    weighting: TeacherWeighting = "per_sample"


@dataclass(frozen=True)
class Head:
    """One client's classifier head (the layer after the latent)."""

    weight: torch.Tensor  # [n_classes, latent]
    bias: torch.Tensor  # [n_classes]


@dataclass(frozen=True)
class GeneratorStepResult:
    teacher_loss: float
    diversity_loss: float
    total_loss: float
    qualified_labels: int


def label_weights(label_counts: Sequence[Sequence[int]], min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(qualified labels, weights [n_classes, n_clients]): w[y, k] = count_k(y) / sum_k' count_k'(y)."""
    counts = np.asarray(label_counts, dtype=np.float64)  # [K, C]
    totals = counts.sum(axis=0)  # [C]
    qualified = np.flatnonzero(counts.max(axis=0) > min_samples)
    weights = np.divide(counts.T, totals[:, None], out=np.zeros_like(counts.T), where=totals[:, None] > 0)
    return qualified, weights


def train_generator(
    generator: Generator,
    optimizer: torch.optim.Optimizer,
    heads: Sequence[Head],
    label_counts: Sequence[Sequence[int]],
    config: GeneratorTrainConfig,
    rng: np.random.Generator,
    noise_generator: torch.Generator | None = None,
) -> GeneratorStepResult:
    """One round of generator training against the label-weighted ensemble of the cohort's heads.

    teacher = sum_k mean_i( w_k[y_i] * CE(head_k(G(y_i, eps_i)), y_i) )  (per_sample, the paper's intent)
            or sum_k mean_i(CE_i) * mean_i(w_k[y_i])                     (official: the [32]x[32,1] broadcast)
    loss = alpha * teacher + eta * diversity.
    """
    if len(heads) != len(label_counts) or not heads:
        raise ValueError(f"need one label-count vector per head (got {len(heads)} heads, {len(label_counts)} counts)")
    device = next(generator.parameters()).device
    qualified, weights = label_weights(label_counts, config.min_samples_per_label)
    if len(qualified) == 0:
        raise ValueError("no label has enough samples at any client to train the generator on")
    weights_t = torch.as_tensor(weights, dtype=torch.float32, device=device)  # [C, K]
    head_w = torch.stack([h.weight for h in heads]).to(device)  # [K, C, D]
    head_b = torch.stack([h.bias for h in heads]).to(device)  # [K, C]
    generator.train()
    teacher_v = diversity_v = total_v = 0.0
    for _ in range(config.steps):
        y = torch.as_tensor(rng.choice(qualified, config.batch_size), dtype=torch.long, device=device)
        eps = sample_noise(generator.config, config.batch_size, noise_generator, device)
        z = generator(y, eps)  # [B, D]
        logits = torch.einsum("bd,kcd->kbc", z, head_w) + head_b[:, None, :]  # [K, B, C]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(len(heads)), reduction="none").view(
            len(heads), -1
        )  # [K, B]
        w = weights_t[y].T  # [K, B]
        if config.weighting == "per_sample":
            teacher = (ce * w).mean(dim=1).sum()
        else:
            teacher = (ce.mean(dim=1) * w.mean(dim=1)).sum()
        diversity = diversity_loss(eps, z)
        loss = config.teacher_alpha * teacher + config.diversity_eta * diversity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        teacher_v, diversity_v, total_v = float(teacher.detach()), float(diversity.detach()), float(loss.detach())
    generator.eval()
    return GeneratorStepResult(teacher_v, diversity_v, total_v, len(qualified))


def make_optimizer(generator: Generator, config: GeneratorTrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam(
        generator.parameters(),
        lr=config.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=config.weight_decay,
        amsgrad=False,
    )
