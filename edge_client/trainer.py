"""Local training on the device's own data (pure PyTorch, no transport)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedgen.core.models import load_numpy_state, state_to_numpy
from fedgen.core.task import PreparedTask, torch_dtype


@dataclass(frozen=True)
class TrainPlan:
    local_steps: int
    batch_size: int
    learning_rate: float
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    # FedGen regulariser (used when `generator` is given to train()).
    generative_alpha: float = 0.0
    generative_beta: float = 0.0
    gen_batch_size: int = 32
    label_space: tuple[int, ...] = field(default_factory=tuple)
    # Examples per forward/backward pass (0 = the whole batch). Smaller micro-batches accumulate
    # gradients to the same step, so a device short of memory trains the same round.
    micro_batch: int = 0


class LatentGenerator(Protocol):
    """What the trainer needs of a generator: noise and G(labels, eps) as numpy (onnxruntime)."""

    def sample_noise(self, batch: int, rng: np.random.Generator) -> np.ndarray: ...

    def latents(self, labels: np.ndarray, eps: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class TrainResult:
    state: dict[str, np.ndarray]
    num_examples: int
    label_counts: list[int]
    metrics: dict[str, float]
    train_seconds: float


class BatchStream:
    """Minibatches that persist across rounds: shuffled, drop_last, restarting when exhausted.

    This is how FedGen's official users draw batches (get_next_train_batch), so 20 local
    steps walk through the shard instead of re-reading its first 640 examples every round.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self._rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)
        self._pos = 0

    def next(self, batch_size: int) -> np.ndarray:
        size = min(batch_size, self.n)
        if self._pos + size > len(self._order):
            self._order = self._rng.permutation(self.n)
            self._pos = 0
        idx = self._order[self._pos : self._pos + size]
        self._pos += size
        return idx


class LocalTrainer:
    def __init__(self, task: PreparedTask, samples: np.ndarray, labels: np.ndarray, seed: int = 0) -> None:
        """samples: the task's stored examples [N, *input.shape] (kept as stored, uint8 pixels for
        the image tasks, and preprocessed a batch at a time: 4x less memory than float32); labels: [N]."""
        if len(samples) != len(labels) or len(labels) == 0:
            raise ValueError(f"need matching, non-empty samples and labels (got {len(samples)} and {len(labels)})")
        self.task = task
        self.samples = torch.from_numpy(np.ascontiguousarray(samples))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.n_classes = task.task.n_classes
        self.model = task.model()
        # BatchNorm running statistics: states, not trained parameters (see _encode_update).
        self.buffer_names = task.buffer_names
        self.batches = BatchStream(len(labels), seed)
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self._augment_rng = torch.Generator().manual_seed(seed)

    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.task.task.preprocess(self.samples[idx])
        return self.task.task.augment(x, self._augment_rng)

    def _latents(self, generator: LatentGenerator, labels: np.ndarray) -> torch.Tensor:
        eps = generator.sample_noise(len(labels), self.rng)
        return torch.from_numpy(generator.latents(labels, eps))

    def _latent_loss(
        self, generator: LatentGenerator, plan: TrainPlan, x_logits: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """FedGen's latent loss (official userpFedGen.train): the model's predictions on the real batch
        pulled towards its own head's predictions on generated latents for the same labels;
        KL(softmax(head(G(y))) || p_model(x)), scaled by beta."""
        with torch.no_grad():
            target = F.softmax(self.model.head(self._latents(generator, y.numpy())), dim=1)
        return plan.generative_beta * F.kl_div(F.log_softmax(x_logits, dim=1), target, reduction="batchmean")

    def _teacher_loss(self, generator: LatentGenerator, plan: TrainPlan) -> torch.Tensor:
        """FedGen's generator regulariser: CE(head(G(y~)), y~) for labels y~ drawn uniformly from the
        label space, scaled by alpha. Latents come from onnxruntime without gradients, so only the
        model (its head) learns from it."""
        space = np.asarray(plan.label_space or range(self.n_classes), dtype=np.int64)
        sampled = self.rng.choice(space, plan.gen_batch_size)
        teacher_logits = self.model.head(self._latents(generator, sampled))
        return plan.generative_alpha * F.cross_entropy(teacher_logits, torch.from_numpy(sampled))

    @torch.no_grad()
    def evaluate(self, state: dict[str, np.ndarray], samples: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
        """(correct, total) of `state` on local data: the paper's federated evaluation."""
        load_numpy_state(self.model, state)
        self.model.eval()
        correct = 0
        for start in range(0, len(labels), 512):
            logits = self.model(self.task.task.preprocess(torch.from_numpy(samples[start : start + 512])))
            correct += int((logits.argmax(1) == torch.from_numpy(labels[start : start + 512])).sum())
        return correct, len(labels)

    def train(
        self, global_state: dict[str, np.ndarray], plan: TrainPlan, generator: LatentGenerator | None = None
    ) -> TrainResult:
        started = time.monotonic()
        load_numpy_state(self.model, global_state)
        model = self.model
        model.train()
        anchor = [p.detach().clone() for p in model.parameters()] if plan.proximal_mu > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        counts = np.zeros(self.n_classes, dtype=np.int64)
        loss_sum, correct, seen = 0.0, 0, 0
        reg_sum = 0.0
        gen_ratio = plan.gen_batch_size / plan.batch_size
        for _ in range(plan.local_steps):
            idx = torch.from_numpy(self.batches.next(plan.batch_size))
            counts += np.bincount(self.labels[idx].numpy(), minlength=self.n_classes)[: self.n_classes]
            for p in params:
                p.grad = None
            micro = plan.micro_batch if 0 < plan.micro_batch < len(idx) else len(idx)
            step_loss = 0.0
            for start in range(0, len(idx), micro):  # gradients of the micro-batches add up to the batch's
                part = idx[start : start + micro]
                y = self.labels[part]
                share = len(part) / len(idx)
                logits = model(self._inputs(part))
                loss = F.cross_entropy(logits, y) * share
                if generator is not None:
                    latent = share * self._latent_loss(generator, plan, logits, y)
                    loss = loss + latent
                    reg_sum += float(latent.detach())
                loss.backward()
                step_loss += float(loss.detach())
                correct += int((logits.argmax(1) == y).sum())
            extra = torch.zeros(())
            if generator is not None:
                teacher = gen_ratio * self._teacher_loss(generator, plan)
                extra = extra + teacher
                reg_sum += float(teacher.detach())
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=False))
                extra = extra + 0.5 * plan.proximal_mu * prox
            if extra.requires_grad:
                extra.backward()
            step_loss += float(extra.detach())
            _sgd_step(params, plan.learning_rate)
            loss_sum += step_loss * len(idx)
            seen += len(idx)
        return TrainResult(
            state=state_to_numpy(model),
            num_examples=len(self.labels),
            label_counts=counts.tolist(),
            metrics={
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
                "steps": float(plan.local_steps),
                "regulariser": reg_sum / plan.local_steps,
            },
            train_seconds=time.monotonic() - started,
        )


@torch.no_grad()
def _sgd_step(params: Sequence[torch.Tensor], lr: float) -> None:
    """Plain SGD, p -= lr * grad (FedGen's official client optimizer: no momentum, no decay).
    Written out because constructing torch.optim.SGD imports ~800 modules (~70 MB resident)."""
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-lr)


def _dry_batch(task: PreparedTask, batch: int) -> torch.Tensor:
    spec = task.task.input
    return task.task.preprocess(torch.zeros((batch, *spec.shape), dtype=torch_dtype(spec.dtype)))


def warm_up(task: PreparedTask) -> None:
    """One forward and backward pass on two examples, so the lazy allocations torch makes on its
    first pass happen now and the memory the process holds afterwards is its real baseline."""
    model = task.model()
    model.train()
    F.cross_entropy(model(_dry_batch(task, 2)), torch.zeros(2, dtype=torch.long)).backward()


def _saved_bytes(task: PreparedTask, batch: int, head_only: bool = False) -> int:
    """Bytes autograd saves for the backward pass in one training step of ``batch`` examples (or of
    ``batch`` generated latents through the head alone: FedGen's regulariser)."""
    model = task.model()
    model.train()
    net = model.head if head_only else model
    x = torch.zeros(batch, task.latent_dim) if head_only else _dry_batch(task, batch)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), torch.zeros(batch, dtype=torch.long))
    loss.backward()
    return saved


def activation_bytes_per_example(task: PreparedTask) -> int:
    """Bytes one training example holds during a step of this task's model, measured by dry steps:
    what the forward pass saves for the backward pass (autograd's saved tensors, counted exactly) per
    extra example (two batch sizes, so the weights it also saves cancel out), twice over for the
    gradients the backward pass makes of them."""
    return max(1024, 2 * (_saved_bytes(task, 16) - _saved_bytes(task, 8)) // 8)


def latent_bytes_per_example(task: PreparedTask) -> int:
    """The same for one generated latent: the latent itself, its target, and what the head saves."""
    head = 2 * (_saved_bytes(task, 16, head_only=True) - _saved_bytes(task, 8, head_only=True)) // 8
    return max(256, head + 3 * 4 * (task.latent_dim + task.task.n_classes))


#: Models whose examples hold more than this during a step are timed with oneDNN (the MNIST CNN's
#: hold 53 KB, the HAR network's 223 KB, the Fashion-MNIST ResNet's 1.6 MB): a deterministic gate.
ONEDNN_PROBE_ABOVE_BYTES = 256 * 1024


def _step_seconds(task: PreparedTask, steps: int = 3, batch: int = 32) -> float:
    model = task.model()
    model.train()
    x, y = _dry_batch(task, batch), torch.zeros(batch, dtype=torch.long)
    F.cross_entropy(model(x), y).backward()  # first-pass allocations are not the step's
    started = time.process_time()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
    return (time.process_time() - started) / steps


def choose_onednn(task: PreparedTask) -> tuple[bool, str]:
    """Whether this task trains faster with oneDNN on this device, and why (measured, not assumed).

    oneDNN's kernels and caches cost ~20 MB resident and are slower for small models on one thread
    (the MNIST CNN: 0.047 vs 0.080 s per 20-step round on x86_64), so a small model never loads them;
    a model with larger activations is timed both ways (a ResNet of 78 k parameters: 1.5x faster with).
    """
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # the stubs type the flag as its descriptor
    per_example = activation_bytes_per_example(task)
    if per_example < ONEDNN_PROBE_ABOVE_BYTES or not torch.backends.mkldnn.is_available():
        return False, f"off ({per_example / 1024:.0f} KiB of activations an example: too small to gain)"
    without = _step_seconds(task)
    torch.backends.mkldnn.enabled = True  # type: ignore[assignment]
    with_ = _step_seconds(task)
    use = with_ < 0.9 * without
    torch.backends.mkldnn.enabled = use  # type: ignore[assignment]
    return use, f"{'on' if use else 'off'} (a step: {1000 * with_:.0f} ms with, {1000 * without:.0f} ms without)"
