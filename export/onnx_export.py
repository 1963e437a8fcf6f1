"""The generator as an ONNX artifact with its manifest (coordinator side: needs torch.onnx and onnx).

The manifest (generator config, opset, input/output names) travels inside the ONNX file
as metadata_props, so the artifact is self-describing; its sha256 is the artifact id.
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any

import onnx
import torch

from export.generator_manifest import MANIFEST_KEY, GeneratorManifest

OPSET = 17


def export_generator_onnx(generator: torch.nn.Module, config: dict[str, Any]) -> bytes:
    """Eval-mode export (BatchNorm running statistics frozen) with a dynamic batch axis."""
    # A CPU copy: Module.to() moves in place, and the coordinator's generator (maybe on CUDA,
    # with Adam moments beside it) must stay where it trains and in the mode it was in.
    module = copy.deepcopy(generator).to("cpu").eval()
    labels = torch.zeros(2, dtype=torch.long)
    eps = torch.zeros(2, int(config["noise_dim"]))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (labels, eps), buffer, input_names=["labels", "eps"], output_names=["latent"],
            dynamic_axes={"labels": {0: "batch"}, "eps": {0: "batch"}, "latent": {0: "batch"}},
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    manifest = GeneratorManifest(config=dict(config), opset=OPSET, encoding="fp32")
    onnx.helper.set_model_props(model, {MANIFEST_KEY: json.dumps(manifest.to_dict(), sort_keys=True)})
    onnx.checker.check_model(model)
    return model.SerializeToString()
