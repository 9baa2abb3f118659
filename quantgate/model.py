"""What quantgate knows about an ONNX graph: its inputs, outputs and opset, read from the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from quantgate.errors import InvalidModel


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``None`` in ``shape`` is a dynamic dimension (e.g. batch)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass(frozen=True)
class ModelInfo:
    """An ONNX model on disk plus its interface."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    is_transformer: bool = False
    # The registered version as downloaded, before the ONNX intake: a backend that converts from the source format
    # itself (LiteRT from a pytorch program: ``quantgate.intake.torch_source(source_dir)``) reads it; only read.
    flavor: str | None = None
    source_dir: Path | None = None
    # Every op type of the graph: what a recipe or the search's priors may depend on (a recurrent layer, say).
    op_types: frozenset[str] = frozenset()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def is_recurrent(self) -> bool:
        return bool(self.op_types & {"LSTM", "GRU", "RNN"})


# Op types that only appear in attention blocks; used to pick transformer-safe settings.
_TRANSFORMER_OPS = {"Attention", "MultiHeadAttention", "LayerNormalization", "Softmax", "Erf", "Gelu"}


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims: list[int | None] = []
    for d in tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))


def onnx_opset(proto: onnx.ModelProto) -> int:
    """The graph's default-domain (``ai.onnx``) opset; 0 when it imports none."""
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def read_model_info(path: Path) -> ModelInfo:
    """Load and check an ONNX file; raise ``InvalidModel`` with the reason if it is not usable."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(f"{path.name} is not a valid ONNX model: {first}") from exc
    initializers = {i.name for i in proto.graph.initializer}
    inputs = tuple(_spec(v) for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in proto.graph.output)
    opset = onnx_opset(proto)
    op_types = {n.op_type for n in proto.graph.node}
    is_transformer = bool(op_types & _TRANSFORMER_OPS) and "MatMul" in op_types and "Conv" not in op_types
    return ModelInfo(
        path=path,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        is_transformer=is_transformer,
        op_types=frozenset(op_types),
    )
