"""The LiteRT backend on the seeds' example: a MobileNetV2 (torchvision's architecture) trained briefly on generated
images, registered as a pytorch model, compressed to full-integer INT8 ``.tflite`` through the real CLI (in
quantgate.testing's sandbox, as a plugin author would test it).

Full-integer INT8 must hold a 1-point accuracy gate and be faster than the FP32 ``.tflite`` on the same interpreter
at batch 1 (the gate's lower confidence bound, not the point estimate); the registered version must load with
``mlflow.pyfunc.load_model``, predict like the candidate did, and answer the same over REST from ``mlflow models
serve``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from quantgate.testing import Sandbox, predict_rest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")

pytestmark = pytest.mark.slow

SIZE = 64  # pixels: big enough that the convolutions, not the call, dominate a batch-1 call
CLASSES = 4


def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class a bright square in one quadrant, in its own colour channel mix, on noise: learnable in a minute."""
    labels = rng.integers(0, CLASSES, n)
    x = rng.normal(0.0, 0.3, (n, 3, SIZE, SIZE)).astype(np.float32)
    half = SIZE // 2
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        x[i, :, r * half : (r + 1) * half, c * half : (c + 1) * half] += np.array([1.0, 0.5 * k, 1.0 - 0.25 * k])[
            :, None, None
        ].astype(np.float32)
    return x, labels.astype(np.int64)


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    from benchmarks.mobilenetv2 import MobileNetV2

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = _images(rng, 768)
    x_eval, y_eval = _images(rng, 300)
    model = MobileNetV2(num_classes=CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model.train()
    for _ in range(3):
        for i in range(0, len(xt), 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i : i + 32]), yt[i : i + 32]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_eval)).argmax(1).numpy() == y_eval).mean())
    assert accuracy >= 0.9, accuracy  # the gate below is only meaningful on a model that learned something
    d = tmp_path_factory.mktemp("mobilenet-data")
    np.savez(d / "calibration.npz", input=x_train[:128])
    np.savez(d / "evaluation.npz", input=x_eval, labels=y_eval)
    return {"model": model, "x": x_eval, "y": y_eval, "calib": d / "calibration.npz", "eval": d / "evaluation.npz"}


def test_full_integer_int8_holds_a_one_point_gate_and_beats_fp32_tflite_at_batch_1(
    mobilenet: dict[str, Any], tmp_path: Path, qg_home: Path
) -> None:
    from quantgate.hardware import detect

    # XNNPACK's INT8 kernels beat its FP32 ones only with INT8 dot-product instructions: measured 1.48x (CI low
    # 1.41) on a CPU with AVX-512 VNNI, 0.79-0.97x on an AVX2-only AMD EPYC. Without them the speed gate is not set
    # (quantgate's host note says why); everything else is checked on every host.
    fast_int8 = detect().int8_dot_product
    with Sandbox(tmp_path / "sandbox", home=qg_home) as box:
        source = box.register_pytorch(mobilenet["model"], mobilenet["x"][:2], "mobilenet")
        policy = {
            "backends": ["litert"],
            "recipes": ["int8-full"],
            "data": {"calibration": str(mobilenet["calib"]), "evaluation": str(mobilenet["eval"])},
            "latency": {"threads": 1, "warmup": 10, "rounds": 60, "batch_sizes": [1]},
            "gate": {
                "max_accuracy_drop": 0.01,
                "min_speedup": 1.0 if fast_int8 else None,
                "speedup_against": "own_fp32",
                "speedup_statistic": "ci_low",
                "max_size_ratio": 0.5,
            },
            "search": {"exhaustive": True},
        }
        run = box.compress(source, policy)
        # Exactly one JSON document on stdout: the converter's progress is not there.
        assert run.document is not None, f"exit {run.exit_code}: {run.stdout[:500]} {run.stderr[-1500:]}"
        cand = run.candidate("litert", "int8-full")
        metrics = cand["metrics"]
        figures = (
            f"accuracy {metrics.get('accuracy')} (drop {metrics.get('accuracy_drop')}), "
            f"INT8 {metrics.get('latency_p50_ms')} ms vs FP32 .tflite {metrics.get('baseline_latency_p50_ms')} ms, "
            f"speedup {metrics.get('speedup')} (CI low {metrics.get('speedup_ci_low')}): {cand['reasons']}"
        )
        assert run.exit_code == 0 and cand["passed"], figures
        uri = run.document["promoted_uri"]
        assert uri == "models:/mobilenet-litert-int8/1"
        assert ("mobilenet-litert-int8", "1") in [(n, v) for n, v, _ in box.versions()]
        client = MlflowClient(box.tracking_uri)
        version = client.get_model_version("mobilenet-litert-int8", "1")
        assert "speedup_vs_ort_fp32" in client.get_run(version.run_id).data.metrics

        x = mobilenet["x"][:32]
        loaded = box.load_model(uri)
        logits = np.asarray(loaded.predict(x))
        assert logits.shape == (32, CLASSES)
        assert (logits.argmax(1) == mobilenet["y"][:32]).mean() >= 0.85
        # The .tflite as `mlflow models serve` runs it, over REST: the same predictions as the candidate's model.
        (name,) = loaded.metadata.get_input_schema().input_names()
        with box.serve(uri) as url:
            served = np.asarray(predict_rest(url, {"inputs": {name: x.tolist()}})["predictions"])
        np.testing.assert_allclose(served, logits, rtol=1e-5, atol=1e-5)
