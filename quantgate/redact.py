"""Credentials never leave the process: passwords in URIs, and secret query parameters, are masked in everything
quantgate writes or prints (JSON, MLflow tags/params/artifacts, reports, Prefect parameters, log records).

A URI's credentials travel through the environment (``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_PASSWORD``...), never
through flow-run parameters: Prefect stores those in its database and shows them in its UI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# scheme://user:password@host  ->  scheme://user:***@host (a user name alone is not a secret).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/:@?#'\"]*):(?P<password>[^\s/@'\"]+)@")
# Query parameters that carry secrets: tokens, signatures (S3/GCS/Azure presigned URLs), passwords, keys.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.\-]*(?:password|passwd|pwd|token|secret|signature|credential|api[_-]?key|"
    r"access[_-]?key|sig|sas))=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every URI password and secret query value replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", out)


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a password or a secret query parameter (what :func:`redact` would mask)."""
    return redact(uri) != uri


def is_redacted(uri: str) -> bool:
    return MASK in uri


def redact_data(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(v) for v in value]
    return value


class _RedactingFactory:
    """A log record factory that masks credentials in the formatted message and the exception text.

    Installed process-wide: Prefect's API log handler, MLflow's and quantgate's own handlers all see the masked
    record, so no handler (terminal, Prefect UI, a log file) can be forgotten.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: leave it to the handler, as logging would
            return record
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


def install() -> None:
    """Mask credentials in every log record of this process from now on (idempotent)."""
    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(current))
