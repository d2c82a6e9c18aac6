"""Loading plugins from the ``koopkit`` entry-point group and the registries they fill.

Discovery is lazy and cached: nothing is imported until a registry is first asked for.
``KOOPKIT_LOAD_PLUGINS`` (comma list; empty means none) restricts which entry points load,
``KOOPKIT_DISABLE_PLUGINS`` (comma list) blocks some.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import DuplicateNameError, KoopkitWarning, PluginError, UnknownNameError

__all__ = [
    "KINDS",
    "Entry",
    "PluginLoadWarning",
    "get_plugin_manager",
    "registry",
    "lookup",
    "create",
    "list_plugins",
    "add_commands",
    "refresh",
]

ENTRY_POINT_GROUP = "koopkit"
KINDS = ("estimator", "metric", "test")
_HOOK_OF_KIND = {
    "estimator": "koopkit_register_estimators",
    "metric": "koopkit_register_metrics",
    "test": "koopkit_register_tests",
}


_DISTRIBUTIONS: dict[str, importlib.metadata.Distribution] = {}
_FAILURES: dict[str, str] = {}  # plugin name -> why it was skipped, quoted when a name is unknown
_CLASHES: dict[tuple[str, str], str] = {}  # (kind, name) registered twice -> the message
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_RESERVED = {"none"}  # the CLI's --test none: no test


class PluginLoadWarning(KoopkitWarning, RuntimeWarning):
    """Warned when a plugin fails to import or to register; it is skipped."""


@dataclass(frozen=True)
class Entry:
    """One registered estimator, metric or test and where it came from."""

    name: str
    kind: str
    target: Any  # the factory, or "package.module:attribute" imported on first use
    plugin: str
    package: str | None
    version: str | None
    info: dict = field(default_factory=dict)

    @functools.cached_property
    def factory(self):
        """The factory itself; a string target is imported now, so listing stays cheap."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attribute = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"Plugin {self.plugin!r} registered {self.kind} {self.name!r} as {self.target!r}, "
                f"which cannot be imported: {type(exc).__name__}: {exc}"
            ) from exc

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "plugin": self.plugin,
            "package": self.package,
            "version": self.version,
            **{k: v for k, v in self.info.items() if isinstance(v, str | int | float | bool)},
        }


def _names_from_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points loaded (once)."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    allowed = _names_from_env("KOOPKIT_LOAD_PLUGINS")
    blocked = _names_from_env("KOOPKIT_DISABLE_PLUGINS") or set()
    # koopkit's own first: another package's entry point of the same name never replaces one
    points = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda ep: _package(ep) != "koopkit",
    )
    for ep in points:
        if (allowed is not None and ep.name not in allowed) or ep.name in blocked:
            continue
        if pm.get_plugin(ep.name) is not None:
            warnings.warn(
                f"Plugin {ep.name!r} of package {_package(ep)!r} has the name of plugin "
                f"{ep.name!r} of package {_distribution(ep.name)[0]!r}, loaded already, and was "
                "skipped; rename its entry point.",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
            pm.check_pending()  # a misspelt hook is this plugin's fault, caught here
        except Exception as exc:  # a broken third-party plugin must not break the CLI
            if pm.get_plugin(ep.name) is not None:
                pm.unregister(name=ep.name)
            _skip(ep.name, f"({ep.value}) failed to load", exc)
            continue
        _DISTRIBUTIONS[ep.name] = ep.dist
    return pm


def _skip(plugin_name: str, what: str, exc: Exception) -> None:
    """Remember and warn (one line) that a broken plugin was skipped."""
    why = " ".join(f"{what} and was skipped: {type(exc).__name__}: {exc}".split())
    _FAILURES[plugin_name] = why
    warnings.warn(f"Plugin {plugin_name!r} {why}", PluginLoadWarning, stacklevel=3)


def _package(ep) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.metadata["Name"]


def _distribution(plugin_name: str) -> tuple[str | None, str | None]:
    dist = _DISTRIBUTIONS.get(plugin_name)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


@functools.cache
def registry(kind: str) -> dict[str, Entry]:
    """All registered entries of one kind, by name; built once per process."""
    if kind not in KINDS:
        raise ValueError(f"Invalid kind {kind!r}; expected one of {', '.join(KINDS)}.")
    pm = get_plugin_manager()
    hook = getattr(pm.hook, _HOOK_OF_KIND[kind])
    entries: dict[str, Entry] = {}
    for clash in [key for key in _CLASHES if key[0] == kind]:  # found again if still there
        del _CLASHES[clash]
    for impl in hook.get_hookimpls():  # registration order
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        package, version = _distribution(plugin_name)

        def register(name, factory, _plugin=plugin_name, _pkg=package, _ver=version, **info):
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
                raise PluginError(
                    f"Plugin {_plugin!r} registered an invalid {kind} name {name!r}; a name is "
                    "letters, digits and ._+- (not starting with one of those four)"
                    + (f", and not {name!r}" if name in _RESERVED else "")
                    + "."
                )
            if name in entries:  # the name errors when used; the other names still work
                clash = (
                    f"{kind.capitalize()} {name!r} is registered by both plugin "
                    f"{entries[name].plugin!r} and plugin {_plugin!r}."
                )
                _CLASHES[kind, name] = clash  # raised by lookup, warned by list_plugins
                return
            entries[name] = Entry(name, kind, factory, _plugin, _pkg, _ver, dict(info))

        snapshot, clashes = dict(entries), dict(_CLASHES)
        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except Exception as exc:  # nothing of this plugin stays, its clashes neither
            entries.clear()
            entries.update(snapshot)
            _CLASHES.clear()
            _CLASHES.update(clashes)
            _skip(plugin_name, f"failed to register {kind}s", exc)
    return entries


def lookup(kind: str, name: str) -> Entry:
    """The entry registered under ``name``, or an error listing the known names."""
    entries = registry(kind)
    if (kind, name) in _CLASHES:
        raise DuplicateNameError(_CLASHES[kind, name])
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        skipped = "".join(f" Plugin {p!r} {why}" for p, why in _FAILURES.items())
        raise UnknownNameError(f"Invalid {kind} {name!r}; known: {known}.{skipped}")
    return entries[name]


def create(kind: str, name: str, **params):
    """Instantiate a registered estimator, metric or test with its parameters."""
    entry = lookup(kind, name)
    try:
        return entry.factory(**params)
    except TypeError as exc:
        raise PluginError(f"Invalid parameters for {kind} {name!r}: {exc}") from exc


def add_commands(cli) -> None:
    """Each plugin's click commands, added to ``cli``. A plugin that raises, or whose command
    would replace one there already (koopkit's or another plugin's), is warned about and
    skipped, its commands taken out again: the CLI keeps working without it."""
    pm = get_plugin_manager()
    for impl in pm.hook.koopkit_register_commands.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        before = _commands(cli)
        try:
            impl.function(**{arg: cli for arg in impl.argnames})
            after = _commands(cli)
            replaced = sorted(
                path
                for path, (command, _) in before.items()
                if after.get(path, (None,))[0] is not command
            )
            if replaced:
                raise PluginError(f"commands {replaced} would replace those of that name")
        except Exception as exc:
            for group, commands in before.values():
                if commands is not None:
                    group.commands.clear()
                    group.commands.update(commands)
            _skip(plugin_name, "failed to add commands", exc)


def _commands(group, path="") -> dict:
    """Every command under a click group, by path ("import npy"): (command, a copy of its
    subcommands if it is a group, else None); the group itself under its path."""
    found = {path: (group, dict(group.commands))}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found.update(_commands(command, f"{path} {name}".strip()))
        else:
            found[f"{path} {name}".strip()] = (command, None)
    return found


def list_plugins() -> list[dict]:
    """Every registered name, with its kind, plugin and package version; a name two
    plugins register is listed once, with a warning naming both."""
    listed = [entry.to_json() for kind in KINDS for entry in registry(kind).values()]
    for clash in _CLASHES.values():
        warnings.warn(clash, PluginLoadWarning, stacklevel=2)
    return listed


def refresh() -> None:
    """Forget loaded plugins and registries (tests register throwaway plugins)."""
    registry.cache_clear()
    get_plugin_manager.cache_clear()
    _DISTRIBUTIONS.clear()
    _FAILURES.clear()
    _CLASHES.clear()
