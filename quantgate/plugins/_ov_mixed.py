"""``int8-mixed`` for the OpenVINO backend: NNCF INT8 with the fewest most sensitive layers kept in float.

Full INT8 first (``nncf.quantize`` as ``int8-ptq-performance`` does it); if that misses the gate's threshold, the
layers are ranked by sensitivity and the search keeps the k most sensitive in float through NNCF's
``ignored_scope``, scoring every variant compiled at the recipe's inference precision.

The ranking is ``quantgate.sensitivity.rank_layers`` on the ONNX model, against a per-channel MinMax QDQ copy of it
quantized by ONNX Runtime on the same calibration data, rather than a ranking of NNCF's own quantizers on the
OpenVINO model. Ranking on OpenVINO would mean editing FakeQuantize and compressed-weight subgraphs and compiling
one model per layer; the ONNX ranking is already tested, runs only the part of the graph downstream of each layer,
and is shared by every recipe of a run (it does not depend on the inference precision). Its quantization differs
from NNCF's in details (ORT: asymmetric U8 activations; NNCF performance preset: symmetric, U8 where the input is
non-negative), so the order is an estimate; every variant is built by NNCF and scored for real, so a ranking
that differs from NNCF's errors costs float layers (a larger k), never a variant that misses the threshold. The
compute ops NNCF quantizes and the ONNX ranking cannot see (ORT leaves LSTMs float) are measured on OpenVINO itself
and ranked with the rest (``_measure_unseen``). Measured on CRAFT (VGG16-BN U-net text detector; full INT8 at
fidelity 0.932): with all 27 convolutions ranked, the first two and the last one came on top and k=3 met 0.99.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.errors import BackendError
from quantgate.plugins import _ov_stats
from quantgate.plugins.base import Calibration, SettingValue
from quantgate.plugins.openvino import (
    _BudgetExhausted,
    _CalibrationBatches,
    _compile,
    _Deadline,
    _label,
    _quantize_args,
    calibration_memo,
)
from quantgate.sensitivity import (
    AccuracyControl,
    BudgetExhausted,
    LayerSensitivity,
    Scorer,
    SearchOutcome,
    output_error,
    rank_layers,
    search_float_layers,
)

log = logging.getLogger(__name__)

BUDGET_HINT = "raise accuracy_control.time_budget_s or lower accuracy_control.samples"
RANKING_CALIBRATION = 64  # calibration samples of the QDQ model the ranking quantizes with
RANKING_VERSION = 2  # bump when the ranking's QDQ settings or measure change: cached rankings are then ignored
_SEARCH_THREADS = max(1, min(4, os.cpu_count() or 1))
_MAX_UNSEEN = 16  # OpenVINO-only compute ops measured (one nncf.quantize each); the rest are ranked last

# OpenVINO op types that carry weights and do the arithmetic: what NNCF quantizes when it quantizes a layer. An ONNX
# neighbour (Relu, Add...) never brings one of these into the ignored scope (see ``OvNames``).
OV_COMPUTE = frozenset(
    {
        "Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul",
        "Einsum", "LSTMSequence", "GRUSequence", "RNNSequence", "LSTMCell", "GRUCell", "RNNCell",
    }
)  # fmt: skip


def mixed_precision(
    model: Any,
    source: Path,
    opts: dict[str, SettingValue],
    calib: Calibration,
    control: AccuracyControl,
    shared: Path,
) -> tuple[Any, tuple[str, ...]]:
    """The ``int8-mixed`` candidate for ``model`` (``source`` converted): full INT8 if it meets the threshold, else
    the smallest k found whose variant keeping the k most sensitive layers float does.

    ``shared`` is the folder every recipe of this backend shares in a run: the ranking is cached there. The budget
    is checked between steps (a calibration batch, a layer's measurement, a variant's build and score): past it,
    the best passing variant found so far is the candidate; with none yet, a ``BackendError`` says where it stopped.
    """
    precision = str(opts["inference_precision"])
    deadline = _Deadline(control.time_budget_s, hint=BUDGET_HINT)
    data = _CalibrationBatches(calib, deadline)
    scorer = Scorer(control, _first_output(_compile(model, "f32")), calib.batch_size)  # the gate's reference: FP32
    memo = calibration_memo(source, calib)
    variants = _Variants(model, data, _quantize_args(opts, data, model), precision, scorer, deadline, memo)
    computed = "" if precision == "f32" else f", computed in {_label(precision)}"
    notes = [data.describe()]
    try:
        full = variants.build_and_score(())
    except _BudgetExhausted:
        raise BackendError(f"{deadline.describe()} while quantizing fully (no variant scored); {BUDGET_HINT}") from None
    if full >= scorer.threshold:
        notes += [
            f"mixed precision: full INT8 (k=0) scores {full:.6f}{computed} on {scorer.describe()}: no layer ranked, "
            "none kept in float",
        ]
        return variants.model(()), _finish(notes, deadline, control)
    if precision != "f32":
        notes.append(_reduced_float_check(model, precision, scorer))
    names = OvNames(model, source)
    why = f"full INT8 scores {full:.6f}, below the threshold {scorer.threshold:.6f}"
    ranking, ranking_note = _ranking(source, calib, opts, shared, deadline, why, variants, names)
    variants.use(ranking, names)
    outcome = search_float_layers(ranking, variants.build_and_score, scorer.threshold, deadline)
    complete = outcome.complete and variants.interrupted is None
    if not outcome.passed or outcome.k is None:
        raise BackendError(_no_variant_reason(outcome, variants, scorer, complete))
    kept = _kept_note(outcome, variants)
    log.info("%s", kept)
    notes += [
        kept,
        ranking_note,
        f"k search on {scorer.describe()}{computed}, variants built by nncf.quantize with ignored_scope: "
        f"{variants.trace()}; smallest passing k = {outcome.k}",
    ]
    if not complete:
        reason = outcome.reason or deadline.describe()
        notes.append(f"search stopped early ({reason}): k={outcome.k} passes; a smaller k may pass too")
    return variants.model(outcome.float_layers), _finish(notes, deadline, control)


def _finish(notes: list[str], deadline: _Deadline, control: AccuracyControl) -> tuple[str, ...]:
    notes.append(f"{deadline.elapsed_s:.1f} s of a {control.time_budget_s:g} s budget")
    if control.caveat:
        notes.append(control.caveat)
    return tuple(notes)


def _first_output(compiled: Any) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    return lambda inputs: np.asarray(compiled(dict(inputs))[0])


def _reduced_float_check(model: Any, precision: str, scorer: Scorer) -> str:
    """A note on what the float model loses in BF16/FP16 alone; a ``BackendError`` when that alone misses the gate.

    Variants are compiled in the reduced precision and scored against the true FP32 reference, as the gate scores
    them, so that loss is already inside every variant's score: the threshold needs no correction, but when the
    float model misses it no k can meet it, and the search would only spend the budget finding that out.
    """
    label = _label(precision)
    score = scorer.score(_first_output(_compile(model, precision)))
    what = f"the float model computed in {label} scores {score:.6f} on {scorer.describe()}"
    if score < scorer.threshold:
        raise BackendError(f"{what}: {label} alone misses the threshold, so no INT8 variant computed in it can meet it")
    return f"{what}; variants are scored in {label} against FP32, so {label}'s own loss counts against max_drop"


# -- variants ---------------------------------------------------------------------------------------------------------


class _Variants:
    """Builds and scores the variant that keeps given ranked layers float; holds only the smallest passing variant
    (the search only ever looks for a smaller k once one passed)."""

    def __init__(
        self,
        model: Any,
        data: _CalibrationBatches,
        args: dict[str, Any],
        precision: str,
        scorer: Scorer,
        deadline: _Deadline,
        memo: _ov_stats.StatsMemo,
    ) -> None:
        self.fp32, self._data, self._args = model, data, args
        self._memo = memo
        self.precision = precision
        self.scorer = scorer
        self.deadline = deadline
        self.ranking: list[LayerSensitivity] = []
        self.names: OvNames | None = None
        self.scores: dict[tuple[str, ...], float] = {}
        self.scored_on: dict[tuple[str, ...], int] = {}  # samples scored: sequential scoring stops when it is clear
        self.interrupted: int | None = None  # the k whose build the budget stopped
        self._kept: dict[tuple[str, ...], Any] = {}

    def use(self, ranking: list[LayerSensitivity], names: OvNames) -> None:
        self.ranking, self.names = ranking, names

    def ignored(self, layers: Sequence[str]) -> list[str]:
        """The OpenVINO op names NNCF must ignore to keep ``layers`` (ranked ONNX node names) float."""
        if self.names is None or not layers:
            return []
        units = {layer.node: layer for layer in self.ranking}
        return self.names.ignored([units[name] for name in layers])

    def quantize(self, ignored: Sequence[str]) -> Any:
        """``nncf.quantize`` as ``int8-ptq-performance`` runs it, the ops named ``ignored`` left float."""
        import nncf

        # Checked here too: with the run's statistics already collected, NNCF never reads the data (whose iterator
        # checks the deadline), and a variant still costs a quantizer placement and a bias correction.
        self.deadline.check()
        scope = nncf.IgnoredScope(names=list(ignored), validate=False) if ignored else None
        data = self._data
        dataset = nncf.Dataset(data)
        return _ov_stats.quantize(
            self.fp32, dataset, self._memo, subset_size=len(data), ignored_scope=scope, **self._args
        )

    def build_and_score(self, layers: tuple[str, ...]) -> float:
        if layers in self.scores:
            return self.scores[layers]
        try:
            quantized = self.quantize(self.ignored(layers))
        except _BudgetExhausted:
            if not layers:
                raise
            self.interrupted = len(layers)  # counts as failing; the search stops at its next deadline check
            return float("nan")
        score = self.scores[layers] = self.scorer.score(_first_output(_compile(quantized, self.precision)))
        self.scored_on[layers] = self.scorer.last_samples
        if score >= self.scorer.threshold and all(len(layers) < len(k) for k in self._kept):
            self._kept = {layers: quantized}  # the only model held: the smallest passing variant so far
        return score

    def model(self, layers: tuple[str, ...]) -> Any:
        return self._kept[layers]

    def trace(self) -> str:
        tried = [f"k={len(k)}: {s:.6f} ({self.scored_on.get(k, '?')} samples)" for k, s in self.scores.items()]
        if self.interrupted is not None:
            tried.append(f"k={self.interrupted}: stopped by the budget while building")
        return ", ".join(tried) or "nothing"


def _kept_note(outcome: SearchOutcome, variants: _Variants) -> str:
    by_node = {layer.node: layer for layer in variants.ranking}
    kept = [_describe_layer(by_node[name]) for name in outcome.float_layers]
    ignored = variants.ignored(outcome.float_layers)
    note = (
        f"mixed precision: {len(kept)} of {len(variants.ranking)} ranked layers kept in float, most sensitive first "
        f"(output error when only that layer is quantized): {', '.join(kept) or 'none'}"
    )
    if ignored:
        note += f"; OpenVINO ops in NNCF's ignored_scope: {_names(ignored)}"
    assert variants.names is not None
    missing = [name for name in outcome.float_layers if not variants.names.compute_ops(by_node[name])]
    if missing:
        note += f"; no OpenVINO compute op found for {', '.join(missing)} (fused away on conversion): NNCF decides"
    return note


def _describe_layer(layer: LayerSensitivity) -> str:
    around = [n for n in layer.exclude if n != layer.node]
    return f"{layer.node} ({layer.error:.2e}" + (f"; with {', '.join(around)})" if around else ")")


def _no_variant_reason(outcome: SearchOutcome, variants: _Variants, scorer: Scorer, complete: bool) -> str:
    tried = variants.trace()
    if not complete:
        where = outcome.reason or variants.deadline.describe()
        return f"{where} before any variant met {scorer.describe()} (tried {tried}); {BUDGET_HINT}"
    return (
        f"no variant meets {scorer.describe()}, not even with all {len(variants.ranking)} ranked layers in float "
        f"(tried {tried}): the loss comes from what NNCF changes outside them (the ops quantized between them; "
        "SmoothQuant's rescaling on transformers); use a float recipe or relax the gate"
    )


def _names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- ONNX node names -> OpenVINO op names ----------------------------------------------------------------------------


class OvNames:
    """Which ops of the converted model each ONNX node became, for NNCF's ``ignored_scope`` (op friendly names).

    Checked on OpenVINO 2026.4 (torch exports, a hand-built MLP, a BERT encoder, CRAFT, a CRNN): ``ov.convert_model``
    names an ONNX node's last op after the node ("/0/Conv" is the bias Add) and the ops it decomposes into before it
    "<node>/<suffix>" (the Convolution is "/0/Conv/WithoutBiases"; a Gemm without bias is a MatMul named
    "gemm1/WithoutBiases"), except that the op producing a graph output is renamed after the output tensor (a last
    Gemm without bias is the MatMul "y"). Tensor names survive conversion on the op that produces them. So a node's
    ops are (a) those whose friendly name is the node's name or starts with it plus "/" (the longest matching node
    name owns an op), and (b) the producer of the node's output tensors, unless another node's name owns it: when
    OpenVINO removes an op (a zero bias Add), its output name moves to the op before it, which belongs to another
    node. A neighbour's ops never include a compute op (``OV_COMPUTE``), so keeping a Relu or an Add float never
    keeps the layer before it float. Ops the frontend rewrites whole lose both (an ONNX LSTM becomes a
    "LSTMSequence_184"): they are ranked on their own, by alias (``alias``, ``_measure_unseen``).
    """

    def __init__(self, model: Any, source: Path) -> None:
        import onnx

        graph = onnx.load(str(source), load_external_data=False).graph
        self._outputs = {n.name: list(n.output) for n in graph.node if n.name}
        ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Result", "Constant", "Parameter")]
        self._types = {op.get_friendly_name(): str(op.get_type_name()) for op in ops}
        self._owned: dict[str, list[str]] = {}
        self._owner: dict[str, str] = {}
        for op in ops:
            name = op.get_friendly_name()
            prefixes = [name] + [name[:i] for i in range(len(name) - 1, 0, -1) if name[i] == "/"]
            owner = next((p for p in prefixes if p in self._outputs), None)  # longest first
            if owner is not None:
                self._owner[name] = owner
                self._owned.setdefault(owner, []).append(name)
        self._producer: dict[str, str] = {}
        for op in ops:
            for out in op.outputs():
                for tensor in out.get_names():
                    self._producer.setdefault(tensor, op.get_friendly_name())
        self.compute = [name for name, kind in self._types.items() if kind in OV_COMPUTE]  # graph order
        # Ops the frontend builds from scratch get a process-wide counter in their name ("LSTMSequence_184" here,
        # "LSTMSequence_13816" on the next conversion): a ranking cached for the run names them by type and
        # position among the compute ops instead ("LSTMSequence#10"), the same on every conversion of the model.
        self._aliases = {f"{self._types[name]}#{i}": name for i, name in enumerate(self.compute)}
        self._alias_of = {name: alias for alias, name in self._aliases.items()}

    def alias(self, op: str) -> str:
        """A compute op's name that stays the same across conversions of the model (see ``ops``)."""
        return self._alias_of[op]

    def ops(self, node: str, *, compute: bool) -> list[str]:
        """The OpenVINO ops of ONNX node ``node``, or of compute op alias ``node`` (a layer only OpenVINO has);
        without ``compute``, never a compute op."""
        if node in self._aliases:
            return [self._aliases[node]] if compute else []
        found = list(self._owned.get(node, []))
        for tensor in self._outputs.get(node, []):
            op = self._producer.get(tensor)
            if op is not None and self._owner.get(op, node) == node and op not in found:
                found.append(op)
        return found if compute else [op for op in found if self._types[op] not in OV_COMPUTE]

    def compute_ops(self, layer: LayerSensitivity) -> list[str]:
        return [op for op in self.ops(layer.node, compute=True) if self._types[op] in OV_COMPUTE]

    def unseen(self, ranked: Sequence[LayerSensitivity]) -> list[str]:
        """The compute ops no layer of ``ranked`` maps to."""
        covered = {op for layer in ranked for op in self.compute_ops(layer)}
        return [op for op in self.compute if op not in covered]

    def ignored(self, layers: Sequence[LayerSensitivity]) -> list[str]:
        """The op names that keep ``layers`` and the activations they quantize float: each layer's own ops and its
        non-compute neighbours' (the ranking's ``exclude``)."""
        out: dict[str, None] = {}
        for layer in layers:
            for node in layer.exclude or (layer.node,):
                out.update(dict.fromkeys(self.ops(node, compute=node == layer.node)))
        return list(out)


# -- ranking, once per model and calibration data ---------------------------------------------------------------------


def _ranking(
    source: Path,
    calib: Calibration,
    opts: dict[str, SettingValue],
    shared: Path,
    deadline: _Deadline,
    why: str,
    variants: _Variants,
    names: OvNames,
) -> tuple[list[LayerSensitivity], str]:
    """The layers most sensitive first, from ``shared``'s cache or measured (then cached), and a note on it."""
    samples = min(int(opts.get("ranking_samples") or 16), calib.dataset.n_samples)
    cache = shared / f"sensitivity-{_ranking_key(source, calib, samples)}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        ranking = [
            LayerSensitivity(x["node"], x["op_type"], float(x["error"]), tuple(x["exclude"])) for x in cached["layers"]
        ]
        return ranking, (
            f"{why}: ranking of {len(ranking)} layers reused from {cache.name} (measured earlier in this run, in "
            f"{cached['seconds']:.1f} s, on {cached['samples']} calibration samples)"
        )
    started = deadline.elapsed_s
    batches = [b.inputs for b in calib.dataset.batches(calib.batch_size, limit=samples)]
    try:
        ranked = _rank(source, calib, batches, shared, deadline)
        unseen = _measure_unseen(variants, names, ranked, batches)
    except (BudgetExhausted, _BudgetExhausted) as exc:
        raise BackendError(f"{exc} ({why}); {BUDGET_HINT}") from None
    ranking = sorted([*ranked, *unseen], key=lambda x: -x.error if np.isfinite(x.error) else np.inf)
    seconds = deadline.elapsed_s - started
    layers = [{"node": x.node, "op_type": x.op_type, "error": x.error, "exclude": list(x.exclude)} for x in ranking]
    payload = {"version": RANKING_VERSION, "samples": samples, "seconds": seconds, "layers": layers}
    shared.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(cache)  # atomic: a recipe building beside this one reads all of it or nothing
    note = (
        f"{why}: ranked {len(ranked)} quantized compute layers of the ONNX model by the output error (1 - cosine "
        f"vs FP32) when only that layer is quantized (ONNX Runtime, per-channel MinMax QDQ)"
    )
    if unseen:
        note += (
            f", and {len(unseen)} OpenVINO compute ops that ranking cannot see "
            f"({_names([f'{x.node}: {names.ops(x.node, compute=True)[0]}' for x in unseen])}) when only that op is "
            "quantized by NNCF"
        )
    return ranking, f"{note}, on {samples} calibration samples, in {seconds:.1f} s"


def _measure_unseen(
    variants: _Variants, names: OvNames, ranked: Sequence[LayerSensitivity], batches: list[dict[str, np.ndarray]]
) -> list[LayerSensitivity]:
    """The OpenVINO compute ops no ranked ONNX layer maps to, measured like ``rank_layers`` measures a layer: the
    output error with only that op quantized (by NNCF, every other compute op ignored), on the ranking's samples.

    ONNX Runtime's QDQ quantizer leaves some ops float that NNCF quantizes, and conversion can rename an op beyond
    recognition: an ONNX LSTM becomes "LSTMSequence_184". On a CRNN text recogniser NNCF's INT8 LSTMs alone took
    the output's cosine to FP32 from 1.0 to -0.19, and no ONNX layer kept float could bring it back.
    """
    unseen = names.unseen(ranked)
    if not unseen:
        return []
    reference_run = _first_output(_compile(variants.fp32, "f32"))
    reference = [reference_run(b) for b in batches]
    out = []
    for i, op in enumerate(unseen[:_MAX_UNSEEN]):
        if variants.deadline.expired():
            raise BudgetExhausted(
                f"{variants.deadline.describe()} while measuring the OpenVINO ops the ONNX ranking cannot see "
                f"({i} of {len(unseen)} measured)"
            )
        run = _first_output(_compile(variants.quantize([o for o in names.compute if o != op]), "f32"))
        out.append(_unseen_layer(names, op, output_error(reference, [run(b) for b in batches])))
    # Past the cap, unmeasured (NaN): the search reaches them last, when everything measured was not enough.
    return out + [_unseen_layer(names, op, float("nan")) for op in unseen[_MAX_UNSEEN:]]


def _unseen_layer(names: OvNames, op: str, error: float) -> LayerSensitivity:
    alias = names.alias(op)
    return LayerSensitivity(alias, alias.split("#")[0], error, (alias,))


def _ranking_key(source: Path, calib: Calibration, samples: int) -> str:
    """The model's bytes and the calibration data (file identity, batch size, sample cap) the ranking depends on."""
    digest = hashlib.sha256()
    with source.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    data = calib.dataset.path.resolve()
    stat = data.stat()
    meta = [RANKING_VERSION, str(data), stat.st_size, stat.st_mtime_ns, calib.batch_size, calib.limit, samples]
    digest.update(json.dumps(meta).encode())
    return digest.hexdigest()[:16]


def _rank(
    source: Path, calib: Calibration, batches: list[dict[str, np.ndarray]], shared: Path, deadline: _Deadline
) -> list[LayerSensitivity]:
    shared.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantgate-ov-rank-", dir=shared) as tmp:
        qdq = Path(tmp) / "qdq.onnx"
        _qdq_model(source, qdq, calib, deadline)
        return rank_layers(source, qdq, batches, _SEARCH_THREADS, deadline)


def _qdq_model(source: Path, out: Path, calib: Calibration, deadline: _Deadline) -> None:
    """``source`` quantized by ONNX Runtime (QDQ, per-channel S8 weights, U8 activations, MinMax), node names kept.

    Not pre-processed (ORT's shape inference and graph optimisation rename and fuse nodes): the ranking's node
    names must be the ones ``ov.convert_model`` reads. Activations with infinite or sentinel values (attention
    masks) get no Q/DQ, as in the ONNX Runtime backend.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from quantgate.plugins._ort_calibration import StreamingCalibrationReader, calibrate, unbounded_neighbours

    def check() -> None:
        if deadline.expired():
            raise BudgetExhausted(f"{deadline.describe()} while calibrating the ONNX model the ranking quantizes")

    # The ranking is an estimate (every variant is then built by NNCF and scored for real): ranges from a few
    # batches order the layers as well, and calibrating a large model on the whole set cost most of its minute.
    limit = min(calib.limit or calib.dataset.n_samples, RANKING_CALIBRATION)
    reader = StreamingCalibrationReader(calib.dataset, batch_size=calib.batch_size, limit=limit)
    ranges = calibrate(source, reader, "minmax", out.with_suffix(".calibration.json"), check=check)
    root = logging.getLogger()
    root.addFilter(_not_preprocessed)
    try:
        quantize_static(
            str(source),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=unbounded_neighbours(source, ranges.unbounded),
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(ranges.cache),
        )
    finally:
        root.removeFilter(_not_preprocessed)


def _not_preprocessed(record: logging.LogRecord) -> bool:
    """Moves quantize_static's advice, logged on the root logger ("Please consider pre-processing", "Bias of Gemm
    node ... is not constant"), to our debug log: the QDQ model is only measured, never deployed, and skipping the
    pre-processing is deliberate."""
    if record.name != "root":
        return True
    log.debug("quantize_static: %s", record.getMessage())
    return False
