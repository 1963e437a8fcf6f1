"""What an ONNX generator artifact says about itself (client-safe: no torch, no onnx)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: metadata_props key holding the manifest JSON inside the ONNX file.
MANIFEST_KEY = "fedgen.manifest"
#: Inputs and output every generator artifact must have.
INPUTS = ("labels", "eps")
OUTPUT = "latent"


class ManifestError(ValueError):
    """The artifact's manifest is missing or does not describe a usable generator."""


@dataclass(frozen=True)
class GeneratorManifest:
    config: dict[str, Any]
    opset: int
    encoding: str = "fp32"
    inputs: tuple[str, ...] = INPUTS
    output: str = OUTPUT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, text: str | None) -> GeneratorManifest:
        if not text:
            raise ManifestError(f"ONNX artifact has no '{MANIFEST_KEY}' metadata")
        try:
            raw = json.loads(text)
            manifest = cls(
                config=dict(raw["config"]),
                opset=int(raw["opset"]),
                encoding=str(raw.get("encoding", "fp32")),
                inputs=tuple(raw.get("inputs", INPUTS)),
                output=str(raw.get("output", OUTPUT)),
                extra=dict(raw.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"generator manifest is malformed: {err}") from None
        for key in ("n_classes", "noise_dim", "latent_dim", "noise"):
            if key not in manifest.config:
                raise ManifestError(f"generator manifest config lacks {key!r}")
        if manifest.config["noise"] not in ("uniform", "normal"):
            raise ManifestError(f"unknown noise kind {manifest.config['noise']!r}")
        return manifest
