"""Registration as one unit: versions, alias, the parent run's result and the source version's tags, all or nothing.

Every change is announced in a journal on the parent run (tag ``quantgate.registration``) before it is made, and the
previous state of what it overwrites (source tags, description, alias) is logged first (``registration/before.json``).
The source version's ``quantgate.outcome`` tag is written last: it is the commit. A failure before it undoes
everything the journal lists, and says what was and was not undone. A process that died mid-way (SIGKILL, a lost
worker) leaves an open journal whose owner is dead; the next registration of the same source, holding the same
lock, finds it and undoes it (:func:`reap`), so no half-registration survives and no run stays RUNNING.

One lock per source version (a Prefect global concurrency lease in flows, :class:`ProcessLock` elsewhere) makes the
check for an existing version and the creation of a new one one step across runs and workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from quantgate import faults, names, processes, registry
from quantgate.redact import redact, redact_data

log = logging.getLogger("quantgate")

HEARTBEAT_S = 60.0


class Lock(Protocol):
    """Mutual exclusion of registrations of one source version; ``hold`` yields a token the journal records."""

    def hold(self, key: str, stale: list[str]) -> contextlib.AbstractContextManager[str]: ...


class ProcessLock:
    """One registration at a time in this process. For callers outside a flow run (tests, scripts); flows use the
    Prefect lease (quantgate.flows.locks), which holds across processes and machines."""

    _locks: ClassVar[dict[str, threading.Lock]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str, stale: list[str]) -> Iterator[str]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield ""


@dataclass
class Journal:
    """What a registration did so far, kept on the parent run (small: names and version numbers only)."""

    state: str = "open"
    lease: str = ""
    step: str = ""
    before: bool = False  # registration/before.json was logged
    versions: list[tuple[str, str]] = field(default_factory=list)  # created by this run
    intents: list[tuple[str, str]] = field(default_factory=list)  # (model, candidate run id) about to be created
    models: list[str] = field(default_factory=list)  # registered models created by this run
    alias: tuple[str, str] | None = None  # (model, alias) this run set
    source_tagged: bool = False

    def dump(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def load(cls, text: str) -> Journal:
        raw = json.loads(text)
        journal = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        journal.versions = [tuple(v) for v in journal.versions]  # type: ignore[misc]
        journal.intents = [tuple(v) for v in journal.intents]  # type: ignore[misc]
        journal.alias = tuple(journal.alias) if journal.alias else None  # type: ignore[assignment]
        return journal


class Unit:
    """One registration, journaled on ``parent_id``."""

    def __init__(self, client: Any, parent_id: str, source: registry.SourceVersion, lease: str) -> None:
        self.client, self.parent_id, self.source = client, parent_id, source
        self.journal = Journal(lease=lease)

    def save(self, step: str) -> None:
        self.journal.step = step
        self.client.set_tag(self.parent_id, names.JOURNAL, self.journal.dump())
        self.client.set_tag(self.parent_id, names.JOURNAL_STATE, self.journal.state)

    def open(self, alias: tuple[str, str] | None) -> None:
        """The journal, then the state this unit may overwrite, before any change."""
        self.save("started")
        mv = self.client.get_model_version(self.source.name, self.source.version)
        before: dict[str, Any] = {
            "tags": {k: v for k, v in (mv.tags or {}).items() if k in (*names.SOURCE_TAGS, names.OUTCOME)},
            "description": mv.description or "",
            "aliases": {},
        }
        if alias is not None:
            before["aliases"][alias[0]] = _alias_target(self.client, *alias)
        _log_json(self.client, self.parent_id, names.BEFORE, before)
        self.journal.before = True
        self.save("before")
        faults.point("registration_started")

    def version(self, name: str, model_uri: str, cand_run_id: str | None, tags: dict[str, str], text: str) -> str:
        """Register ``model_uri`` as a new version of ``name`` (journaled); returns the version number."""
        if not _model_exists(self.client, name):
            self.journal.models.append(name)
            self.save("creating model")
            self.client.create_registered_model(name, tags={names.MANAGED: "true"})
            faults.point("model_created")
        self.journal.intents.append((name, cand_run_id or ""))
        self.save("creating version")
        mv = self.client.create_model_version(
            name,
            model_uri,
            run_id=cand_run_id,
            tags=tags,
            description=text,
            model_id=model_uri.removeprefix("models:/"),
        )
        version = str(mv.version)
        self.journal.versions.append((name, version))
        self.save("version created")
        faults.point("version_created")
        return version

    def settled(self, name: str, created: str, kept: str, cand_run_id: str | None) -> None:
        """``created`` was deleted for an older duplicate ``kept``: ours too when MLflow's client re-sent a create
        whose answer it lost (same candidate run), then it is ours to undo; another run's otherwise."""
        if kept == created:
            return
        self.journal.versions = [v for v in self.journal.versions if v != (name, created)]
        tags = self.client.get_model_version(name, kept).tags or {}
        if cand_run_id and tags.get(names.CANDIDATE_RUN_ID) == cand_run_id:
            self.journal.versions.append((name, kept))
        self.save("duplicate settled")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.journal.alias = (name, alias)
        self.save("setting alias")
        self.client.set_registered_model_alias(name, alias, version)
        faults.point("alias_set")

    def tag_source(self, tags: dict[str, str], description: str) -> None:
        """The commit: every source tag, the description, then the outcome tag."""
        self.journal.source_tagged = True
        self.save("tagging source")
        name, version = self.source.name, self.source.version
        for key in names.SOURCE_TAGS:
            if key in tags:
                self.client.set_model_version_tag(name, version, key, tags[key])
            else:
                with contextlib.suppress(Exception):  # absent already
                    self.client.delete_model_version_tag(name, version, key)
        self.client.update_model_version(name, version, description)
        self.client.set_model_version_tag(name, version, names.OUTCOME, tags[names.OUTCOME])
        faults.point("source_tagged")
        self.journal.state = "committed"
        self.save("committed")


def rollback(
    client: Any, parent_id: str, journal: Journal, source: registry.SourceVersion
) -> tuple[list[str], list[str]]:
    """Undo what ``journal`` lists, newest first; returns (what was undone, what could not be undone)."""
    done: list[str] = []
    failed: list[str] = []

    def attempt(what: str, action: Any) -> None:
        try:
            action()
        except Exception as exc:  # keep unwinding the rest; the message says what is left
            failed.append(f"{what} ({_first_line(exc)})")
        else:
            done.append(what)

    before = _read_before(client, parent_id) if journal.before else None
    if journal.source_tagged and before is not None:
        attempt(f"source tags of {source.uri} restored", lambda: _restore_source(client, source, before))
    if journal.alias is not None and before is not None:
        name, alias = journal.alias
        previous = before["aliases"].get(name)
        what = f"alias @{alias} on {name} " + (f"back to v{previous}" if previous else "removed")
        attempt(what, lambda: _restore_alias(client, name, alias, previous))
    created = set(journal.versions)
    for name, run_id in journal.intents:  # a create MLflow did, though its answer was lost
        created.update((name, v) for v in _versions_of_run(client, name, run_id))
    for name, version in sorted(created, key=lambda nv: (nv[0], -int(nv[1]))):
        attempt(f"{name} v{version} deleted", lambda n=name, v=version: _delete_version(client, n, v))
    for name in reversed(journal.models):
        try:
            others = _model_exists(client, name) and bool(client.search_model_versions(f"name = '{_q(name)}'"))
        except Exception as exc:  # MLflow is failing: the next run retries
            failed.append(f"registered model {name} ({_first_line(exc)})")
            continue
        if others:  # never delete what another run registered meanwhile
            done.append(f"registered model {name} kept (another run has versions in it)")
        else:
            attempt(f"registered model {name} deleted", lambda n=name: _delete_model(client, n))
    if not failed:
        journal.state = "rolled_back"
        with contextlib.suppress(Exception):
            client.set_tag(parent_id, names.JOURNAL, journal.dump())
            client.set_tag(parent_id, names.JOURNAL_STATE, journal.state)
    return done, failed


def describe_rollback(step: str, error: BaseException, done: list[str], failed: list[str]) -> str:
    what = f"registration failed while {step or 'starting'} ({_first_line(error)})"
    if not done and not failed:
        return f"{what}; nothing had been changed yet"
    undone = f"rolled back: {', '.join(done)}" if done else "nothing could be rolled back"
    if failed:
        return f"{what}; {undone}; NOT rolled back: {', '.join(failed)} (the next run of this version retries that)"
    return f"{what}; {undone}"


@dataclass(frozen=True)
class Orphan:
    run_id: str
    owner: str
    journal: Journal | None


def orphans(client: Any, experiment_id: str, source: registry.SourceVersion, exclude: str) -> list[Orphan]:
    """Runs of ``source`` whose process is gone: still RUNNING, or with an open journal, owner dead or silent."""
    base = f"tags.`{names.SOURCE_NAME}` = '{_q(source.name)}'"
    base += f" and tags.`{names.SOURCE_VERSION}` = '{_q(source.version)}'"
    found: dict[str, Any] = {}
    for extra in ("attributes.status = 'RUNNING'", f"tags.`{names.JOURNAL_STATE}` = 'open'"):
        for run in client.search_runs([experiment_id], filter_string=f"{base} and {extra}", max_results=100):
            found[run.info.run_id] = run
    out = []
    for run_id, run in found.items():
        if run_id == exclude:
            continue
        tags = run.data.tags
        owner = processes.Owner.from_json(tags.get(names.OWNER, ""))
        if owner is not None and owner.alive():
            continue
        silent_for = time.time() - float(tags.get(names.HEARTBEAT, "0") or 0)
        # Another host (or no owner recorded): only a heartbeat silent for long enough says it is gone.
        if (owner is None or owner.alive() is None) and silent_for < orphan_after_s():
            continue
        journal = Journal.load(tags[names.JOURNAL]) if tags.get(names.JOURNAL) else None
        out.append(Orphan(run_id, tags.get(names.OWNER, "an unknown process"), journal))
    return out


def reap(client: Any, orphan: Orphan, source: registry.SourceVersion) -> None:
    """Undo an orphan's open registration and close it and its children: FINISHED if it had committed."""
    journal = orphan.journal
    status = "FINISHED" if journal is not None and journal.state == "committed" else "FAILED"
    if journal is not None and journal.state == "open":
        done, failed = rollback(client, orphan.run_id, journal, source)
        log.warning("run %s died mid-registration: rolled back %s%s", orphan.run_id, ", ".join(done) or "nothing",
                    f"; NOT rolled back: {', '.join(failed)}" if failed else "")  # fmt: skip
        if failed:
            return  # left open: the next registration tries again
    children = client.search_runs(
        [client.get_run(orphan.run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{orphan.run_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    for child in children:
        client.set_terminated(child.info.run_id, "FAILED")
    client.set_tag(orphan.run_id, names.ORPHANED, f"its process ({orphan.owner}) died; closed by a later run")
    client.set_terminated(orphan.run_id, status)


def orphan_after_s() -> float:
    """How long a run on another host may stay silent (no heartbeat) before it counts as dead."""
    import os

    return float(os.environ.get("QUANTGATE_ORPHAN_AFTER_S", 600))


@contextlib.contextmanager
def keep_alive(client: Any, run_id: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Mark ``run_id`` as owned by this process, with a heartbeat other hosts can read, while the block runs."""
    client.set_tag(run_id, names.OWNER, processes.me().to_json())
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat only makes the run look older
                client.set_tag(run_id, names.HEARTBEAT, f"{time.time():.0f}")
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=beat, name="quantgate-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def existing_version(client: Any, name: str, source: registry.SourceVersion, recipe_hash: str) -> str | None:
    """The oldest version of ``name`` registered from this source version and recipe (duplicates resolve to it)."""
    versions = _matching(client, name, source, recipe_hash)
    return str(min(versions)) if versions else None


def settle_duplicates(client: Any, name: str, source: registry.SourceVersion, recipe_hash: str, mine: str) -> str:
    """If a run without the lock registered the same thing too, keep the oldest version and delete ours."""
    oldest = existing_version(client, name, source, recipe_hash)
    if oldest is not None and int(oldest) < int(mine):
        client.delete_model_version(name, mine)
        return oldest
    return mine


def _matching(client: Any, name: str, source: registry.SourceVersion, recipe_hash: str) -> list[int]:
    from mlflow.exceptions import MlflowException

    try:
        versions = registry.all_pages(
            lambda page_token=None: client.search_model_versions(f"name = '{_q(name)}'", page_token=page_token)
        )
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return [
        int(mv.version)
        for mv in versions
        if (mv.tags or {}).get(names.SOURCE_NAME) == source.name
        and (mv.tags or {}).get(names.SOURCE_VERSION) == source.version
        and (mv.tags or {}).get(names.RECIPE_HASH) == recipe_hash
    ]


def _versions_of_run(client: Any, name: str, run_id: str) -> list[str]:
    if not run_id or not _model_exists(client, name):
        return []
    versions = client.search_model_versions(f"name = '{_q(name)}'")
    return [str(mv.version) for mv in versions if (mv.tags or {}).get(names.CANDIDATE_RUN_ID) == run_id]


def _model_exists(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _delete_version(client: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(name, version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":  # gone already is what we wanted
            raise


def _delete_model(client: Any, name: str) -> None:
    if _model_exists(client, name):
        client.delete_registered_model(name)


def _alias_target(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such model or alias yet
        raise


def _restore_alias(client: Any, name: str, alias: str, previous: str | None) -> None:
    from mlflow.exceptions import MlflowException

    if not _model_exists(client, name):
        return
    if previous is not None and _version_exists(client, name, previous):
        client.set_registered_model_alias(name, alias, previous)
        return
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # never set is fine; MLflow failing is not


def _version_exists(client: Any, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _restore_source(client: Any, source: registry.SourceVersion, before: dict[str, Any]) -> None:
    """The source's tags as they were. The outcome (the commit mark) goes first and comes back last, so an
    interrupted restore never leaves it vouching for a mix of old and new tags."""
    tags: dict[str, str] = before.get("tags", {})
    name, version = source.name, source.version
    with contextlib.suppress(Exception):
        client.delete_model_version_tag(name, version, names.OUTCOME)
    for key in names.SOURCE_TAGS:
        if key in tags:
            client.set_model_version_tag(name, version, key, tags[key])
        else:
            with contextlib.suppress(Exception):
                client.delete_model_version_tag(name, version, key)
    client.update_model_version(name, version, before.get("description", ""))
    if names.OUTCOME in tags:
        client.set_model_version_tag(name, version, names.OUTCOME, tags[names.OUTCOME])


def _read_before(client: Any, run_id: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            loaded: dict[str, Any] = json.loads(Path(client.download_artifacts(run_id, names.BEFORE, tmp)).read_text())
        except Exception:  # never logged (died before): nothing to restore from it
            return None
    return loaded


def _log_json(client: Any, run_id: str, name: str, payload: object) -> None:
    folder, _, base = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        path.write_text(json.dumps(redact_data(payload), indent=2, sort_keys=True, default=str))
        client.log_artifact(run_id, str(path), folder or None)


def _q(text: str) -> str:
    return text.replace("'", "\\'")


def _first_line(exc: BaseException) -> str:
    lines = redact(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
