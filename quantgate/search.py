"""The search over recipes: which to try next, what each stage may skip, and one time budget for the whole run.

Cost should grow with what is worth measuring, not with the size of the menu. So candidates are tried in order of
expected value (recipes that usually win on this kind of graph first; the float-restoring searches as soon as plain
INT8 has failed on quality), and each goes through stages that stop early: a quality check on a small subset (a
candidate far outside the gate stops there), full quality, then latency only for what passed quality, timed until
its confidence interval decides the gate and the ranking. Whatever is not measured to the end is still reported, as
``skipped`` with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np

from quantgate.model import ModelInfo
from quantgate.plugins.base import Recipe
from quantgate.policy import Policy
from quantgate.validators.base import EvalOutputs
from quantgate.validators.fidelity import cosine_per_row

log = logging.getLogger("quantgate")
progress_log = logging.getLogger("quantgate.progress")

# Recipe kinds that search which layers to keep in float until the gate's quality holds.
RESTORING_KINDS = ("accuracy_control", "mixed")

# How many standard errors outside the gate a quick-check estimate must be to stop the candidate there.
QUICK_Z = 3.0


class Budget:
    """The run's wall-clock budget; ``None`` seconds (an exhaustive search) never runs out."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.started = clock()
        # Kept back for a later stage (the shape-specialized variants of the best candidates): what the search may
        # spend until that stage releases it.
        self.reserved = 0.0

    @property
    def used(self) -> float:
        return self._clock() - self.started

    @property
    def remaining(self) -> float:
        return float("inf") if self.seconds is None else max(self.seconds - self.reserved - self.used, 0.0)

    @property
    def deadline(self) -> float | None:
        """The clock reading at which the budget runs out (``time.monotonic`` unless another clock was given)."""
        return None if self.seconds is None else self.started + self.seconds - self.reserved

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0.0

    def describe(self) -> str:
        if self.seconds is None:
            return f"{self.used:.0f} s used (no budget: exhaustive)"
        kept = f", {self.reserved:.0f} s kept for the shape-specialized variants" if self.reserved else ""
        return f"{self.used:.0f} s of {self.seconds:.0f} s used{kept}"


# The default budget (``search.time_budget_s: auto``): this much for a model of up to AUTO_BUDGET_BYTES, and
# proportionally more above, since building, calibrating, ranking layers and scoring all grow with the model. Measured
# on 2 cores without AVX512: an 83 MB CRAFT detector needs about 310 s for its mixed-precision search to pass where a
# 15 MB CRNN is done in 110 s. 150 s because a run also spends 20-25 s outside the search (imports, the Prefect
# server, registration): a model of up to 25 MB is done in about three minutes.
AUTO_BUDGET_S = 150.0
AUTO_BUDGET_BYTES = 25e6
AUTO_BUDGET_MAX_S = 1800.0


def budget_seconds(setting: float | str, model_bytes: int) -> float:
    """The search budget in seconds: ``setting`` itself, or for ``"auto"`` the default sized to the model."""
    if not isinstance(setting, str):
        return float(setting)
    return min(AUTO_BUDGET_S * max(1.0, model_bytes / AUTO_BUDGET_BYTES), AUTO_BUDGET_MAX_S)


# Share of the budget kept for measuring the shape-specialized variants of the best candidates, once there are any.
SPECIALIZE_RESERVE = 0.15


def speed_floor(policy: Policy) -> float | None:
    """The gate's speed threshold against the reference runtime: what a family measured below cannot pass (None
    when the gate reads another speedup: against the candidate's own FP32, or on the first call)."""
    gate = policy.gate
    if gate.min_speedup is None or gate.speedup_against != "reference" or gate.speedup_on != "warm":
        return None
    return float(gate.min_speedup)


def model_prior(recipe: Recipe, model: ModelInfo) -> float:
    """``prior`` for this model's kind of graph."""
    return prior(recipe, transformer=model.is_transformer, recurrent=model.is_recurrent)


# -- order of expected value ---------------------------------------------------------------------------------------


def prior(recipe: Recipe, *, transformer: bool, recurrent: bool = False) -> float:
    """How likely a recipe is to give the promoted variant, before anything is measured (higher: try first).

    From what was measured on real models (README, "Search"): full INT8 with reduced-precision float parts and plain
    full INT8 win most often; reduced-precision float is cheap and rarely loses quality; float-restoring searches are
    expensive and only pay when plain INT8 fails quality; dynamic INT8 pays on transformers only; weight-only and
    FP16 storage make a smaller file, rarely a faster one on CPUs.
    """
    o = recipe.options
    kind = str(o.get("kind", ""))
    # BF16 compute is native wherever a backend offers it on a CPU (AVX512_BF16, AMX); FP16 compute on x86 CPUs
    # mostly is not (measured: OpenVINO f16 on AVX512-FP16 without AMX-FP16 ran 1.0x its FP32), so only BF16 scores.
    reduced_float = str(o.get("inference_precision", "f32")) == "bf16"
    if kind == "float" and reduced_float:
        # Reduced-precision float compute costs no build and rarely loses quality: a floor every later candidate
        # is measured against (and pruned by), found in seconds, before any INT8 build.
        return 4.0
    if kind == "fp16" and o.get("inference_precision") == "f32":
        # Another runtime's FP32, its weights stored in FP16 (OpenVINO's fp16-ir): the same floor where the host has
        # no BF16 compute. OpenVINO's FP32 ran 1.4-1.8x ONNX Runtime's on the real MTCNN and PP-OCR nets (AVX2): with
        # no floor, a long restoring search spent the whole budget and nothing passed. Where BF16 passed first, the
        # FP32 baseline measured beside it prunes this one without a build.
        return 3.8
    if kind == "qat":
        base = 0.2  # fine-tuning costs minutes: named ones run after the post-training recipes
    elif kind == "hybrid":
        # Static INT8 plus dynamic INT8 of the recurrent layers static quantization leaves float: ahead of plain
        # static INT8 where there are such layers (a real CRNN: 2.05x against 1.45x), pointless where there are none.
        base = 3.2 if recurrent else 0.1
    elif kind == "mixed":
        base = 2.2  # its variants reuse the run's statistics (seconds each): ahead of NNCF's accuracy control
    elif kind in RESTORING_KINDS:
        base = 2.0
    elif kind in ("static", "quantize"):
        calibration = str(o.get("calibration", "minmax"))
        base = 3.0 if calibration == "minmax" and o.get("per_channel", True) is not False else 2.2
        if o.get("preset") == "mixed" and not transformer:
            base = 2.4
    elif kind == "dynamic":
        base = 2.6 if transformer else 0.5
    elif kind in ("fp16", "weights"):
        base = 0.8 if reduced_float else 0.3
    else:
        base = 1.5
    if reduced_float:
        base += 0.5
    return base


def family(recipe: Recipe) -> tuple[str, str, str]:
    """Recipes whose speed differs little: same backend, same kind of arithmetic, same float compute precision
    (and the same way of compiling: shape-specialized variants are a family of their own).

    Static INT8 with any calibration, NNCF INT8 with either preset, and the float-restoring searches (which can only
    be slower than full INT8 at the same precision) are one family. Float compute of one precision is another, and
    weight-only INT8 and FP16 storage belong to it: their weights are decompressed and computed in float (measured:
    OpenVINO's int8-weights and fp16-ir at 0.94-1.05x its FP32 IR on CNNs). A backend's FP32 baseline is a member
    of its float f32 family.
    """
    o = recipe.options
    kind = str(o.get("kind", "float"))
    if kind in ("static", "quantize", *RESTORING_KINDS):
        arithmetic = "int8"
    elif kind == "hybrid":
        arithmetic = "int8+dynamic"  # its recurrent layers too: faster than static INT8 when it holds quality
    elif kind in ("float", "fp16", "weights"):
        arithmetic = "float"
    else:
        arithmetic = kind
    precision = str(o.get("inference_precision") or "f32")
    if o.get("static_shapes"):
        precision += "+static"
    return recipe.backend, arithmetic, precision


# A family member is not expected to beat its measured sibling by more than this factor.
FAMILY_SPREAD = 1.15

# Below this prior a recipe rarely gives the fastest variant (dynamic INT8 on CNNs, weight-only INT8 and FP16 storage
# in FP32 compute): once a candidate has passed, it is not built.
LOW_PRIOR = 1.0
# Kinds never pruned by their prior: they run only when a policy names them or as a fallback (fine-tuning).
_NOT_PRUNED_BY_PRIOR = ("qat",)


def reach(recipe: Recipe) -> float:
    """How far above its family's measured speed a recipe may still land: a float-restoring search is its family's
    full INT8 with layers taken back to float, so never faster; another calibration or preset, within the spread."""
    return 1.0 if recipe.options.get("kind") in RESTORING_KINDS else FAMILY_SPREAD


def _measured(sibling: Recipe, reachable: float, recipe: Recipe) -> str:
    never = " (a float-restoring search is never faster)" if reach(recipe) == 1 else ""
    return f"measured at most {reachable / reach(recipe):.2f}x{never}"


def cannot_beat(
    recipe: Recipe,
    timed: Sequence[tuple[Recipe, float]],
    best: float | None,
    *,
    passed: Sequence[Recipe] = (),
    prior_score: float | None = None,
    floor: float | None = None,
) -> str | None:
    """Why ``recipe`` cannot be expected to beat the best so far, or pass the gate's speed threshold at all, or None.

    ``timed``: (recipe, upper end of its speedup CI against the reference runtime) of every candidate timed so far;
    ``passed``: the recipes that passed the gate so far; ``floor``: the gate's speedup threshold against the
    reference runtime (None when the gate reads another speedup). A recipe is not tried when a member of its family
    already passed (another calibration of the same arithmetic runs no faster, and quality is already enough), when
    its family was measured too slow to beat the best or to reach the floor, or, once anything passed, when its
    prior is low.
    """
    mine = family(recipe)
    twin = next((r for r in passed if family(r) == mine and r.name != recipe.name), None)
    if best is not None and twin is not None:
        return (
            f"not tried: {twin.name}, of the same family ({', '.join(mine)}), already passed; another calibration or "
            "float-restoring search of the same arithmetic runs no faster"
        )
    outdone = _outdone(recipe, timed, passed) if best is not None else None
    if outdone is not None:
        return outdone
    siblings = [(r, high) for r, high in timed if family(r) == mine]
    if siblings:
        sibling, high = max(siblings, key=lambda t: t[1])
        high *= reach(recipe)
        if best is not None and high < best:
            return (
                f"not tried: it could not beat the best so far ({best:.2f}x against ONNX Runtime FP32): "
                f"{sibling.name}, of the same family ({', '.join(mine)}), {_measured(sibling, high, recipe)}"
            )
        if floor is not None and high < floor:
            return (
                f"not tried: it could not pass the gate's {floor:.2f}x against ONNX Runtime FP32: {sibling.name}, of "
                f"the same family ({', '.join(mine)}), {_measured(sibling, high, recipe)}"
            )
        return None
    kind = str(recipe.options.get("kind", ""))
    if best is not None and prior_score is not None and prior_score < LOW_PRIOR and kind not in _NOT_PRUNED_BY_PRIOR:
        return (
            f"not tried: rarely the fastest on this kind of model (prior {prior_score:.1f}), and a candidate already "
            f"passed at {best:.2f}x against ONNX Runtime FP32; search.exhaustive: true measures it anyway"
        )
    return None


Family = tuple[str, str, str]

# Two measured speeds closer than this are the same speed on a shared host.
SAME_SPEED = 1.05


def _outdone(recipe: Recipe, timed: Sequence[tuple[Recipe, float]], passed: Sequence[Recipe]) -> str | None:
    """Why a float-restoring search at one float precision cannot beat one at another precision that already passed.

    What a restoring search keeps in float runs at its float precision, and the rest in INT8 kernels that are the
    same whatever the float precision (the real CRAFT detector's full INT8 on AMX: 12.0x ONNX Runtime FP32 with FP32
    float parts, 12.2x with BF16, 10.6x with FP16). So where the float precision was measured slower (OpenVINO FP16
    compute there: 0.66x; BF16: 5.4x) and the INT8 of its family is not measurably faster, the search that passed
    at the faster float precision wins (an FP16 accuracy control had spent 80 s there and still failed).
    """
    if recipe.options.get("kind") not in RESTORING_KINDS:
        return None
    backend, arithmetic, precision = family(recipe)
    fastest: dict[Family, float] = {}
    for r, high in timed:
        fastest[family(r)] = max(fastest.get(family(r), 0.0), high)
    float_mine = fastest.get((backend, "float", precision))
    if float_mine is None:
        return None
    for winner in passed:
        b, a, other = family(winner)
        if (b, a) != (backend, arithmetic) or other == precision or winner.options.get("kind") not in RESTORING_KINDS:
            continue
        float_other = fastest.get((b, "float", other))
        int8_mine, int8_other = fastest.get((b, a, precision)), fastest.get((b, a, other))
        if float_other is None or float_mine * SAME_SPEED >= float_other:
            continue
        if int8_mine is not None and int8_other is not None and int8_mine > int8_other * SAME_SPEED:
            continue
        return (
            f"not tried: {winner.name} already passed keeping layers in {other} float, which ran at {float_other:.2f}x "
            f"ONNX Runtime FP32 here against {float_mine:.2f}x in {precision}, with the same INT8 kernels for the "
            "rest; search.exhaustive: true measures it anyway"
        )
    return None


@dataclass
class Planned:
    """One recipe still to try and what is known about it."""

    index: int  # position in the plan, for a stable order among equals
    recipe: Recipe
    score: float


# A plain INT8 recipe scores at least this much before anything is measured: the recipes that show what a family
# runs at (dynamic INT8 on a CNN, weight-only INT8 score below it).
EXPLORE_PRIOR = 2.0


def next_index(
    pending: Sequence[Planned],
    *,
    quality_failed: int,
    quality_passed: int,
    failed_families: Mapping[Family, float] | None = None,
    best: float | None = None,
    attempted: Set[Family] = frozenset(),
    floor: float | None = None,
    passed: Sequence[Recipe] = (),
) -> int:
    """The position in ``pending`` of the recipe to try next.

    ``failed_families``: families whose full INT8 failed on quality, with the upper end of the speed measured for
    them (against the reference runtime). In such a family the float-restoring search is what targets the gate's
    threshold, so it moves to the front while the family could still beat ``best`` (and reach ``floor``, the gate's
    own speed threshold), the fastest family's first; another calibration of it rarely closes the gap the first one
    missed (on CRAFT every NNCF preset and calibration stayed at cosine 0.94 against a 0.99 gate), so it moves back.

    A restoring search costs tens of seconds to minutes, so before the first one runs, every INT8 family not yet
    ``attempted`` has its plain INT8 built once: that is cheap, and its speed says which family's restoring search
    is worth the budget (on the real CRAFT detector without AVX512: ONNX Runtime's INT8 1.74x, OpenVINO's 1.96x; the
    ONNX Runtime search alone had spent the whole budget). With no family measured yet, the old rule: once INT8 failed
    and nothing passed, the restoring searches go first.

    Once a restoring search passed (``passed``), a float precision not yet measured whose restoring search is still
    pending is measured first (no build, seconds): its speed is what tells whether that search can be skipped
    (``cannot_beat``: on CRAFT an FP16 accuracy control spent 80 s before FP16's own 0.66x showed it hopeless).
    """
    restored = {family(r) for r in passed if r.options.get("kind") in RESTORING_KINDS}
    waiting = {family(p.recipe) for p in pending if p.recipe.options.get("kind") in RESTORING_KINDS}
    failed = failed_families or {}
    bar = max(best or 0.0, floor or 0.0) or None
    fastest = max(failed.values(), default=0.0)
    exploring = bool(quality_failed) and not quality_passed

    def value(p: Planned) -> tuple[float, int]:
        score = p.score
        restoring = p.recipe.options.get("kind") in RESTORING_KINDS
        fam = family(p.recipe)
        if fam in failed:
            promising = bar is None or failed[fam] * reach(p.recipe) >= bar
            if restoring and promising:
                score += 3.0 + (2.0 * failed[fam] / fastest if fastest > 0 else 0.0)
            elif not restoring:
                score -= 1.0
        elif restoring and quality_failed and not quality_passed:
            score += 2.0
        if fam[1] == "float" and fam not in attempted and p.recipe.options.get("kind") == "float":
            backend, _, precision = fam
            other_passed = any(b == backend and q != precision for b, _, q in restored)
            if other_passed and (backend, "int8", precision) in waiting:
                score += 6.0
        unexplored = fam[1].startswith("int8") and fam not in attempted and p.score >= EXPLORE_PRIOR
        if exploring and unexplored and not restoring:
            score += 10.0
        return (score, -p.index)

    return max(range(len(pending)), key=lambda i: value(pending[i]))


# -- the quick quality check ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuickVerdict:
    far_outside: bool
    detail: str


def quick_check(base: EvalOutputs, cand: EvalOutputs, policy: Policy, *, has_labels: bool) -> QuickVerdict:
    """Quality on the first samples: far outside the gate (by more than ``QUICK_Z`` standard errors) or not."""
    n = len(cand.outputs)
    b, c = base.outputs[:n], cand.outputs
    gate = policy.gate
    if has_labels and gate.max_accuracy_drop is not None and base.labels is not None:
        labels = base.labels[:n]
        diff = (np.argmax(b, axis=1) == labels).astype(float) - (np.argmax(c, axis=1) == labels).astype(float)
        drop, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        if drop - QUICK_Z * se > gate.max_accuracy_drop:
            return QuickVerdict(
                True,
                f"quick check on {n} samples: top-1 drop {drop * 100:.1f} ± {se * 100:.1f} points, far above the "
                f"{gate.max_accuracy_drop * 100:.1f} allowed",
            )
    if gate.min_fidelity is not None:
        cos = cosine_per_row(b, c)
        mean, se = float(cos.mean()), float(cos.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        if mean + QUICK_Z * se < gate.min_fidelity:
            return QuickVerdict(
                True,
                f"quick check on {n} samples: fidelity {mean:.6f} ± {se:.6f}, far below the {gate.min_fidelity:.6f} "
                "required",
            )
    return QuickVerdict(False, "")


# -- progress ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """Where the search is: shown live on the terminal and as a Prefect progress artifact."""

    stage: str  # "baseline", "build", "qat" (a fine-tuning's epochs), "quick", "quality", "latency", "done"
    index: int  # candidate i of ``total`` (1-based; 0 before the first)
    total: int
    label: str  # backend/recipe
    used_s: float
    budget_s: float | None

    @property
    def fraction(self) -> float:
        by_count = (self.index - 1 + _STAGE_SHARE.get(self.stage, 0.0)) / max(self.total, 1)
        if self.stage == "done":
            return 1.0
        by_time = self.used_s / self.budget_s if self.budget_s else 0.0
        return float(min(max(by_count, by_time, 0.0), 0.99))

    def describe(self) -> str:
        budget = f"{self.used_s:.0f}/{self.budget_s:.0f} s" if self.budget_s else f"{self.used_s:.0f} s"
        if self.stage == "done":
            return f"search done: {self.total} candidates in {budget}"
        return f"{self.stage} · candidate {self.index}/{self.total} {self.label} · {budget} of the budget"


_STAGE_SHARE = {"build": 0.0, "qat": 0.1, "quick": 0.4, "quality": 0.5, "latency": 0.7}


def report_progress(event: ProgressEvent) -> None:
    """Emit a progress event as a log record on ``quantgate.progress``: the CLI draws it, the flow publishes it."""
    progress_log.info(event.describe(), extra={"quantgate_progress": event})
