"""Which registered models are compressed automatically, with which policy, and where the runs go.

The automation config is a small YAML file (``deploy/automation.example.yaml``); with none, the default selection
is every model version carrying the data tags, except quantgate's own outputs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantgate import names
from quantgate.errors import PolicyError
from quantgate.policy import (
    IntakePolicy,
    Policy,
    TargetPolicy,
    load_policy,
    parse_policy,
    read_yaml,
    validation_message,
)
from quantgate.redact import redact


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NightlyConfig(_Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"


class PoolConfig(_Strict):
    name: str = Field(default="cpu-x86", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    concurrency_limit: int | None = Field(default=2, ge=1, description="compression runs at once in this pool")


class StepPoolConfig(_Strict):
    concurrency_limit: int | None = Field(
        default=1, ge=1, description="steps at once in this target pool (1: a measurement has the hardware alone)"
    )


class Rule(_Strict):
    name: str = Field(default="*", description="glob on the registered model name")
    tags: dict[str, str] = Field(default_factory=dict, description="tags the version must carry, exact values")
    aliases: tuple[str, ...] = Field(default=(), description="or: the version must carry one of these aliases")
    require_data_tags: bool = True
    policy: str | dict[str, Any] | None = None
    allow_pickle: bool = Field(
        default=False,
        description="load pickled models of this rule (they run code on load) in the isolated intake process",
    )

    def matches(self, name: str, tags: Mapping[str, str], aliases: tuple[str, ...]) -> bool:
        if not fnmatch.fnmatchcase(name, self.name):
            return False
        if any(tags.get(k) != v for k, v in self.tags.items()):
            return False
        return not self.aliases or bool(set(self.aliases) & set(aliases))


class AutomationConfig(_Strict):
    tracking_uri: str | None = None
    nightly: NightlyConfig = NightlyConfig()
    pool: PoolConfig = PoolConfig()
    step_pools: dict[str, StepPoolConfig] = Field(
        default_factory=dict, description="limits of the target pools the rules' policies name (default: 1 at once)"
    )
    rules: tuple[Rule, ...] = (Rule(),)
    base_dir: Path = Field(default=Path("."), exclude=True)  # where relative policy paths are resolved

    def inlined(self) -> dict[str, Any]:
        """This config as plain data with every policy file read in: what a deployment parameter can carry."""
        rules = [
            rule.model_copy(update={"policy": self.policy_for(rule).model_dump(mode="json")}) for rule in self.rules
        ]
        data: dict[str, Any] = self.model_copy(update={"rules": tuple(rules)}).model_dump(mode="json")
        if data["tracking_uri"]:
            data["tracking_uri"] = redact(data["tracking_uri"])  # a deployment parameter: Prefect stores it
        return data

    def target_pools(self) -> dict[str, list[TargetPolicy]]:
        """Every target pool any rule's policy sends a backend to, with the targets that name it."""
        out: dict[str, list[TargetPolicy]] = {}
        for rule in self.rules:
            for target in self.policy_for(rule).targets.values():
                out.setdefault(target.pool, []).append(target)
        return out

    def step_limit(self, pool: str) -> int | None:
        return self.step_pools[pool].concurrency_limit if pool in self.step_pools else 1

    def policy_for(self, rule: Rule) -> Policy:
        """The rule's policy, with ``intake.allow_pickle`` from the rule: automatic runs refuse pickle unless the
        automation config (the operator's file, not a policy a model owner may write) allows it for the rule."""
        if rule.policy is None:
            policy = Policy()
        elif isinstance(rule.policy, dict):
            policy = parse_policy(rule.policy, "(inline policy in the automation config)")
        else:
            path = Path(rule.policy)
            policy = load_policy(path if path.is_absolute() else self.base_dir / path)
        if policy.intake.allow_pickle and not rule.allow_pickle:
            raise PolicyError(
                f"rule name={rule.name!r}: its policy sets intake.allow_pickle, which automatic runs take only from "
                "the rule: set allow_pickle: true on the rule itself"
            )
        return policy.model_copy(update={"intake": IntakePolicy(allow_pickle=rule.allow_pickle)})


def load_config(path: Path | None) -> AutomationConfig:
    """Read and validate the automation config; ``None`` gives the defaults."""
    if path is None:
        return AutomationConfig()
    raw = read_yaml(path, "automation config") or {}
    if not isinstance(raw, dict):
        raise PolicyError(f"invalid automation config {path.name}: expected a mapping at the top level")
    try:
        config = AutomationConfig.model_validate({**raw, "base_dir": path.parent.resolve()})
    except ValidationError as exc:
        raise PolicyError(validation_message("automation config", path.name, exc)) from None
    for rule in config.rules:  # a rule's bad policy is an error now, not at the first webhook that selects it
        config.policy_for(rule)
    return config


def select(
    config: AutomationConfig,
    name: str,
    tags: Mapping[str, str],
    aliases: tuple[str, ...],
    model_tags: Mapping[str, str],
) -> tuple[Rule | None, str]:
    """The first rule that selects this model version, or ``None`` and why not."""
    if tags.get(names.MANAGED) == "true" or model_tags.get(names.MANAGED) == "true":
        return None, "quantgate's own output"
    for rule in config.rules:
        if not rule.matches(name, tags, aliases):
            continue
        if rule.require_data_tags:
            data = config.policy_for(rule).data
            named = {names.CALIBRATION: data.calibration, names.EVALUATION: data.evaluation}
            missing = [t for t in names.DATA_TAGS.values() if not named[t] and not tags.get(t)]
            if missing:
                return None, f"waiting for data tags: {', '.join(missing)}"
        return rule, f"selected by rule name={rule.name!r}"
    return None, "no automation rule selects it"
