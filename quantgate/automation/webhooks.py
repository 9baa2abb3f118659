"""The bridge from MLflow Model Registry webhooks to quantgate: verify, de-duplicate, hand off.

MLflow (3.x open source) POSTs a JSON body ``{"entity", "action", "timestamp", "data"}`` with the headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` and, when the webhook has a secret, ``X-MLflow-Signature:
v1,<base64 HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}")>`` (``mlflow.webhooks.delivery.
_generate_hmac_signature``). Delivery is at-most-once with a few retries on 429/5xx that reuse the same delivery id
and timestamp, so a failed hand-off answers 503 and forgets the delivery id to let the retry through.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

logger = logging.getLogger("quantgate.webhooks")

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"
HANDLED_KINDS = frozenset({"model_version.created", "model_version_tag.set", "model_version_alias.created"})


class BridgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(min_length=1, repr=False, description="the secret given to MLflow when creating the webhook")
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    window_s: int = Field(default=300, gt=0, description="how far X-MLflow-Timestamp may be from now, either way")
    dedupe_db: Path


@dataclass(frozen=True, kw_only=True)
class WebhookEvent:
    delivery_id: str
    timestamp: int
    entity: str
    action: str
    name: str
    version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    value: str | None = None
    alias: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return f"{self.entity}.{self.action}"


@dataclass(frozen=True)
class HandleResult:
    status: Literal["started", "ignored"]
    detail: str
    flow_run_id: str | None = None


class Handler(Protocol):
    """Hands an event to the flows. Called in a worker thread, so it may block."""

    def __call__(self, event: WebhookEvent) -> HandleResult: ...


class MalformedEvent(ValueError):
    """The signed body is not a webhook event we can read."""


class DeliveryStore:
    """Delivery ids already seen, in SQLite, so replays and MLflow's retries are handled once.

    A connection per call: sqlite3 connections are not meant to be shared across threads, and opening one is
    ~50 µs, noise next to an HTTP request. WAL plus a busy timeout lets several bridge processes share the file.
    """

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            # WAL is a property of the file, so setting it once here covers every later connection.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS deliveries ("
                " delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL)"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit: every method is a single statement, which SQLite already makes atomic.
        with closing(sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)) as db:
            yield db

    def claim(self, delivery_id: str) -> bool:
        """Record the delivery id; False if it was already recorded (by this or another process)."""
        with self._connect() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, 'claimed', '')", (delivery_id, time.time())
            )
            return cur.rowcount == 1

    def finish(self, delivery_id: str, status: str, detail: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE deliveries SET status = ?, detail = ? WHERE delivery_id = ?", (status, detail, delivery_id)
            )

    def release(self, delivery_id: str) -> None:
        """Forget a claim whose handling failed, so MLflow's retry of it is processed."""
        with self._connect() as db:
            db.execute("DELETE FROM deliveries WHERE delivery_id = ?", (delivery_id,))

    def get(self, delivery_id: str) -> tuple[str, str] | None:
        """``(status, detail)`` of a recorded delivery, or None."""
        with self._connect() as db:
            row = db.execute("SELECT status, detail FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """Whether ``header`` holds a valid v1 signature of the delivery.

    ``timestamp`` is the header text as received: MLflow signs that text, not a number re-formatted from it.
    Several space-separated signatures are accepted (the Standard Webhooks form MLflow follows, for secret rotation).
    """
    expected = sign(secret, delivery_id, timestamp, body).encode()
    # compare_digest on str rejects non-ASCII with TypeError; bytes never raise and stay constant-time.
    return any(hmac.compare_digest(expected, candidate.encode("utf-8", "replace")) for candidate in header.split())


def check_timestamp(ts: int, now: float, window_s: int) -> bool:
    """Whether ``ts`` (Unix seconds) is within ``window_s`` of ``now`` either way: bounds replays of old deliveries."""
    return abs(now - ts) <= window_s


def parse_event(delivery_id: str, timestamp: int, body: bytes) -> WebhookEvent:
    """The event in a (verified) body; raises ``MalformedEvent`` if it is not one."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # ValueError covers bad JSON and bad UTF-8; RecursionError deep nesting
        raise MalformedEvent("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEvent("body is not a JSON object")
    entity, action, data = payload.get("entity"), payload.get("action"), payload.get("data")
    if not isinstance(entity, str) or not isinstance(action, str) or not isinstance(data, dict):
        raise MalformedEvent("body needs string 'entity' and 'action' and an object 'data'")
    kind = f"{entity}.{action}"
    if kind not in HANDLED_KINDS:
        # Not validated further: it is only recorded and acknowledged.
        name = str(data.get("name", ""))
        return WebhookEvent(
            delivery_id=delivery_id, timestamp=timestamp, entity=entity, action=action, name=name, raw=data
        )
    tags = data.get("tags") or {}
    if not isinstance(tags, dict):
        raise MalformedEvent(f"{kind}: 'tags' is not an object")
    return WebhookEvent(
        delivery_id=delivery_id,
        timestamp=timestamp,
        entity=entity,
        action=action,
        name=_text(data, "name", kind),
        version=_text(data, "version", kind),
        tags={str(k): str(v) for k, v in tags.items()},
        key=_text(data, "key", kind) if kind == "model_version_tag.set" else None,
        value=_text(data, "value", kind) if kind == "model_version_tag.set" else None,
        alias=_text(data, "alias", kind) if kind == "model_version_alias.created" else None,
        raw=data,
    )


def _text(data: dict[str, Any], key: str, kind: str) -> str:
    value = data.get(key)
    # MLflow sends versions as strings; an int is accepted in case a proxy or older server re-encodes them.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise MalformedEvent(f"{kind}: data.{key} is missing or not a string")
    return value


def create_app(settings: BridgeSettings, handler: Handler) -> Starlette:
    """The ASGI app: ``POST /webhooks/mlflow`` for MLflow, ``GET /healthz`` for probes."""
    store = DeliveryStore(settings.dedupe_db)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def receive(request: Request) -> JSONResponse:
        body = await _read_capped(request, settings.max_body_bytes)
        if body is None:
            return _answer(413, "error", f"body is larger than {settings.max_body_bytes} bytes")
        delivery_id = request.headers.get(DELIVERY_ID_HEADER, "")
        ts_text = request.headers.get(TIMESTAMP_HEADER, "")
        if not delivery_id or not ts_text:
            return _answer(400, "error", f"missing {DELIVERY_ID_HEADER} or {TIMESTAMP_HEADER} header")
        ts = _unsigned(ts_text)
        if ts is None or not check_timestamp(ts, time.time(), settings.window_s):
            return _answer(401, "error", "stale or future timestamp")
        if not verify_signature(settings.secret, delivery_id, ts_text, body, request.headers.get(SIGNATURE_HEADER, "")):
            # Nothing is recorded: an unsigned request must not be able to burn a delivery id MLflow will send.
            logger.warning("rejected delivery %s: bad or missing signature", delivery_id[:100])
            return _answer(401, "error", "bad or missing signature")
        try:
            event = parse_event(delivery_id, ts, body)
        except MalformedEvent as exc:
            return _answer(400, "error", str(exc))
        return await _dispatch(store, handler, event)

    return Starlette(
        routes=[Route("/webhooks/mlflow", receive, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={sqlite3.Error: _store_unavailable},
    )


async def _dispatch(store: DeliveryStore, handler: Handler, event: WebhookEvent) -> JSONResponse:
    # SQLite may wait on another process's lock for up to its timeout, so the store is called off the event loop too.
    if not await run_in_threadpool(store.claim, event.delivery_id):
        return JSONResponse({"status": "duplicate", "detail": f"delivery {event.delivery_id} was already received"})
    if event.kind not in HANDLED_KINDS:
        detail = f"event {event.kind} is not handled"
        await run_in_threadpool(store.finish, event.delivery_id, "ignored", detail)
        return _answer(200, "ignored", detail)
    try:
        result = await run_in_threadpool(handler, event)
    except Exception as exc:  # any failure of the hand-off: answer 5xx so MLflow retries
        logger.error("handling delivery %s (%s) failed", event.delivery_id, event.kind, exc_info=True)
        await run_in_threadpool(store.release, event.delivery_id)
        return _answer(503, "error", _one_line(exc))
    await run_in_threadpool(store.finish, event.delivery_id, result.status, result.detail)
    logger.info("delivery %s (%s %s): %s %s", event.delivery_id, event.kind, event.name, result.status, result.detail)
    return JSONResponse({"status": result.status, "detail": result.detail, "flow_run_id": result.flow_run_id})


async def _read_capped(request: Request, cap: int) -> bytes | None:
    """The body, or None once it is known to exceed ``cap`` (from Content-Length, or while streaming it)."""
    length = _unsigned(request.headers.get("content-length", ""))
    if length is not None and length > cap:
        return None
    # Content-Length can be absent (chunked) or wrong, so the stream is cut at the cap rather than trusted.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _unsigned(text: str) -> int | None:
    # Stricter than int(): no sign, spaces, "_" or non-ASCII digits (str.isdigit takes "¹", int() does not), and
    # short enough that int() never hits its 4300-digit limit. MLflow sends str(int(time.time())).
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # 503, not a bare 500 page: MLflow retries it, and a claim already made turns that retry into "duplicate".
    logger.error("delivery store %s failed: %s", request.url.path, exc)
    return _answer(503, "error", f"delivery store unavailable: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _answer(code: int, status: str, detail: str) -> JSONResponse:
    return JSONResponse({"status": status, "detail": detail}, status_code=code)
