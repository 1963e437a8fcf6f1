"""Generator artifacts in every encoding the link policy may choose (coordinator side).

From the fp32 ONNX export: fp16 (onnxruntime's float16 converter, fp32 inputs and outputs
kept), int8 weight quantisation (onnxruntime's ``quantize_dynamic``: per-channel int8
weights, activations quantised on the fly) and 4-bit block-quantised weights
(onnxruntime's ``MatMulNBitsQuantizer``, needs the ``onnx-ir`` package). Each may be wrapped
in one Zstandard frame (``+zstd``); the client unwraps it (``export.codec.decompress_frame``)
before onnxruntime loads it. The manifest inside records which encoding it is.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import onnx
import zstandard

from export.codec import ZSTD_LEVEL
from export.generator_manifest import MANIFEST_KEY, GeneratorManifest
from export.onnx_export import set_manifest

_LOGGER = logging.getLogger(__name__)

#: Generator weight encodings, most faithful first.
GENERATOR_ENCODINGS = ("fp32", "fp16", "int8", "int4")
#: Block size of the 4-bit weight quantiser (elements sharing one scale).
INT4_BLOCK_SIZE = 32


class ArtifactEncodingError(ValueError):
    """An encoding name this module does not make, or a quantiser that is not installed."""


def int4_available() -> bool:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
        import onnx_ir  # noqa: F401
    except ImportError:
        return False
    return True


def _quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # it advises "pre-processing" on every call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "g.onnx", Path(tmp) / "q.onnx"
            src.write_bytes(model.SerializeToString())
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
            return onnx.load_from_string(dst.read_bytes())
    finally:
        quant_logger.setLevel(level)


def _quantize_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    if not int4_available():
        raise ArtifactEncodingError("4-bit generator weights need onnxruntime's MatMulNBitsQuantizer and onnx-ir "
                                    "(pip install onnx-ir)")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, block_size=INT4_BLOCK_SIZE, is_symmetric=True)
    quantizer.process()
    return quantizer.model.model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def generator_variant(fp32_onnx: bytes, name: str) -> bytes:
    """The fp32 export re-encoded as ``name``: fp32, fp16, int8 or int4, optionally ``+zstd``."""
    base, plus, suffix = name.partition("+")
    if base not in GENERATOR_ENCODINGS or (plus and suffix != "zstd"):
        raise ArtifactEncodingError(f"unknown generator encoding {name!r}; valid: "
                                    f"{', '.join(GENERATOR_ENCODINGS)}, each with an optional +zstd")
    model = onnx.load_from_string(fp32_onnx)
    props = {p.key: p.value for p in model.metadata_props}
    manifest = GeneratorManifest.from_json(props.get(MANIFEST_KEY))
    if base != "fp32":
        model = {"fp16": _to_fp16, "int8": _quantize_int8, "int4": _quantize_int4}[base](model)
        set_manifest(model, dataclasses.replace(manifest, encoding=base))
    data = model.SerializeToString() if base != "fp32" else fp32_onnx
    if plus:
        data = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)
    return data


def available_generator_encodings(compressed: bool = True) -> tuple[str, ...]:
    """The encodings this installation can make (int4 only with onnx-ir), most faithful first."""
    names = [n for n in GENERATOR_ENCODINGS if n != "int4" or int4_available()]
    return tuple(f"{n}+zstd" if compressed else n for n in names)
