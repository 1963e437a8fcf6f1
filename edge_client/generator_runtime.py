"""The FedGen generator on the device: an ONNX model run by onnxruntime, frozen.

The client never trains the generator, so it needs no torch module for it: onnxruntime
computes latents and only the client's own model carries gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedgen.export.compression import decompress_frame, is_zstd_frame
from fedgen.export.generator_manifest import MANIFEST_KEY, GeneratorManifest, ManifestError
from fedgen.export.tensor_codecs import CodecError

#: Largest ONNX generator a compressed artifact may unpack to.
MAX_GENERATOR_BYTES = 64 * 1024 * 1024


class OnnxGenerator:
    """Runs any generator artifact the coordinator ships: fp32, fp16, int8 or 4-bit weights,
    as a plain ONNX file or wrapped in one Zstandard frame."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        data = Path(path).read_bytes()
        if is_zstd_frame(data):
            try:
                data = decompress_frame(data, MAX_GENERATOR_BYTES, label=f"generator {Path(path).name[:12]}")
            except CodecError as err:
                raise ManifestError(str(err)) from None
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise ManifestError(f"cannot load generator {path.name}: {err}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.manifest = GeneratorManifest.from_json(props.get(MANIFEST_KEY))
        names = tuple(i.name for i in self.session.get_inputs())
        if sorted(names) != sorted(self.manifest.inputs):
            raise ManifestError(f"generator inputs are {names}, expected {self.manifest.inputs}")
        cfg = self.manifest.config
        self.n_classes = int(cfg["n_classes"])
        self.noise_dim = int(cfg["noise_dim"])
        self.latent_dim = int(cfg["latent_dim"])
        self.noise = str(cfg["noise"])

    def sample_noise(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        if self.noise == "uniform":
            return rng.random((batch, self.noise_dim), dtype=np.float32)
        return rng.standard_normal((batch, self.noise_dim), dtype=np.float32)

    def latents(self, labels: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """G(labels, eps): float32 [B, latent_dim]."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"labels must be in [0, {self.n_classes})")
        out: np.ndarray
        (out,) = self.session.run(
            [self.manifest.output], {"labels": labels, "eps": np.ascontiguousarray(eps, np.float32)}
        )
        return out
