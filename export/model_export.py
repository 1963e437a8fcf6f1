"""The trained global model as a file to deploy: ONNX for devices without torch, a TensorBundle, or a
torch state dict (coordinator side: needs torch and onnx).

The ONNX file takes what the task stores (``uint8 [N, 28, 28]`` pixels for MNIST, ``float32
[N, 9, 128]`` windows for HAR) and includes the task's preprocessing, so a device feeds it its raw
examples; its metadata (``fedgen.task``) names the task, the round and the input it expects.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any, Literal

import onnx
import torch
from torch import nn

from fedgen.core.models import load_numpy_state
from fedgen.core.task import PreparedTask, torch_dtype
from fedgen.export.codec import Encoding, State, bundle_to_bytes, encode_state
from fedgen.export.onnx_export import OPSET

ExportFormat = Literal["onnx", "bundle", "torch"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("onnx", "bundle", "torch")
#: metadata_props key of an exported model's description.
TASK_METADATA_KEY = "fedgen.task"
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class _Deployable(nn.Module):
    """Stored examples -> logits: the task's preprocessing, then the model."""

    def __init__(self, task: PreparedTask, state: State) -> None:
        super().__init__()
        self.preprocess = task.task.preprocess
        self.model = task.model()
        load_numpy_state(self.model, state)
        self.model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(self.preprocess(x))
        return logits


def model_to_onnx(task: PreparedTask, state: State, description: dict[str, Any] | None = None) -> bytes:
    """The model (eval mode, with preprocessing) as ONNX with a dynamic batch axis."""
    module = _Deployable(task, state).eval()
    spec = task.task.input
    example = torch.zeros((2, *spec.shape), dtype=torch_dtype(spec.dtype))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # the exporter writes to any binary file object
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    meta = {
        "name": task.identity.name,
        "version": task.identity.version,
        "state_spec_sha256": task.identity.state_spec_sha256,
        "input": {"name": INPUT_NAME, "shape": ["batch", *spec.shape], "dtype": spec.dtype},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", task.task.n_classes]},
        "preprocessing": "included",
        **(description or {}),
    }
    onnx.helper.set_model_props(model, {TASK_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def model_to_bundle(state: State) -> bytes:
    """A ``fedgen.v1.TensorBundle`` in fp32 (integer buffers stay integers): what a warm start reads."""
    return bundle_to_bytes(encode_state(state, Encoding()))


def model_to_torch(state: State) -> bytes:
    """``torch.save`` of the state dict: ``model.load_state_dict(torch.load(f, weights_only=True))``."""
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, buffer)
    return buffer.getvalue()


def export_model(
    task: PreparedTask, state: State, fmt: ExportFormat, description: dict[str, Any] | None = None
) -> bytes:
    if fmt == "onnx":
        return model_to_onnx(task, state, description)
    if fmt == "bundle":
        return model_to_bundle(state)
    return model_to_torch(state)
