"""One registry for every kind of plugin: entry points read lazily, each plugin loaded and checked once per process.

Built-in backends and validators come through the same entry-point groups as a third party's, so there is no
special path for ours. A plugin is refused at load, with one line naming it and what is wrong, when its
``plugin_api`` differs from ``PLUGIN_API_VERSION`` or it lacks part of its protocol.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Generic, TypeVar

from quantgate.errors import BackendUnavailable, PolicyError

log = logging.getLogger(__name__)

# Raised when a protocol changes in a way an existing plugin cannot follow; a plugin declares the version it was
# written against as a ``plugin_api`` class attribute (absent means 1: written before the attribute existed).
PLUGIN_API_VERSION = 1

T = TypeVar("T")


class PluginRefused(BackendUnavailable):
    """A plugin is installed but cannot be used: it does not import, or does not meet its protocol or API version."""

    def __init__(self, kind: str, name: str, target: str, reason: str, hint: str = "") -> None:
        self.kind = kind
        super().__init__(name, reason, hint)
        # The base class's wording says "backend"; a refused validator is not one.
        self.args = (f"{kind} plugin '{name}' ({target}) refused: {reason}" + (f" ({hint})" if hint else ""),)


@dataclass(frozen=True)
class Installed:
    """One installed plugin as ``quantgate backends`` lists it: loaded, or why it was refused."""

    name: str
    target: str  # the entry point's ``module:attribute``
    error: str | None = None


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (methods must be callable), in declaration order."""
    wanted = [n for n in getattr(protocol, "__annotations__", {}) if not n.startswith("_")]
    wanted += [n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")]
    out: list[str] = []
    for n in dict.fromkeys(wanted):
        if not hasattr(obj, n) or (inspect.isfunction(vars(protocol).get(n)) and not callable(getattr(obj, n))):
            out.append(n)
    return out


class PluginRegistry(Generic[T]):
    """Plugins of one entry-point group, each checked against ``protocol`` when first loaded, then cached."""

    def __init__(self, group: str, kind: str, protocol: type, install_hint: Callable[[str], str]) -> None:
        self.group = group
        self.kind = kind
        self.protocol = protocol
        self._hint = install_hint
        self._points: dict[str, metadata.EntryPoint] | None = None
        self._loaded: dict[str, T] = {}
        self._factories: dict[str, Callable[[], T]] = {}
        self._refused: dict[str, PluginRefused] = {}
        self._warned: set[str] = set()

    def _entry_points(self) -> dict[str, metadata.EntryPoint]:
        if self._points is None:
            self._points = {ep.name: ep for ep in metadata.entry_points(group=self.group)}
        return self._points

    def names(self) -> list[str]:
        return sorted(self._entry_points())

    def refresh(self) -> None:
        """Forget what was read and loaded: for a process whose installed packages changed (tests, a REPL)."""
        self._points = None
        self._loaded.clear()
        self._factories.clear()
        self._refused.clear()
        self._warned.clear()

    def unknown(self, name: str) -> PolicyError:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        maybe = f"; did you mean '{close[0]}'?" if close else ""
        known = ", ".join(names) or "none"
        return PolicyError(f"unknown {self.kind} '{name}'{maybe} (installed {self.kind}s: {known})")

    def load(self, name: str) -> T:
        """The plugin registered as ``name``, built once per process; ``PluginRefused`` if it is unusable."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._refused:
            raise self._refused[name]
        eps = self._entry_points()
        if name not in eps:
            raise self.unknown(name)
        try:
            plugin = self._build(name, eps[name])
        except PluginRefused as exc:
            self._refused[name] = exc
            raise
        self._loaded[name] = plugin
        return plugin

    def fresh(self, name: str) -> T:
        """A new instance of the (already checked) plugin: for one run's configuration, which must not outlive it."""
        self.load(name)
        return self._factories[name]()

    def _build(self, name: str, ep: metadata.EntryPoint) -> T:
        def refuse(reason: str, hint: str = "") -> PluginRefused:
            return PluginRefused(self.kind, name, ep.value, reason, hint)

        try:
            factory = ep.load()
        except ImportError as exc:
            raise refuse(f"cannot import it: {exc}", self._hint(name)) from None
        except Exception as exc:  # a third party's module can fail any way at import; it must not stop the run
            raise refuse(f"importing it raised {type(exc).__name__}: {exc}") from None
        api = getattr(factory, "plugin_api", 1)
        if api != PLUGIN_API_VERSION:
            raise refuse(f"written for plugin API {api}, this quantgate has plugin API {PLUGIN_API_VERSION}")
        try:
            plugin = factory()
        except Exception as exc:  # same: a plugin's constructor is not ours to trust
            raise refuse(f"constructing it raised {type(exc).__name__}: {exc}") from None
        missing = missing_members(plugin, self.protocol)
        if missing or not isinstance(plugin, self.protocol):
            what = ", ".join(missing) or "its protocol"
            raise refuse(f"it lacks {what} of the {self.protocol.__name__} protocol")
        declared = getattr(plugin, "name", name)
        if declared != name:
            raise refuse(f"its name is '{declared}' but its entry point says '{name}'")
        self._factories[name] = factory
        return plugin  # type: ignore[return-value]  # checked against the protocol just above

    def installed(self) -> Iterator[Installed]:
        """Every installed plugin, loaded if it can be, in name order."""
        for name, ep in sorted(self._entry_points().items()):
            try:
                self.load(name)
            except PluginRefused as exc:
                yield Installed(name, ep.value, str(exc))
                continue
            yield Installed(name, ep.value)

    def loadable(self) -> list[T]:
        """Every plugin that loads; each refused one is logged in one line and skipped, as MLflow does."""
        out: list[T] = []
        for name in self.names():
            try:
                out.append(self.load(name))
            except PluginRefused as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s", exc)
        return out
