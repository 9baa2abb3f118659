"""Turn a downloaded MLflow model into one ONNX file: onnx as is, pytorch exported, sklearn converted.

Trust model (README, "Trust model"): formats that are data load here, in the worker (ONNX; torch.export ``pt2``
archives checked by :mod:`quantgate.safe_load` and read without unpickling; sklearn models in skops with trusted
types only). Formats that run code when loaded (pickled pytorch modules, pickle/cloudpickle sklearn, pt2 archives
holding pickled objects) are refused unless the run allows pickle, and then load in the isolated process of
:mod:`quantgate.isolation`, never here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from quantgate import isolation, safe_load
from quantgate.errors import InvalidModel, UnsafeModel, UnsupportedFlavor
from quantgate.model import ModelInfo, read_model_info

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SUPPORTED_FLAVORS = ("onnx", "pytorch", "sklearn")
OPSET = 17
DEFAULT_INPUT = "input"
DEFAULT_OUTPUT = "output"
ALLOW_HINT = (
    "allow pickled models with the policy key intake.allow_pickle: true (automation: allow_pickle: true on the "
    "rule); they then load in a separate process without the worker's credentials"
)

Inputs = list[tuple[str, tuple[int, ...], Any]]


def load_exported_program(path: Path) -> torch.export.ExportedProgram:
    """A ``torch.export`` program from a ``.pt2`` archive, read without unpickling or running anything from it.

    Raises ``UnsafeModel`` for an archive that would need that (pickled objects, native code, expressions or names
    outside what torch writes), ``InvalidModel`` for one torch cannot read.
    """
    from torch.export.pt2_archive._package import load_pt2

    safe_load.check_pt2(path)
    _quiet_torch()
    try:
        # load_pt2, not torch.export.load: the latter falls back to an older, pickled format on any error.
        contents = load_pt2(str(path))
    except Exception as exc:  # torch raises many types on a damaged archive
        raise InvalidModel(f"cannot read the pt2 archive {path.name}: {_first_line(exc)}") from exc
    programs = contents.exported_programs
    if len(programs) != 1:
        raise InvalidModel(f"the pt2 archive {path.name} holds {len(programs)} programs, expected one")
    return next(iter(programs.values()))


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


def to_onnx(model_dir: Path, workdir: Path, *, allow_pickle: bool = False) -> tuple[ModelInfo, str]:
    """The model as ONNX plus its flavor. Never writes into ``model_dir``; never unpickles in this process."""
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
        _pytorch(model_dir, meta, out, allow_pickle)
    else:
        _sklearn(model_dir, meta, out, allow_pickle)
    return read_model_info(out), flavor


def _pytorch(model_dir: Path, meta: Any, out: Path, allow_pickle: bool) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise UnsupportedFlavor(f"pytorch models need torch installed ({exc})") from exc
    inputs, outputs = _tensor_inputs(meta), _output_names(meta)
    pt2 = next(iter(sorted(model_dir.glob("data/*.pt2"))), None)
    if pt2 is not None:
        try:
            program = load_exported_program(pt2)
        except UnsafeModel as exc:
            if not allow_pickle:
                raise UnsafeModel(f"refused to load the pytorch model: {exc}; {ALLOW_HINT}") from None
            log.warning("pytorch pt2 archive needs pickle (%s): loading it in an isolated process", exc)
            _isolated("pytorch-pt2", model_dir, pt2, inputs, outputs, out)
            return
        export_program(program, inputs, outputs, out)
        return
    pth = model_dir / "data" / "model.pth"
    if not pth.is_file():
        raise InvalidModel("the pytorch model has neither a pt2 archive nor data/model.pth")
    if not allow_pickle:
        raise UnsafeModel(
            "refused to load the pytorch model: it is pickled (data/model.pth), and unpickling runs any code its "
            "author put in it; log it with serialization_format='pt2' (MLflow's default), or " + ALLOW_HINT
        )
    module_file = model_dir / "data" / "pickle_module_info.txt"
    pickle_module = module_file.read_text().strip() if module_file.is_file() else "pickle"
    _isolated("pytorch-pickle", model_dir, pth, inputs, outputs, out, pickle_module=pickle_module)


def _sklearn(model_dir: Path, meta: Any, out: Path, allow_pickle: bool) -> None:
    conf = meta.flavors["sklearn"]
    fmt = str(conf.get("serialization_format", "cloudpickle"))
    path = model_dir / str(conf.get("pickled_model", "model.pkl"))
    if not path.is_file():
        raise InvalidModel(f"the sklearn flavor names {path.name}, which is not in the artifacts")
    n_features = _signature_features(meta)
    if fmt == "skops":
        try:
            safe_load.check_skops(path)
        except UnsafeModel as exc:
            if not allow_pickle:
                raise UnsafeModel(f"refused to load the sklearn model: {exc}; {ALLOW_HINT}") from None
            _isolated("sklearn-skops", model_dir, path, [], [], out, n_features=n_features)
            return
        from skops.io import load

        convert_estimator(load(path, trusted=[]), n_features, out)
        return
    if fmt not in ("pickle", "cloudpickle"):
        raise UnsupportedFlavor(f"sklearn serialization format '{fmt}' is not supported (skops, pickle, cloudpickle)")
    if not allow_pickle:
        raise UnsafeModel(
            f"refused to load the sklearn model: it is saved with {fmt}, and unpickling runs any code its author put "
            "in it; log it with serialization_format='skops' (MLflow's default), or " + ALLOW_HINT
        )
    _isolated(f"sklearn-{fmt}", model_dir, path, [], [], out, n_features=n_features)


def _isolated(
    kind: str,
    model_dir: Path,
    model_file: Path,
    inputs: Inputs,
    outputs: list[str],
    out: Path,
    *,
    n_features: int | None = None,
    pickle_module: str = "pickle",
) -> None:
    import numpy as np

    request = isolation.Request(
        kind=kind,
        model_file=str(model_file.relative_to(model_dir)),
        out=str(out),
        inputs=[
            (n, [int(d) if d not in (None, -1) else -1 for d in shape], np.dtype(t).name) for n, shape, t in inputs
        ],
        outputs=outputs,
        n_features=n_features,
        pickle_module=pickle_module,
    )
    log.info("loading the %s model in an isolated process (%s)", kind, isolation.describe().describe())
    isolation.convert(request, model_dir, out)


def _tensor_inputs(meta: Any) -> Inputs:
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


def export_module(module: Any, inputs: Inputs, out_names: list[str], out: Path) -> None:
    """A loaded ``nn.Module`` (or TorchScript module) to ONNX through the TorchScript exporter."""
    import torch

    module.eval()
    dummies = tuple(
        torch.zeros([1 if d in (-1, None) else int(d) for d in shape], dtype=_torch_dtype(dtype))
        for _, shape, dtype in inputs
    )
    names = [n for n, _, _ in inputs]
    dynamic = {n: {i: f"{n}_dim{i}" for i, d in enumerate(shape) if d in (-1, None)} for n, shape, _ in inputs}
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
        raise InvalidModel(f"cannot export the pytorch model to ONNX: {_first_line(exc)}") from exc


def export_program(program: Any, inputs: Inputs, out_names: list[str], out: Path) -> None:
    """A ``torch.export`` program to ONNX: only the dynamo exporter takes it as is.

    MLflow exported it with the signature's -1 dims marked dynamic, so the ONNX keeps a dynamic batch.
    """
    import torch

    _quiet_torch()
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
        raise InvalidModel(f"cannot export the pytorch (pt2) model to ONNX: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
    it); ``model_dir`` is only read. Only a pt2 version (its torch.export program, checked before loading) can be
    fine-tuned: a pickled module is never unpickled in the worker's own process."""
    meta = _load_mlmodel(model_dir)
    if flavor_of(model_dir) != "pytorch":
        raise UnsupportedFlavor("quantization-aware training needs a pytorch model")
    inputs, out_names = _tensor_inputs(meta), _output_names(meta)
    _quiet_torch()
    pt2 = next(iter(sorted(model_dir.glob("data/*.pt2"))), None)
    if pt2 is None:
        # A pickled module is only ever unpickled in an isolated process (trust model); fine-tuning needs it here.
        raise UnsafeModel(
            "quantization-aware training needs the pytorch model as a pt2 (torch.export) archive, MLflow's default "
            "serialization_format; this version is pickled (data/model.pth), and pickles are never loaded in the "
            "worker's own process"
        )
    try:
        program = load_exported_program(pt2)  # checked before loading: no pickle, no code in shape expressions
    except UnsafeModel as exc:
        raise UnsafeModel(f"refused to load the pytorch model for quantization-aware training: {exc}") from None
    except Exception as exc:  # torch.export raises many types
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
    export_program(program, source.inputs, source.output_names, out)
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


def convert_estimator(estimator: Any, n_features: int | None, out: Path) -> None:
    """A loaded sklearn estimator to ONNX with skl2onnx (classifiers output probabilities)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    n = getattr(estimator, "n_features_in_", None)
    n_features = n if isinstance(n, int) else n_features
    if n_features is None:
        raise InvalidModel("cannot tell the sklearn model's number of features (no n_features_in_, no signature)")
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
            f"cannot convert the sklearn model ({type(estimator).__name__}) to ONNX: {_first_line(exc)}"
        ) from exc
    if is_classifier and len(proto.graph.output) > 1:
        # skl2onnx's first output is the int64 label; validators compare scores, so keep probabilities only.
        keep = [o for o in proto.graph.output if o.name != "label"]
        del proto.graph.output[:]
        proto.graph.output.extend(keep)
    onnx.save(proto, str(out))


def _signature_features(meta: Any) -> int | None:
    sig = meta.signature
    if sig is not None and sig.inputs is not None:
        specs = sig.inputs.inputs
        if len(specs) == 1 and hasattr(specs[0], "shape"):
            return int(specs[0].shape[-1])
        return len(specs)
    return None
