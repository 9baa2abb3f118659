from pathlib import Path

import pytest

from quantgate import registry
from quantgate.errors import InputError, ModelNotFound, TrackingUnavailable
from tests.conftest import register_onnx


@pytest.mark.parametrize(
    ("uri", "name", "version", "alias"),
    [
        ("models:/digits-cnn/3", "digits-cnn", "3", None),
        ("models:/digits-cnn@champion", "digits-cnn", None, "champion"),
    ],
)
def test_parse_model_uri(uri: str, name: str, version: str | None, alias: str | None) -> None:
    ref = registry.parse_model_uri(uri)
    assert (ref.name, ref.version, ref.alias) == (name, version, alias)
    assert str(ref) == uri


@pytest.mark.parametrize("uri", ["digits-cnn", "models:/", "models:/a/b/c", "runs:/abc/model", "models:/a/x"])
def test_parse_rejects_anything_but_registered_model_uris(uri: str) -> None:
    with pytest.raises(InputError):
        registry.parse_model_uri(uri)


def test_unreachable_tracking_server_fails_fast() -> None:
    with pytest.raises(TrackingUnavailable, match=r"cannot reach the MLflow tracking server at http://127\.0\.0\.1:9"):
        registry.connect("http://127.0.0.1:9")


def test_resolve_pins_alias_and_names_what_is_missing(tracking_uri: str, digits_onnx: Path) -> None:
    uri = register_onnx(tracking_uri, digits_onnx, "digits")
    client = registry.connect(tracking_uri)
    client.set_registered_model_alias("digits", "champion", "1")
    source = registry.resolve(client, registry.parse_model_uri("models:/digits@champion"))
    assert source.uri == uri == "models:/digits/1"
    with pytest.raises(ModelNotFound, match="registered model 'nope' does not exist"):
        registry.resolve(client, registry.parse_model_uri("models:/nope/1"))
    with pytest.raises(ModelNotFound, match="has no version 7"):
        registry.resolve(client, registry.parse_model_uri("models:/digits/7"))
    with pytest.raises(ModelNotFound, match="has no alias '@prod'"):
        registry.resolve(client, registry.parse_model_uri("models:/digits@prod"))
