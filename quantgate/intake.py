"""Turn a downloaded MLflow model into one ONNX file: onnx as is, pytorch exported, sklearn converted."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from quantgate.errors import InvalidModel, UnsupportedFlavor
from quantgate.model import ModelInfo, read_model_info

log = logging.getLogger(__name__)

SUPPORTED_FLAVORS = ("onnx", "pytorch", "sklearn")
OPSET = 17
DEFAULT_INPUT = "input"
DEFAULT_OUTPUT = "output"


def _load_mlmodel(model_dir: Path) -> Any:
    from mlflow.models import Model

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise InvalidModel(f"no MLmodel file in the downloaded artifacts ({model_dir.name})")
    try:
        return Model.load(str(mlmodel))
    except Exception as exc:  # yaml errors, missing keys
        raise InvalidModel(f"MLmodel file cannot be read: {exc}") from exc


def flavor_of(model_dir: Path) -> str:
    flavors = set(_load_mlmodel(model_dir).flavors) - {"python_function"}
    for name in SUPPORTED_FLAVORS:
        if name in flavors:
            return name
    found = ", ".join(sorted(flavors)) or "python_function only"
    raise UnsupportedFlavor(
        f"model flavor '{found}' is not supported; quantgate compresses {', '.join(SUPPORTED_FLAVORS)} models"
    )


def to_onnx(model_dir: Path, workdir: Path) -> tuple[ModelInfo, str]:
    """The model as ONNX plus its flavor. Never writes into ``model_dir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    flavor = flavor_of(model_dir)
    meta = _load_mlmodel(model_dir)
    if flavor == "onnx":
        path = model_dir / meta.flavors["onnx"].get("data", "model.onnx")
        if not path.is_file():
            raise InvalidModel(f"the onnx flavor names {path.name}, which is not in the artifacts")
        return read_model_info(path), flavor
    out = workdir / "intake.onnx"
    if flavor == "pytorch":
        _export_pytorch(model_dir, meta, out)
    else:
        _convert_sklearn(model_dir, meta, out)
    return read_model_info(out), flavor


def _tensor_inputs(meta: Any) -> list[tuple[str, tuple[int, ...], Any]]:
    """(name, shape with -1 for dynamic, numpy dtype) per input from the signature or the input example."""
    sig = meta.signature
    if sig is not None and sig.inputs is not None and not getattr(sig, "is_signature_from_type_hint", False):
        specs = sig.inputs.inputs
        if all(hasattr(s, "shape") and hasattr(s, "type") and hasattr(s.type, "kind") for s in specs):
            return [
                (s.name or (DEFAULT_INPUT if len(specs) == 1 else f"input_{i}"), tuple(s.shape), s.type)
                for i, s in enumerate(specs)
            ]
    raise InvalidModel(
        "the pytorch model has no tensor input signature; log it with a signature "
        "(mlflow.pytorch.log_model(..., signature=infer_signature(x, y))) so quantgate knows the input shape"
    )


def _export_pytorch(model_dir: Path, meta: Any, out: Path) -> None:
    try:
        import mlflow.pytorch
        import torch
    except ImportError as exc:
        raise UnsupportedFlavor(f"pytorch models need torch installed ({exc})") from exc
    inputs = _tensor_inputs(meta)
    pt2 = next(iter(sorted(model_dir.glob("data/*.pt2"))), None)
    if pt2 is not None:
        _export_pt2(pt2, inputs, _output_names(meta), out)
        return
    module = mlflow.pytorch.load_model(str(model_dir), map_location="cpu")
    module.eval()
    dummies = tuple(
        torch.zeros([1 if d in (-1, None) else int(d) for d in shape], dtype=_torch_dtype(dtype))
        for _, shape, dtype in inputs
    )
    names = [n for n, _, _ in inputs]
    dynamic = {n: {i: f"{n}_dim{i}" for i, d in enumerate(shape) if d in (-1, None)} for n, shape, _ in inputs}
    out_names = _output_names(meta)
    dynamic.update({n: {0: f"{n}_dim0"} for n in out_names})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                dummies,
                str(out),
                input_names=names,
                output_names=out_names,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # torch's exporter raises many types; the first line says which op failed
        raise InvalidModel(f"cannot export the pytorch model to ONNX: {str(exc).splitlines()[0]}") from exc


def _export_pt2(path: Path, inputs: list[tuple[str, tuple[int, ...], Any]], out_names: list[str], out: Path) -> None:
    """MLflow's default 'pt2' format is a torch.export program; only the dynamo exporter takes it as is.

    MLflow exported it with the signature's -1 dims marked dynamic, so the ONNX keeps a dynamic batch.
    """
    import torch

    _quiet_torch()
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export raises many types
        raise InvalidModel(f"cannot export the pytorch (pt2) model to ONNX: {str(exc).splitlines()[0]}") from exc
    _export_program(program, inputs, out_names, out)


def _export_program(
    program: Any, inputs: list[tuple[str, tuple[int, ...], Any]], out_names: list[str], out: Path
) -> None:
    import torch

    try:
        args = tuple(
            torch.zeros([2 if d in (-1, None) else int(d) for d in shape], dtype=_torch_dtype(dtype))
            for _, shape, dtype in inputs
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.onnx.export(
                program,
                args,
                input_names=[n for n, _, _ in inputs],
                output_names=out_names,
                dynamo=True,
                # onnxscript's optimizer costs ~1.6 s here and ONNX Runtime optimises the graph anyway.
                optimize=False,
                opset_version=OPSET + 1,
                verbose=False,
            )
        assert exported is not None
        exported.save(str(out), external_data=False)
    except Exception as exc:  # torch.export / onnxscript raise many types
        raise InvalidModel(f"cannot export the pytorch (pt2) model to ONNX: {str(exc).splitlines()[0]}") from exc


@dataclass(frozen=True)
class TorchSource:
    """A pytorch model version as a torch module, with what exporting it to ONNX again needs."""

    module: Any  # a torch.fx.GraphModule: the version's torch.export program, as a module
    inputs: list[tuple[str, tuple[int, ...], Any]]  # (name, shape with -1 for dynamic, numpy dtype)
    output_names: list[str]

    def example_inputs(self, batch: int = 2) -> tuple[Any, ...]:
        import torch

        return tuple(
            torch.zeros([batch if d in (-1, None) else int(d) for d in shape], dtype=_torch_dtype(dtype))
            for _, shape, dtype in self.inputs
        )


def torch_source(model_dir: Path) -> TorchSource:
    """The downloaded pytorch version's graph and weights as a fresh module (quantization-aware training fine-tunes
    it); ``model_dir`` is only read. A pt2 version is its torch.export program; any other format is loaded the way
    intake loads it for the ONNX export, then captured with torch.export."""
    import torch

    meta = _load_mlmodel(model_dir)
    if flavor_of(model_dir) != "pytorch":
        raise UnsupportedFlavor("quantization-aware training needs a pytorch model")
    inputs, out_names = _tensor_inputs(meta), _output_names(meta)
    _quiet_torch()
    pt2 = next(iter(sorted(model_dir.glob("data/*.pt2"))), None)
    try:
        if pt2 is not None:
            program = torch.export.load(str(pt2))
        else:
            import mlflow.pytorch

            module = mlflow.pytorch.load_model(str(model_dir), map_location="cpu").eval()
            source = TorchSource(module, inputs, out_names)
            program = torch.export.export(module, source.example_inputs(), dynamic_shapes=_dynamic_batch(inputs))
    except Exception as exc:  # torch.export / unpickling raise many types
        raise InvalidModel(f"cannot load the pytorch model as a torch program: {str(exc).splitlines()[0]}") from exc
    return TorchSource(program.module(), inputs, out_names)


def _dynamic_batch(inputs: list[tuple[str, tuple[int, ...], Any]]) -> tuple[dict[int, Any], ...]:
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    return tuple({0: batch} if shape and shape[0] in (-1, None) else {} for _, shape, _ in inputs)


def export_torch(source: TorchSource, module: Any, out: Path) -> ModelInfo:
    """``module`` (``source``'s graph with other weights, e.g. fine-tuned) as ONNX, exported as intake exports
    ``source``: same input and output names, same dynamic batch."""
    import torch

    _quiet_torch()
    try:
        program = torch.export.export(module, source.example_inputs(), dynamic_shapes=_dynamic_batch(source.inputs))
    except Exception as exc:  # torch.export raises many types
        raise InvalidModel(f"cannot export the fine-tuned model: {str(exc).splitlines()[0]}") from exc
    _export_program(program, source.inputs, source.output_names, out)
    return read_model_info(out)


def _quiet_torch() -> None:
    # torch's ONNX exporter logs a warning per optional torchvision op at import; not the user's concern.
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _output_names(meta: Any) -> list[str]:
    sig = meta.signature
    if sig is not None and sig.outputs is not None:
        specs = sig.outputs.inputs
        names = [s.name for s in specs if getattr(s, "name", None)]
        if len(names) == len(specs) and names:
            return names
        if len(specs) > 1:
            return [f"output_{i}" for i in range(len(specs))]
    return [DEFAULT_OUTPUT]


def _torch_dtype(np_dtype: Any) -> Any:
    import numpy as np
    import torch

    mapping = {
        np.float32: torch.float32,
        np.float16: torch.float16,
        np.int64: torch.int64,
        np.int32: torch.int32,
    }
    return mapping.get(np.dtype(np_dtype).type, torch.float32)


def _convert_sklearn(model_dir: Path, meta: Any, out: Path) -> None:
    import mlflow.sklearn
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    estimator = mlflow.sklearn.load_model(str(model_dir))
    n_features = _sklearn_features(meta, estimator)
    is_classifier = hasattr(estimator, "predict_proba")
    options = {id(estimator): {"zipmap": False}} if is_classifier else None
    try:
        proto = convert_sklearn(
            estimator,
            initial_types=[(DEFAULT_INPUT, FloatTensorType([None, n_features]))],
            target_opset={"": OPSET, "ai.onnx.ml": 3},
            options=options,
        )
    except Exception as exc:  # skl2onnx raises RuntimeError/NotImplementedError for unknown estimators
        raise UnsupportedFlavor(
            f"cannot convert the sklearn model ({type(estimator).__name__}) to ONNX: {str(exc).splitlines()[0]}"
        ) from exc
    if is_classifier and len(proto.graph.output) > 1:
        # skl2onnx's first output is the int64 label; validators compare scores, so keep probabilities only.
        keep = [o for o in proto.graph.output if o.name != "label"]
        del proto.graph.output[:]
        proto.graph.output.extend(keep)
    onnx.save(proto, str(out))


def _sklearn_features(meta: Any, estimator: Any) -> int:
    n = getattr(estimator, "n_features_in_", None)
    if isinstance(n, int):
        return n
    sig = meta.signature
    if sig is not None and sig.inputs is not None:
        specs = sig.inputs.inputs
        if len(specs) == 1 and hasattr(specs[0], "shape"):
            return int(specs[0].shape[-1])
        return len(specs)
    raise InvalidModel("cannot tell the sklearn model's number of features (no n_features_in_, no signature)")
