"""The automation config: selection rules, and the target pools the rules' policies name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantgate.automation import stack
from quantgate.automation.config import AutomationConfig, load_config, select
from quantgate.errors import PolicyError

DATA = {"quantgate.calibration": "runs:/r/c.npz", "quantgate.evaluation": "runs:/r/e.npz"}


def test_default_selection_is_every_version_with_both_data_tags_except_quantgates_own() -> None:
    config = AutomationConfig()
    assert select(config, "m", DATA, (), {})[0] is not None
    rule, why = select(config, "m", {"quantgate.calibration": "x"}, (), {})
    assert rule is None and why == "waiting for data tags: quantgate.evaluation"
    assert select(config, "m-onnxruntime-int8", {**DATA, "quantgate.managed": "true"}, (), {}) == (
        None,
        "quantgate's own output",
    )
    assert select(config, "m", DATA, (), {"quantgate.managed": "true"})[0] is None


def test_rules_match_by_name_tags_and_aliases_first_match_wins(tmp_path: Path) -> None:
    f = tmp_path / "automation.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {"name": "bert-*", "tags": {"quantgate.enabled": "true"}, "policy": {"backends": ["openvino"]}},
                    {"name": "*", "aliases": ["champion"], "require_data_tags": False},
                ]
            }
        )
    )
    config = load_config(f)
    rule, _ = select(config, "bert-base", {**DATA, "quantgate.enabled": "true"}, (), {})
    assert rule is not None and config.policy_for(rule).backends == ("openvino",)
    assert select(config, "bert-base", DATA, (), {}) == (None, "no automation rule selects it")
    rule, _ = select(config, "resnet", {}, ("champion",), {})
    assert rule is not None and rule.name == "*"


def test_target_pools_come_from_every_rules_policy_with_their_limits(tmp_path: Path) -> None:
    f = tmp_path / "automation.yaml"
    vnni = {"pool": "cpu-vnni", "requires": {"isa": ["avx512_vnni"]}}
    f.write_text(
        yaml.safe_dump(
            {
                "pool": {"name": "cpu-x86"},
                "step_pools": {"nvidia-gpu": {"concurrency_limit": 3}},
                "rules": [
                    {
                        "name": "vision-*",
                        "policy": {
                            "backends": ["openvino", "tensorrt"],
                            "targets": {"openvino": vnni, "tensorrt": {"pool": "nvidia-gpu", "requires": {"gpu": "*"}}},
                        },
                    },
                    {"name": "*", "policy": {"backends": ["openvino"], "targets": {"openvino": vnni}}},
                ],
            }
        )
    )
    config = load_config(f)
    pools = config.target_pools()
    assert sorted(pools) == ["cpu-vnni", "nvidia-gpu"] and len(pools["cpu-vnni"]) == 2
    assert config.step_limit("nvidia-gpu") == 3 and config.step_limit("cpu-vnni") == 1
    # make stack starts a worker for the compression pool and each CPU target pool, never for a GPU pool.
    settings = stack.StackSettings(home=tmp_path, config=f)
    assert stack._worker_pools(settings) == {"worker": "cpu-x86", "worker-cpu-vnni": "cpu-vnni"}


def test_a_bad_target_in_a_rules_policy_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "automation.yaml"
    f.write_text(yaml.safe_dump({"rules": [{"policy": {"targets": {"tensorrt": {"pool": "nvidia-gpu"}}}}]}))
    with pytest.raises(PolicyError, match="targets name backend"):
        load_config(f)


def test_automatic_runs_refuse_pickle_unless_the_rule_itself_allows_it(tmp_path: Path) -> None:
    f = tmp_path / "automation.yaml"
    f.write_text(yaml.safe_dump({"rules": [{"name": "legacy-*", "allow_pickle": True}, {"name": "*"}]}))
    config = load_config(f)
    allowed, default = config.rules
    assert config.policy_for(allowed).intake.allow_pickle is True
    assert config.policy_for(default).intake.allow_pickle is False
    assert config.policy_for(default).digest() == AutomationConfig().policy_for(AutomationConfig().rules[0]).digest()
    assert config.inlined()["rules"][0]["policy"]["intake"] == {"allow_pickle": True}

    f.write_text(yaml.safe_dump({"rules": [{"name": "*", "policy": {"intake": {"allow_pickle": True}}}]}))
    with pytest.raises(PolicyError, match="set allow_pickle: true on the rule itself"):
        load_config(f)
