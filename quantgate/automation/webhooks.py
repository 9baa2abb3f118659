"""The bridge from MLflow Model Registry webhooks to quantgate: verify, de-duplicate, hand off.

MLflow (3.x open source) POSTs a JSON body ``{"entity", "action", "timestamp", "data"}`` with the headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` and, when the webhook has a secret, ``X-MLflow-Signature:
v1,<base64 HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}")>`` (``mlflow.webhooks.delivery.
_generate_hmac_signature``). MLflow's delivery is at-most-once with a few retries on 429/5xx over about two minutes
that reuse the same delivery id and timestamp.

So that no delivery is lost, the bridge keeps each claimed delivery's body until it is handed off: a hand-off that
fails is retried by the bridge itself (and by MLflow's retries), and a claim whose bridge process died (on this host:
at once; elsewhere: once the claim is older than its lease, longer than MLflow's retry window) is claimed again. A
second hand-off is harmless: the flow run's idempotency key makes it return the same run. Handled delivery ids are
pruned after a retention period longer than the timestamp window (older replays are refused by their timestamp).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from quantgate import faults, processes
from quantgate.files import private_file

logger = logging.getLogger("quantgate.webhooks")

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"
HANDLED_KINDS = frozenset({"model_version.created", "model_version_tag.set", "model_version_alias.created"})


class BridgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(min_length=1, repr=False, description="the secret given to MLflow when creating the webhook")
    max_body_bytes: int = Field(default=1_048_576, gt=0, le=64 * 1_048_576)
    window_s: int = Field(default=300, gt=0, description="how far X-MLflow-Timestamp may be from now, either way")
    dedupe_db: Path
    claim_lease_s: float = Field(
        default=300.0, gt=0, le=86_400, description="a claim older than this is taken again (> MLflow's ~130 s retries)"
    )
    retention_s: float = Field(default=7 * 86_400, gt=0, description="handled delivery ids are kept this long")
    sweep_s: float = Field(default=30.0, gt=0, description="how often stale claims and failed hand-offs are retried")

    @model_validator(mode="after")
    def _retention_covers_the_window(self) -> BridgeSettings:
        # A replay is refused by its timestamp only within window_s; its id must be remembered at least that long.
        if self.retention_s <= 2 * self.window_s:
            raise ValueError(f"retention_s must be longer than twice the timestamp window ({2 * self.window_s} s)")
        return self


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


Claim = Literal["new", "reclaimed", "in_progress", "done"]


class DeliveryStore:
    """Delivery ids, with the body of each one not yet handed off, in SQLite: replays and MLflow's retries are
    handled once, and nothing claimed is lost when a hand-off fails or the bridge dies.

    A connection per call: sqlite3 connections are not meant to be shared across threads, and opening one is
    ~50 µs, noise next to an HTTP request. WAL plus a busy timeout lets several bridge processes share the file.
    """

    def __init__(self, path: Path, timeout_s: float = 10.0, lease_s: float = 300.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        private_file(path)  # delivery bodies name models and tags: owner-only from the first byte
        with self._connect() as db:
            # WAL is a property of the file, so setting it once here covers every later connection.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS deliveries ("
                " delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL)"
            )
            have = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
            for column, kind in (("claimed_at", "REAL"), ("claimed_by", "TEXT"), ("body", "BLOB"), ("ts", "INTEGER"),
                                 ("attempts", "INTEGER NOT NULL DEFAULT 0"), ("handled_at", "REAL")):  # fmt: skip
                if column not in have:  # a store written by an earlier bridge
                    db.execute(f"ALTER TABLE deliveries ADD COLUMN {column} {kind}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit; claim() takes the write lock itself (BEGIN IMMEDIATE) for its read-then-write.
        with closing(sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)) as db:
            yield db

    def claim(self, delivery_id: str, body: bytes = b"", ts: int = 0) -> Claim:
        """Claim a delivery for this process: ``new``, ``reclaimed`` (a stale claim: its claimer died or its lease
        passed, or its hand-off failed), ``in_progress`` (another live claim), or ``done`` (handled already)."""
        me = processes.me().to_json()
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT status, claimed_at, claimed_by FROM deliveries WHERE delivery_id = ?", (delivery_id,)
                ).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO deliveries (delivery_id, received_at, status, detail, claimed_at, claimed_by,"
                        " body, ts, attempts) VALUES (?, ?, 'claimed', '', ?, ?, ?, ?, 1)",
                        (delivery_id, now, now, me, body, ts),
                    )
                    outcome: Claim = "new"
                elif row[0] not in ("claimed", "retry"):
                    outcome = "done"
                elif row[0] == "retry" or self._stale(row[1], row[2], now):
                    db.execute(
                        "UPDATE deliveries SET status = 'claimed', claimed_at = ?, claimed_by = ?,"
                        " attempts = attempts + 1, body = COALESCE(body, ?) WHERE delivery_id = ?",
                        (now, me, body or None, delivery_id),
                    )
                    outcome = "reclaimed"
                else:
                    outcome = "in_progress"
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return outcome

    def _stale(self, claimed_at: float | None, claimed_by: str | None, now: float) -> bool:
        owner = processes.Owner.from_json(claimed_by or "")
        if owner is not None and owner.alive() is False:  # its bridge process on this host is gone
            return True
        return claimed_at is None or now - claimed_at > self.lease_s

    def finish(self, delivery_id: str, status: str, detail: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE deliveries SET status = ?, detail = ?, handled_at = ?, body = NULL WHERE delivery_id = ?",
                (status, detail, time.time(), delivery_id),
            )

    def release(self, delivery_id: str, detail: str = "") -> None:
        """A hand-off failed: keep the delivery for a retry (by MLflow, or by the bridge's own sweep)."""
        with self._connect() as db:
            db.execute(
                "UPDATE deliveries SET status = 'retry', detail = ? WHERE delivery_id = ?", (detail, delivery_id)
            )

    def get(self, delivery_id: str) -> tuple[str, str] | None:
        """``(status, detail)`` of a recorded delivery, or None."""
        with self._connect() as db:
            row = db.execute("SELECT status, detail FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def pending(self) -> list[tuple[str, int, bytes]]:
        """(delivery id, timestamp, body) of every delivery not handed off whose claim is stale or failed."""
        now = time.time()
        with self._connect() as db:
            rows = db.execute(
                "SELECT delivery_id, ts, body, status, claimed_at, claimed_by FROM deliveries"
                " WHERE status IN ('claimed', 'retry') AND body IS NOT NULL"
            ).fetchall()
        return [
            (str(r[0]), int(r[1] or 0), bytes(r[2])) for r in rows if r[3] == "retry" or self._stale(r[4], r[5], now)
        ]

    def prune(self, retention_s: float) -> int:
        """Forget handled deliveries older than ``retention_s``; returns how many."""
        with self._connect() as db:
            cur = db.execute(
                "DELETE FROM deliveries WHERE status NOT IN ('claimed', 'retry') AND COALESCE(handled_at, received_at)"
                " < ?",
                (time.time() - retention_s,),
            )
            return int(cur.rowcount)


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
    """The ASGI app: ``POST /webhooks/mlflow`` for MLflow, ``GET /healthz`` for probes; while it runs, a sweep
    retries failed hand-offs and stale claims from their stored bodies, and prunes old delivery ids."""
    store = DeliveryStore(settings.dedupe_db, lease_s=settings.claim_lease_s)

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
        # SQLite may wait on another process's lock for up to its timeout: the store is called off the event loop.
        claim = await run_in_threadpool(store.claim, delivery_id, body, ts)
        if claim == "done":
            return JSONResponse({"status": "duplicate", "detail": f"delivery {delivery_id} was already received"})
        if claim == "in_progress":  # 503 + Retry-After: MLflow retries, and by then it is handled or reclaimable
            detail = f"delivery {delivery_id} is being handled"
            return JSONResponse({"status": "in_progress", "detail": detail}, 503, {"Retry-After": "5"})
        code, answer = await run_in_threadpool(_hand_off, store, handler, event)
        return JSONResponse(answer, status_code=code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_sweep_forever(store, handler, settings))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(
        routes=[Route("/webhooks/mlflow", receive, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={sqlite3.Error: _store_unavailable},
        lifespan=lifespan,
    )


def _hand_off(store: DeliveryStore, handler: Handler, event: WebhookEvent) -> tuple[int, dict[str, Any]]:
    """Hand a claimed delivery to the handler and record the outcome; a failure leaves it for a retry."""
    faults.point("delivery_claimed")
    if event.kind not in HANDLED_KINDS:
        detail = f"event {event.kind} is not handled"
        store.finish(event.delivery_id, "ignored", detail)
        return 200, {"status": "ignored", "detail": detail}
    try:
        result = handler(event)
    except Exception as exc:  # any failure of the hand-off: answer 5xx so MLflow retries; the sweep retries too
        logger.error("handling delivery %s (%s) failed", event.delivery_id, event.kind, exc_info=True)
        store.release(event.delivery_id, _one_line(exc))
        return 503, {"status": "error", "detail": _one_line(exc)}
    store.finish(event.delivery_id, result.status, result.detail)
    logger.info("delivery %s (%s %s): %s %s", event.delivery_id, event.kind, event.name, result.status, result.detail)
    return 200, {"status": result.status, "detail": result.detail, "flow_run_id": result.flow_run_id}


def sweep(store: DeliveryStore, handler: Handler, retention_s: float) -> int:
    """Hand off every delivery whose hand-off failed or whose claimer is gone, from its stored body; prune old
    delivery ids. Returns how many deliveries it handed off."""
    store.prune(retention_s)
    handed = 0
    for delivery_id, ts, body in store.pending():
        if store.claim(delivery_id) != "reclaimed":
            continue  # another bridge process, or MLflow's own retry, took it meanwhile
        try:
            event = parse_event(delivery_id, ts, body)
        except MalformedEvent as exc:  # it parsed when it arrived; a store edited by hand, say
            store.finish(delivery_id, "error", str(exc))
            continue
        code, _ = _hand_off(store, handler, event)
        if code == 200:
            handed += 1
            logger.info("delivery %s handed off by the sweep", delivery_id)
    return handed


async def _sweep_forever(store: DeliveryStore, handler: Handler, settings: BridgeSettings) -> None:
    while True:
        try:
            await run_in_threadpool(sweep, store, handler, settings.retention_s)
        except Exception as exc:  # the store or the handler is failing: try again at the next sweep
            logger.error("delivery sweep failed: %s", _one_line(exc))
        await asyncio.sleep(settings.sweep_s)


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
