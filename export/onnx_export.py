"""The generator as an ONNX artifact with its manifest (coordinator side: needs torch.onnx and onnx).

The manifest (generator config, opset, input/output names, encoding) travels inside the ONNX
file as metadata_props, so the artifact is self-describing; its sha256 is the artifact id.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any, Protocol, TypeVar

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from fedgen.export.generator_manifest import MANIFEST_KEY, GeneratorManifest

OPSET = 17


class FoldableBlock(Protocol):
    fc: nn.Linear
    bn: nn.BatchNorm1d


class FoldableGenerator(Protocol):
    """What the export needs of a generator: (Linear -> BatchNorm1d -> ReLU) blocks, then a Linear,
    on [noise, onehot(label)]."""

    onehot: torch.Tensor
    blocks: Any  # a sequence of FoldableBlock
    out: nn.Linear


def _folded(block: FoldableBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """One Linear + eval-mode BatchNorm as one affine map: (weight [in, out], bias [out])."""
    bn, fc = block.bn, block.fc
    assert bn.running_var is not None and bn.running_mean is not None  # eval-mode statistics exist
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (fc.weight * scale[:, None]).t().contiguous().float(), (
        (fc.bias - bn.running_mean) * scale + bn.bias
    ).float()


class _InferenceGenerator(nn.Module):
    """The generator's eval-mode function in the form the exporter and quantisers like best.

    Each BatchNorm (frozen running statistics) is folded into the linear layer before it, and every
    layer is a plain MatMul + Add with the weight stored [in, out]: fewer parameters, fewer ops, and
    MatMul is what onnxruntime's int8 and 4-bit weight quantisers handle.
    """

    onehot: torch.Tensor

    def __init__(self, g: FoldableGenerator) -> None:
        super().__init__()
        with torch.no_grad():
            self.register_buffer("onehot", g.onehot.detach().clone().float())
            folded = [_folded(block) for block in g.blocks]
            self.weights = nn.ParameterList([nn.Parameter(w) for w, _ in folded])
            self.biases = nn.ParameterList([nn.Parameter(b) for _, b in folded])
            self.w_out = nn.Parameter(g.out.weight.t().contiguous().float())
            self.b_out = nn.Parameter(g.out.bias.detach().clone().float())

    def forward(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x = torch.cat([eps, self.onehot[labels]], dim=1)
        for w, b in zip(self.weights, self.biases, strict=True):
            x = F.relu(torch.matmul(x, w) + b)
        latent: torch.Tensor = torch.matmul(x, self.w_out) + self.b_out
        return latent


def set_manifest(model: onnx.ModelProto, manifest: GeneratorManifest) -> None:
    """Writes (or replaces) the manifest in the model's metadata_props."""
    keep = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in keep}, MANIFEST_KEY: json.dumps(manifest.to_dict(), sort_keys=True)}
    )


class _GeneratorModule(FoldableGenerator, Protocol):
    def parameters(self) -> Any: ...
    def buffers(self) -> Any: ...


G = TypeVar("G", bound=_GeneratorModule)


def export_generator_onnx(generator: _GeneratorModule, config: dict[str, Any]) -> bytes:
    """Eval-mode export (BatchNorm running statistics frozen and folded) with a dynamic batch axis."""
    # A CPU copy: the coordinator's generator (maybe on CUDA, with Adam moments beside it) stays
    # where it trains and in the mode it was in.
    module = _InferenceGenerator(_cpu_view(generator)).eval()
    labels = torch.zeros(2, dtype=torch.long)
    eps = torch.zeros(2, int(config["noise_dim"]))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (labels, eps),
            buffer,  # type: ignore[arg-type]  # the exporter writes to any binary file object
            input_names=["labels", "eps"],
            output_names=["latent"],
            dynamic_axes={"labels": {0: "batch"}, "eps": {0: "batch"}, "latent": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    set_manifest(model, GeneratorManifest(config=dict(config), opset=OPSET, encoding="fp32"))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _cpu_view(generator: G) -> G:
    """The generator's parameters and buffers on the CPU without moving the original."""
    if all(t.device.type == "cpu" for t in [*generator.parameters(), *generator.buffers()]):
        return generator
    moved: G = copy.deepcopy(generator).to("cpu")  # type: ignore[attr-defined]  # an nn.Module
    return moved
