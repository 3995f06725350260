"""YAML read the way Skaffold reads it, keeping the line of every value.

Skaffold decodes YAML 1.2 into typed fields, so a scalar meant as a string stays the text
written: `DEBUG: 1` is "1" and `1.10` is "1.10", never a number. PyYAML's BaseLoader
resolves no types (every scalar stays its text), so it reads what Skaffold reads; a plain
`null`, `~` or empty value is null. As in Skaffold's decoder a key given twice is an error;
merge keys (`<<`) are applied; aliases are expanded within a budget, so a document that
expands to billions of values is refused instead of filling memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_NULLS: Final = frozenset({"", "~", "null", "Null", "NULL"})
_MAX_VALUES: Final = 200_000
_PATH_PART: Final = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


class Text(str):
    """A scalar, with the line it is on (1-based)."""

    line: int


class Map(dict[str, "Value"]):
    line: int


class Seq(list["Value"]):
    line: int


Value = Text | Map | Seq | None
Plain = str | dict[str, "Plain"] | list["Plain"] | None


class YamlError(ValueError):
    """Not YAML Skaffold would read, at `line`."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(f"line {line or '?'}: {message}")
        self.line = line
        self.message = message


class _Builder:
    def __init__(self) -> None:
        self.budget = _MAX_VALUES
        self.open: set[int] = set()
        """The collections being built: an alias back to one of them would never end."""

    def value(self, node: Node) -> Value:
        if id(node) in self.open:
            raise YamlError(node.start_mark.line + 1, "an alias refers to a value containing it")
        if isinstance(node, ScalarNode):
            return self._value(node)
        self.open.add(id(node))
        try:
            return self._value(node)
        finally:
            self.open.discard(id(node))

    def _value(self, node: Node) -> Value:
        self.budget -= 1
        if self.budget < 0:
            raise YamlError(
                node.start_mark.line + 1,
                f"more than {_MAX_VALUES} values (aliases expanding without end?)",
            )
        line = node.start_mark.line + 1
        match node:
            case ScalarNode(value=text, style=style):
                if style is None and text in _NULLS:
                    return None
                scalar = Text(text)
                scalar.line = line
                return scalar
            case SequenceNode(value=items):
                seq = Seq(self.value(item) for item in items)
                seq.line = line
                return seq
            case MappingNode(value=pairs):
                return self.mapping(pairs, line)
        raise YamlError(line, f"unexpected YAML node {type(node).__name__}")

    def mapping(self, pairs: list[tuple[Node, Node]], line: int) -> Map:
        result = Map()
        result.line = line
        merged: list[Map] = []
        for key_node, value_node in pairs:
            key = self.value(key_node)
            if not isinstance(key, Text):
                raise YamlError(key_node.start_mark.line + 1, "a key must be a string")
            if key == "<<" and key_node.style is None:  # type: ignore[attr-defined]
                merged.extend(self._merge_sources(value_node))
                continue
            if key in result:
                raise YamlError(
                    key.line,
                    f"key {str(key)!r} already defined at line "
                    f"{_line_of(result[key], result.line)}",
                )
            result[key] = self.value(value_node)
        for source in merged:
            for merged_key, merged_value in source.items():
                result.setdefault(merged_key, merged_value)
        return result

    def _merge_sources(self, node: Node) -> Iterator[Map]:
        value = self.value(node)
        sources = value if isinstance(value, Seq) else [value]
        for source in sources:
            if not isinstance(source, Map):
                raise YamlError(node.start_mark.line + 1, "<< merges mappings only")
            yield source


def _line_of(value: Value, default: int) -> int:
    return getattr(value, "line", default)


def load_documents(text: str) -> list[Map | None]:
    """Every document of `text` (None for an empty one)."""
    builder = _Builder()
    documents: list[Map | None] = []
    try:
        for node in yaml.compose_all(text, Loader=yaml.BaseLoader):
            value = builder.value(node) if node is not None else None
            if value is not None and not isinstance(value, Map):
                raise YamlError(node.start_mark.line + 1, "a document must be a mapping")
            documents.append(value)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlError(line, str(exc.problem or exc.context)) from None
    except yaml.YAMLError as exc:
        raise YamlError(None, str(exc)) from None
    except RecursionError:
        raise YamlError(None, "nested too deeply") from None
    return documents


def plain(value: Value) -> Plain:
    """The same data without lines: what a decoder is given."""
    match value:
        case Map():
            return {str(key): plain(item) for key, item in value.items()}
        case Seq():
            return [plain(item) for item in value]
        case Text():
            return str(value)
        case None:
            return None


def line_at(root: Value, path: str, default: int = 1) -> int:
    """The line of the deepest value on a decoder's error path (`$.build.artifacts[0].image`)."""
    line = _line_of(root, default)
    node: Value = root
    for name, index in _PATH_PART.findall(path):
        if name and isinstance(node, Map) and name in node:
            node = node[name]
        elif index and isinstance(node, Seq) and int(index) < len(node):
            node = node[int(index)]
        else:
            break
        line = _line_of(node, line)
    return line
