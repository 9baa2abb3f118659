"""From "this model version changed" to a Prefect flow run: select, key, hand off. Shared by webhooks and nightly.

Every hand-off carries an idempotency key derived from the model version, the policy, the data it names and the
backend library versions: Prefect returns the existing flow run for a key it has seen, so two triggers for the
same version (a replayed delivery, a concurrent duplicate, the nightly catch-up) start one run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quantgate import names
from quantgate.automation.config import AutomationConfig, Rule, select
from quantgate.hardware import backend_versions
from quantgate.policy import Policy
from quantgate.registry import all_pages, flow_tracking_uri

log = logging.getLogger("quantgate.automation")

COMPRESS_DEPLOYMENT = "compress-model/compress-model"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    tags: dict[str, str]
    aliases: tuple[str, ...]
    model_tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def version_info(client: Any, name: str, version: str) -> VersionInfo:
    mv = client.get_model_version(name, version)
    model = client.get_registered_model(name)
    aliases = tuple(sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version)))
    return VersionInfo(name, str(version), dict(mv.tags or {}), aliases, dict(model.tags or {}))


def idempotency_key(info: VersionInfo, policy: Policy, libraries: Mapping[str, str]) -> str:
    """Same version + policy + data + backend versions -> same key -> at most one flow run."""
    payload = {
        "name": info.name,
        "version": info.version,
        "policy": policy.digest(),
        "data": {t: info.tags.get(t, "") for t in names.DATA_TAGS.values()},
        "libraries": dict(sorted(libraries.items())),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return f"quantgate-{info.name}-v{info.version}-{digest}"


@dataclass(frozen=True)
class Decision:
    status: str  # "started" or "ignored"
    detail: str
    flow_run_id: str | None = None
    key: str | None = None


# Flow-run states after which the same key would only return the dead run: a retry needs a key of its own.
RETRYABLE_STATES = ("FAILED", "CRASHED", "CANCELLED")
MAX_ATTEMPTS = 20


def trigger(info: VersionInfo, rule: Rule, config: AutomationConfig, tracking_uri: str) -> tuple[str, str]:
    """Create (or find, by idempotency key) the compress-model flow run for this version; returns (id, key).

    Prefect returns the existing run for a key it has seen, whatever its state. A run that ended FAILED, CRASHED
    (a killed worker) or CANCELLED is retried under the next key (``<key>-r2``, ...) unless the version says its
    input was at fault (``quantgate.failure=input``: a new tag or version makes a new key anyway).
    """
    from prefect.deployments import run_deployment

    policy = config.policy_for(rule)
    base = idempotency_key(info, policy, backend_versions())
    retry = info.tags.get(names.FAILURE) != "input"
    for attempt in range(1, MAX_ATTEMPTS + 1):
        key = base if attempt == 1 else f"{base}-r{attempt}"
        flow_run: Any = run_deployment(
            COMPRESS_DEPLOYMENT,
            parameters={
                "model_uri": info.uri,
                "policy": policy.model_dump(mode="json"),
                "tracking_uri": flow_tracking_uri(tracking_uri),  # credentials stay in the worker's environment
                "tag_failures": True,  # nobody watches an automatic run: a failure is written on the version
            },
            idempotency_key=key,
            timeout=0,  # hand off and return: the worker runs it
            as_subflow=False,
            tags=["quantgate", "automation"],
        )
        state = flow_run.state.type.value if flow_run.state is not None else "SCHEDULED"
        if not retry or state not in RETRYABLE_STATES:
            return str(flow_run.id), key
        log.info("%s: flow run %s ended %s; retrying under a new key", info.uri, flow_run.id, state)
    return str(flow_run.id), key


def already_compressed(info: VersionInfo, policy: Policy) -> bool:
    """This version has a result for this policy and these backend versions (recorded on the source version)."""
    tags = info.tags
    return (
        tags.get(names.OUTCOME) in ("promoted", "none_passed")
        and tags.get(names.POLICY_HASH) == policy.digest()
        and tags.get(names.BACKEND_VERSIONS) == json.dumps(backend_versions(), sort_keys=True)
    )


def reconcile(client: Any, config: AutomationConfig, tracking_uri: str) -> list[Decision]:
    """The nightly catch-up: every selected version without a result for the current policy gets a run.

    Uses the webhook path's idempotency keys, so a version whose webhook did arrive is not run twice.
    """
    out: list[Decision] = []
    for model in all_pages(client.search_registered_models):
        model_tags = dict(model.tags or {})
        search = functools.partial(client.search_model_versions, "name = '{}'".format(model.name.replace("'", "\\'")))
        for mv in all_pages(search):
            aliases = tuple(sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(mv.version)))
            info = VersionInfo(model.name, str(mv.version), dict(mv.tags or {}), aliases, model_tags)
            rule, why = select(config, info.name, info.tags, info.aliases, model_tags)
            if rule is None:
                continue
            if already_compressed(info, config.policy_for(rule)):
                continue
            run_id, key = trigger(info, rule, config, tracking_uri)
            out.append(Decision("started", f"{info.uri}: {why}", run_id, key))
    return out


def consider(client: Any, config: AutomationConfig, tracking_uri: str, name: str, version: str) -> Decision:
    """Select this version and, if selected, hand it to Prefect."""
    info = version_info(client, name, version)
    rule, why = select(config, info.name, info.tags, info.aliases, info.model_tags)
    if rule is None:
        log.info("%s: not compressed (%s)", info.uri, why)
        return Decision("ignored", f"{info.uri}: {why}")
    run_id, key = trigger(info, rule, config, tracking_uri)
    log.info("%s: flow run %s (%s)", info.uri, run_id, why)
    return Decision("started", f"{info.uri}: {why}", run_id, key)


def relevant_tag(config: AutomationConfig, key: str) -> bool:
    """A tag change that can change a selection: data tags and any tag a rule selects on."""
    return key in names.DATA_TAGS.values() or any(key in rule.tags for rule in config.rules)
