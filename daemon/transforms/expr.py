"""The expression language of filters, computed fields and routes (docs/expressions.md).

``parse(text)`` tokenizes, parses and type-checks once (cached); an
:class:`Expression` is then bound to a table's column names, which compiles it
into a batch function over row tuples (cached per column layout)::

    keep = parse("status == 'active' and amount > 100").predicate(schema.column_names)
    mask = keep([c.after for c in changes])  # list[bool]

Every input text gives an Expression or an :class:`ExpressionError`; evaluation
raises only :class:`EvaluationError` (a bad row) and binding only
:class:`UnknownField` or :class:`ExpressionError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from dataflare.daemon.transforms.expr_compile import (
    BatchFn,
    EvaluationError,
    Fail,
    Generator,
    UnknownField,
    compile_batch,
    describe_failure,
)
from dataflare.daemon.transforms.expr_parse import (
    ANY,
    BOOL,
    NULL,
    ExpressionError,
    Field,
    Node,
    parse_tree,
)

__all__ = ["EvaluationError", "Expression", "ExpressionError", "UnknownField", "parse"]

Row = tuple[Any, ...]
Predicate = Callable[[Sequence[Row | None]], list[bool]]
Values = Callable[[Sequence[Row | None]], list[Any]]

# what generated code may raise on a bad row; turned into EvaluationError
_ROW_ERRORS = (
    Fail,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    AttributeError,
    RecursionError,
    OSError,
)
_MAX_COLUMNS_SHOWN = 40


def _fields(node: Node) -> list[Field]:
    out: list[Field] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Field):
            out.append(n)
            continue
        for name in n.__slots__:
            child = getattr(n, name)
            if isinstance(child, Node):
                stack.append(child)
            elif isinstance(child, tuple):
                stack.extend(c for c in child if isinstance(c, Node))
    return out


class Expression:
    """A parsed, type-checked expression; bind it to columns to evaluate it."""

    __slots__ = ("_bound", "_field_nodes", "_lock", "_tree", "fields", "result_type", "text")

    def __init__(self, text: str, tree: Node) -> None:
        self.text = text
        self.result_type: str = tree.ty
        self._tree = tree
        self._field_nodes = _fields(tree)
        self.fields: frozenset[str] = frozenset(f.name for f in self._field_nodes)
        self._bound: dict[tuple[bool, tuple[str, ...]], Callable[..., list[Any]]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Expression({self.text!r}, {self.result_type})"

    def predicate(self, columns: Sequence[str]) -> Predicate:
        """Rows -> whether each is exactly true (null, false and a None row: False)."""
        if self.result_type not in (BOOL, ANY, NULL):
            raise ExpressionError(
                1, f"a condition must be true or false, got a {self.result_type}", "type", self.text
            )
        return self._bind(columns, True)

    def values(self, columns: Sequence[str]) -> Values:
        """Rows -> the value of the expression for each (a None row gives None)."""
        return self._bind(columns, False)

    def evaluate(self, columns: Sequence[str], row: Row) -> Any:
        return self._bind(columns, False)([row])[0]

    # -- binding
    def _bind(self, columns: Sequence[str], predicate: bool) -> Callable[..., list[Any]]:
        key = (predicate, tuple(columns))
        fn = self._bound.get(key)
        if fn is None:
            with self._lock:
                fn = self._bound.get(key)
                if fn is None:
                    fn = self._compile(key[1], predicate)
                    self._bound[key] = fn
        return fn

    def _compile(self, columns: tuple[str, ...], predicate: bool) -> Callable[..., list[Any]]:
        gen = Generator(self.text, self._resolve(columns))
        try:
            batch = compile_batch(gen, self._tree, predicate)
        except (
            SyntaxError,
            RecursionError,
            MemoryError,
            ValueError,
        ):  # not expected: depth is limited
            raise ExpressionError(
                1, "expression too complex to compile", "syntax", self.text
            ) from None
        return _wrap(batch, self.text, gen.uses_now)

    def _resolve(self, columns: tuple[str, ...]) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Field name -> (column index, path): the longest dotted prefix that is a
        column, the rest a path into its value."""
        index: dict[str, int] = {}
        for i, name in enumerate(columns):
            index.setdefault(name, i)
        out: dict[str, tuple[int, tuple[str, ...]]] = {}
        for f in self._field_nodes:
            if f.name in out:
                continue
            if f.name in index:
                out[f.name] = (index[f.name], ())
                continue
            parts = f.name.split(".")
            for k in range(len(parts) - 1, 0, -1):
                prefix = ".".join(parts[:k])
                if not f.quoted and prefix in index:
                    out[f.name] = (index[prefix], tuple(parts[k:]))
                    break
            else:
                shown = ", ".join(columns[:_MAX_COLUMNS_SHOWN])
                if len(columns) > _MAX_COLUMNS_SHOWN:
                    shown += f", … ({len(columns)} in all)"
                raise UnknownField(
                    f"unknown field {f.name!r} in expression {self.text!r}; "
                    f"the columns are: {shown or '(none)'}"
                )
        return out


def _wrap(batch: BatchFn, text: str, uses_now: bool) -> Callable[..., list[Any]]:
    def run(rows: Sequence[Row | None]) -> list[Any]:
        try:
            return batch(rows, datetime.now(UTC) if uses_now else None)
        except _ROW_ERRORS as e:
            raise EvaluationError(f"{describe_failure(e)} in expression {text!r}") from None

    return run


def parse(text: str) -> Expression:
    """Parse and type-check ``text``; raises :class:`ExpressionError` only."""
    if not isinstance(text, str):
        raise ExpressionError(1, f"an expression must be text, got {type(text).__name__}")
    return _parse(text)


@lru_cache(maxsize=1024)
def _parse(text: str) -> Expression:
    return Expression(text, parse_tree(text))
