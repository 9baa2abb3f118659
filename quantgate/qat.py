"""Quantization-aware fine-tuning (QAT) of PyTorch models, for when post-training quantization cannot hold the gate.

How a QAT candidate is made (``kind="qat"`` recipes, offered by backends through ``plugins.base.FineTunes``):

1. The source version's own torch program (``intake.torch_source``; the files are only read) gets fake quantizers
   the way the target backend will quantize: torchao's PT2E QAT flow (``prepare_qat_pt2e``) with the x86 annotation
   rules (convolutions and linear layers with their activations, adds, pools), activations per-tensor asymmetric
   UINT8 (ONNX Runtime's static QDQ) or symmetric INT8 (NNCF's performance preset for OpenVINO), weights per-channel
   symmetric INT8 for both; BatchNorm folded into the convolution weights it quantizes, as the backends fold it.
2. It is fine-tuned: by default by distillation from the FP32 model on the calibration inputs (the FP32 outputs are
   the targets, no labels needed); with a labelled ``data.training`` set, cross-entropy on the first output plus the
   distillation loss. BatchNorm statistics stay frozen and dropout off: a few hundred calibration samples are too few
   to re-estimate statistics. Seeded; stopped at its own budget between steps, keeping the weights reached.
3. The fine-tuned weights go back into a fresh copy of the source graph (never into the source), which is exported
   to ONNX as intake exports it, and the backend's own post-training recipe quantizes that: the artifact has exactly
   the placement, formats and float layers of that recipe (and so its speed), with weights trained to survive it.

Why torchao's PT2E and not NNCF's PyTorch QAT: MLflow's default pytorch format is a torch.export program, which is
what PT2E takes as it is; NNCF 3.4's torch backend fails on torch 2.13 here (a model whose root is ``nn.Sequential``
runs NNCF's hook storage as a layer; its quantizers compile a C++ extension at first use, over its own 60 s limit on
2 cores), and NNCF 3.4 ships only an adapter for an ``OpenVINOQuantizer`` whose class lives in ExecuTorch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendError, PolicyError
from quantgate.model import ModelInfo
from quantgate.plugins.base import Backend, FineTunes, Recipe, build_progress
from quantgate.policy import Policy

log = logging.getLogger(__name__)

KIND = "qat"
PYTORCH = "pytorch"
# Loss points logged per candidate at most (MLflow plots them by step); longer curves are thinned evenly.
MAX_LOGGED_STEPS = 500


def is_qat(recipe: Recipe | None) -> bool:
    return recipe is not None and recipe.options.get("kind") == KIND


def offered(backend: Backend, model: ModelInfo) -> list[Recipe]:
    """The backend's quantization-aware recipes (none for a backend without them)."""
    return backend.qat_recipes(model) if isinstance(backend, FineTunes) else []


def refuse_flavor(recipes: Sequence[Recipe | None], flavor: str, source_uri: str = "the model") -> None:
    """A policy that names a QAT recipe for a model QAT cannot train: one line naming the flavor."""
    named = sorted({r.name for r in recipes if r is not None and is_qat(r)})
    if named and flavor != PYTORCH:
        raise PolicyError(
            f"recipes name {', '.join(named)} (quantization-aware training), which fine-tunes the model's own weights "
            f"and graph: {source_uri} is a '{flavor}' flavor model; QAT needs a 'pytorch' flavor model"
        )


@dataclass(frozen=True)
class Context:
    """What a run knows for its QAT candidates: where the source's torch program is and what they train on."""

    source_dir: Path
    calibration: NpzDataset
    training: NpzDataset | None
    training_uri: str  # the data the fine-tuning reads (the calibration set's URI for distillation only)
    settings: dict[str, Any]  # policy.qat, as recipe settings
    time_budget_s: float
    device: str
    data_sha256: str = ""

    @classmethod
    def make(
        cls,
        policy: Policy,
        source_dir: Path,
        calibration: NpzDataset,
        calibration_uri: str,
        training: NpzDataset | None,
        training_uri: str,
    ) -> Context:
        q = policy.qat
        data = training if training is not None else calibration
        labelled = training is not None and training.has_labels
        settings: dict[str, Any] = {
            "epochs": q.epochs,
            "learning_rate": q.learning_rate,
            "batch_size": q.batch_size,
            "samples": q.samples,
            "seed": q.seed,
            "objective": "task+distillation" if labelled else "distillation",
            "distillation_weight": q.distillation_weight if labelled else 1.0,
            "training_data_sha256": file_sha256(data.path),
        }
        uri = training_uri if training is not None else calibration_uri
        return cls(
            source_dir,
            calibration,
            training,
            uri,
            settings,
            q.time_budget_s,
            q.device,
            settings["training_data_sha256"],
        )

    def configured(self, recipe: Recipe, policy: Policy) -> Recipe:
        """The recipe with this run's training settings and data hash (its hash follows them); the policy's
        ``recipe_options`` for it still win."""
        override = policy.recipe_options.get(f"{recipe.backend}/{recipe.name}") or {}
        return Recipe.make(recipe.backend, recipe.name, recipe.precision, **(recipe.options | self.settings | override))

    def job(self, remaining_s: float) -> QatJob:
        # The fine-tuning leaves a quarter of what is left for the export, the backend's quantization and the gate.
        budget = self.time_budget_s if math.isinf(remaining_s) else min(self.time_budget_s, 0.75 * remaining_s)
        return QatJob(
            self.source_dir, self.calibration, self.training, self.training_uri, max(budget, 1.0), self.device
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class QatJob:
    """One fine-tuning as the build worker receives it (picklable)."""

    source_dir: Path
    calibration: NpzDataset
    training: NpzDataset | None
    training_uri: str
    time_budget_s: float
    device: str = "auto"


@dataclass
class FineTuned:
    model: ModelInfo  # the fine-tuned FP32 model as ONNX, for the backend's post-training recipe
    notes: list[str]
    details: dict[str, Any] = field(default_factory=dict)


def finetune(job: QatJob, recipe: Recipe, workdir: Path, scheme: str) -> FineTuned:
    """Fine-tune the source's torch program with fake quantizers of ``scheme`` ("onnxruntime" or "openvino") and
    export the result to ONNX. A ``BackendError`` names what failed."""
    try:
        import torch
    except ImportError as exc:
        raise BackendError(f"quantization-aware training needs torch ({exc}); pip install quantgate[pytorch]") from None
    from quantgate.errors import InputError
    from quantgate.intake import export_torch, torch_source

    o = recipe.options
    torch.manual_seed(int(str(o["seed"])))
    device = _device(job.device)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        teacher = torch_source(job.source_dir)
        # The loop stops in time for what follows it: loading the source again and exporting the trained copy.
        # Both are timed here, once each, the export on the untrained model (so a graph that cannot be exported
        # fails before the budget is spent on it; the first export in a process is also the slowest: the exporter
        # builds its registry, 1-3 s that neither the fake-quantizer insertion nor anything else here predicts).
        loaded = time.monotonic()
        student_source = torch_source(job.source_dir)  # a second copy: the teacher stays the FP32 model
        export_torch(teacher, teacher.module, workdir / "untrained.onnx")
        reserve = time.monotonic() - loaded
        (workdir / "untrained.onnx").unlink()
    except InputError as exc:
        raise BackendError(str(exc)) from None
    student = _prepare(student_source.module, scheme).to(device)
    teacher.module.to(device)
    data = job.training if job.training is not None else job.calibration
    samples = data.n_samples if o.get("samples") is None else min(int(str(o["samples"])), data.n_samples)
    batch = data.take(samples)
    names = [name for name, _, _ in teacher.inputs]
    xs = [torch.from_numpy(batch.inputs[n]).to(device) for n in names]
    labelled = o["objective"] == "task+distillation" and batch.labels is not None
    labels = (
        torch.from_numpy(batch.labels.astype(np.int64)).to(device) if labelled and batch.labels is not None else None
    )
    loop = _Loop(o, samples, started + job.time_budget_s - reserve)
    with torch.no_grad():
        targets = _outputs_in_chunks(teacher.module, xs, int(str(o["batch_size"])))
    calibrate: Callable[[], None] | None = None
    if scheme == "onnxruntime":
        # Chunks of at least 64: a forward call's overhead dominates small batches (no gradients are kept here).
        chunk = max(int(str(o["batch_size"])), 64)
        calibrate = lambda: _calibrate_activations(student, xs, chunk)  # noqa: E731
    loop.run(student, xs, targets, labels, calibrate)
    trained = student.to("cpu").state_dict()
    fresh = torch_source(job.source_dir)
    _load_trained(fresh.module, trained)
    try:
        model = export_torch(fresh, fresh.module, workdir / "finetuned.onnx")
    except InputError as exc:
        raise BackendError(str(exc)) from None
    train_s = time.monotonic() - started
    what = "task loss (cross-entropy on the first output) + distillation" if labels is not None else "distillation"
    source_of = "the labelled training set" if labels is not None else (
        "the training set" if job.training is not None else "the calibration inputs (the FP32 outputs as targets)"
    )  # fmt: skip
    notes = [
        f"quantization-aware fine-tuning (torchao PT2E QAT, {SCHEMES[scheme]}) by {what} on {samples} samples of "
        f"{source_of}: {loop.describe()}, lr {float(str(o['learning_rate'])):g}, batch {o['batch_size']}, seed "
        f"{o['seed']}, on {device}, {train_s:.1f} s",
    ]
    if loop.stopped:
        notes.append(
            f"fine-tuning stopped by its budget ({job.time_budget_s:.0f} s) after {loop.steps_done} of "
            f"{loop.steps_planned} steps (epoch {loop.epoch_reached} of {loop.epochs}); the weights reached were used"
        )
    details = {
        "qat": {
            "loss_by_step": loop.thinned_losses(),
            "loss_by_epoch": loop.epoch_losses,
            "epochs_planned": loop.epochs,
            "epochs_done": loop.epochs_done,
            "steps_done": loop.steps_done,
            "steps_planned": loop.steps_planned,
            "stopped_by_budget": loop.stopped,
            "time_budget_s": job.time_budget_s,
            "train_s": train_s,
            "device": device,
            "objective": "task+distillation" if labels is not None else "distillation",
            "samples": samples,
            "training_data_uri": job.training_uri,
            "training_data_sha256": o.get("training_data_sha256"),
            "scheme": SCHEMES[scheme],
        }
    }
    return FineTuned(model, notes, details)


SCHEMES = {
    "onnxruntime": "activations per-tensor asymmetric UINT8 with the extremes over the training samples (set before "
    "each epoch, as ONNX Runtime's MinMax calibration), weights per-channel symmetric INT8, as its static QDQ",
    "openvino": "activations per-tensor symmetric INT8 with a moving average of per-batch extremes, weights "
    "per-channel symmetric INT8, as NNCF's performance preset",
}


class _Loop:
    """The fine-tuning loop: shuffled mini-batches, Adam; no step (or calibration) is begun that would end past the
    deadline, judged by how long the last one took."""

    def __init__(self, o: dict[str, Any], samples: int, deadline: float) -> None:
        self.epochs = int(str(o["epochs"]))
        self.batch_size = int(str(o["batch_size"]))
        self.lr = float(str(o["learning_rate"]))
        self.weight = float(str(o["distillation_weight"]))
        self.seed = int(str(o["seed"]))
        self.samples = samples
        self.per_epoch = math.ceil(samples / self.batch_size)
        self.steps_planned = self.per_epoch * self.epochs
        self.deadline = deadline
        # The last step's and the last calibration's durations: one that would end past the deadline is not begun.
        self.step_s = 0.0
        self.calibrate_s = 0.0
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        self.epochs_done = 0
        self.stopped = False

    @property
    def steps_done(self) -> int:
        return len(self.losses)

    @property
    def epoch_reached(self) -> int:
        return min(self.epochs_done + 1, self.epochs)

    def run(
        self, student: Any, xs: list[Any], targets: list[Any], labels: Any, calibrate: Callable[[], None] | None = None
    ) -> None:
        """``calibrate`` (if given) runs before each epoch, within the budget."""
        import torch

        optimizer = torch.optim.Adam(student.parameters(), lr=self.lr)
        order = np.random.default_rng(self.seed)
        for epoch in range(1, self.epochs + 1):
            perm = torch.from_numpy(order.permutation(self.samples))
            epoch_losses: list[float] = []
            if calibrate is not None:
                if not self._fits(self.calibrate_s + self.step_s):
                    self.stopped = True
                else:
                    began = time.monotonic()
                    calibrate()
                    self.calibrate_s = time.monotonic() - began
            for start in range(0, self.samples, self.batch_size):
                if self.stopped or not self._fits(self.step_s):
                    self.stopped = True
                    break
                began = time.monotonic()
                idx = perm[start : start + self.batch_size].to(xs[0].device)
                outs = _as_tuple(student(*[x[idx] for x in xs]))
                loss = _loss(outs, [t[idx] for t in targets], None if labels is None else labels[idx], self.weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_losses.append(float(loss.detach()))
                self.step_s = time.monotonic() - began
            self.losses.extend(epoch_losses)
            if epoch_losses:
                self.epoch_losses.append(float(np.mean(epoch_losses)))
            if self.stopped:
                build_progress(f"QAT stopped by its budget in epoch {epoch}/{self.epochs}, loss {self._last()}")
                return
            self.epochs_done = epoch
            build_progress(f"QAT epoch {epoch}/{self.epochs}, loss {self._last()}")

    def _fits(self, seconds: float) -> bool:
        return time.monotonic() + seconds < self.deadline

    def _last(self) -> str:
        return f"{self.epoch_losses[-1]:.4g}" if self.epoch_losses else "n/a"

    def describe(self) -> str:
        if not self.epoch_losses:
            return "no step before the budget ran out"
        return (
            f"{self.epochs_done} of {self.epochs} epochs ({self.steps_done} steps), loss {self.epoch_losses[0]:.4g} "
            f"-> {self.epoch_losses[-1]:.4g}"
        )

    def thinned_losses(self) -> list[list[float]]:
        """(step, loss) pairs, at most ``MAX_LOGGED_STEPS`` of them (evenly thinned, the last step kept)."""
        n = len(self.losses)
        keep = range(n) if n <= MAX_LOGGED_STEPS else sorted({*np.linspace(0, n - 1, MAX_LOGGED_STEPS).astype(int)})
        return [[int(i) + 1, self.losses[i]] for i in keep]


def _loss(outs: Sequence[Any], targets: Sequence[Any], labels: Any, weight: float) -> Any:
    """Distillation: each float output's squared error to the FP32 output, relative to that output's power (so
    outputs of any scale weigh alike); with labels, cross-entropy on the first output plus ``weight`` x that."""
    import torch.nn.functional as F

    terms = [
        F.mse_loss(s, t) / (t.pow(2).mean() + 1e-8) for s, t in zip(outs, targets, strict=True) if s.is_floating_point()
    ]
    distill = sum(terms[1:], terms[0])
    if labels is None:
        return distill
    return F.cross_entropy(outs[0].flatten(1), labels) + weight * distill


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _outputs_in_chunks(module: Any, xs: list[Any], batch: int) -> list[Any]:
    import torch

    chunks = [_as_tuple(module(*[x[i : i + batch] for x in xs])) for i in range(0, xs[0].shape[0], batch)]
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def _device(wanted: str) -> str:
    import torch

    has_gpu = torch.cuda.is_available()
    if wanted == "cuda" and not has_gpu:
        raise BackendError("qat.device is cuda, but torch sees no CUDA GPU on this worker")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and has_gpu) else "cpu"


def _prepare(module: Any, scheme: str) -> Any:
    """``module`` (a torch.export program's module) with fake quantizers of ``scheme``, in eval mode (BatchNorm
    statistics frozen, dropout off) but trainable."""
    _quiet_torchao()
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    try:
        prepared = prepare_qat_pt2e(module, X86InductorQuantizer().set_global(_config(scheme)))
    except Exception as exc:  # torchao raises many types on graphs it cannot annotate
        raise BackendError(f"cannot insert fake quantizers: {str(exc).splitlines()[0][:300]}") from exc
    move_exported_model_to_eval(prepared)
    return prepared


def _config(scheme: str) -> Any:
    """Fake quantizers as the backend's finishing recipe will calibrate its ranges. Activations: for ONNX Runtime,
    plain min/max observers that ``_calibrate_activations`` fills with the extremes over all training samples (its
    MinMax calibration takes the extremes over the whole calibration set); for OpenVINO, a moving average of each
    batch's extremes (NNCF's default for per-tensor activations averages per-sample extremes, MEAN_MINMAX)."""
    import torch
    from torchao.quantization.pt2e import (
        FakeQuantize,
        FusedMovingAvgObsFakeQuantize,
        MinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import QuantizationConfig

    symmetric = scheme == "openvino"
    act = QuantizationSpec(
        dtype=torch.int8 if symmetric else torch.uint8,
        quant_min=-128 if symmetric else 0,
        quant_max=127 if symmetric else 255,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=(
            FusedMovingAvgObsFakeQuantize.with_args(eps=2**-12)
            if symmetric
            else FakeQuantize.with_args(observer=MinMaxObserver, eps=2**-12)
        ),
    )
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,  # both backends quantize weights to the symmetric narrow range
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            eps=2**-12, observer=MovingAveragePerChannelMinMaxObserver
        ),
    )
    return QuantizationConfig(act, act, weight, None, True)


def _activation_quantizers(student: Any) -> list[Any]:
    import torch
    from torchao.quantization.pt2e import FakeQuantizeBase

    per_tensor = (torch.per_tensor_affine, torch.per_tensor_symmetric)
    return [m for m in student.modules() if isinstance(m, FakeQuantizeBase) and m.qscheme in per_tensor]


def _calibrate_activations(student: Any, xs: list[Any], batch: int) -> None:
    """Set the activation quantizers' ranges as ONNX Runtime's MinMax calibration will on the exported model: the
    extremes over all the samples, through the float model with the current weights (no fake quantization
    upstream); held fixed while the weights train.

    The moving average of per-batch extremes this replaces trained on a grid narrower than the one ONNX Runtime then
    used (the extremes over the whole set lie beyond the average extremes of its batches), so the fine-tuned
    weights met coarser rounding than they were trained for.
    """
    import torch
    from torchao.quantization.pt2e import FakeQuantizeBase

    quantizers = [m for m in student.modules() if isinstance(m, FakeQuantizeBase)]
    acts = _activation_quantizers(student)
    for fq in quantizers:
        fq.disable_fake_quant()
        fq.disable_observer()
    for fq in acts:
        fq.activation_post_process.reset_min_max_vals()
        fq.enable_observer()
    with torch.no_grad():
        for start in range(0, xs[0].shape[0], batch):
            student(*[x[start : start + batch] for x in xs])
    for fq in quantizers:
        fq.enable_fake_quant()
        if fq not in acts:
            fq.enable_observer()
    for fq in acts:
        fq.disable_observer()


def _load_trained(module: Any, trained: dict[str, Any]) -> None:
    """The fine-tuned parameters and BatchNorm buffers into a fresh copy of the source graph (same names)."""
    own = module.state_dict()
    shared = {k: v for k, v in trained.items() if k in own}
    missing = [k for k in own if k not in shared and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackendError(f"the fine-tuned model lost parameters of the source graph: {', '.join(missing[:5])}")
    module.load_state_dict(shared, strict=False)


def _quiet_torchao() -> None:
    # torchao logs a warning per optional CUDA kernel library it cannot load on a CPU build of torch, and torch one
    # per enum torchao still registers with pytree: neither concerns a CPU fine-tuning.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lineage_tags(details: dict[str, object]) -> dict[str, str]:
    """Registry tags of a QAT candidate: that it was fine-tuned, and on which data."""
    qat = details.get("qat")
    if not isinstance(qat, dict):
        return {}
    return {
        "qat": "true",
        "qat_objective": str(qat.get("objective", "")),
        "training_data_uri": str(qat.get("training_data_uri", "")),
        "training_data_sha256": str(qat.get("training_data_sha256", "")),
    }


def metrics(details: dict[str, object]) -> dict[str, float]:
    """A fine-tuned candidate's training figures as metrics (the JSON document, the MLflow run, the gate table)."""
    qat = details.get("qat")
    if not isinstance(qat, dict):
        return {}
    epochs = qat.get("loss_by_epoch") or [float("nan")]
    return {
        "qat_train_s": float(qat["train_s"]),
        "qat_time_budget_s": float(qat["time_budget_s"]),
        "qat_epochs": float(qat["epochs_done"]),
        "qat_steps": float(qat["steps_done"]),
        "qat_stopped_by_budget": float(bool(qat["stopped_by_budget"])),
        "qat_final_loss": float(epochs[-1]),
    }


def loss_curve(details: dict[str, object]) -> list[tuple[int, float]]:
    qat = details.get("qat")
    if not isinstance(qat, dict):
        return []
    return [(int(step), float(loss)) for step, loss in qat.get("loss_by_step", [])]


def make_recipe(backend: str, name: str, precision: str, **options: Any) -> Recipe:
    """A backend's QAT recipe with the default training settings (a run replaces them: ``Context.configured``)."""
    from quantgate.policy import QatPolicy

    q = QatPolicy()
    defaults: dict[str, Any] = {
        "kind": KIND,
        "epochs": q.epochs,
        "learning_rate": q.learning_rate,
        "batch_size": q.batch_size,
        "samples": q.samples,
        "seed": q.seed,
        "objective": "distillation",
        "distillation_weight": 1.0,
        "training_data_sha256": "",
    }
    return Recipe.make(backend, name, precision, **(defaults | options))


def build(
    backend: Backend, job: QatJob | None, recipe: Recipe, finish: Recipe, calib: Any, workdir: Path, scheme: str
) -> Any:
    """A QAT candidate: fine-tune, then the backend's own post-training ``finish`` recipe on the fine-tuned model.

    Recipes of one backend that train alike (the same scheme and training settings, e.g. OpenVINO's f32 and bf16
    variants) share one fine-tuning per run: it is kept in the backend's shared folder under a hash of those.
    """
    import json

    from quantgate.model import read_model_info
    from quantgate.plugins.base import Candidate

    if job is None:
        raise BackendError(
            f"{recipe.name} needs the source's torch program and training data: the pipeline must call "
            "configure_qat() first"
        )
    o = recipe.options
    key = hashlib.sha256(
        json.dumps({"scheme": scheme, **{k: o.get(k) for k in _TRAINING_KEYS}}, sort_keys=True).encode()
    ).hexdigest()[:16]
    shared = workdir.parent / "qat-finetuned" / key
    record = shared / "finetuned.json"
    if record.exists():
        saved = json.loads(record.read_text())
        tuned = FineTuned(read_model_info(shared / "finetuned.onnx"), list(saved["notes"]), dict(saved["details"]))
        tuned.notes.append("fine-tuned weights shared with a recipe of this run that trains alike")
    else:
        tuned = finetune(job, recipe, shared, scheme)
        record.write_text(json.dumps({"notes": tuned.notes, "details": tuned.details}))
    built: Candidate = backend.compress(tuned.model, finish, calib, workdir / "finish")
    notes = (*tuned.notes, f"then quantized by {finish.backend}'s {finish.name} recipe", *built.notes)
    return Candidate(recipe, built.artifact, notes, built.files, tuned.details)


_TRAINING_KEYS = (
    "epochs",
    "learning_rate",
    "batch_size",
    "samples",
    "seed",
    "objective",
    "distillation_weight",
    "training_data_sha256",
)
