"""The demo model: a small CNN trained on scikit-learn's bundled digits (no downloads), registered in MLflow."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantgate import names

log = logging.getLogger("quantgate")

DEMO_MODEL = "digits-cnn"
IMAGE = 32  # digits are 8x8; upsampled so the convolutions have real work to do


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data(seed: int = 0) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    scale = IMAGE // images.shape[1]
    images = np.kron(images, np.ones((scale, scale), dtype=np.float32))[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target.astype(np.int64), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return DigitsData(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


def build_cnn() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )  # fmt: skip


def train_cnn(data: DigitsData, epochs: int = 8, seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    model = build_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(x), generator=gen), 64):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def test_accuracy(model: Any, data: DigitsData) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
    return float(np.mean(pred == data.y_test))


def write_data(data: DigitsData, directory: Path, calibration_samples: int = 512) -> tuple[Path, Path]:
    """calibration.npz (training images) and evaluation.npz (held-out images + labels)."""
    directory.mkdir(parents=True, exist_ok=True)
    calib, evaluation = directory / "calibration.npz", directory / "evaluation.npz"
    np.savez(calib, input=data.x_train[:calibration_samples])
    np.savez(evaluation, input=data.x_test, labels=data.y_test)
    return calib, evaluation


def register_demo_model(tracking_uri: str, workdir: Path, *, name: str = DEMO_MODEL, epochs: int = 8) -> str:
    """Train, log and register the CNN with its data attached; returns ``models:/NAME/VERSION``.

    The calibration and evaluation sets are logged as artifacts of the training run and the version is
    tagged with their URIs, which is how quantgate finds data when no policy names it.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    data = digits_data()
    model = train_cnn(data, epochs=epochs)
    acc = test_accuracy(model, data)
    calib, evaluation = write_data(data, workdir / "data")
    mlflow.set_experiment("digits-training")
    with torch.no_grad():
        sample_out = model(torch.from_numpy(data.x_test[:4])).numpy()
    signature = infer_signature(data.x_test[:4], sample_out)
    with mlflow.start_run(run_name="train digits-cnn") as run:
        mlflow.log_metric("test_accuracy", acc)
        mlflow.log_artifact(str(calib), "data")
        mlflow.log_artifact(str(evaluation), "data")
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=data.x_test[:2],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    # Registered through the client: mlflow's registered_model_name= prints its own progress lines.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    run_id = run.info.run_id
    version = str(client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id).version)
    client.set_model_version_tag(name, version, names.CALIBRATION, f"runs:/{run_id}/data/calibration.npz")
    client.set_model_version_tag(name, version, names.EVALUATION, f"runs:/{run_id}/data/evaluation.npz")
    client.set_registered_model_alias(name, "champion", version)
    log.info("registered %s version %s (test accuracy %.3f)", name, version, acc)
    return f"models:/{name}/{version}"


TINY_BERT = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def export_bert_encoder(
    path: Path, *, seq_len: int = 8, pooled: bool = False, seed: int = 0, config: dict[str, int] | None = None
) -> int:
    """A random-weight ``BertModel`` built from a ``transformers`` config (nothing downloaded), exported to ONNX with
    dynamic batch and sequence axes: inputs ``input_ids`` and ``attention_mask``, outputs ``hidden`` (and
    ``pooled``). Returns its parameter count. Needs the ``transformers`` extra."""
    import warnings

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    settings: dict[str, Any] = dict(config or TINY_BERT)
    bert: Any = BertModel(BertConfig(**settings))
    bert.eval()

    class Wrapper(torch.nn.Module):  # transformers 5 rejects positional (ids, mask) in torch.onnx.export
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return (out.last_hidden_state, out.pooler_output) if pooled else out.last_hidden_state

    outputs = ["hidden", "pooled"] if pooled else ["hidden"]
    axes: dict[str, dict[int, str]] = {name: {0: "b", 1: "s"} for name in ("input_ids", "attention_mask", "hidden")}
    if pooled:
        axes["pooled"] = {0: "b"}
    ids = torch.ones(1, seq_len, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapper(), (ids, ids), str(path), input_names=["input_ids", "attention_mask"], output_names=outputs,
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    return sum(p.numel() for p in bert.parameters())
