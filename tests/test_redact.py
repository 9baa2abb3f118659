"""Credentials are masked in every string quantgate writes, and in every log record of the process."""

from __future__ import annotations

import logging

import pytest

from quantgate.redact import has_credentials, install, redact, redact_data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql+psycopg2://user:S3cret@db:5432/mlflow", "postgresql+psycopg2://user:***@db:5432/mlflow"),
        ("https://alice:p%40ss@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("failed: cannot reach http://u:pw@h:5000 (refused)", "failed: cannot reach http://u:***@h:5000 (refused)"),
        ("https://b.s3.amazonaws.com/x.npz?X-Amz-Signature=abc123&X-Amz-Date=1", None),
        ("https://h/x?sig=abc&sv=2020", "https://h/x?sig=***&sv=2020"),
        ("https://h/x?api_key=k1&token=t2", "https://h/x?api_key=***&token=***"),
    ],
)
def test_passwords_and_secret_query_values_are_masked(text: str, expected: str | None) -> None:
    masked = redact(text)
    if expected is not None:
        assert masked == expected
    assert "S3cret" not in masked and "abc123" not in masked and "p%40ss" not in masked
    assert has_credentials(text)


@pytest.mark.parametrize(
    "text",
    ["postgresql://postgres@127.0.0.1:5432/db", "http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db",
     "models:/digits/1", "runs:/abc/eval.npz", "http://host:5000/path@x", "a = b"],
)  # fmt: skip
def test_uris_without_credentials_are_unchanged(text: str) -> None:
    assert redact(text) == text
    assert not has_credentials(text)


def test_nested_documents_are_masked_everywhere() -> None:
    doc = {"uri": "http://u:pw@h", "list": ["mysql://a:b@c/d", 3], "n": {"k": ("https://x:y@z",)}, "f": 1.5}
    assert redact_data(doc) == {"uri": "http://u:***@h", "list": ["mysql://a:***@c/d", 3],
                                "n": {"k": ["https://x:***@z"]}, "f": 1.5}  # fmt: skip


def test_log_records_are_masked_in_message_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    install()
    install()  # idempotent
    log = logging.getLogger("quantgate.test-redact")
    with caplog.at_level(logging.INFO, logger="quantgate.test-redact"):
        log.info("connecting to %s", "postgresql://me:hunter2@db/x")
        try:
            raise RuntimeError("boom at http://me:hunter2@h")
        except RuntimeError:
            log.exception("failed")
    text = caplog.text
    assert "hunter2" not in text
    assert "postgresql://me:***@db/x" in text and "http://me:***@h" in text
