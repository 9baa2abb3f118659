"""TensorRT backend: TensorRT-ready ONNX anywhere, serialized engines on NVIDIA GPU workers.

``compress`` works in two steps. Step 1 runs on any host: the FP16 or symmetric INT8 QDQ ONNX TensorRT builds from
(``tensorrt_qdq``), checked against TensorRT's QDQ rules. Step 2 needs TensorRT and an NVIDIA GPU: it builds a
strongly typed engine (precision comes from the ONNX; the FP16/INT8 builder flags are only set on a TensorRT too old
for strong typing, and TensorRT 11 has none) and writes ``<recipe>.engine`` plus ``<recipe>.engine.json``, a sidecar
naming the GPU, compute capability and TensorRT version the engine was built for. Where step 2 cannot run,
``compress`` raises :class:`EngineNotBuilt` (a ``BackendUnavailable``) after step 1, naming the ONNX it wrote.

On a GPU worker the runner needs ``tensorrt`` (10.x or 11.x) and ``cuda-python`` (device memory and a CUDA stream;
no PyTorch needed). The FP32 baseline there is an FP32 engine built from the original ONNX with TF32 off, so speedups
compare against true FP32 on the same GPU; on any other host the baseline is the FP32 ONNX and cannot be run here.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import subprocess
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.errors import BackendError, BackendUnavailable, NeedsTargetHardware, QuantgateError
from quantgate.model import ModelInfo
from quantgate.plugins.base import (
    Availability,
    Calibration,
    Candidate,
    ModelLogging,
    Recipe,
    Runner,
    first_line,
    model_files,
)
from quantgate.plugins.tensorrt_qdq import (
    TensorRtQdqError,
    check_tensorrt_qdq,
    make_tensorrt_fp16,
    make_tensorrt_qdq,
)

log = logging.getLogger(__name__)

NAME = "tensorrt"
INSTALL_HINT = "pip install quantgate[tensorrt] on an NVIDIA GPU worker"
# Optimization profile: batch axis min/opt/max. Baseline and candidates share it, so latency compares like with like.
PROFILE_BATCH = (1, 16, 64)
# Any other dynamic axis (a sequence length): a model with dynamic spatial axes needs its own profile.
PROFILE_OTHER_AXES = (1, 128, 512)
WORKSPACE_BYTES = 4 << 30

_PROFILE = {
    "profile_batch": ",".join(map(str, PROFILE_BATCH)),
    "profile_other_axes": ",".join(map(str, PROFILE_OTHER_AXES)),
}
RECIPES: tuple[Recipe, ...] = (
    Recipe.make(NAME, "fp16", "fp16", kind="fp16", keep_io_types=True, **_PROFILE),
    Recipe.make(
        NAME, "int8-qdq", "int8", kind="int8-qdq", calibration="minmax", symmetric=True, per_channel=True,
        fp16_fallback=False, **_PROFILE,
    ),
    Recipe.make(
        NAME, "int8-qdq-fp16-fallback", "int8", kind="int8-qdq", calibration="minmax", symmetric=True,
        per_channel=True, fp16_fallback=True, **_PROFILE,
    ),
)  # fmt: skip


class EngineNotBuilt(NeedsTargetHardware):
    """Step 1 succeeded (``onnx_path`` is TensorRT-ready and passed the form check) but no engine can be built here."""

    def __init__(self, onnx_path: Path, reason: str, hint: str, notes: tuple[str, ...] = ()) -> None:
        self.onnx_path = onnx_path
        super().__init__(
            NAME,
            onnx_path,
            f"needs an NVIDIA GPU worker: {reason}; the TensorRT-ready ONNX is {onnx_path.name}",
            hint,
            notes,
        )


@dataclass(frozen=True)
class _Gpu:
    """What step 2 and the runner need on a GPU worker."""

    trt: Any
    cudart: Any
    name: str
    compute_capability: str


class TensorRtBackend:
    name = NAME

    def log_model(self, request: ModelLogging) -> str:
        """A pyfunc model from code (``quantgate/serving/tensorrt_model.py``) carrying the engine and its sidecar."""
        import mlflow
        from mlflow.models import Model

        from quantgate.serving import HERE, pins

        engine = request.artifact
        sidecar = engine.with_name(engine.name + ".json")
        meta = json.loads(sidecar.read_text())
        libs = request.libraries
        reqs = [*pins(libs, ("mlflow", "numpy")), f"tensorrt=={meta.get('tensorrt', '')}"]
        if "quantgate" in libs:
            reqs.append(f"quantgate[tensorrt]=={libs['quantgate']}")
        info = Model.log(
            flavor=mlflow.pyfunc,
            python_model=str(HERE / "tensorrt_model.py"),
            artifacts={"engine": str(engine), "engine_meta": str(sidecar)},
            pip_requirements=reqs,
            **request.mlflow_args,
        )
        return str(info.model_uri)

    def available(self) -> Availability:
        status = _probe()[1]
        # Step 1 (the checked QDQ ONNX) needs only onnx and onnxruntime, so it runs on any host.
        return status if status.ok else replace(status, prepares_here=True)

    def recipes(self, model: ModelInfo) -> list[Recipe]:
        return list(RECIPES)

    def baseline(self, model: ModelInfo, workdir: Path) -> Candidate:
        gpu, _ = _probe()
        recipe = Recipe.make(NAME, "fp32", "fp32", tf32=False, **_PROFILE)
        if gpu is None:
            note = "FP32 ONNX: the FP32 TensorRT engine is built on an NVIDIA GPU worker"
            return Candidate(recipe, model.path, notes=(note,), files=model_files(model.path))
        workdir.mkdir(parents=True, exist_ok=True)
        engine = workdir / "fp32.engine"
        notes = _build_engine(gpu, model.path, engine, recipe, exact_fp32=True)
        return Candidate(recipe, engine, notes=notes, files=(engine, _sidecar(engine)))

    def compress(self, model: ModelInfo, recipe: Recipe, calib: Calibration, workdir: Path) -> Candidate:
        workdir.mkdir(parents=True, exist_ok=True)
        onnx_path = workdir / f"{recipe.name}.onnx"
        notes = _prepare(model.path, onnx_path, recipe, calib, workdir.parent)
        gpu, status = _probe()
        if gpu is None:
            raise EngineNotBuilt(onnx_path, status.reason, status.hint, notes)
        engine = workdir / f"{recipe.name}.engine"
        built = _build_engine(gpu, onnx_path, engine, recipe, exact_fp32=False)
        return Candidate(recipe, engine, notes=(*notes, *built), files=(engine, _sidecar(engine)))

    def runner(self, candidate: Candidate, *, threads: int) -> Runner:
        """``threads`` does not apply: the engine runs on GPU 0 with one CUDA stream."""
        meta = _read_sidecar(candidate.artifact)
        gpu, status = _probe()
        if gpu is None:
            raise BackendUnavailable(NAME, f"{_needs(candidate.artifact, meta)}; {status.reason}", status.hint)
        if meta is None:
            raise BackendError(f"{candidate.artifact.name} is not a TensorRT engine with a sidecar; build it first")
        _check_engine_fits(gpu, candidate.artifact, meta)
        return TensorRtRunner(gpu, candidate.artifact, meta)


# -- step 1: the TensorRT-ready ONNX ---------------------------------------------------------------------


def _prepare(src: Path, out: Path, recipe: Recipe, calib: Calibration, shared: Path) -> tuple[str, ...]:
    """Write the ONNX TensorRT builds ``recipe`` from and check its form; raise ``BackendError`` if either fails."""
    opts = recipe.options
    try:
        if opts["kind"] == "fp16":
            notes = make_tensorrt_fp16(src, out)
        else:
            notes = make_tensorrt_qdq(src, out, calib, fp16_fallback=bool(opts["fp16_fallback"]), prep_dir=shared)
    except QuantgateError:  # DataError from the calibration reader stays an input error
        raise
    except Exception as exc:  # quantization raises anything from ValueError to ORT's Fail
        raise BackendError(f"{recipe.name} failed: {first_line(exc)}") from exc
    violations = check_tensorrt_qdq(out)
    if violations:
        raise TensorRtQdqError(recipe.name, violations)
    return notes


# -- host probing ----------------------------------------------------------------------------------------


def _probe() -> tuple[_Gpu | None, Availability]:
    """TensorRT, a GPU and cuda-python, in that order; never raises."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or OSError from a wheel whose libnvinfer is missing
        return None, Availability(False, f"TensorRT is not installed ({first_line(exc)})", INSTALL_HINT)
    cudart = _import_cudart()
    try:
        devices = _cuda_devices(cudart)
    except Exception as exc:  # a broken driver or CUDA install: say so, available() never raises
        return None, Availability(
            False, f"no usable NVIDIA GPU: the CUDA query failed ({first_line(exc)})", INSTALL_HINT
        )
    if not devices:
        return None, Availability(False, "no NVIDIA GPU found (nvidia-smi / CUDA device count 0)", INSTALL_HINT)
    if cudart is None:
        reason = "cuda-python is not installed (the TensorRT runner allocates GPU memory with it)"
        return None, Availability(False, reason, "pip install cuda-python")
    name, capability = devices[0]
    return _Gpu(trt, cudart, name, capability), Availability(True)


def _import_cudart() -> Any:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, then older releases
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    return None


def _cuda_devices(cudart: Any) -> list[tuple[str, str]]:
    """(name, compute capability) of every visible NVIDIA GPU: from the CUDA runtime, else from nvidia-smi."""
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:  # no driver, no device: both mean "no GPU here"
            return []
        out = []
        for i in range(count):
            props = _cuda(cudart, cudart.cudaGetDeviceProperties(i), "cudaGetDeviceProperties")
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            out.append((name.rstrip("\x00"), f"{props.major}.{props.minor}"))
        return out
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.rsplit(",", 1) for line in done.stdout.splitlines() if "," in line] if done.returncode == 0 else []
    return [(name.strip(), cap.strip()) for name, cap in rows]


def _cuda(cudart: Any, result: Any, call: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising ``BackendError`` on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call {call} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


# -- step 2: the engine ----------------------------------------------------------------------------------


def _build_engine(gpu: _Gpu, onnx_path: Path, engine: Path, recipe: Recipe, *, exact_fp32: bool) -> tuple[str, ...]:
    """Build and serialize an engine for ``onnx_path``; write the sidecar; return notes."""
    trt = gpu.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise BackendError(f"{recipe.name}: TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if not strongly_typed:  # TensorRT 8.x: precision from builder flags, which TensorRT 11 no longer has
        wants_fp16 = recipe.precision == "fp16" or bool(recipe.options.get("fp16_fallback"))
        if wants_fp16 and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        if recipe.precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization (Q/DQ) still needs it on 8.x
    if exact_fp32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile_shapes = _add_profile(builder, network, config)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{recipe.name}: TensorRT could not build an engine from {onnx_path.name} (see its log)")
    engine.write_bytes(bytes(serialized))
    meta = {
        "engine": engine.name,
        "onnx": str(onnx_path),
        "recipe": recipe.name,
        "precision": recipe.precision,
        "tensorrt": str(trt.__version__),
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "strongly_typed": strongly_typed,
        "profile": profile_shapes,
        "inputs": [network.get_input(i).name for i in range(network.num_inputs)],
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
    }
    _sidecar(engine).write_text(json.dumps(meta, indent=2) + "\n")
    typing = "strongly typed" if strongly_typed else "weakly typed (builder flags)"
    return (f"TensorRT {trt.__version__} engine, {typing}, built on {gpu.name} (sm {gpu.compute_capability})",)


def _network_flags(trt: Any) -> tuple[int, bool]:
    """Network creation flags and whether the network is strongly typed (precision taken from the ONNX).

    The STRONGLY_TYPED flag is how 9.x/10.x opt in; 11.x is always strongly typed (it accepts and ignores the
    flag); 8.x has no strong typing and needs EXPLICIT_BATCH.
    """
    flags_enum = trt.NetworkDefinitionCreationFlag
    if hasattr(flags_enum, "STRONGLY_TYPED"):
        return 1 << int(flags_enum.STRONGLY_TYPED), True
    if int(str(trt.__version__).split(".")[0]) >= 11:
        return 0, True
    return 1 << int(flags_enum.EXPLICIT_BATCH), False


def _add_profile(builder: Any, network: Any, config: Any) -> dict[str, list[list[int]]]:
    """One optimization profile covering every dynamic input axis; returns {input: [min, opt, max]}."""
    profile = builder.create_optimization_profile()
    shapes: dict[str, list[list[int]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [int(d) for d in tensor.shape]
        if all(d >= 0 for d in dims):
            continue
        low, opt, high = [], [], []
        for axis, d in enumerate(dims):
            lo_hi = PROFILE_BATCH if axis == 0 else PROFILE_OTHER_AXES
            low.append(d if d >= 0 else lo_hi[0])
            opt.append(d if d >= 0 else lo_hi[1])
            high.append(d if d >= 0 else lo_hi[2])
        profile.set_shape(tensor.name, low, opt, high)
        shapes[tensor.name] = [low, opt, high]
    if shapes:
        config.add_optimization_profile(profile)
    return shapes


def _sidecar(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def _read_sidecar(artifact: Path) -> dict[str, Any] | None:
    path = _sidecar(artifact)
    if artifact.suffix != ".engine" or not path.exists():
        return None
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path.name} cannot be read ({exc}); build the engine again") from exc
    return meta


def _needs(artifact: Path, meta: dict[str, Any] | None) -> str:
    if meta is None:
        return f"{artifact.name} runs as a TensorRT engine on an NVIDIA GPU worker"
    return (
        f"{artifact.name} needs an NVIDIA GPU like the {meta.get('gpu', '?')} (compute capability "
        f"{meta.get('compute_capability', '?')}) it was built on, with TensorRT {meta.get('tensorrt', '?')}"
    )


def _check_engine_fits(gpu: _Gpu, artifact: Path, meta: dict[str, Any]) -> None:
    """Engines are tied to the TensorRT version and GPU architecture they were built with."""
    here = f"this worker has TensorRT {gpu.trt.__version__} on {gpu.name} (sm {gpu.compute_capability})"
    if meta.get("tensorrt") != str(gpu.trt.__version__) or meta.get("compute_capability") != gpu.compute_capability:
        raise BackendUnavailable(NAME, f"{_needs(artifact, meta)}; {here}", "rebuild the engine on this worker")


# -- the runner ------------------------------------------------------------------------------------------


class TensorRtRunner:
    """Runs a serialized engine on GPU 0 with one CUDA stream.

    ``run`` copies inputs to the device, enqueues the engine, copies outputs back and synchronizes the stream before
    it returns: a wall-clock timer around ``run`` measures the whole round trip, transfers included. Device buffers
    are kept between calls and grown when a larger batch arrives; batches above the profile's maximum are split.
    """

    def __init__(self, gpu: _Gpu, engine_path: Path, meta: dict[str, Any]) -> None:
        trt, cudart = gpu.trt, gpu.cudart
        self._cudart = cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # kept: TensorRT needs the runtime to outlive its engines
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"TensorRT cannot deserialize {engine_path.name}; rebuild it on this worker")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in meta.get("outputs", names) if n in is_input and not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._max_batch = min((s[2][0] for s in meta.get("profile", {}).values()), default=0)
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, capacity in bytes)
        self._finalizer = weakref.finalize(self, _release, cudart, self._stream, self._buffers)

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = next(iter(inputs.values())).shape[0] if inputs else 0
        if self._max_batch and n > self._max_batch:
            parts = [
                self._run_once({k: v[i : i + self._max_batch] for k, v in inputs.items()})
                for i in range(0, n, self._max_batch)
            ]
            return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]
        return self._run_once(inputs)

    def close(self) -> None:
        self._finalizer()

    def _run_once(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cudart, ctx, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        staged = []  # host arrays must outlive the asynchronous copies
        for name in self._inputs:
            host = np.ascontiguousarray(inputs[name], dtype=self._dtypes[name])
            if not ctx.set_input_shape(name, host.shape):
                raise BackendError(f"input '{name}' shape {host.shape} is outside the engine's optimization profile")
            ptr = self._device(name, host.nbytes)
            _cuda(cudart, cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, stream), "cudaMemcpyAsync")
            ctx.set_tensor_address(name, ptr)
            staged.append(host)
        outputs = []
        for name in self._outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output '{name}' has a data-dependent shape {shape}; this runner cannot size it")
            host = np.empty(shape, dtype=self._dtypes[name])
            ctx.set_tensor_address(name, self._device(name, host.nbytes))
            outputs.append(host)
        if not ctx.execute_async_v3(int(stream)):
            raise BackendError("TensorRT failed to enqueue the engine (see its log)")
        for name, host in zip(self._outputs, outputs, strict=True):
            ptr = self._buffers[name][0]
            _cuda(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, stream), "cudaMemcpyAsync")
        _cuda(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return outputs

    def _device(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, -1))
        if nbytes > capacity:
            if ptr:
                _cuda(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_cuda(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (ptr, max(nbytes, 1))
        return ptr


def _release(cudart: Any, stream: Any, buffers: dict[str, tuple[int, int]]) -> None:
    """Free device buffers and the stream; a finalizer, so errors are logged, not raised."""
    for ptr, _ in buffers.values():
        err = cudart.cudaFree(ptr)[0]
        if err != cudart.cudaError_t.cudaSuccess:
            log.warning("cudaFree failed while releasing a TensorRT runner: %s", err)
    buffers.clear()
    cudart.cudaStreamDestroy(stream)
