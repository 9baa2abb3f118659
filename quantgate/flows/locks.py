"""The registration lock of a source version, as a Prefect global concurrency limit of 1 held with a lease.

Every run and worker that registers through one Prefect server (the stack's, a deployment's, or the local server the
CLI shares between its commands) takes the same limit, ``quantgate-register-<hash of name/version>``, so "is this
source version + recipe registered yet? then register it" is one step across them. The lease is renewed while held
and expires ``lease_s`` after its holder stops renewing (a killed process): Prefect's repossessor then frees the slot.
A holder known dead sooner (same host, its run's journal names the lease) is released at once by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from quantgate.errors import InfrastructureError

log = logging.getLogger("quantgate")

PREFIX = "quantgate-register-"


def limit_name(key: str) -> str:
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()[:24]


class PrefectLock:
    """``hold(key)`` blocks until this process holds the key's slot (or ``timeout_s`` passes)."""

    def __init__(self, timeout_s: float | None = None, lease_s: float | None = None) -> None:
        env = os.environ
        self.timeout_s = timeout_s or float(env.get("QUANTGATE_LOCK_TIMEOUT_S", 900))
        # Prefect's minimum lease is 60 s; a killed holder blocks others for at most this (plus the repossessor's
        # 15 s loop) unless its journal lets the next run release it at once.
        self.lease_s = max(lease_s or float(env.get("QUANTGATE_LOCK_LEASE_S", 60)), 60.0)

    @contextlib.contextmanager
    def hold(self, key: str, stale: list[str]) -> Iterator[str]:
        from prefect.client.orchestration import get_client

        name = limit_name(key)
        try:
            with get_client(sync_client=True) as client:
                _ensure_limit(client, name)
                for lease in stale:  # leases of runs whose process is known dead
                    with contextlib.suppress(Exception):
                        client.release_concurrency_slots_with_lease(UUID(lease))
                lease_id = self._acquire(client, name, key)
        except InfrastructureError:
            raise
        except Exception as exc:  # httpx and Prefect errors: the coordination service is down
            raise InfrastructureError(f"the registration lock for {key} is unavailable (Prefect API): {exc}") from exc
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(lease_id, stop), name="quantgate-lease", daemon=True)
        renewer.start()
        try:
            yield str(lease_id)
        finally:
            stop.set()
            renewer.join(5)
            try:
                with get_client(sync_client=True) as client:
                    client.release_concurrency_slots_with_lease(lease_id)
            except Exception as exc:  # the lease expires by itself
                log.warning("could not release the registration lock for %s (it expires by itself): %s", key, exc)

    def _acquire(self, client: Any, name: str, key: str) -> UUID:
        from httpx import HTTPStatusError

        deadline = time.monotonic() + self.timeout_s
        waited = False
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=self.lease_s
                )
                return UUID(response.json()["lease_id"])
            except HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                if time.monotonic() > deadline:
                    raise InfrastructureError(
                        f"another run has held the registration lock for {key} for over {self.timeout_s:.0f} s"
                    ) from None
                if not waited:
                    log.info("waiting for another run's registration of %s", key)
                    waited = True
                time.sleep(min(float(exc.response.headers.get("Retry-After", 1) or 1), 5.0))

    def _renew(self, lease_id: UUID, stop: threading.Event) -> None:
        from prefect.client.orchestration import get_client

        while not stop.wait(self.lease_s / 3):
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(lease_id, lease_duration=self.lease_s)
            except Exception as exc:  # retried at the next third of the lease
                log.warning("could not renew the registration lease: %s", exc)


def _ensure_limit(client: Any, name: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
