"""What a plugin author needs to know their plugin works: contract suites to subclass, a small model with data, and
a sandbox that runs the real CLI end to end (``quantgate.testing.sandbox``: a throwaway MLflow store, ``quantgate
compress --json`` in a subprocess, ``mlflow models serve`` of what it registered).

In your package's tests::

    import pytest
    from quantgate.testing import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture()
        def backend(self):
            return MyBackend()

Every test of the suite then runs against your backend, on ``contract_model`` (a small convolutional ONNX model,
built here with random weights) unless you override that fixture with a model your backend takes (a backend that
converts from another format overrides ``contract_model`` with a ``ModelInfo`` carrying ``flavor`` and
``source_dir``). ``ValidatorContract`` does the same for validators. The suites need pytest; importing this module
does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantgate.data import NpzDataset
from quantgate.errors import BackendError, BackendUnavailable
from quantgate.model import ModelInfo, read_model_info
from quantgate.plugins.base import BACKENDS, Availability, Backend, Calibration, Candidate, Recipe
from quantgate.testing.sandbox import (
    CompressRun,
    Sandbox,
    free_port,
    model_versions,
    predict_rest,
    register_onnx,
    register_pytorch,
    run_quantgate,
    running_server,
    serve_model,
    write_policy,
)
from quantgate.validators.base import VALIDATORS, Reading, Threshold, Validator, check_declarations, declared_checks

try:
    import pytest
except ImportError:  # pragma: no cover - the suites are only collected under pytest
    pytest = None  # type: ignore[assignment]

__all__ = [
    "BackendContract",
    "CompressRun",
    "Sandbox",
    "ValidatorContract",
    "calibration_for",
    "free_port",
    "model_versions",
    "predict_rest",
    "register_onnx",
    "register_pytorch",
    "run_quantgate",
    "running_server",
    "serve_model",
    "small_onnx_model",
    "write_policy",
]


def small_onnx_model(path: Path, *, seed: int = 0) -> ModelInfo:
    """A 2-conv + linear classifier (input ``input``: float32[N,3,16,16], 4 classes), random weights, opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16), init("w3", 4, 16)]
    inits.append(init("b3", 4))
    graph = helper.make_graph(
        nodes,
        "contract",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return read_model_info(path)


def calibration_for(model: ModelInfo, path: Path, samples: int = 32, *, seed: int = 0) -> Calibration:
    """Random calibration data shaped like ``model``'s inputs (dynamic dimensions become ``samples``, then 1)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = [samples if i == 0 else (d or 1) for i, d in enumerate(spec.shape)]
        arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return Calibration(NpzDataset.open(path), batch_size=8, limit=samples)


if pytest is not None:

    class BackendContract:
        """The backend contract; subclass it and provide a ``backend`` fixture."""

        @pytest.fixture()
        def backend(self) -> Backend:
            raise NotImplementedError("override the 'backend' fixture with an instance of your backend")

        @pytest.fixture()
        def contract_model(self, tmp_path: Path) -> ModelInfo:
            return small_onnx_model(tmp_path / "contract.onnx")

        @pytest.fixture()
        def contract_calibration(self, contract_model: ModelInfo, tmp_path: Path) -> Calibration:
            return calibration_for(contract_model, tmp_path / "calibration.npz")

        @staticmethod
        def _inputs(model: ModelInfo, batch: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(1)
            return {
                s.name: rng.standard_normal([batch if i == 0 else (d or 1) for i, d in enumerate(s.shape)]).astype(
                    s.dtype
                )
                for s in model.inputs
            }

        def test_meets_the_backend_protocol(self, backend: Backend) -> None:
            assert isinstance(backend, Backend)
            assert isinstance(backend.name, str) and backend.name

        def test_loads_through_its_entry_point(self, backend: Backend) -> None:
            assert type(BACKENDS.load(backend.name)) is type(backend)

        def test_says_whether_it_is_available(self, backend: Backend) -> None:
            status = backend.available()
            assert isinstance(status, Availability)
            assert status.ok or status.reason, "an unavailable backend says why"

        def test_recipes_are_its_own_and_uniquely_named(self, backend: Backend, contract_model: ModelInfo) -> None:
            recipes = backend.recipes(contract_model)
            assert all(isinstance(r, Recipe) and r.backend == backend.name for r in recipes)
            assert len({r.name for r in recipes}) == len(recipes)
            assert all(r.digest == Recipe(r.backend, r.name, r.precision, r.settings).digest for r in recipes)

        def _usable(self, backend: Backend) -> None:
            status = backend.available()
            if not status.ok:
                pytest.skip(f"{backend.name} is not available here: {status.reason}")

        def test_baseline_runs_on_its_runner(self, backend: Backend, contract_model: ModelInfo, tmp_path: Path) -> None:
            self._usable(backend)
            base = backend.baseline(contract_model, tmp_path / "baseline")
            assert isinstance(base, Candidate) and base.artifact.exists() and base.size_bytes > 0
            outputs = backend.runner(base, threads=1).run(self._inputs(contract_model, 2))
            assert isinstance(outputs, list) and outputs and outputs[0].shape[0] == 2

        def test_every_recipe_builds_a_runnable_candidate_or_fails_with_backend_error(
            self, backend: Backend, contract_model: ModelInfo, contract_calibration: Calibration, tmp_path: Path
        ) -> None:
            self._usable(backend)
            inputs = self._inputs(contract_model, 1)
            for recipe in backend.recipes(contract_model):
                try:
                    cand = backend.compress(contract_model, recipe, contract_calibration, tmp_path / recipe.name)
                except (BackendError, BackendUnavailable) as exc:
                    assert str(exc).strip() and "\n" not in str(exc).strip(), f"{recipe.name}: one line, please"
                    continue
                assert cand.recipe == recipe and cand.artifact.exists()
                out = backend.runner(cand, threads=1).run(inputs)
                assert out and np.all(np.isfinite(np.asarray(out[0], dtype=np.float64))), recipe.name

    class ValidatorContract:
        """The validator contract; subclass it and provide a ``validator`` fixture."""

        @pytest.fixture()
        def validator(self) -> Validator:
            raise NotImplementedError("override the 'validator' fixture with an instance of your validator")

        def test_meets_the_validator_protocol(self, validator: Validator) -> None:
            assert isinstance(validator, Validator)
            assert isinstance(validator.name, str) and validator.name

        def test_loads_through_its_entry_point(self, validator: Validator) -> None:
            assert type(VALIDATORS.load(validator.name)) is type(validator)

        def test_its_declarations_clash_with_no_installed_validator(self, validator: Validator) -> None:
            others = [v for v in VALIDATORS.loadable() if v.name != validator.name]
            check_declarations([*others, validator])  # a PolicyError names the clash

        def test_its_checks_have_a_schema_and_read_a_missing_metric_as_not_measured(self, validator: Validator) -> None:
            specs = declared_checks(validator)
            assert len({s.name for s in specs}) == len(specs)
            for spec in specs:
                assert issubclass(spec.settings, Threshold) and spec.bound in ("min", "max"), spec.name
                settings = spec.settings.model_construct(limit=1.0)  # defaults for its other settings
                reading = spec.reading({}, settings)
                assert isinstance(reading, Reading) and reading.value is None, f"{spec.name} read a value from nothing"


def __getattr__(name: str) -> Any:
    if name in ("BackendContract", "ValidatorContract"):
        raise ImportError(f"quantgate.testing.{name} needs pytest (pip install pytest)")
    raise AttributeError(name)
