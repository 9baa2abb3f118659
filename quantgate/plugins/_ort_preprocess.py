"""ONNX Runtime's quantization pre-processing (shape inference + graph optimisation), cached per model.

Shared by the backends that quantize ONNX with onnxruntime's tools (ONNX Runtime's own, TensorRT's QDQ step), so
neither backend imports the other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from quantgate.plugins.base import first_line, model_files

log = logging.getLogger(__name__)

# On a failed symbolic shape inference, onnxruntime saves the half-inferred model, with external data under a
# random name, into the current working directory: the user's repository, typically.
_ORT_DEBUG_DUMP = Path("sym_shape_infer_temp.onnx")


def preprocess(src: Path, workdir: Path) -> tuple[Path, tuple[str, ...]]:
    """Shape inference + graph optimisation once per model (cached in ``workdir``); symbolic inference may fail on
    transformers, then it runs without it, then the model is used as given. Returns the model to quantize and notes."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "preprocessed.onnx"
    marker = workdir / "preprocessed.note"
    if out.exists():
        return out, tuple(marker.read_text().splitlines()) if marker.exists() else ()
    dump_existed = _ORT_DEBUG_DUMP.exists()
    try:
        quant_pre_process(str(src), str(out))
        notes: tuple[str, ...] = ()
    except Exception as exc:  # "Incomplete symbolic shape inference" on transformer exports
        if not dump_existed:
            _remove_ort_debug_dump()
        log.info("symbolic shape inference failed (%s); retrying without it", first_line(exc))
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            notes = ("pre-processing ran without symbolic shape inference (it failed on this graph)",)
        except Exception as exc2:
            log.info("pre-processing failed (%s); quantizing the model as given", first_line(exc2))
            return src, ("pre-processing skipped: " + first_line(exc2),)
    marker.write_text("\n".join(notes))
    return out, notes


# Per-axis QuantizeLinear/DequantizeLinear (the ``axis`` attribute) exist from opset 13.
PER_CHANNEL_OPSET = 13


def per_channel_ready(src: Path, opset: int, workdir: Path) -> tuple[Path, tuple[str, ...]]:
    """``src`` (a graph at ``opset``; 0: it imports no default domain) at opset 13 or above, converted once per model
    (cached in ``workdir``) where it is older.

    onnxruntime's quantizer writes per-channel Q/DQ nodes with an ``axis`` into an opset-11 graph as it is, and its
    own runtime then refuses the model (``Unrecognized attribute: axis``): seen on the real PP-OCR classifier.
    """
    import onnx
    from onnx import version_converter

    if opset == 0 or opset >= PER_CHANNEL_OPSET:
        return src, ()
    out = workdir / f"{src.stem}-opset{PER_CHANNEL_OPSET}.onnx"
    note = f"converted from opset {opset} to {PER_CHANNEL_OPSET} for per-channel Q/DQ (axis needs opset 13)"
    if not out.exists():
        full = onnx.load(str(src))
        onnx.save(version_converter.convert_version(full, PER_CHANNEL_OPSET), str(out))
    return out, (note,)


def _remove_ort_debug_dump() -> None:
    if not _ORT_DEBUG_DUMP.exists():
        return
    for extra in model_files(_ORT_DEBUG_DUMP)[1:]:
        extra.unlink(missing_ok=True)
    _ORT_DEBUG_DUMP.unlink(missing_ok=True)
