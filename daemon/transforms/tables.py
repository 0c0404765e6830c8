"""Table names in transformation configs: ``tables:`` lists and rename targets.

Entries use SQL identifier syntax: ``public.orders``, ``public."Order Items"``,
``shop.`Line Items``` (MySQL backticks). An unquoted part matches case-insensitively
(PostgreSQL folds it to lower case, MySQL names keep theirs); a quoted part matches
exactly. A bare name (``orders``) matches that table in any schema or database, and
an unquoted ``*`` matches any name (``public.*``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dataflare.cdc.errors import ConfigError
from dataflare.cdc.model import TableId


@dataclass(frozen=True, slots=True)
class NamePart:
    text: str
    quoted: bool

    def matches(self, name: str) -> bool:
        if self.quoted:
            return self.text == name
        return self.text == "*" or self.text.lower() == name.lower()


def split_identifier(text: str) -> list[NamePart]:
    """The dot-separated parts of an SQL name, quotes (``"`` or backticks) removed."""
    parts: list[NamePart] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] in '"`':
            q, j, buf = text[i], i + 1, []
            while True:
                if j >= n:
                    raise ConfigError(f"unterminated quoted identifier in {text!r}")
                if text[j] == q:
                    if j + 1 < n and text[j + 1] == q:
                        buf.append(q)
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append(NamePart("".join(buf), True))
            i = j + 1
            while i < n and text[i].isspace():
                i += 1
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            parts.append(NamePart(text[i:j].strip(), False))
            i = j
        if not parts[-1].text:
            raise ConfigError(f"bad table name {text!r}: empty name")
        if i >= n:
            return parts
        if text[i] != ".":
            raise ConfigError(f"bad table name {text!r}: expected a dot after a quoted name")
        i += 1


@dataclass(frozen=True, slots=True)
class TablePattern:
    schema: NamePart | None  # None: any schema
    name: NamePart

    def matches(self, table: TableId) -> bool:
        return self.name.matches(table.name) and (
            self.schema is None or self.schema.matches(table.schema)
        )


def parse_pattern(text: str) -> TablePattern:
    parts = split_identifier(text)
    if len(parts) == 1:
        return TablePattern(None, parts[0])
    if len(parts) != 2:
        raise ConfigError(f"bad table name {text!r}: expected schema.table")
    return TablePattern(parts[0], parts[1])


def parse_table_id(text: str) -> TableId:
    """An exact ``schema.table`` (a rename target): written as given, quotes removed."""
    parts = split_identifier(text)
    if len(parts) != 2 or any(p.text == "*" and not p.quoted for p in parts):
        raise ConfigError(f"bad table name {text!r}: expected schema.table")
    return TableId(parts[0].text, parts[1].text)


class TableSelector:
    """Which tables a transformation applies to (``tables:``; None: every table)."""

    def __init__(self, entries: Iterable[str] | None) -> None:
        self.patterns = None if entries is None else [parse_pattern(e) for e in entries]

    def __contains__(self, table: TableId) -> bool:
        return self.patterns is None or any(p.matches(table) for p in self.patterns)


def quote_ident(name: str, quote: str = '"') -> str:
    """An identifier quoted for SQL (``"`` for PostgreSQL, a backtick for MySQL)."""
    return quote + name.replace(quote, quote * 2) + quote


def sql_name(text: str, quote: str = '"', fold: bool = True) -> str:
    """A possibly qualified SQL name from a config, every part quoted. ``fold``:
    unquoted parts in lower case, as PostgreSQL reads them (MySQL: keep them)."""
    return ".".join(
        quote_ident(p.text if p.quoted or not fold else p.text.lower(), quote)
        for p in split_identifier(text)
    )
