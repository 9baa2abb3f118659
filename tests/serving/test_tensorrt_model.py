"""The TensorRT pyfunc on a host without TensorRT or a GPU (this one): loading fails early and says what it needs.

No engine can be built here, so the engine file is a stand-in (bytes that are never parsed); the sidecar is the
real format the TensorRT backend writes.
"""

import json
from pathlib import Path

import mlflow.pyfunc
import pytest

from quantgate.serving import HERE


def test_loading_an_engine_off_target_names_the_gpu_and_tensorrt_version_it_needs(tmp_path: Path) -> None:
    engine = tmp_path / "int8-qdq.engine"
    engine.write_bytes(b"stand-in: never parsed on this host")
    meta = {
        "engine": engine.name, "recipe": "int8-qdq", "precision": "int8", "tensorrt": "10.13.3",
        "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "inputs": ["input"], "outputs": ["output"],
    }  # fmt: skip
    sidecar = engine.with_name(engine.name + ".json")
    sidecar.write_text(json.dumps(meta))
    model_dir = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(HERE / "tensorrt_model.py"),
        artifacts={"engine": str(engine), "engine_meta": str(sidecar)},
        pip_requirements=["tensorrt==10.13.3"],
    )
    with pytest.raises(Exception) as caught:
        mlflow.pyfunc.load_model(str(model_dir))
    message = str(caught.value)
    assert "built on an NVIDIA H100 80GB HBM3 (compute capability 9.0) with TensorRT 10.13.3" in message
    assert "this host cannot run it: TensorRT is not installed" in message
    assert "quantgate[tensorrt]" in message
