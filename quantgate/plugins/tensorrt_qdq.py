"""INT8 QDQ ONNX in the one form TensorRT's explicit quantization reads: build it anywhere, and check a file for it.

TensorRT 10.1 deprecated its INT8 calibrators; TensorRT 11 removed them and the FP16/INT8 builder flags. Networks are
strongly typed: precision comes from the ONNX itself (Q/DQ nodes for INT8, FP16 weights and Cast nodes for FP16).
TensorRT accepts Q/DQ only when quantization is symmetric (every zero point 0) in INT8, activations per-tensor, weights
per output channel, bias left in float, opset >= 13, and no QOperator or dynamic-quantization op. NVIDIA Model
Optimizer gets there by calling ONNX Runtime's ``quantize_static`` with symmetric settings; so does
:func:`make_tensorrt_qdq`. Nothing here needs TensorRT or a GPU: the engine build is in ``tensorrt.py``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantgate.errors import BackendError
from quantgate.model import onnx_opset
from quantgate.plugins.base import Calibration

# Weighted ops whose inputs get Q/DQ; TensorRT's placement guidance: quantize their inputs, not their outputs.
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
MIN_OPSET = 13
# Kept in FP32 by the FP16 conversions: TensorRT warns that FP16 LayerNorm overflows on real activations.
KEEP_FP32_OP_TYPES = ("LayerNormalization",)

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
_FORBIDDEN = {
    "QLinearConv": "a QOperator-format op; quantize with quant_format=QDQ",
    "QLinearMatMul": "a QOperator-format op; quantize with quant_format=QDQ",
    "ConvInteger": "an integer op from dynamic quantization; quantize statically to QDQ",
    "MatMulInteger": "an integer op from dynamic quantization; quantize statically to QDQ",
    "DynamicQuantizeLinear": "dynamic quantization; TensorRT needs static scales from calibration",
}
# Quantized com.microsoft ops that onnxruntime's quantizers emit; TensorRT's ONNX parser has none of them.
_FORBIDDEN_CONTRIB = ("QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM")

_TRT_EXTRA_OPTIONS: dict[str, object] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    # onnxruntime's own note: TensorRT wants a Q/DQ pair per consumer rather than one shared pair.
    "DedicatedQDQPair": True,
    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
}


class TensorRtQdqError(BackendError):
    """The ONNX built for TensorRT breaks a rule of its QDQ form; ``violations`` lists every broken rule.

    A ``BackendError`` (not an ``InputError``): the file is ours, so a violation means this recipe failed to build,
    and the pipeline records it as a failed candidate.
    """

    def __init__(self, recipe: str, violations: list[str]) -> None:
        self.violations = list(violations)
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"{recipe}: the ONNX is not in TensorRT's QDQ form: {violations[0]}{more}")


# -- building --------------------------------------------------------------------------------------------


def make_tensorrt_qdq(
    src: Path, out: Path, calib: Calibration, *, fp16_fallback: bool, prep_dir: Path | None = None
) -> tuple[str, ...]:
    """Quantize ``src`` to symmetric INT8 QDQ that TensorRT reads; return notes on how it was built.

    Pre-processing (shape inference + graph optimisation) is onnxruntime's, shared with the ONNX Runtime backend and
    cached as ``prep_dir/preprocessed.onnx`` when ``prep_dir`` is given. With ``fp16_fallback`` the float layers left
    outside Q/DQ are converted to FP16, with Cast nodes at the borders, which is how a strongly typed network learns
    to run them in FP16.
    """
    from quantgate.plugins._ort_preprocess import preprocess

    # onnxruntime's shape inference and calibrators print() progress and warnings
    with tempfile.TemporaryDirectory(prefix="quantgate-trt-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        prepared, notes = preprocess(src, prep_dir or Path(tmp))
        _quantize_static(prepared, out, calib)
    if fp16_fallback:
        notes = (*notes, _fp16_outside_qdq(out))
    return notes


def make_tensorrt_fp16(src: Path, out: Path) -> tuple[str, ...]:
    """Convert ``src`` to FP16 weights and compute, float32 at the graph's inputs and outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *KEEP_FP32_OP_TYPES]
    )
    _drop_cast_round_trips(converted.graph)
    _sort_topologically(converted.graph)
    onnx.save(converted, str(out))
    kept = sum(n.op_type in KEEP_FP32_OP_TYPES for n in model.graph.node)
    return (f"fp16: {kept} {'/'.join(KEEP_FP32_OP_TYPES)} node(s) kept in FP32",) if kept else ()


def _quantize_static(src: Path, out: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from quantgate.plugins._ort_calibration import StreamingCalibrationReader, streaming_extra_options

    reader = StreamingCalibrationReader(
        calib.dataset, batch_size=calib.batch_size, batches_per_chunk=4, limit=calib.limit
    )
    quantize_static(
        str(src),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={**streaming_extra_options(), **_TRT_EXTRA_OPTIONS},
    )


def _fp16_outside_qdq(path: Path) -> str:
    """Convert in place every float node that is neither Q/DQ nor fed by a DQ; return a note."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(path))
    _name_nodes(model.graph)
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    # A DQ must feed its consumer directly for TensorRT to fuse the pair into an INT8 kernel, and DQ-13 only
    # produces float32: so the quantized ops stay FP32 around their Q/DQ, and Casts go at the region's borders.
    keep = {n.name for n in model.graph.node if n.op_type in _QDQ or dq_outputs.intersection(n.input)}
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *KEEP_FP32_OP_TYPES],
        node_block_list=sorted(keep),
    )
    _drop_cast_round_trips(converted.graph)
    _sort_topologically(converted.graph)  # the converter appends its Casts at the end of the node list
    onnx.save(converted, str(path))
    g = converted.graph
    fp16 = {v.name for v in g.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    converted_nodes = sum(n.op_type != "Cast" and bool(fp16.intersection(n.output)) for n in g.node)
    casts = sum(n.op_type == "Cast" for n in g.node) - sum(n.op_type == "Cast" for n in model.graph.node)
    return f"fp16 fallback: {converted_nodes} node(s) outside Q/DQ run in FP16, {casts} Cast node(s) at the borders"


def _drop_cast_round_trips(graph: onnx.GraphProto) -> None:
    """Remove the FP32 -> FP16 -> FP32 Cast pairs the converter puts on every tensor between two FP32-kept nodes.

    They would round the graph input and every DQ output to FP16 for nothing, and a Cast between a DQ and its
    consumer keeps TensorRT from fusing the pair into an INT8 kernel.
    """
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: list[onnx.NodeProto] = []
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if first is None or first.op_type != "Cast" or _cast_to(node) != f32 or _cast_to(first) != f16:
            continue
        source = first.input[0]
        if types.get(source, f32 if source in producer else 0) != f32:
            continue
        if node.output[0] in outputs:  # a graph output keeps its name: pass the FP32 tensor through
            node.op_type, node.input[0] = "Identity", source
            del node.attribute[:]
        else:
            rename[node.output[0]] = source
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    used = {i for n in graph.node for i in n.input} | outputs
    for node in [n for n in graph.node if n.op_type == "Cast" and not used.intersection(n.output)]:
        graph.node.remove(node)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs, keeping the given order where it can."""
    ready = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # names bound outside node inputs (subgraphs): keep what is left as given
            break
        pending = rest
    del graph.node[:]
    graph.node.extend([*ordered, *pending])


def _cast_to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), 0)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names: the FP16 converter's block list matches nodes by name."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


# -- checking --------------------------------------------------------------------------------------------


@dataclass
class _Graph:
    consts: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]
    types: dict[str, int]  # elem_type of graph inputs / value_info, where the file records it
    base_dir: str

    @classmethod
    def of(cls, model: onnx.ModelProto, base_dir: Path) -> _Graph:
        graph = model.graph
        consts = {t.name: t for t in graph.initializer}
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    consts[node.output[0]] = value
            for out in node.output:
                producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    consumers[name].append((node, i))
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
        return cls(consts, producer, dict(consumers), types, str(base_dir))

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.consts.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor, base_dir=self.base_dir)


def check_tensorrt_qdq(path: Path) -> list[str]:
    """Every way the ONNX at ``path`` breaks TensorRT's QDQ form, one line per violation; empty when it is fine.

    Raises nothing, not even for an unreadable file: that is a violation too, and the caller decides.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError...: the caller gets it as a violation
        return [f"model: {path.name} cannot be read as ONNX ({type(exc).__name__}: {exc})"]
    out = _check_opset(model)
    g = _Graph.of(model, path.parent)
    for i, node in enumerate(model.graph.node):
        label = f"node '{node.name or f'{node.op_type}#{i}'}'"
        out.extend(f"{label}: {v}" for v in _check_node(node, g))
    return out


def _check_opset(model: onnx.ModelProto) -> list[str]:
    opset = onnx_opset(model)
    if opset >= MIN_OPSET:
        return []
    return [
        f"model: opset must be >= {MIN_OPSET} for TensorRT (per-channel QuantizeLinear/DequantizeLinear), "
        f"found {opset}; re-export with opset_version >= {MIN_OPSET}"
    ]


def _check_node(node: onnx.NodeProto, g: _Graph) -> list[str]:
    default_domain = node.domain in ("", "ai.onnx")
    if node.op_type in _FORBIDDEN and default_domain:
        return [f"{node.op_type} is rejected by TensorRT: {_FORBIDDEN[node.op_type]}"]
    if node.op_type.startswith("QLinear") or node.op_type in _FORBIDDEN_CONTRIB:
        return [f"{node.op_type} ({node.domain or 'ai.onnx'}) is rejected by TensorRT: use standard QDQ ops"]
    if node.op_type in _QDQ and not default_domain:
        return [f"{node.op_type} must be in the standard ONNX domain for TensorRT, found '{node.domain}'"]
    out: list[str] = []
    if node.op_type in _BIAS_OPS and len(node.input) > 2 and node.input[2]:
        dq = g.producer.get(node.input[2])
        if dq is not None and dq.op_type == "DequantizeLinear":
            out.append(
                f"bias (input 2) must stay float for TensorRT, found it dequantized by '{dq.name}' "
                "(quantize with QuantizeBias=False)"
            )
    if node.op_type in _QDQ:
        out.extend(_check_qdq(node, g))
    return out


def _check_qdq(node: onnx.NodeProto, g: _Graph) -> list[str]:
    out = _check_zero_point(node, g)
    feeds = g.consumers.get(node.output[0], [])
    bias_only = bool(feeds) and all(c.op_type in _BIAS_OPS and i == 2 for c, i in feeds)
    dtype = _quant_dtype(node, g)
    if dtype is not None and dtype != onnx.TensorProto.INT8 and not bias_only:  # a quantized bias is reported once
        out.append(f"quantized type must be int8 for TensorRT INT8, found {onnx.TensorProto.DataType.Name(dtype)}")
    if _weight_initializer(node, g) is None:
        shape = _dims(g.consts.get(node.input[1]))
        if shape is not None and int(np.prod(shape)) > 1:
            out.append(f"activation scale must be per-tensor (a scalar) for TensorRT, found shape {shape}")
    elif node.op_type == "DequantizeLinear":
        out.extend(_check_weight_axis(node, g, feeds))
    return out


def _check_zero_point(node: onnx.NodeProto, g: _Graph) -> list[str]:
    if len(node.input) < 3 or not node.input[2]:
        return []  # a missing zero point is 0
    zp = g.array(node.input[2])
    if zp is None:
        return [f"zero point '{node.input[2]}' must be a constant 0 for TensorRT, found a computed tensor"]
    nonzero = zp[zp != 0]
    if nonzero.size == 0:
        return []
    where = f" ({nonzero.size} of {zp.size} entries)" if zp.size > 1 else ""
    return [f"zero point must be 0 for TensorRT (symmetric quantization), found {int(nonzero.flat[0])}{where}"]


def _quant_dtype(node: onnx.NodeProto, g: _Graph) -> int | None:
    """The integer type this Q/DQ works in, or None when the file does not say."""
    if len(node.input) > 2 and node.input[2] and node.input[2] in g.consts:
        return g.consts[node.input[2]].data_type
    if node.op_type == "QuantizeLinear":
        explicit = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), None)
        return explicit or onnx.TensorProto.UINT8  # the ONNX default without a zero point
    x = node.input[0]
    if x in g.consts:
        return g.consts[x].data_type
    prod = g.producer.get(x)
    if prod is not None and prod.op_type == "QuantizeLinear":
        return _quant_dtype(prod, g)
    return g.types.get(x) or None


def _weight_initializer(node: onnx.NodeProto, g: _Graph) -> onnx.TensorProto | None:
    """The constant behind this Q/DQ (weight Q/DQ), or None for an activation Q/DQ."""
    x = node.input[0]
    if x in g.consts:
        return g.consts[x]
    prod = g.producer.get(x)
    if node.op_type == "DequantizeLinear" and prod is not None and prod.op_type == "QuantizeLinear":
        return g.consts.get(prod.input[0])
    return None


def _check_weight_axis(dq: onnx.NodeProto, g: _Graph, feeds: list[tuple[onnx.NodeProto, int]]) -> list[str]:
    weight = _weight_initializer(dq, g)
    assert weight is not None
    rank = len(weight.dims)
    scale = _dims(g.consts.get(dq.input[1]))
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)  # the ONNX default axis is 1
    axis = axis + rank if axis < 0 else axis
    out: list[str] = []
    for consumer, index in feeds:
        if consumer.op_type == "Cast":
            out.append(
                f"weight DequantizeLinear must feed its Conv/MatMul/Gemm directly for TensorRT to fuse it into an "
                f"INT8 kernel, found Cast '{consumer.name}' in between"
            )
        expected = _channel_axis(consumer, rank)
        if index != 1 or expected is None or scale is None:
            continue
        what = f"weight of {consumer.op_type} '{consumer.name}'"
        if len(scale) == 0 or (int(np.prod(scale)) == 1 and weight.dims[expected] != 1):
            out.append(
                f"{what} must be quantized per output channel (axis {expected}) for TensorRT, found a per-tensor scale"
            )
        elif axis != expected:
            out.append(f"per-channel axis of the {what} must be {expected} for TensorRT, found {axis}")
    return out


def _channel_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of a weight feeding ``consumer``'s input 1."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def _dims(tensor: onnx.TensorProto | None) -> list[int] | None:
    return None if tensor is None else [int(d) for d in tensor.dims]
