"""The classifier FedGen uses for MNIST-like data, split at its latent layer.

`body(x) -> h` (32-d latent) and `head(h) -> logits`; FedGen's generator produces
`h`, so only the head sees generated samples (official code: latent_layer_idx=-1).
State-dict keys are the wire names of the tensors, so they are part of the contract.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, int] = (6, 16)
    latent_dim: int = 32
    n_classes: int = 10

    @property
    def flat_dim(self) -> int:
        size = self.image_size
        for _ in self.channels:  # each conv: kernel 3, stride 2, padding 1
            size = (size + 1) // 2
        return self.channels[-1] * size * size


class Classifier(nn.Module):
    """Conv(3,s2)-BN-ReLU x2 -> flatten -> Linear(latent) | Linear(n_classes)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        c0, c1 = config.channels
        self.body = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(config.in_channels, c0, 3, stride=2, padding=1),  # [B,6,14,14]
                bn0=nn.BatchNorm2d(c0),
                relu0=nn.ReLU(),
                conv1=nn.Conv2d(c0, c1, 3, stride=2, padding=1),  # [B,16,7,7]
                bn1=nn.BatchNorm2d(c1),
                relu1=nn.ReLU(),
                flatten=nn.Flatten(),  # [B,784]
                fc=nn.Linear(config.flat_dim, config.latent_dim),  # [B,32], no activation (as FedGen)
            )
        )
        self.head = nn.Linear(config.latent_dim, config.n_classes)  # [B,10]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images x [B,C,H,W]."""
        logits: torch.Tensor = self.head(self.body(x))
        return logits


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict (parameters and BN buffers) as numpy arrays, in order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load a numpy state dict; keys, shapes and dtypes must match exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state keys differ: missing {missing}, unexpected {unexpected}")
    tensors = {}
    for key, ref in expected.items():
        arr = state[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"tensor {key!r} has shape {list(arr.shape)}, expected {list(ref.shape)}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
    model.load_state_dict(tensors)
