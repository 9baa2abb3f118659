"""Record a compression in MLflow: a parent run, one child run per candidate, registered versions, tags.

Registration is all or nothing (quantgate.registration): versions, alias, the parent's result and the source tags
are one unit, undone on any failure before its last write, and by the next run when the process died mid-way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from quantgate import faults, names, plots, processes, qat, registration, registry, report, serving
from quantgate.errors import BackendError, BackendUnavailable, RegistrationError
from quantgate.hardware import Hardware, backend_versions
from quantgate.model import ModelInfo
from quantgate.policy import Policy
from quantgate.redact import redact, redact_data
from quantgate.result import CandidateResult, CompressionResult

log = logging.getLogger("quantgate")


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    return str(client.create_experiment(name))


def _log_json(client: Any, run_id: str, name: str, payload: object) -> None:
    folder, _, base = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        path.write_text(json.dumps(redact_data(payload), indent=2, sort_keys=True, default=str))
        client.log_artifact(run_id, str(path), folder or None)


def _lineage_tags(result: CompressionResult, cand: CandidateResult) -> dict[str, str]:
    hw = cand.hardware
    tags: dict[str, object] = {
        names.MANAGED: "true",
        names.SOURCE_NAME: result.source.name,
        names.SOURCE_VERSION: result.source.version,
        names.SOURCE_URI: result.source.uri,
        names.SOURCE_RUN_ID: result.source.run_id or "",
        names.BACKEND: cand.backend,
        names.RECIPE: cand.recipe.name,
        names.RECIPE_HASH: cand.recipe.digest,
        names.POLICY_HASH: result.policy_hash,
        names.CANDIDATE_RUN_ID: cand.run_id or "",
        names.HARDWARE: hw.fingerprint(),
        names.CPU: hw.cpu_model,
        names.ISA: ",".join(hw.isa_flags),
        names.LIBRARIES: hw.libraries,
    }
    for key in names.TAGGED_METRICS:
        if key in cand.metrics:
            tags[names.METRIC_PREFIX + key] = f"{cand.metrics[key]:.6g}"
    tags.update({names.tag(key): value for key, value in qat.lineage_tags(cand.details).items()})
    return registry.tags_to_strings(tags)


def _log_candidate(
    client: Any,
    exp_id: str,
    parent_id: str,
    source_uri: str,
    cand: CandidateResult,
    model: ModelInfo,
    log_model: bool,
) -> str | None:
    """Child run for one candidate; returns the logged model URI when the model was logged."""

    run = client.create_run(
        exp_id,
        run_name=f"{cand.backend}/{cand.recipe.name}",
        tags={
            "mlflow.parentRunId": parent_id,
            names.BACKEND: cand.backend,
            names.RECIPE: cand.recipe.name,
            names.PASSED: str(cand.passed).lower(),
            names.PROMOTED: str(cand.promoted).lower(),
            names.STATUS: cand.status,
            names.SOURCE_URI: source_uri,
            names.HARDWARE: cand.hardware.fingerprint(),
        },
    )
    run_id = str(run.info.run_id)
    cand.run_id = run_id
    params = {"backend": cand.backend, "recipe": cand.recipe.name, "recipe_hash": cand.recipe.digest}
    params.update({f"recipe.{k}": str(v) for k, v in cand.recipe.settings})
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(name, float(metric), now, 0) for name, metric in sorted(cand.metrics.items())]
    _log_batches(client, run_id, metrics + _loss_curve(cand, now), [Param(k, v) for k, v in params.items()])
    model_uri = None
    if log_model and cand.artifact is not None:
        try:
            model_uri = serving.log_candidate_model(client, exp_id, run_id, cand, model)
        except (BackendError, BackendUnavailable) as exc:  # costs this candidate its registration, not the run
            log.warning("%s", exc)
            cand.notes.append(f"not registered: {exc}")
            client.set_tag(run_id, names.SERVING_ERROR, redact(str(exc))[:500])
        cand.logged_model_uri = model_uri
    _log_json(client, run_id, names.CANDIDATE_REPORT, cand.to_record())
    client.set_terminated(run_id, "FINISHED")
    return model_uri


def _loss_curve(cand: CandidateResult, now: int) -> list[Any]:
    """A fine-tuned candidate's loss by step (``qat_loss``) and by epoch (``qat_epoch_loss``): the UI plots both."""
    from mlflow.entities import Metric

    points = [Metric("qat_loss", loss, now, step) for step, loss in qat.loss_curve(cand.details)]
    record = cand.details.get("qat")
    if isinstance(record, dict):
        epochs = record.get("loss_by_epoch") or []
        points += [Metric("qat_epoch_loss", float(loss), now, i + 1) for i, loss in enumerate(epochs)]
    return points


# What MLflow takes in one log_batch request.
BATCH_METRICS = 1000
BATCH_PARAMS = 100


def _log_batches(client: Any, run_id: str, metrics: list[Any], params: list[Any]) -> None:
    """Metrics and params in as few requests as MLflow allows: a candidate has 30-60 metrics (a fine-tuned one
    hundreds of loss points), and a request per value made registration the slowest step after the search."""
    rounds = max(-(-len(metrics) // BATCH_METRICS), -(-len(params) // BATCH_PARAMS), 1)
    for i in range(rounds):
        client.log_batch(
            run_id,
            metrics=metrics[i * BATCH_METRICS : (i + 1) * BATCH_METRICS],
            params=params[i * BATCH_PARAMS : (i + 1) * BATCH_PARAMS],
        )


def _wants_registration(policy: Policy, cand: CandidateResult) -> bool:
    return cand.passed and (policy.registry.register_all_passing or cand.promoted)


def start_parent(
    client: Any, source: registry.SourceVersion, policy: Policy, hardware: Hardware, data_uris: dict[str, str]
) -> str:
    """The parent run of one compression, open until ``record`` closes it (target-pool steps log under it)."""
    exp_id = _experiment_id(client, policy.registry.experiment)
    policy_hash = policy.digest()
    parent = client.create_run(
        exp_id,
        run_name=f"compress {source.name} v{source.version}",
        tags={
            names.SOURCE_NAME: source.name,
            names.SOURCE_VERSION: source.version,
            names.POLICY_HASH: policy_hash,
            names.HARDWARE: hardware.fingerprint(),
            # Set with the run, not after it: a concurrent run must never see it RUNNING without an owner.
            names.OWNER: processes.me().to_json(),
            names.HEARTBEAT: f"{time.time():.0f}",
        },
    )
    parent_id = str(parent.info.run_id)
    faults.point("parent_created")
    try:
        client.log_param(parent_id, "source_uri", source.uri)
        client.log_param(parent_id, "policy_hash", policy_hash)
        for role, uri in data_uris.items():
            client.log_param(parent_id, f"data.{role}", redact(uri))
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    return parent_id


def log_step(
    client: Any,
    parent_id: str,
    source_uri: str,
    results: list[CandidateResult],
    model: ModelInfo,
    document: dict[str, Any],
) -> None:
    """A target-pool step's candidates as child runs of the parent (passing ones with their model), and the
    step's document for the parent to gate: the parent registers, the step never does."""
    parent = client.get_run(parent_id)
    exp_id = str(parent.info.experiment_id)
    for cand in results:
        _log_candidate(client, exp_id, parent_id, source_uri, cand, model, cand.passed)
    document["candidates"] = [c.to_record() for c in results]  # now with run ids and logged models
    _log_json(client, parent_id, names.step_artifact(str(document["pool"])), document)


def read_step(client: Any, parent_id: str, pool: str) -> dict[str, Any]:
    """The document a step left on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(parent_id, names.step_artifact(pool), tmp)
        loaded: dict[str, Any] = json.loads(Path(local).read_text())
    return loaded


def record(
    client: Any,
    result: CompressionResult,
    policy: Policy,
    model: ModelInfo,
    data_uris: dict[str, str],
    parent_id: str | None = None,
    lock: registration.Lock | None = None,
) -> None:
    """Log every candidate, then register the passing ones, alias the winner and tag the source as one unit.

    ``parent_id``: the run ``start_parent`` opened (target-pool steps already logged their candidates under it). A
    retry (Prefect retries the register task while MLflow fails) reuses the parent run and the candidate runs of the
    first attempt. ``lock``: what serializes registrations of one source version (flows pass a Prefect lease).
    """
    parent_id = parent_id or result.parent_run_id
    if parent_id is None:
        parent_id = start_parent(client, result.source, policy, result.hardware, data_uris)
    else:
        client.update_run(parent_id, status="RUNNING")  # a retry: FAILED by the attempt before
    result.parent_run_id = parent_id
    exp_id = str(client.get_run(parent_id).info.experiment_id)
    try:
        with registration.keep_alive(client, parent_id):
            to_register = _log_candidates(client, exp_id, parent_id, result, policy, model)
            faults.point("candidates_logged")
            _register(client, exp_id, parent_id, result, policy, to_register, lock or registration.ProcessLock())
    except BaseException:
        with contextlib.suppress(Exception):  # MLflow may be what failed; an orphan is closed by the next run
            client.set_terminated(parent_id, "FAILED")
        raise
    try:
        publish_report(client, parent_id, result.to_document(), policy.gate.model_dump())
    except Exception as exc:  # review material only: the registered versions and result.json stand without it
        log.warning("the review report could not be logged to run %s: %s", parent_id, exc)
        with contextlib.suppress(Exception):
            client.set_tag(parent_id, names.REPORT_ERROR, redact(str(exc))[:500])
    faults.point("committed")
    client.set_terminated(parent_id, "FINISHED")


def _log_candidates(
    client: Any, exp_id: str, parent_id: str, result: CompressionResult, policy: Policy, model: ModelInfo
) -> list[tuple[CandidateResult, str]]:
    to_register: list[tuple[CandidateResult, str]] = []
    for cand in result.candidates:
        wanted = _wants_registration(policy, cand)
        if cand.run_id is None:
            logged = _log_candidate(client, exp_id, parent_id, result.source.uri, cand, model, wanted)
        else:  # logged by its step or by an earlier attempt: the verdict may have changed here (the hardware check)
            _retag_candidate(client, cand)
            logged = cand.logged_model_uri if wanted else None
        if logged is not None:
            to_register.append((cand, logged))
    return to_register


def _register(
    client: Any,
    exp_id: str,
    parent_id: str,
    result: CompressionResult,
    policy: Policy,
    to_register: list[tuple[CandidateResult, str]],
    lock: registration.Lock,
) -> None:
    """The unit: under the source version's lock, close what dead runs left, then versions, alias, the parent
    run's result, and the source tags last. Any failure undoes it all (RegistrationError says what was undone)."""
    source = result.source
    dead = registration.orphans(client, exp_id, source, exclude=parent_id)
    with lock.hold(f"{source.name}/v{source.version}", [o.journal.lease for o in dead if o.journal]) as lease:
        for orphan in registration.orphans(client, exp_id, source, exclude=parent_id):
            registration.reap(client, orphan, source)
        unit = registration.Unit(client, parent_id, source, lease)
        winner = result.promoted
        alias = None
        if winner is not None and _wants_registration(policy, winner):
            alias = (registry.sibling_name(source.name, winner.backend, winner.recipe.precision), policy.registry.alias)
        try:
            unit.open(alias)
            for cand, model_uri in to_register:
                _register_one(client, unit, result, cand, model_uri)
            if alias is not None and winner is not None and winner.registered_uri is not None:
                unit.set_alias(alias[0], alias[1], winner.registered_uri.rpartition("/")[2])
            doc = result.to_document()
            _record_parent(client, parent_id, result, policy, doc)
            faults.point("run_recorded")
            unit.tag_source(_source_tags(result, parent_id), _source_description(_description(client, source),
                            report.source_description_line(doc)))  # fmt: skip
        except Exception as exc:
            done, failed = registration.rollback(client, parent_id, unit.journal, source)
            for cand, _ in to_register:
                cand.registered_uri = None
            raise RegistrationError(registration.describe_rollback(unit.journal.step, exc, done, failed)) from exc


def _register_one(client: Any, unit: registration.Unit, result: CompressionResult, cand: CandidateResult,
                  model_uri: str) -> None:  # fmt: skip
    name = registry.sibling_name(result.source.name, cand.backend, cand.recipe.precision)
    existing = registration.existing_version(client, name, result.source, cand.recipe.digest)
    if existing is not None:
        log.info("%s/%s already registered as %s v%s", cand.backend, cand.recipe.name, name, existing)
        cand.registered_uri = f"models:/{name}/{existing}"
        return
    cand.registered_uri = None
    text = report.summary_markdown(result.to_document(), cand.to_dict())
    created = unit.version(name, model_uri, cand.run_id, _lineage_tags(result, cand), text)
    version = registration.settle_duplicates(client, name, result.source, cand.recipe.digest, created)
    unit.settled(name, created, version, cand.run_id)
    cand.registered_uri = f"models:/{name}/{version}"


def _record_parent(client: Any, parent_id: str, result: CompressionResult, policy: Policy, doc: dict[str, Any]) -> None:
    client.log_metric(parent_id, "candidates", len(result.candidates))
    client.log_metric(parent_id, "passed", sum(c.passed for c in result.candidates))
    client.set_tag(parent_id, names.OUTCOME, "promoted" if result.promoted else "none_passed")
    client.set_tag(parent_id, names.PROMOTED_URI, result.promoted_uri or "")
    _log_json(client, parent_id, names.RESULT, doc)
    _log_json(client, parent_id, names.POLICY, policy.model_dump(mode="json"))


def _retag_candidate(client: Any, cand: CandidateResult) -> None:
    assert cand.run_id is not None
    client.set_tag(cand.run_id, names.PASSED, str(cand.passed).lower())
    client.set_tag(cand.run_id, names.PROMOTED, str(cand.promoted).lower())
    _log_json(client, cand.run_id, names.CANDIDATE_REPORT, cand.to_record())


def publish_report(client: Any, run_id: str, doc: dict[str, Any], gate: dict[str, Any]) -> None:
    """The review material on the parent run: a comparison table the UI renders, Markdown/HTML reports, plots."""
    import pandas as pd

    drawn = (plots.plot_latency(doc), plots.plot_tradeoff(doc, gate), plots.plot_sizes(doc, gate))
    pngs = dict(zip(names.PLOTS, drawn, strict=True))
    client.log_table(run_id, pd.DataFrame(report.comparison_rows(doc)), names.COMPARISON_TABLE)
    client.log_text(run_id, report.markdown_report(doc), names.REPORT_MD)
    client.log_text(run_id, report.html_report(doc, gate, pngs), names.REPORT_HTML)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / names.PLOTS_DIR
        folder.mkdir()
        for name, png in pngs.items():
            (folder / f"{name}.png").write_bytes(png)
        client.log_artifacts(run_id, str(folder), names.PLOTS_DIR)


def _source_description(current: str | None, line: str) -> str:
    """The source version's description with quantgate's line replaced (never stacked run after run)."""
    kept = [x for x in (current or "").splitlines() if not x.startswith(names.DESCRIPTION_PREFIX)]
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n\n".join(part for part in ("\n".join(kept), line) if part)


def _source_tags(result: CompressionResult, parent_id: str) -> dict[str, str]:
    winner = result.promoted
    if winner is not None:
        summary = (
            f"promoted {winner.registered_uri}: {winner.backend}/{winner.recipe.name}, "
            f"{winner.metrics.get('speedup', 0):.2f}x faster, size x{winner.metrics.get('size_ratio', 0):.2f}"
        )
    else:
        summary = f"no candidate passed the gate ({len(result.candidates)} tried)"
    return {
        names.OUTCOME: "promoted" if winner else "none_passed",
        names.SUMMARY: summary,
        names.COMPRESSED_URI: winner.registered_uri if winner and winner.registered_uri else "",
        names.LAST_RUN_ID: parent_id,
        names.POLICY_HASH: result.policy_hash,
        names.BACKEND_VERSIONS: json.dumps(backend_versions(), sort_keys=True),
    }


def _description(client: Any, source: registry.SourceVersion) -> str | None:
    return client.get_model_version(source.name, source.version).description  # type: ignore[no-any-return]


def tag_failure(client: Any, source: registry.SourceVersion, reason: str, kind: str = "input") -> None:
    """A run that failed says why on the source version (never a silent skip); ``kind`` tells the nightly pass
    whether to retry it (infrastructure, internal) or wait for the input to change (input)."""
    tags = {names.SUMMARY: redact(reason)[:5000], names.FAILURE: kind, names.OUTCOME: "failed"}
    for key, value in tags.items():
        client.set_model_version_tag(source.name, source.version, key, value)
