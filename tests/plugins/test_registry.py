"""The plugin registry: real entry points (a ``.dist-info`` on ``sys.path``), loaded once, refused in one line."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantgate.errors import PolicyError
from quantgate.plugins.base import BACKENDS, Backend, ReferenceRuntime, load_backend, reference_name
from quantgate.plugins.registry import PLUGIN_API_VERSION, PluginRefused, PluginRegistry
from quantgate.validators.base import VALIDATORS, Validator

GROUP = "quantgate.test_plugins"

PLUGINS = """
class Good:
    name = "good"
    built = 0

    def __init__(self):
        type(self).built += 1

    def applies(self, ctx):
        return True

    def measure(self, ctx):
        raise NotImplementedError


class NoMeasure:
    name = "no-measure"

    def applies(self, ctx):
        return True


class OldApi(Good):
    name = "old-api"
    plugin_api = 0


class WrongName(Good):
    name = "something-else"


class Exploding:
    def __init__(self):
        raise RuntimeError("no licence file")
"""


def _distribution(root: Path, module: str, body: str, entries: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees one: a module and a .dist-info with entry points."""
    (root / f"{module}.py").write_text(body)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[PluginRegistry[Validator]]:
    _distribution(
        tmp_path,
        "qg_test_plugins",
        textwrap.dedent(PLUGINS),
        {
            "good": "qg_test_plugins:Good",
            "no-measure": "qg_test_plugins:NoMeasure",
            "old-api": "qg_test_plugins:OldApi",
            "wrong-name": "qg_test_plugins:WrongName",
            "exploding": "qg_test_plugins:Exploding",
            "missing-module": "qg_test_plugins_absent:Thing",
        },
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield PluginRegistry(GROUP, "validator", Validator, lambda name: f"pip install {name}")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("qg_test_plugins", None)


def test_registry_loads_a_plugin_once_per_process(registry: PluginRegistry[Validator]) -> None:
    first = registry.load("good")
    assert registry.load("good") is first
    assert type(first).built == 1  # type: ignore[attr-defined]
    assert registry.fresh("good") is not first


def test_registry_refuses_a_plugin_missing_a_method_in_one_line(registry: PluginRegistry[Validator]) -> None:
    with pytest.raises(PluginRefused) as exc:
        registry.load("no-measure")
    text = str(exc.value)
    assert "\n" not in text
    assert "validator plugin 'no-measure' (qg_test_plugins:NoMeasure) refused" in text
    assert "lacks measure of the Validator protocol" in text


def test_registry_refuses_a_plugin_of_another_api_version(registry: PluginRegistry[Validator]) -> None:
    wanted = f"written for plugin API 0, this quantgate has plugin API {PLUGIN_API_VERSION}"
    with pytest.raises(PluginRefused, match=wanted):
        registry.load("old-api")


def test_registry_refuses_what_does_not_import_or_construct(registry: PluginRegistry[Validator]) -> None:
    with pytest.raises(PluginRefused, match=r"cannot import it: .*\(pip install missing-module\)"):
        registry.load("missing-module")
    with pytest.raises(PluginRefused, match="constructing it raised RuntimeError: no licence file"):
        registry.load("exploding")
    with pytest.raises(PluginRefused, match="its name is 'something-else' but its entry point says 'wrong-name'"):
        registry.load("wrong-name")


def test_registry_suggests_the_closest_name_for_a_typo(registry: PluginRegistry[Validator]) -> None:
    with pytest.raises(PolicyError, match=r"unknown validator 'godo'; did you mean 'good'\? \(installed validators: "):
        registry.load("godo")


def test_registry_lists_every_plugin_and_skips_the_refused(registry: PluginRegistry[Validator]) -> None:
    listed = {p.name: p.error for p in registry.installed()}
    assert listed["good"] is None
    assert {n for n, e in listed.items() if e} == {"no-measure", "old-api", "wrong-name", "exploding", "missing-module"}
    assert [p.name for p in registry.loadable()] == ["good"]


def test_builtin_backends_and_validators_meet_their_protocols() -> None:
    for name in ("onnxruntime", "openvino", "tensorrt"):
        assert isinstance(load_backend(name), Backend)
    assert {"accuracy", "fidelity", "latency", "size"} <= {v.name for v in VALIDATORS.loadable()}


def test_the_reference_runtime_is_the_backend_that_declares_it() -> None:
    assert reference_name() == "onnxruntime"
    assert isinstance(BACKENDS.load("onnxruntime"), ReferenceRuntime)
    assert not isinstance(BACKENDS.load("openvino"), ReferenceRuntime)


def test_an_unknown_backend_names_the_closest_installed_one() -> None:
    with pytest.raises(PolicyError, match="unknown backend 'openvno'; did you mean 'openvino'"):
        load_backend("openvno")
