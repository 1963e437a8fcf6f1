"""FedGen's generator G(y, eps) -> latent, and its server-side training step (pure PyTorch).

The generator maps a label and noise to a latent vector that the clients' classifier heads agree
is that label. It is trained on the coordinator from the cohort's heads and label counts (teacher
loss) plus a diversity loss, then shipped to clients as ONNX. Its output size is the task's latent
and its hidden layers are configurable; the teachers are copies of the task's own head module,
whatever small module it is, each with one client's weights. Facts from the paper and official
code: ../shared/FEDGEN_FACTS.md sections 1 and 3.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

NoiseKind = Literal["uniform", "normal"]
TeacherWeighting = Literal["per_sample", "official"]


@dataclass(frozen=True)
class GeneratorConfig:
    n_classes: int = 10
    noise_dim: int = 32
    hidden_dims: tuple[int, ...] = (256,)
    latent_dim: int = 32
    # The official code draws eps ~ U[0,1) (maintainer, issue #10); the paper writes N(0, I).
    noise: NoiseKind = "uniform"

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["hidden_dims"] = list(self.hidden_dims)
        return out


class HiddenBlock(nn.Module):
    """Linear -> BatchNorm1d -> ReLU."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.bn = nn.BatchNorm1d(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.fc(x)))


class Generator(nn.Module):
    """[noise, onehot(label)] -> (Linear -> BatchNorm1d -> ReLU) per hidden layer -> Linear(latent).

    FedGen's MNIST generator is one hidden layer of 256: 19,744 parameters. No output activation.
    """

    onehot: torch.Tensor  # [n_classes, n_classes], a buffer

    def __init__(self, config: GeneratorConfig = GeneratorConfig()) -> None:
        super().__init__()
        if not config.hidden_dims:
            raise ValueError("the generator needs at least one hidden layer")
        self.config = config
        self.register_buffer("onehot", torch.eye(config.n_classes), persistent=False)
        dims = (config.noise_dim + config.n_classes, *config.hidden_dims)
        self.blocks = nn.ModuleList(HiddenBlock(a, b) for a, b in itertools.pairwise(dims))
        self.out = nn.Linear(dims[-1], config.latent_dim)

    def forward(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """labels int64 [B], eps float [B, noise_dim] -> latent [B, latent_dim]."""
        x = torch.cat([eps, self.onehot[labels]], dim=1)  # [B, noise+classes]
        for block in self.blocks:
            x = block(x)
        latent: torch.Tensor = self.out(x)
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


class Teachers:
    """The cohort's heads: one head module (the task's) and each client's weights for it, applied
    functionally, so any small module can be a teacher and no copy of it is made per client. The
    weights are stacked and the head vectorised over them (torch.func.vmap), one call for all
    teachers; a head vmap cannot batch is called once per teacher instead."""

    def __init__(self, head: nn.Module, weights: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.head = head.eval()
        self.weights = [dict(w) for w in weights]
        self._stacked = {k: torch.stack([w[k] for w in self.weights]) for k in self.weights[0]} if weights else {}
        self._vectorised = True

    @classmethod
    def linear(cls, weights: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Teachers:
        """Linear heads (the MNIST CNN's), from (weight [C, D], bias [C]) pairs."""
        c, d = weights[0][0].shape
        return cls(nn.Linear(int(d), int(c)), [{"weight": w, "bias": b} for w, b in weights])

    def __len__(self) -> int:
        return len(self.weights)

    def to(self, device: torch.device) -> Teachers:
        return Teachers(self.head.to(device), [{k: v.to(device) for k, v in w.items()} for w in self.weights])

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """[K, B, C]: every teacher's logits for latents z [B, D]."""
        if type(self.head) is nn.Linear:  # the common head: one batched matmul
            return torch.baddbmm(
                self._stacked["bias"].unsqueeze(1), z.expand(len(self), -1, -1), self._stacked["weight"].transpose(1, 2)
            )
        if self._vectorised:
            try:
                out: torch.Tensor = vmap(lambda w: functional_call(self.head, w, (z,)))(self._stacked)
                return out
            except RuntimeError:  # an op without a batching rule: one call per teacher from now on
                self._vectorised = False
        return torch.stack([functional_call(self.head, w, (z,)) for w in self.weights])


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
    teachers: Teachers,
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
    if len(teachers) != len(label_counts) or not len(teachers):
        raise ValueError(
            f"need one label-count vector per head (got {len(teachers)} heads, {len(label_counts)} counts)"
        )
    device = next(generator.parameters()).device
    qualified, weights = label_weights(label_counts, config.min_samples_per_label)
    if len(qualified) == 0:
        raise ValueError("no label has enough samples at any client to train the generator on")
    weights_t = torch.as_tensor(weights, dtype=torch.float32, device=device)  # [C, K]
    teachers = teachers.to(device)
    generator.train()
    teacher_v = diversity_v = total_v = 0.0
    for _ in range(config.steps):
        y = torch.as_tensor(rng.choice(qualified, config.batch_size), dtype=torch.long, device=device)
        eps = sample_noise(generator.config, config.batch_size, noise_generator, device)
        z = generator(y, eps)  # [B, D]
        logits = teachers.logits(z)  # [K, B, C]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(len(teachers)), reduction="none").view(
            len(teachers), -1
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
