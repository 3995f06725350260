"""Skaffold profiles applied to a config, as Skaffold applies them, lines kept.

A profile's fields are laid over the config's: a mapping is merged field by field, a
non-empty list or scalar replaces, an empty one keeps the config's; then its `patches`
(JSON Patch `add`, `replace`, `remove`; `op` defaults to `replace`) edit the result. The
values a profile brings keep the lines they were written on, so an error in them names
the profile's line.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Final

from buildfleet.rebuild.located import Map, Seq, Text, Value
from buildfleet.rebuild.plan import SourceError

_PROFILE_ONLY: Final = frozenset({"name", "activation", "patches", "requiresAllActivations"})


def _copy(value: Map) -> Map:
    copied = Map(value)
    copied.line = value.line
    return copied


def _overlay(base: Value, profile: Value) -> Value:
    """Skaffold's profile overlay: mappings merge field by field; a non-empty list or
    scalar replaces; an empty one keeps the config's."""
    if isinstance(profile, Map):
        if not isinstance(base, Map):
            return profile
        merged = _copy(base)
        for key, value in profile.items():
            merged[key] = _overlay(base.get(key), value)
        return merged
    if profile is None or len(profile) == 0:
        return base
    return profile


def _pointer(path: Value, where: str, line: int) -> list[str]:
    if not isinstance(path, Text) or not path.startswith("/"):
        raise SourceError(f"{where}:{line}: patches: path must be a JSON pointer like /build/...")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _child(node: Value, part: str) -> Value:
    if isinstance(node, Seq):
        return node[int(part)]
    if isinstance(node, Map):
        return node[part]
    raise KeyError(part)


def _apply_patch(doc: Map, patch: Value, where: str) -> None:
    """One of a profile's `patches` (JSON Patch add, replace or remove), in place."""
    line = getattr(patch, "line", doc.line)
    if not isinstance(patch, Map):
        raise SourceError(f"{where}:{line}: patches: expected a mapping with op and path")
    op = str(patch.get("op") or "replace")
    if op not in ("add", "replace", "remove"):
        raise SourceError(
            f"{where}:{line}: patches: op {op!r} is not supported (add, replace, remove)"
        )
    *parents, last = _pointer(patch.get("path"), where, line)
    value = patch.get("value")
    try:
        node: Value = doc
        for part in parents:
            node = _child(node, part)
        if isinstance(node, Seq):
            index = len(node) if last == "-" and op == "add" else int(last)
            if op == "add":
                node.insert(index, value)
            elif op == "replace":
                node[index] = value
            else:
                del node[index]
        elif isinstance(node, Map) and (op == "add" or last in node):
            if op == "remove":
                del node[last]
            else:
                node[last] = value
        else:
            raise KeyError(last)
    except (KeyError, IndexError, ValueError, TypeError):
        raise SourceError(f"{where}:{line}: patches: no such path {patch.get('path')}") from None


def apply_profiles(doc: Map, names: Sequence[str], where: str) -> Map:
    """The config with the named profiles applied, in order, and no profiles left."""
    by_name: dict[str, Map] = {}
    profiles = doc.get("profiles")
    for profile in profiles if isinstance(profiles, Seq) else ():
        if isinstance(profile, Map) and isinstance(profile_name := profile.get("name"), Text):
            by_name[str(profile_name)] = profile
    result = _copy(doc)
    result.pop("profiles", None)
    for name in names:
        profile = by_name[name]
        for key, value in profile.items():
            if key not in _PROFILE_ONLY:
                result[key] = _overlay(result.get(key), value)
        patches = profile.get("patches")
        if patches:
            result = copy.deepcopy(result)
            for patch in patches if isinstance(patches, Seq) else [patches]:
                _apply_patch(result, patch, where)
    return result


def profile_names(doc: Map) -> set[str]:
    profiles = doc.get("profiles")
    return {
        str(profile["name"])
        for profile in (profiles if isinstance(profiles, Seq) else ())
        if isinstance(profile, Map) and isinstance(profile.get("name"), Text)
    }
