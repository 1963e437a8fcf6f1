"""Generator artifacts in every encoding the link policy may choose (coordinator side).

From the fp32 ONNX export: fp16 (onnxruntime's float16 converter, fp32 inputs and outputs kept),
int8 weight quantisation (onnxruntime's ``quantize_dynamic`` after its own ``quant_pre_process``:
per-channel 7-bit weights, activations quantised on the fly) and 4-bit block-quantised weights
(onnxruntime's ``MatMulNBitsQuantizer``, needs the ``onnx-ir`` package). Each may be wrapped in one
Zstandard frame (``+zstd``); the client unwraps it (``fedgen.export.compression.decompress_frame``)
before onnxruntime loads it. The manifest inside records which encoding it is.

Why 7-bit int8 weights (``reduce_range``): on x86 CPUs without VNNI, onnxruntime's u8 x s8 integer
matmul adds pairs of products in 16 bits and saturates with full-range weights; measured on this
project's generator on an AVX2-only CPU, full range gave a max latent error of 0.076 against 0.007
with 7 bits. ARM and VNNI CPUs lose nothing measurable with 7 bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx

from fedgen.export.compression import compress
from fedgen.export.encoding import ONNX_WEIGHT_CODECS, Encoding, EncodingError
from fedgen.export.generator_manifest import MANIFEST_KEY, GeneratorManifest
from fedgen.export.onnx_export import set_manifest

#: Block size of the 4-bit weight quantiser (elements sharing one scale).
INT4_BLOCK_SIZE = 32


class ArtifactEncodingError(EncodingError):
    """An encoding this module does not make, or a quantiser that is not installed."""


def int4_available() -> bool:
    try:
        import onnx_ir  # noqa: F401
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
    except ImportError:
        return False
    return True


def preload_quantisers(codecs: Iterable[str]) -> None:
    """Imports now the quantisers `codecs` will need, so the first round that makes such a variant
    does not wait for them (onnxruntime's 4-bit quantiser and onnx-ir take about 0.75 s)."""
    wanted = set(codecs)
    if "int8" in wanted:
        with contextlib.suppress(ImportError):
            import onnxruntime.quantization.shape_inference
    if "fp16" in wanted:
        with contextlib.suppress(ImportError):
            import onnxruntime.transformers.float16  # noqa: F401
    if "int4" in wanted:
        int4_available()


def _quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, prepared, dst = Path(tmp) / "g.onnx", Path(tmp) / "p.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(model.SerializeToString())
        quant_pre_process(src, prepared)  # shape inference and graph optimisation, as the quantiser advises
        quantize_dynamic(prepared, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        return onnx.load_from_string(dst.read_bytes())


def _quantize_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    if not int4_available():
        raise ArtifactEncodingError(
            "4-bit generator weights need onnxruntime's MatMulNBitsQuantizer and onnx-ir (pip install onnx-ir)"
        )
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=INT4_BLOCK_SIZE, is_symmetric=True)
    quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    return quantized


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted: onnx.ModelProto = convert_float_to_float16(model, keep_io_types=True)
    return converted


_QUANTISERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "fp16": _to_fp16,
    "int8": _quantize_int8,
    "int4": _quantize_int4,
}


def available_generator_encodings(compressed: bool = True) -> tuple[Encoding, ...]:
    """The encodings this installation can make (int4 only with onnx-ir), most faithful first."""
    return tuple(Encoding(c, zstd=compressed) for c in ONNX_WEIGHT_CODECS if c != "int4" or int4_available())


def generator_variant(fp32_onnx: bytes, encoding: Encoding) -> bytes:
    """The fp32 export re-encoded: fp32, fp16, int8 or int4 weights, optionally in a zstd frame."""
    if encoding.codec not in ONNX_WEIGHT_CODECS or encoding.delta:
        raise ArtifactEncodingError(
            f"{encoding.name!r} is not a generator encoding; valid: "
            f"{', '.join(ONNX_WEIGHT_CODECS)}, each with an optional +zstd"
        )
    data = fp32_onnx
    if encoding.codec != "fp32":
        model = onnx.load_from_string(fp32_onnx)
        manifest = GeneratorManifest.from_json({p.key: p.value for p in model.metadata_props}.get(MANIFEST_KEY))
        model = _QUANTISERS[encoding.codec](model)
        set_manifest(model, dataclasses.replace(manifest, encoding=encoding.codec))
        data = model.SerializeToString()
    return compress(data) if encoding.zstd else data
