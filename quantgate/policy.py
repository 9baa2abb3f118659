"""The policy file: which backends and recipes to try, on which data, and what a candidate must prove.

Validated with pydantic at the edge; everything downstream receives a typed ``Policy``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantgate.errors import PolicyError
from quantgate.hardware import ISA_FLAGS


class _Strict(BaseModel):
    # No inf/nan anywhere: YAML's ".inf" and "1e400" (read as a string, then as a float) are never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataPolicy(_Strict):
    calibration: str | None = Field(default=None, description="Local path or MLflow artifact URI of a .npz")
    evaluation: str | None = Field(default=None, description="Local path or MLflow artifact URI of a .npz")
    calibration_samples: int = Field(default=512, ge=1, le=100_000_000, description="Most calibration samples used")
    calibration_batch_size: int = Field(default=16, ge=1, le=65_536)
    evaluation_samples: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Cap on evaluation samples"
    )
    training: str | None = Field(
        default=None,
        description="Local path or MLflow artifact URI of a .npz that quantization-aware training fine-tunes on "
        "(with 'labels': task loss plus distillation); unset: distillation on the calibration set",
    )
    allow_non_finite: bool = Field(
        default=False, description="Accept NaN/Inf in input arrays (refused by default: they poison every metric)"
    )


# A declared check's value in the policy: its limit, or a mapping of its settings. Validated by the schema the check
# declares, when a run starts (gate.configure), not here: the policy does not know which validators are installed.
CheckSetting = Any


class GatePolicy(_Strict):
    max_accuracy_drop: float | None = Field(default=0.01, ge=0.0, le=1.0)
    min_fidelity: float | None = Field(default=None, ge=-1.0, le=1.0)
    min_speedup: float | None = Field(default=1.1, gt=0.0, le=1000.0)
    max_size_ratio: float | None = Field(default=1.0, gt=0.0, le=1000.0)
    speedup_statistic: Literal["p50", "ci_low"] = Field(
        default="ci_low",
        description="Gate on the point estimate (p50 ratio) or on the lower end of its 95% confidence interval",
    )
    speedup_against: Literal["reference", "own_fp32"] = Field(
        default="reference",
        description=(
            "What the warm speedup is measured against: the original model as MLflow serves it (ONNX Runtime FP32, "
            "timed beside every candidate) or FP32 on the candidate's own runtime"
        ),
    )
    speedup_on: Literal["warm", "first_call"] = Field(
        default="warm",
        description="Gate the speedup on warm calls (a served model) or on the first call after loading (cold start)",
    )
    checks: dict[str, dict[str, CheckSetting]] = Field(
        default_factory=dict,
        description=(
            "Checks validators declare, as validator -> check -> a limit (a number) or its settings (a mapping with "
            "'limit'); checked against the installed validators' declarations when a run starts (gate.py)"
        ),
    )


class LatencyPolicy(_Strict):
    threads: int = Field(default=1, ge=1, le=1024, description="intra-op threads, fixed for baseline and candidate")
    warmup: int = Field(default=20, ge=0, le=100_000, description="untimed calls per runner before timing")
    rounds: int = Field(
        default=200, ge=5, le=100_000, description="timed blocks per runner, at most (adaptive stops earlier)"
    )
    min_rounds: int = Field(default=30, ge=5, le=100_000, description="blocks timed before adaptive stopping may stop")
    adaptive: bool = Field(
        default=True, description="stop timing once the confidence interval decides the gate and the ranking"
    )
    block_calls: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description="calls per block for every runner; default: each runner's switch_ms + min_block_ms",
    )
    min_block_ms: float = Field(
        default=20.0, gt=0.0, le=60_000.0, description="shortest block when block_calls is unset"
    )
    switch_ms: float = Field(
        default=20.0, ge=0.0, le=60_000.0, description="milliseconds of calls after a switch not counted as warm"
    )
    cold_starts: int = Field(
        default=1, ge=0, le=100, description="fresh loads timed for the first-call latency (0: not measured)"
    )
    batch_sizes: tuple[int, ...] = Field(default=(1,), min_length=1, max_length=16)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 or b > 65_536 for b in v):
            raise ValueError("batch sizes must be between 1 and 65536")
        return v


class AccuracyControlPolicy(_Strict):
    """Settings of accuracy-aware recipes (OpenVINO's ``int8-accuracy-control``); the allowed drop is the gate's."""

    time_budget_s: float = Field(
        default=600.0, gt=0.0, le=1e6, description="Wall-clock limit; the recipe fails past it"
    )
    samples: int | None = Field(
        default=300, ge=1, le=100_000_000, description="Evaluation samples the recipe validates on"
    )


class SearchPolicy(_Strict):
    """How the recipes are searched: one wall-clock budget for the run, staged evaluation, a cache of measurements."""

    time_budget_s: float | Literal["auto"] = Field(
        default="auto",
        description=(
            "Wall-clock budget of the whole search, every step included; auto: 150 s for a model of up to 25 MB, "
            "proportionally more above (every step's cost grows with the model), at most 1800 s"
        ),
    )
    exhaustive: bool = Field(
        default=False, description="Measure every recipe to the end: no budget, no quick check, no adaptive stop"
    )
    quick_samples: int = Field(
        default=64, ge=8, le=1_000_000, description="Evaluation samples of the quick quality check"
    )
    cache: bool = Field(default=True, description="Reuse measurements of the same model, recipe, data and host")
    specialize_shapes: bool = Field(
        default=True,
        description=(
            "Also measure the fastest candidates compiled for the input shapes they are called with, where the "
            "backend can (OpenVINO: static shapes, one compile per new shape)"
        ),
    )

    @field_validator("time_budget_s", mode="before")
    @classmethod
    def _auto_or_seconds(cls, v: object) -> object:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < float(v) <= 1e6:
            raise ValueError(f"must be 'auto' or a number of seconds above 0 and at most 1000000, not {v!r}")
        return float(v)


class QatPolicy(_Strict):
    """Quantization-aware fine-tuning (``int8-qat*`` recipes, pytorch models only)."""

    auto: bool = Field(default=True, description="Try QAT when no post-training candidate passes the quality gate")
    epochs: int = Field(default=4, ge=1, le=10_000)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=32, ge=1, le=65_536)
    samples: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Most training samples used (null = all)"
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    distillation_weight: float = Field(
        default=1.0,
        ge=0.0,
        le=1000.0,
        description="Weight of the distillation loss beside the task loss (labelled data)",
    )
    time_budget_s: float = Field(
        default=300.0, gt=0.0, le=1e6, description="Wall-clock limit of the fine-tuning; the search budget caps it"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: a CUDA GPU when the worker has one, else the CPU"
    )


RecipeSetting = str | int | float | bool | None


class RegistryPolicy(_Strict):
    experiment: str = Field(default="quantgate", min_length=1)
    alias: str = Field(default="compressed", pattern=r"^[A-Za-z0-9_-]{1,255}$")
    register_all_passing: bool = Field(
        default=False, description="Register every passing candidate (true) or only the promoted one (false)"
    )

    @field_validator("alias")
    @classmethod
    def _mlflow_alias_rules(cls, v: str) -> str:
        # MLflow reserves these: "latest" and "v<number>" already mean something in models:/ URIs.
        if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"'{v}' is reserved by MLflow; pick another alias")
        return v


class HardwareRequirements(_Strict):
    """What the host that measured a candidate must have; checked against the fingerprint its validators recorded."""

    arch: str | None = Field(default=None, description="machine architecture, e.g. x86_64")
    cpu: str | None = Field(default=None, description="glob on the CPU model name, e.g. '*Xeon*'")
    isa: tuple[str, ...] = Field(default=(), description="ISA flags the CPU must have, e.g. [avx512_vnni]")
    min_cores: int | None = Field(default=None, ge=1, le=100_000)
    gpu: str | None = Field(default=None, description="glob on an NVIDIA GPU name, e.g. '*H100*'; '*' = any GPU")

    @field_validator("isa")
    @classmethod
    def _known_flags(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in v if f not in ISA_FLAGS]
        if unknown:
            raise ValueError(f"unknown ISA flag(s) {', '.join(unknown)}; known: {', '.join(ISA_FLAGS)}")
        return v


class TargetPolicy(_Strict):
    """Where one backend's compress + validate step runs: a Prefect work pool whose workers have this hardware."""

    pool: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="Prefect work pool of the target's workers")
    requires: HardwareRequirements = HardwareRequirements()
    timeout_s: float = Field(
        default=3600.0, gt=0.0, le=7 * 86_400, description="Longest wait for the step, queueing included"
    )


class IntakePolicy(_Strict):
    """What a registered model may do when it is loaded (README, "Trust model")."""

    allow_pickle: bool = Field(
        default=False,
        description="Load pickled pytorch/sklearn models (they run code on load), in a separate process without "
        "the worker's credentials; refused by default",
    )


class Policy(_Strict):
    backends: tuple[str, ...] = Field(default=("onnxruntime",), min_length=1)
    recipes: tuple[str, ...] | None = Field(default=None, description="Restrict to these recipe names")
    data: DataPolicy = DataPolicy()
    gate: GatePolicy = GatePolicy()
    latency: LatencyPolicy = LatencyPolicy()
    accuracy_control: AccuracyControlPolicy = AccuracyControlPolicy()
    registry: RegistryPolicy = RegistryPolicy()
    search: SearchPolicy = SearchPolicy()
    qat: QatPolicy = QatPolicy()
    intake: IntakePolicy = IntakePolicy()
    recipe_options: dict[str, dict[str, RecipeSetting]] = Field(
        default_factory=dict,
        description="Per 'backend/recipe': settings that override the recipe's own (the recipe hash follows them)",
    )
    targets: dict[str, TargetPolicy] = Field(
        default_factory=dict, description="Per backend: the work pool its step runs in; absent = in-process"
    )

    @field_validator("recipe_options")
    @classmethod
    def _recipe_keys(cls, v: dict[str, dict[str, RecipeSetting]]) -> dict[str, dict[str, RecipeSetting]]:
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", k)]
        if bad:
            raise ValueError(f"keys must be 'backend/recipe', got {', '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _targets_name_backends(self) -> Policy:
        stray = sorted(set(self.targets) - set(self.backends))
        if stray:
            raise ValueError(f"targets name backend(s) not in backends: {', '.join(stray)}")
        return self

    def digest(self) -> str:
        """A stable hash of every setting, used for lineage and idempotency."""
        data = self.model_dump(mode="json")
        if not data["targets"]:
            del data["targets"]  # policies without targets keep the hashes they had before targets existed
        if not data["recipe_options"]:
            del data["recipe_options"]
        # Settings added later leave the hash of a policy that keeps their default as it was.
        if data["intake"] == IntakePolicy().model_dump(mode="json"):
            del data["intake"]
        if not data["data"]["allow_non_finite"]:
            del data["data"]["allow_non_finite"]
        if data["qat"] == QatPolicy().model_dump(mode="json"):
            del data["qat"]
        if data["data"].get("training") is None:
            del data["data"]["training"]
        if not data["gate"]["checks"]:
            del data["gate"]["checks"]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def pools(self) -> dict[str, tuple[str, ...]]:
        """Target pool -> the backends routed to it, in policy order."""
        out: dict[str, tuple[str, ...]] = {}
        for backend in self.backends:
            if backend in self.targets:
                pool = self.targets[backend].pool
                out[pool] = (*out.get(pool, ()), backend)
        return out

    def with_data(self, calibration: str | None, evaluation: str | None, training: str | None = None) -> Policy:
        data = self.data.model_copy(
            update={
                "calibration": calibration or self.data.calibration,
                "evaluation": evaluation or self.data.evaluation,
                "training": training or self.data.training,
            }
        )
        return self.model_copy(update={"data": data})


def validation_message(kind: str, source: str, exc: ValidationError) -> str:
    """One line naming the first invalid setting of a YAML file of ``kind`` (``policy``, ``automation config``)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid {kind} {source}: {where}: {msg}{more}"


MAX_FILE_BYTES = 1_048_576
MAX_DEPTH = 32


def read_yaml(path: Path, kind: str) -> object:
    """The parsed file; a missing, binary, huge or too deeply nested file, or bad YAML, is a ``PolicyError``."""
    if not path.is_file():
        raise PolicyError(f"{kind} file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{kind} file {path} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError(f"invalid {kind} {path.name}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"invalid {kind} {path.name}: not UTF-8 text (a binary file?)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"invalid {kind} {path.name}: not valid YAML{where}") from None
    except RecursionError:
        raise PolicyError(f"invalid {kind} {path.name}: nested more than {MAX_DEPTH} levels deep") from None
    if _depth(data) > MAX_DEPTH:
        raise PolicyError(f"invalid {kind} {path.name}: nested more than {MAX_DEPTH} levels deep")
    return data


def _depth(value: object, level: int = 0) -> int:
    """How deeply ``value`` nests (stops counting past ``MAX_DEPTH``, so a shared YAML alias is never expanded)."""
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def parse_policy(data: object, source: str = "<policy>") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"invalid policy {source}: expected a mapping at the top level")
    if _depth(data) > MAX_DEPTH:
        raise PolicyError(f"invalid policy {source}: nested more than {MAX_DEPTH} levels deep")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(validation_message("policy", source, exc)) from None


def load_policy(path: Path | None) -> Policy:
    """Read a YAML policy; ``None`` gives the documented defaults."""
    if path is None:
        return Policy()
    policy = parse_policy(read_yaml(path, "policy"), path.name)
    # Relative data paths are relative to the policy file, as a user reading the file expects.
    return policy.with_data(
        _relative_to(policy.data.calibration, path.parent),
        _relative_to(policy.data.evaluation, path.parent),
        _relative_to(policy.data.training, path.parent),
    )


def _relative_to(uri: str | None, base: Path) -> str | None:
    if uri is None or "://" in uri or uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return uri
    p = Path(uri).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())
