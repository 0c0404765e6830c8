"""YAML loading that remembers where every key and list item was written.

PyYAML's constructed objects forget their position, so we compose the node tree
ourselves and record the 1-based line of each mapping key and sequence item under
its path (a tuple of keys and indexes). Error messages built from that can point
at the exact line an operator has to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

PathPart = str | int
Path = tuple[PathPart, ...]


@dataclass(frozen=True)
class YamlProblem:
    """Something wrong in the YAML itself (syntax, duplicate key, odd key)."""

    line: int
    path: Path
    message: str
    column: int = 0


@dataclass(frozen=True)
class LocatedYaml:
    data: Any  # plain dicts (str keys), lists and scalars
    lines: Mapping[Path, int] = field(default_factory=dict)

    def line(self, path: Path) -> int:
        """Line of ``path``'s key or item, else of its nearest recorded ancestor."""
        while path:
            found = self.lines.get(path)
            if found is not None:
                return found
            path = path[:-1]
        return self.lines.get((), 1)


class _Loader(yaml.SafeLoader):
    pass


def load_located(text: str) -> tuple[LocatedYaml | None, list[YamlProblem]]:
    """Parse one YAML document. On a syntax error returns (None, [that problem])."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            return None, [_syntax_problem(e)]
        except yaml.YAMLError as e:  # pragma: no cover - PyYAML marks nearly everything
            return None, [YamlProblem(1, (), f"YAML error: {type(e).__name__}")]
        if node is None:
            return LocatedYaml(None, {(): 1}), []
        walker = _Walker(loader)
        data = walker.walk(node, ())
        walker.lines.setdefault((), node.start_mark.line + 1)
        return LocatedYaml(data, walker.lines), walker.problems
    finally:
        loader.dispose()


def _syntax_problem(e: yaml.MarkedYAMLError) -> YamlProblem:
    # Only the short problem/context texts: str(e) would quote the offending source
    # line, which may hold a secret.
    mark = e.problem_mark or e.context_mark
    line = mark.line + 1 if mark is not None else 1
    column = mark.column + 1 if mark is not None else 0
    context = e.context
    if context and e.context_mark is not None and e.context_mark.line + 1 != line:
        context += f" (started at line {e.context_mark.line + 1})"
    text = ": ".join(p for p in (context, e.problem) if p) or "invalid YAML"
    return YamlProblem(line, (), f"YAML syntax error at column {column}: {text}", column)


class _Walker:
    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.lines: dict[Path, int] = {}
        self.problems: list[YamlProblem] = []
        self._active: set[int] = set()  # node ids being walked: catches recursive aliases
        self._written: dict[int, set[int]] = {}

    def walk(self, node: yaml.Node, path: Path) -> Any:
        if id(node) in self._active:
            self.problems.append(
                YamlProblem(node.start_mark.line + 1, path, "recursive YAML alias")
            )
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    self.lines.setdefault((*path, i), item.start_mark.line + 1)
                    items.append(self.walk(item, (*path, i)))
                return items
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.MarkedYAMLError as e:
                self.problems.append(
                    YamlProblem(node.start_mark.line + 1, path, e.problem or "bad value")
                )
                return None
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        # Keys written in this mapping (not merged in); remembered per node because an
        # alias walks the same, already flattened, node again.
        written = self._written.setdefault(id(node), {id(k) for k, _ in node.value})
        try:
            # Resolves `<<: *anchor`: merged keys come first, so keys written here win.
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as e:
            line = node.start_mark.line + 1
            self.problems.append(YamlProblem(line, path, e.problem or "bad merge key"))
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(YamlProblem(line, path, "mapping keys must be plain text"))
                continue
            # The written text, not the resolved value: `1:` or `on:` stay "1"/"on".
            key = str(key_node.value)
            if id(key_node) in written:
                if key in first_line:
                    message = f"duplicate key (first at line {first_line[key]})"
                    self.problems.append(YamlProblem(line, (*path, key), message))
                first_line.setdefault(key, line)
            self.lines[(*path, key)] = line
            result[key] = self.walk(value_node, (*path, key))
        return result
