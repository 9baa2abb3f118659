"""The MLflow webhook bridge: a real ASGI app over a real SQLite store; only the Prefect hand-off is a recorder."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from quantgate.automation.webhooks import (
    BridgeSettings,
    DeliveryStore,
    HandleResult,
    WebhookEvent,
    check_timestamp,
    create_app,
    verify_signature,
)

SECRET = "s3cret-for-tests"
URL = "/webhooks/mlflow"


def mlflow_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """Written from MLflow's format, independently of the module under test."""
    mac = hmac.new(secret.encode(), delivery_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def created_body(name: str = "m", version: str = "1", tags: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "entity": "model_version",
        "action": "created",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "data": {
            "name": name,
            "version": version,
            "source": f"models:/m-{uuid.uuid4().hex}",
            "run_id": None,
            "tags": tags or {},
            "description": None,
        },
    }


class RecordingHandler:
    """Stands in for the Prefect hand-off: records events, returns a set result or raises."""

    def __init__(self, result: HandleResult | None = None, fail_times: int = 0, delay_s: float = 0.0) -> None:
        self.result = result or HandleResult("started", "flow run submitted", "run-123")
        self.fail_times = fail_times
        self.delay_s = delay_s
        self.events: list[WebhookEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: WebhookEvent) -> HandleResult:
        time.sleep(self.delay_s)
        with self._lock:
            self.events.append(event)
            if self.fail_times > 0:
                self.fail_times -= 1
                raise RuntimeError("Prefect API unreachable\nlong traceback-ish detail")
        return self.result


class Bridge:
    def __init__(self, tmp_path: Path, handler: RecordingHandler, **settings: Any) -> None:
        self.db = tmp_path / "deliveries.sqlite"
        self.settings = BridgeSettings(secret=SECRET, dedupe_db=self.db, **settings)
        self.handler = handler
        self.client = TestClient(create_app(self.settings, handler))

    def post(
        self,
        body: dict[str, Any] | bytes,
        *,
        delivery_id: str | None = None,
        timestamp: str | None = None,
        secret: str = SECRET,
        signature: str | None = None,
        drop: tuple[str, ...] = (),
    ) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        delivery_id = delivery_id or str(uuid.uuid4())
        timestamp = timestamp or str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": signature or mlflow_signature(secret, delivery_id, timestamp, raw),
        }
        for name in drop:
            del headers[name]
        return self.client.post(URL, content=raw, headers=headers)


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(tmp_path, RecordingHandler())
    with b.client:
        yield b


# --- the signature format -------------------------------------------------------------------------------------


def test_signature_format_matches_mlflows_own_signer() -> None:
    from mlflow.webhooks.constants import (
        WEBHOOK_DELIVERY_ID_HEADER,
        WEBHOOK_SIGNATURE_HEADER,
        WEBHOOK_TIMESTAMP_HEADER,
    )
    from mlflow.webhooks.delivery import _generate_hmac_signature

    import quantgate.automation.webhooks as wh

    assert (wh.DELIVERY_ID_HEADER, wh.TIMESTAMP_HEADER, wh.SIGNATURE_HEADER) == (
        WEBHOOK_DELIVERY_ID_HEADER,
        WEBHOOK_TIMESTAMP_HEADER,
        WEBHOOK_SIGNATURE_HEADER,
    )
    payload = json.dumps(created_body(tags={"k": "ü"}))  # MLflow signs json.dumps(...) and sends it utf-8 encoded
    delivery_id, ts = str(uuid.uuid4()), str(int(time.time()))
    theirs = _generate_hmac_signature(SECRET, delivery_id, ts, payload)
    assert theirs == mlflow_signature(SECRET, delivery_id, ts, payload.encode())
    assert verify_signature(SECRET, delivery_id, ts, payload.encode(), theirs)
    assert not verify_signature("other", delivery_id, ts, payload.encode(), theirs)
    assert not verify_signature(SECRET, delivery_id, ts, payload.encode() + b" ", theirs)
    assert not verify_signature(SECRET, delivery_id, ts, payload.encode(), "v1,ÿnot-ascii")
    assert verify_signature(SECRET, delivery_id, ts, payload.encode(), f"v1,b2xk {theirs}")  # rotation form


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_delivery_sent_by_mlflows_own_sender_over_http_is_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from mlflow.entities.webhook import Webhook
    from mlflow.entities.webhook import WebhookEvent as MlflowEvent
    from mlflow.webhooks.delivery import test_webhook

    # MLflow only sends to https URLs on public IPs unless told otherwise, as a server next to the bridge must be.
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    handler = RecordingHandler()
    app = create_app(BridgeSettings(secret=SECRET, dedupe_db=tmp_path / "d.sqlite"), handler)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        event = MlflowEvent("model_version", "created")
        hook = Webhook("wh-1", "bridge", f"http://127.0.0.1:{port}{URL}", [event], 0, 0, secret=SECRET)
        result = test_webhook(hook, event)
    finally:
        server.should_exit = True
        thread.join(5)
    assert result.success, (result.response_status, result.response_body, result.error_message)
    assert json.loads(result.response_body or "{}")["status"] == "started"
    [event] = handler.events
    assert (event.kind, event.name, event.version) == ("model_version.created", "example_model", "1")


# --- the happy path and de-duplication ------------------------------------------------------------------------


def test_created_event_is_handed_off_once_with_parsed_fields(bridge: Bridge) -> None:
    body = created_body("digits", "7", {"quantgate.calibration": "s3://c"})
    r = bridge.post(body, delivery_id="d-1")
    assert r.status_code == 200
    assert r.json() == {"status": "started", "detail": "flow run submitted", "flow_run_id": "run-123"}
    [event] = bridge.handler.events
    assert event.delivery_id == "d-1"
    assert (event.kind, event.name, event.version) == ("model_version.created", "digits", "7")
    assert event.tags == {"quantgate.calibration": "s3://c"}
    assert event.raw == body["data"]
    assert abs(event.timestamp - time.time()) < 5
    assert DeliveryStore(bridge.db).get("d-1") == ("started", "flow run submitted")


def test_replayed_delivery_is_duplicate_and_not_handled_again(bridge: Bridge) -> None:
    body = json.dumps(created_body()).encode()
    ts = str(int(time.time()))
    assert bridge.post(body, delivery_id="d-1", timestamp=ts).json()["status"] == "started"
    r = bridge.post(body, delivery_id="d-1", timestamp=ts)
    assert r.status_code == 200
    assert r.json()["status"] == "duplicate"
    assert len(bridge.handler.events) == 1


def test_concurrent_duplicates_are_handled_exactly_once(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler(delay_s=0.2))
    body, ts = json.dumps(created_body()).encode(), str(int(time.time()))
    barrier = threading.Barrier(10)

    def send(_: int) -> str:
        barrier.wait()
        return str(b.post(body, delivery_id="same", timestamp=ts).json()["status"])

    with b.client, ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(send, range(10)))
    # While the first is handled the others get 503 "in_progress" (MLflow retries those), after it "duplicate".
    assert statuses.count("started") == 1 and set(statuses) <= {"started", "in_progress", "duplicate"}
    assert len(b.handler.events) == 1


def _claim_all(db: str, ids: list[str], out: str) -> None:
    store = DeliveryStore(Path(db))
    won = []
    for i in ids:
        if store.claim(i) == "new":
            store.finish(i, "started", "")
            won.append(i)
    Path(out).write_text("\n".join(won))


def test_store_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite"
    DeliveryStore(db)
    ids = [f"id-{i}" for i in range(100)]
    # spawn, not fork: forking a test process that already runs other tests' threads (Prefect's) is unsafe.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_claim_all, args=(str(db), ids, str(tmp_path / f"won-{n}"))) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    won = [line for n in range(4) for line in (tmp_path / f"won-{n}").read_text().split("\n") if line]
    assert sorted(won) == sorted(ids)  # every id claimed, none twice


def test_store_is_durable_across_reopening(bridge: Bridge) -> None:
    bridge.post(created_body(), delivery_id="d-durable")
    reopened = DeliveryStore(bridge.db)
    assert reopened.get("d-durable") == ("started", "flow run submitted")
    assert reopened.claim("d-durable") == "done"
    # and a fresh app on the same file still treats it as seen
    b2 = Bridge(bridge.db.parent, RecordingHandler())
    assert b2.post(created_body(), delivery_id="d-durable").json()["status"] == "duplicate"
    assert b2.handler.events == []


# --- authentication: nothing happens before the signature checks out ------------------------------------------


def test_bad_signature_is_rejected_and_does_not_burn_the_delivery_id(bridge: Bridge) -> None:
    r = bridge.post(created_body(), delivery_id="d-1", secret="wrong")
    assert r.status_code == 401
    assert r.json()["detail"] == "bad or missing signature"
    assert bridge.handler.events == []
    assert DeliveryStore(bridge.db).get("d-1") is None
    assert bridge.post(created_body(), delivery_id="d-1").json()["status"] == "started"
    assert len(bridge.handler.events) == 1


def test_missing_signature_is_rejected(bridge: Bridge) -> None:
    r = bridge.post(created_body(), drop=("X-MLflow-Signature",))
    assert r.status_code == 401
    assert bridge.handler.events == []


def test_signature_of_another_body_is_rejected_before_json_is_parsed(bridge: Bridge) -> None:
    ts = str(int(time.time()))
    sig = mlflow_signature(SECRET, "d-1", ts, b"{}")
    r = bridge.post(b"not json", delivery_id="d-1", timestamp=ts, signature=sig)
    assert r.status_code == 401  # not 400: an unauthenticated caller learns nothing about parsing


@pytest.mark.parametrize("offset_s", [-360, 360], ids=["six-minutes-old", "six-minutes-ahead"])
def test_stale_or_future_timestamp_is_rejected(bridge: Bridge, offset_s: int) -> None:
    r = bridge.post(created_body(), timestamp=str(int(time.time()) + offset_s))
    assert r.status_code == 401
    assert r.json()["detail"] == "stale or future timestamp"
    assert bridge.handler.events == []


# "¹" (sent as latin-1 byte 0xb9) passes str.isdigit() but not int().
@pytest.mark.parametrize(
    "ts",
    [b"soon", b"1.5e9", b"-5", b"1_700_000_000", b"\xb9", b"9" * 5000],
    ids=["word", "float", "negative", "underscores", "superscript-one", "5000-digits"],
)
def test_non_integer_timestamp_is_rejected(bridge: Bridge, ts: bytes) -> None:
    headers = {"X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": ts, "X-MLflow-Signature": "v1,x"}
    r = bridge.client.post(URL, content=b"{}", headers=headers)
    assert r.status_code == 401
    assert r.json()["detail"] == "stale or future timestamp"


def test_check_timestamp_window_is_inclusive_both_ways() -> None:
    assert check_timestamp(1000, 1300, 300)
    assert check_timestamp(1300, 1000, 300)
    assert not check_timestamp(1000, 1301, 300)
    assert not check_timestamp(1301, 1000, 300)


@pytest.mark.parametrize("header", ["X-MLflow-Delivery-Id", "X-MLflow-Timestamp"])
def test_missing_delivery_headers_are_rejected(bridge: Bridge, header: str) -> None:
    r = bridge.post(created_body(), drop=(header,))
    assert r.status_code == 400
    assert bridge.handler.events == []


# --- bad bodies -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps({"entity": "model_version", "action": "created"}).encode(),
        json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m"}}).encode(),
        b"[" * 100_000,
    ],
    ids=["broken", "not-utf8", "array", "no-data", "no-version", "deeply-nested"],
)
def test_malformed_body_is_rejected_and_not_recorded(bridge: Bridge, raw: bytes) -> None:
    r = bridge.post(raw, delivery_id="d-bad")
    assert r.status_code == 400
    assert r.json()["status"] == "error"
    assert bridge.handler.events == []
    assert DeliveryStore(bridge.db).get("d-bad") is None


def test_oversized_body_is_rejected_by_content_length(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler(), max_body_bytes=1024)
    big = created_body()
    big["data"]["description"] = "x" * 2000
    r = b.post(big)
    assert r.status_code == 413
    assert b.handler.events == []


def test_oversized_chunked_body_is_rejected(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler(), max_body_bytes=1024)
    ts, delivery_id = str(int(time.time())), "d-chunked"
    chunks = [b"x" * 600] * 3
    headers = {
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": mlflow_signature(SECRET, delivery_id, ts, b"".join(chunks)),
    }
    r = b.client.post(URL, content=iter(chunks), headers=headers)  # a generator: no Content-Length, chunked
    assert r.status_code == 413


def test_body_stream_is_not_read_past_the_cap(tmp_path: Path) -> None:
    app = create_app(
        BridgeSettings(secret=SECRET, dedupe_db=tmp_path / "d.sqlite", max_body_bytes=10_000), RecordingHandler()
    )
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # an endless body

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": URL, "headers": [], "query_string": b"", "root_path": ""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))  # type: ignore[arg-type]
    assert sent[0]["status"] == 413
    assert reads <= 11


# --- event kinds ----------------------------------------------------------------------------------------------


def test_unknown_event_is_acknowledged_recorded_and_not_handled(bridge: Bridge) -> None:
    body = {"entity": "registered_model", "action": "created", "timestamp": "t", "data": {"name": "m", "tags": {}}}
    r = bridge.post(body, delivery_id="d-rm")
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "detail": "event registered_model.created is not handled"}
    assert bridge.handler.events == []
    assert DeliveryStore(bridge.db).get("d-rm") == ("ignored", "event registered_model.created is not handled")


def test_tag_set_event_is_parsed(bridge: Bridge) -> None:
    data = {"name": "m", "version": "3", "key": "quantgate.calibration", "value": "s3://b/c.npz"}
    body = {"entity": "model_version_tag", "action": "set", "timestamp": "t", "data": data}
    assert bridge.post(body).status_code == 200
    [event] = bridge.handler.events
    assert (event.kind, event.name, event.version) == ("model_version_tag.set", "m", "3")
    assert (event.key, event.value, event.alias, event.tags) == ("quantgate.calibration", "s3://b/c.npz", None, {})


def test_alias_created_event_is_parsed(bridge: Bridge) -> None:
    body = {
        "entity": "model_version_alias",
        "action": "created",
        "timestamp": "t",
        "data": {"name": "m", "alias": "champion", "version": "4"},
    }
    assert bridge.post(body).status_code == 200
    [event] = bridge.handler.events
    assert (event.kind, event.name, event.version, event.alias) == ("model_version_alias.created", "m", "4", "champion")
    assert (event.key, event.value) == (None, None)


def test_handler_result_ignored_is_passed_through(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler(HandleResult("ignored", "no automation rule selects it")))
    r = b.post(created_body(), delivery_id="d-1")
    assert r.json() == {"status": "ignored", "detail": "no automation rule selects it", "flow_run_id": None}
    assert DeliveryStore(b.db).get("d-1") == ("ignored", "no automation rule selects it")


# --- failures of the hand-off ---------------------------------------------------------------------------------


def test_handler_failure_answers_503_and_the_retry_is_processed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = Bridge(tmp_path, RecordingHandler(fail_times=1))
    body, ts = json.dumps(created_body()).encode(), str(int(time.time()))
    with caplog.at_level("ERROR", logger="quantgate.webhooks"):
        r = b.post(body, delivery_id="d-1", timestamp=ts)
    assert r.status_code == 503
    assert r.json() == {"status": "error", "detail": "RuntimeError: Prefect API unreachable"}
    assert "d-1" in caplog.text
    assert DeliveryStore(b.db).get("d-1") == ("retry", "RuntimeError: Prefect API unreachable")  # kept for a retry
    retry = b.post(body, delivery_id="d-1", timestamp=ts)
    assert retry.status_code == 200
    assert retry.json()["status"] == "started"
    assert len(b.handler.events) == 2


def test_unusable_store_answers_503_so_mlflow_retries(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler())
    for leftover in tmp_path.glob("deliveries.sqlite*"):
        leftover.unlink()
    b.db.mkdir()  # the store file is now a directory: every connection fails
    r = b.post(created_body())
    assert r.status_code == 503
    assert r.json()["detail"].startswith("delivery store unavailable: OperationalError")
    assert b.handler.events == []


# --- settings and health --------------------------------------------------------------------------------------


def test_healthz(bridge: Bridge) -> None:
    r = bridge.client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"ok": True})


def test_settings_require_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        BridgeSettings(secret="", dedupe_db=tmp_path / "d.sqlite")
    assert SECRET not in repr(BridgeSettings(secret=SECRET, dedupe_db=tmp_path / "d.sqlite"))


# --- deliveries are never lost ----------------------------------------------------------------------------------


def _claim_and_die(db: str, delivery_id: str, body: bytes, ts: int) -> None:
    """A bridge process that claims a delivery and dies before handing it off."""
    DeliveryStore(Path(db)).claim(delivery_id, body, ts)


def _claimed_by_a_dead_process(db: Path, delivery_id: str, body: bytes, ts: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_claim_and_die, args=(str(db), delivery_id, body, ts))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert DeliveryStore(db).get(delivery_id) == ("claimed", "")


def test_a_claim_whose_bridge_process_died_is_taken_by_mlflows_retry(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler())
    body, ts = json.dumps(created_body()).encode(), str(int(time.time()))
    _claimed_by_a_dead_process(b.db, "d-1", body, int(ts))
    r = b.post(body, delivery_id="d-1", timestamp=ts)  # MLflow's retry: same id, same timestamp
    assert (r.status_code, r.json()["status"]) == (200, "started")
    assert len(b.handler.events) == 1 and DeliveryStore(b.db).get("d-1") == ("started", "flow run submitted")


def test_a_claim_whose_bridge_process_died_is_handed_off_by_the_sweep_from_its_stored_body(tmp_path: Path) -> None:
    from quantgate.automation.webhooks import sweep

    body = json.dumps(created_body(name="swept", version="7")).encode()
    db = tmp_path / "d.sqlite"
    _claimed_by_a_dead_process(db, "d-lost", body, int(time.time()))
    handler = RecordingHandler()
    assert sweep(DeliveryStore(db), handler, retention_s=86_400) == 1
    assert [(e.delivery_id, e.name, e.version) for e in handler.events] == [("d-lost", "swept", "7")]
    assert sweep(DeliveryStore(db), handler, retention_s=86_400) == 0  # handed off once


def test_a_live_claim_answers_503_until_its_lease_passes(tmp_path: Path) -> None:
    b = Bridge(tmp_path, RecordingHandler(), claim_lease_s=0.5)
    body, ts = json.dumps(created_body()).encode(), str(int(time.time()))
    DeliveryStore(b.db, lease_s=0.5).claim("d-1", body, int(ts))  # this (live) process holds it, and never finishes
    r = b.post(body, delivery_id="d-1", timestamp=ts)
    assert (r.status_code, r.json()["status"], r.headers["Retry-After"]) == (503, "in_progress", "5")
    time.sleep(0.6)
    assert b.post(body, delivery_id="d-1", timestamp=ts).json()["status"] == "started"
    assert len(b.handler.events) == 1


def test_a_failed_hand_off_is_retried_by_the_sweep_when_mlflow_has_given_up(tmp_path: Path) -> None:
    from quantgate.automation.webhooks import sweep

    b = Bridge(tmp_path, RecordingHandler(fail_times=1))
    assert b.post(created_body(), delivery_id="d-1").status_code == 503
    assert sweep(DeliveryStore(b.db), b.handler, retention_s=86_400) == 1
    assert DeliveryStore(b.db).get("d-1") == ("started", "flow run submitted") and len(b.handler.events) == 2


def test_handled_delivery_ids_are_pruned_after_the_retention_and_unhandled_ones_kept(tmp_path: Path) -> None:
    import sqlite3

    store = DeliveryStore(tmp_path / "d.sqlite")
    for i in range(3):
        store.claim(f"old-{i}", b"{}", 0)
        store.finish(f"old-{i}", "started", "")
    store.claim("pending", b"{}", 0)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE deliveries SET handled_at = handled_at - 1000, received_at = received_at - 1000")
    store.claim("recent", b"{}", 0)
    store.finish("recent", "ignored", "")
    assert store.prune(retention_s=500) == 3
    assert store.get("old-0") is None and store.get("recent") is not None and store.get("pending") is not None


def test_the_delivery_store_is_owner_only_from_the_start(tmp_path: Path) -> None:
    store = DeliveryStore(tmp_path / "new" / "d.sqlite")
    store.claim("x", b"{}", 0)
    for path in (tmp_path / "new").glob("d.sqlite*"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_retention_must_outlast_the_timestamp_window(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="retention_s must be longer"):
        BridgeSettings(secret=SECRET, dedupe_db=tmp_path / "d.sqlite", retention_s=60)


# --- settings from the environment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUANTGATE_WEBHOOK_SECRET": "CHANGE-ME"}, "is a placeholder from a template"),
        ({"QUANTGATE_WEBHOOK_SECRET": "short"}, "shorter than 16 characters"),
        ({"QUANTGATE_WEBHOOK_SECRET": ""}, "QUANTGATE_WEBHOOK_SECRET is not set"),
        ({"QUANTGATE_WEBHOOK_MAX_BODY_BYTES": "lots"}, "QUANTGATE_WEBHOOK_MAX_BODY_BYTES must be an integer"),
        ({"QUANTGATE_WEBHOOK_MAX_BODY_BYTES": "-5"}, "QUANTGATE_WEBHOOK_MAX_BODY_BYTES must be positive"),
        ({"QUANTGATE_WEBHOOK_MAX_BODY_BYTES": "999999999999"}, "invalid bridge setting max_body_bytes"),
        ({"QUANTGATE_WEBHOOK_CLAIM_LEASE_S": "soon"}, "QUANTGATE_WEBHOOK_CLAIM_LEASE_S must be a number"),
    ],
)
def test_bad_bridge_settings_in_the_environment_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    from quantgate.automation.bridge import settings_from_env
    from quantgate.errors import PolicyError

    monkeypatch.setenv("QUANTGATE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("QUANTGATE_WEBHOOK_DB", str(tmp_path / "d.sqlite"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PolicyError, match=message) as exc:
        settings_from_env()
    assert "\n" not in str(exc.value)
