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


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("foo://bar", "tracking URI foo://bar: MLflow has no store for this scheme"),
        ("sqlite:////nonexistent/dir/x.db", "the directory /nonexistent/dir does not exist"),
        ("postgresql+psycopg2://u:hunter2@db/x?foo", None),
    ],
)
def test_tracking_uris_mlflow_cannot_use_are_refused_before_anything_is_created(
    uri: str, message: str | None, tmp_path: Path
) -> None:
    if message is None:
        registry.check_tracking_uri(uri)  # a database URL is only checked by connecting
        return
    with pytest.raises(InputError, match=message):
        registry.check_tracking_uri(uri)
    assert not Path("/nonexistent").exists()


def test_a_missing_sqlite_database_is_refused_unless_it_may_be_created(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(InputError, match="no MLflow database at"):
        registry.check_tracking_uri(uri)
    registry.check_tracking_uri(uri, create=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("status", "body"), [(404, b"not here"), (200, b"<html>hello</html>")])
def test_an_http_server_that_is_not_mlflow_is_refused(status: int, body: bytes) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(InputError, match=r"is not an MLflow tracking server \(GET /health answered"):
            registry.check_reachable(f"http://u:hunter2@127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def test_flow_parameters_carry_the_masked_uri_and_the_flow_takes_credentials_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = "postgresql+psycopg2://u:hunter2@db/mlflow"
    shown = registry.flow_tracking_uri(full)
    assert shown == "postgresql+psycopg2://u:***@db/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    assert registry.resolve_tracking_uri(shown) == full
    assert registry.resolve_tracking_uri(None) == full
    assert registry.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(InputError, match="carries credentials in a flow-run parameter"):
        registry.resolve_tracking_uri(full)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://u:other@elsewhere/mlflow")
    with pytest.raises(InputError, match="credentials masked") as exc:
        registry.resolve_tracking_uri(shown)
    assert "hunter2" not in str(exc.value) and "other" not in str(exc.value)
