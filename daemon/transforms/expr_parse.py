"""Tokenizer, parser and static type check of the expression language.

The parser is a Pratt parser over a token list; it builds a typed syntax tree
bottom-up, so every node knows its static type and a type error is reported at
the column of the operator or function that cannot take its operands. Nesting
is limited (:data:`MAX_DEPTH`) so that no input can exhaust the Python stack
here or in the code generated from the tree. See docs/expressions.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from dataflare.cdc.errors import ConfigError

MAX_DEPTH = 48  # nesting of the tree; the generated Python nests about twice as deep
MAX_LENGTH = 100_000  # characters of one expression
MAX_NUMBER = 100  # characters of one number literal (int() refuses > 4300 digits)

BOOL, STRING, NUMBER, TIMESTAMP, DATE, NULL, ANY = (
    "bool",
    "string",
    "number",
    "timestamp",
    "date",
    "null",
    "any",
)
TEMPORAL = frozenset({TIMESTAMP, DATE})


class ExpressionError(ConfigError):
    """An expression that does not parse or type-check; ``column`` is 1-based."""

    def __init__(self, column: int, reason: str, kind: str = "syntax", text: str = "") -> None:
        self.column = column
        self.reason = reason
        self._args = (column, reason, kind, text)
        where = f"column {column}"
        if "\n" in text[: column - 1]:
            line = text.count("\n", 0, column - 1) + 1
            where = f"line {line}, column {column - text.rfind(chr(10), 0, column - 1) - 1}"
        super().__init__(f"{kind} error at {where}: {reason}")

    def __reduce__(self) -> tuple[type[ExpressionError], tuple[int, str, str, str]]:
        return type(self), self._args


# -- tokens -------------------------------------------------------------------


class Token(NamedTuple):
    kind: str  # "num" "str" "name" "field" (backquoted) "op" "kw" "end"
    value: Any
    col: int  # 1-based
    text: str  # as written (for messages)


KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false", "null"})
# two-character operators first
_OPS = (
    "==",
    "!=",
    "<=",
    ">=",
    "=~",
    "!~",
    "<",
    ">",
    "+",
    "-",
    "*",
    "/",
    "%",
    "(",
    ")",
    "[",
    "]",
    ",",
)
_HINTS = {"=": "use '==' to compare", "&&": "use 'and'", "||": "use 'or'", "!": "use 'not'"}
_NAME = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_HEX = frozenset("0123456789abcdefABCDEF")


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The string literal opening at ``start``; returns (value, index after it).
    Unknown escapes keep their backslash, so '\\.' in a regex means a dot."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "u" and i + 6 <= n and all(c in _HEX for c in text[i + 2 : i + 6]):
                code = int(text[i + 2 : i + 6], 16)
                if 0xD800 <= code <= 0xDFFF:
                    raise ExpressionError(i + 1, "\\u escape of a surrogate", text=text)
                out.append(chr(code))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ExpressionError(start + 1, "unterminated string", text=text)


def _decimal_literal(raw: str) -> Decimal | None:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    return value if -1000 < value.adjusted() < 1000 else None


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        col = i + 1
        if ch in "'\"":
            literal, j = _read_string(text, i)
            tokens.append(Token("str", literal, col, text[i:j]))
            i = j
            continue
        if ch == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise ExpressionError(col, "unterminated `quoted name`", text=text)
            if j == i + 1:
                raise ExpressionError(col, "empty `quoted name`", text=text)
            tokens.append(Token("field", text[i + 1 : j], col, text[i : j + 1]))
            i = j + 1
            continue
        if "0" <= ch <= "9":
            m = _NUMBER.match(text, i)
            assert m is not None
            j = m.end()
            if j < n and (text[j] == "." or text[j] == "_" or text[j].isalnum()):
                raise ExpressionError(col, "invalid number", text=text)
            if j - i > MAX_NUMBER:
                raise ExpressionError(col, f"number longer than {MAX_NUMBER} characters", text=text)
            raw = m.group()
            value: Any = None if m.group(1) or m.group(2) else int(raw)
            if value is None:
                value = _decimal_literal(raw)
                if value is None:
                    raise ExpressionError(col, "number out of range", text=text)
            tokens.append(Token("num", value, col, raw))
            i = j
            continue
        m = _NAME.match(text, i)
        if m is not None:
            word = m.group()
            if word.lower() in KEYWORDS:
                tokens.append(Token("kw", word.lower(), col, word))
            else:
                tokens.append(Token("name", word, col, word))
            i = m.end()
            continue
        for op in _OPS:
            if text.startswith(op, i):
                tokens.append(Token("op", op, col, op))
                i += len(op)
                break
        else:
            two = text[i : i + 2]
            hint = _HINTS.get(two) or _HINTS.get(ch)
            shown = two if two in _HINTS else ch
            msg = f"unexpected character {shown!r}" + (f": {hint}" if hint else "")
            raise ExpressionError(col, msg, text=text)
    tokens.append(Token("end", None, n + 1, "end of expression"))
    return tokens


# -- syntax tree ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    col: int
    ty: str
    depth: int


@dataclass(frozen=True, slots=True, eq=False)
class Lit(Node):
    value: Any  # None, bool, int, Decimal, str


@dataclass(frozen=True, slots=True, eq=False)
class Field(Node):
    name: str  # as written, dotted
    quoted: bool  # `name`: an exact column name, no path


@dataclass(frozen=True, slots=True, eq=False)
class Neg(Node):
    operand: Node


@dataclass(frozen=True, slots=True, eq=False)
class Arith(Node):
    op: str  # + - * / %
    left: Node
    right: Node


@dataclass(frozen=True, slots=True, eq=False)
class Cmp(Node):
    op: str  # == != < <= > >=
    left: Node
    right: Node


@dataclass(frozen=True, slots=True, eq=False)
class InList(Node):
    operand: Node
    values: frozenset[Any]
    negated: bool


@dataclass(frozen=True, slots=True, eq=False)
class Match(Node):
    operand: Node
    pattern: re.Pattern[str]
    negated: bool


@dataclass(frozen=True, slots=True, eq=False)
class Logic(Node):
    op: str  # and | or
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Not(Node):
    operand: Node


@dataclass(frozen=True, slots=True, eq=False)
class Call(Node):
    name: str  # lower-case, a key of FUNCTIONS
    args: tuple[Node, ...]


# -- functions: static signatures (the implementations are in expr_compile) --


class Signature(NamedTuple):
    min_args: int
    max_args: int  # -1: any number
    arg_types: tuple[str, ...]  # per argument (the last repeats); ANY accepts all
    result: str  # a type, or "common": the common type of the value arguments


_S, _N = STRING, NUMBER
FUNCTIONS: dict[str, Signature] = {
    "upper": Signature(1, 1, (_S,), _S),
    "lower": Signature(1, 1, (_S,), _S),
    "trim": Signature(1, 1, (_S,), _S),
    "length": Signature(1, 1, (_S,), _N),
    "substr": Signature(2, 3, (_S, _N, _N), _S),
    "replace": Signature(3, 3, (_S, _S, _S), _S),
    "starts_with": Signature(2, 2, (_S, _S), BOOL),
    "ends_with": Signature(2, 2, (_S, _S), BOOL),
    "contains": Signature(2, 2, (_S, _S), BOOL),
    "matches": Signature(2, 2, (_S, _S), BOOL),
    "concat": Signature(1, -1, (ANY,), _S),
    "abs": Signature(1, 1, (_N,), _N),
    "round": Signature(1, 2, (_N, _N), _N),
    "floor": Signature(1, 1, (_N,), _N),
    "ceil": Signature(1, 1, (_N,), _N),
    "coalesce": Signature(1, -1, (ANY,), "common"),
    "if": Signature(3, 3, (BOOL, ANY, ANY), "common"),
    "is_null": Signature(1, 1, (ANY,), BOOL),
    "now": Signature(0, 0, (), TIMESTAMP),
    "int": Signature(1, 1, (ANY,), _N),
    "float": Signature(1, 1, (ANY,), _N),
    "decimal": Signature(1, 1, (ANY,), _N),
    "str": Signature(1, 1, (ANY,), _S),
    "bool": Signature(1, 1, (ANY,), BOOL),
    "date": Signature(1, 1, (ANY,), DATE),
    "timestamp": Signature(1, 1, (ANY,), TIMESTAMP),
}


# -- static types -----------------------------------------------------------------


def _known(ty: str) -> bool:
    return ty not in (ANY, NULL)


def common_type(types: list[str]) -> str:
    known = {t for t in types if t != NULL}
    if not known:
        return NULL
    return known.pop() if len(known) == 1 else ANY


ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def looks_temporal(node: Node) -> bool:
    """A string literal that reads as an ISO 8601 date or date-time."""
    return (
        isinstance(node, Lit) and isinstance(node.value, str) and bool(ISO_DATE.match(node.value))
    )


def parse_iso(s: str) -> date | datetime:
    """An ISO 8601 date ('2026-01-31') or date-time; raises ValueError."""
    s = s.strip()
    if len(s) == 10:
        return date.fromisoformat(s)
    return datetime.fromisoformat(s)


# -- parser -----------------------------------------------------------------------

_CMP_OPS = frozenset({"==", "!=", "<", "<=", ">", ">="})
_BP_OR, _BP_AND, _BP_NOT, _BP_CMP, _BP_ADD, _BP_MUL, _BP_NEG = 10, 20, 30, 40, 50, 60, 70


def _binding_power(tok: Token, nxt: Token) -> int:
    """Left binding power of an infix token (0: not an infix operator)."""
    if tok.kind == "kw":
        if tok.value == "or":
            return _BP_OR
        if tok.value == "and":
            return _BP_AND
        if tok.value == "in" or (tok.value == "not" and nxt.kind == "kw" and nxt.value == "in"):
            return _BP_CMP
        return 0
    if tok.kind != "op":
        return 0
    if tok.value in _CMP_OPS or tok.value in ("=~", "!~"):
        return _BP_CMP
    if tok.value in ("+", "-"):
        return _BP_ADD
    if tok.value in ("*", "/", "%"):
        return _BP_MUL
    return 0


def _describe(tok: Token) -> str:
    if tok.kind == "end":
        return "the end of the expression"
    return repr(tok.text) if len(tok.text) <= 40 else repr(tok.text[:37] + "...")


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.level = 0

    # -- helpers
    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        tok = self.tokens[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def syntax(self, col: int, reason: str) -> ExpressionError:
        return ExpressionError(col, reason, "syntax", self.text)

    def type_error(self, col: int, reason: str) -> ExpressionError:
        return ExpressionError(col, reason, "type", self.text)

    def expect(self, value: str, after: str) -> Token:
        tok = self.peek()
        if tok.kind == "op" and tok.value == value:
            return self.advance()
        raise self.syntax(tok.col, f"expected {value!r} {after}, found {_describe(tok)}")

    def depth_of(self, col: int, *children: Node, extra: int = 1) -> int:
        d = max((c.depth for c in children), default=0) + extra
        if d > MAX_DEPTH:
            raise self.syntax(col, f"expression nested too deeply (more than {MAX_DEPTH} levels)")
        return d

    # -- entry
    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.syntax(1, "empty expression")
        node = self.expr(0, None)
        tok = self.peek()
        if tok.kind != "end":
            raise self.syntax(tok.col, f"unexpected {_describe(tok)} after a complete expression")
        return node

    def expr(self, min_bp: int, after: Token | None) -> Node:
        self.level += 1
        if self.level > MAX_DEPTH:
            raise self.syntax(
                self.peek().col, f"expression nested too deeply (more than {MAX_DEPTH} levels)"
            )
        try:
            left = self.prefix(after)
            while True:
                tok, nxt = self.peek(), self.peek(1)
                bp = _binding_power(tok, nxt)
                if bp <= min_bp:
                    return left
                left = self.infix(left, bp)
        finally:
            self.level -= 1

    # -- prefix position: a value
    def prefix(self, after: Token | None) -> Node:
        tok = self.advance()
        if tok.kind == "num":
            return Lit(tok.col, NUMBER, 0, tok.value)
        if tok.kind == "str":
            return Lit(tok.col, STRING, 0, tok.value)
        if tok.kind == "field":
            return Field(tok.col, ANY, 0, tok.value, True)
        if tok.kind == "kw":
            if tok.value in ("true", "false"):
                return Lit(tok.col, BOOL, 0, tok.value == "true")
            if tok.value == "null":
                return Lit(tok.col, NULL, 0, None)
            if tok.value == "not":
                operand = self.expr(_BP_NOT, tok)
                self.check_condition(operand, "'not'")
                return Not(tok.col, BOOL, self.depth_of(tok.col, operand), operand)
        if tok.kind == "name":
            if self.peek().kind == "op" and self.peek().value == "(":
                return self.call(tok)
            return Field(tok.col, ANY, 0, tok.value, False)
        if tok.kind == "op":
            if tok.value == "(":
                inner = self.expr(0, tok)
                self.expect(")", "to close the '(' at column " + str(tok.col))
                return inner
            if tok.value in ("-", "+"):
                operand = self.expr(_BP_NEG, tok)
                if operand.ty not in (NUMBER, ANY, NULL):
                    raise self.type_error(
                        tok.col, f"unary {tok.value!r} needs a number, got {operand.ty}"
                    )
                if tok.value == "+":
                    return operand
                if isinstance(operand, Lit) and isinstance(operand.value, Decimal):
                    return Lit(tok.col, NUMBER, 0, operand.value.copy_negate())
                if isinstance(operand, Lit) and operand.ty == NUMBER:
                    return Lit(tok.col, NUMBER, 0, -operand.value)
                if isinstance(operand, Lit):  # -null
                    return Lit(tok.col, NULL, 0, None)
                return Neg(tok.col, NUMBER, self.depth_of(tok.col, operand), operand)
            if tok.value == "[":
                raise self.syntax(tok.col, "a [list] is only allowed after 'in'")
        if after is None:
            raise self.syntax(tok.col, f"expected a value, found {_describe(tok)}")
        raise self.syntax(tok.col, f"expected a value after {after.text!r}, found {_describe(tok)}")

    def call(self, name_tok: Token) -> Node:
        name = name_tok.value.lower()
        sig = FUNCTIONS.get(name)
        if sig is None:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.type_error(
                name_tok.col, f"unknown function {name_tok.text!r} (known: {known})"
            )
        open_tok = self.advance()
        args: list[Node] = []
        if not (self.peek().kind == "op" and self.peek().value == ")"):
            while True:
                args.append(self.expr(0, open_tok if not args else self.tokens[self.pos - 1]))
                tok = self.peek()
                if tok.kind == "op" and tok.value == ",":
                    self.advance()
                    continue
                break
        self.expect(")", f"to close the arguments of {name}()")
        return self.check_call(name_tok, name, sig, args)

    # -- infix position
    def infix(self, left: Node, bp: int) -> Node:
        tok = self.advance()
        if tok.kind == "kw" and tok.value in ("and", "or"):
            right = self.expr(bp, tok)
            for side in (left, right):
                self.check_condition(side, repr(tok.value))
            if isinstance(left, Logic) and left.op == tok.value:  # flat: a and b and c
                ops = (*left.operands, right)
                return Logic(
                    left.col, BOOL, self.depth_of(tok.col, left, right, extra=0), tok.value, ops
                )
            return Logic(
                left.col, BOOL, self.depth_of(tok.col, left, right), tok.value, (left, right)
            )
        if bp == _BP_CMP:
            node = self.comparison(left, tok)
            nxt = self.peek()
            if _binding_power(nxt, self.peek(1)) == _BP_CMP:
                raise self.syntax(nxt.col, "comparisons cannot be chained: join them with 'and'")
            return node
        right = self.expr(bp, tok)
        return self.check_arith(tok, left, right)

    def comparison(self, left: Node, tok: Token) -> Node:
        if tok.kind == "kw":  # in | not in
            negated = tok.value == "not"
            if negated:
                self.advance()
            return self.in_list(left, tok, negated)
        if tok.value in ("=~", "!~"):
            right = self.expr(_BP_CMP, tok)
            pattern = self.regex(right, f"the right side of {tok.value!r}")
            self.check_string_operand(left, tok.col, f"{tok.value!r}")
            return Match(
                tok.col, BOOL, self.depth_of(tok.col, left), left, pattern, tok.value == "!~"
            )
        right = self.expr(_BP_CMP, tok)
        self.check_compare(tok, left, right)
        return Cmp(tok.col, BOOL, self.depth_of(tok.col, left, right), tok.value, left, right)

    def in_list(self, left: Node, tok: Token, negated: bool) -> Node:
        open_tok = self.advance()
        if not (open_tok.kind == "op" and open_tok.value in ("(", "[")):
            raise self.syntax(
                open_tok.col,
                f"expected a list after 'in', like ('a', 'b'), found {_describe(open_tok)}",
            )
        close = ")" if open_tok.value == "(" else "]"
        values: list[Lit] = []
        while not (self.peek().kind == "op" and self.peek().value == close):
            item = self.expr(0, open_tok if not values else self.tokens[self.pos - 1])
            if not isinstance(item, Lit):
                raise self.syntax(item.col, "the items of an 'in' list must be literals")
            if item.value is None:
                raise self.type_error(
                    item.col, "null cannot be in an 'in' list: test 'x == null' apart"
                )
            values.append(item)
            nxt = self.peek()
            if nxt.kind == "op" and nxt.value == ",":
                self.advance()
            elif not (nxt.kind == "op" and nxt.value == close):
                raise self.syntax(
                    nxt.col, f"expected ',' or {close!r} in the 'in' list, found {_describe(nxt)}"
                )
        self.advance()
        if not values:
            raise self.syntax(open_tok.col, "an 'in' list needs at least one item")
        item_ty = common_type([v.ty for v in values])
        if item_ty == ANY:
            raise self.type_error(open_tok.col, "the items of an 'in' list must all have one type")
        if left.ty in TEMPORAL and item_ty == STRING:
            for v in values:
                try:
                    parse_iso(v.value)
                except ValueError:
                    raise self.type_error(
                        v.col, f"{v.value!r} is not an ISO 8601 date or date-time"
                    ) from None
        elif _known(left.ty) and left.ty != item_ty:
            raise self.type_error(
                tok.col, f"cannot test whether a {left.ty} is in a list of {item_ty}s"
            )
        if left.ty == NULL:
            raise self.type_error(tok.col, "null 'in' a list is always null: test 'x == null'")
        frozen = frozenset(v.value for v in values)
        return InList(tok.col, BOOL, self.depth_of(tok.col, left), left, frozen, negated)

    def regex(self, node: Node, where: str) -> re.Pattern[str]:
        if not (isinstance(node, Lit) and isinstance(node.value, str)):
            raise self.type_error(
                node.col, f"{where} must be a string literal (a regular expression)"
            )
        try:
            return re.compile(node.value)
        except (re.error, ValueError, OverflowError, RecursionError) as e:
            raise self.type_error(node.col, f"invalid regular expression: {e}") from None

    # -- static checks
    def check_condition(self, node: Node, where: str) -> None:
        if node.ty not in (BOOL, ANY, NULL):
            raise self.type_error(
                node.col, f"{where} needs a condition (true or false), got {node.ty}"
            )

    def check_string_operand(self, node: Node, col: int, where: str) -> None:
        if node.ty not in (STRING, ANY, NULL):
            raise self.type_error(col, f"{where} needs a string, got {node.ty}")

    def check_compare(self, tok: Token, left: Node, right: Node) -> None:
        op = tok.value
        lt, rt = left.ty, right.ty
        if NULL in (lt, rt):
            if op in ("==", "!="):
                return
            raise self.type_error(
                tok.col, f"{op!r} with null is always null: use '== null' or '!= null'"
            )
        for a, b in ((left, right), (right, left)):
            if a.ty in TEMPORAL and b.ty == STRING:
                if isinstance(b, Lit):  # compared as a date/time: check it reads as one now
                    try:
                        parse_iso(b.value)
                    except ValueError:
                        raise self.type_error(
                            b.col, f"{b.value!r} is not an ISO 8601 date or date-time"
                        ) from None
                return
        if not (_known(lt) and _known(rt)) or lt == rt or {lt, rt} == TEMPORAL:
            return
        raise self.type_error(tok.col, f"cannot compare {lt} with {rt} using {op!r}")

    def check_arith(self, tok: Token, left: Node, right: Node) -> Node:
        op = tok.value
        lt, rt = left.ty, right.ty
        allowed = (NUMBER, STRING, ANY, NULL) if op == "+" else (NUMBER, ANY, NULL)
        for side in (left, right):
            if side.ty not in allowed:
                need = "numbers or strings" if op == "+" else "numbers"
                raise self.type_error(tok.col, f"{op!r} needs {need}, got {side.ty}")
        if op == "+" and {lt, rt} == {STRING, NUMBER}:
            raise self.type_error(tok.col, "cannot add string and number: convert with str(x)")
        if NULL in (lt, rt):
            ty = NULL
        elif op == "+":
            ty = STRING if STRING in (lt, rt) else NUMBER if NUMBER in (lt, rt) else ANY
        else:
            ty = NUMBER
        return Arith(tok.col, ty, self.depth_of(tok.col, left, right), op, left, right)

    def check_call(self, name_tok: Token, name: str, sig: Signature, args: list[Node]) -> Node:
        n = len(args)
        if n < sig.min_args or (sig.max_args >= 0 and n > sig.max_args):
            if sig.min_args == sig.max_args:
                want = f"{sig.min_args} argument" + ("s" if sig.min_args != 1 else "")
            elif sig.max_args < 0:
                want = f"at least {sig.min_args} argument" + ("s" if sig.min_args != 1 else "")
            else:
                want = f"{sig.min_args} to {sig.max_args} arguments"
            raise self.type_error(name_tok.col, f"{name}() takes {want}, got {n}")
        for i, arg in enumerate(args):
            want_ty = sig.arg_types[min(i, len(sig.arg_types) - 1)]
            if want_ty == ANY or arg.ty in (want_ty, ANY, NULL):
                continue
            if want_ty == BOOL:
                self.check_condition(arg, f"{name}()")
                continue
            article = "an" if want_ty[0] in "aeiou" else "a"
            which = f"argument {i + 1} of {name}()" if sig.max_args != 1 else f"{name}()"
            raise self.type_error(arg.col, f"{which} needs {article} {want_ty}, got {arg.ty}")
        pattern: re.Pattern[str] | None = None
        if name == "matches":
            pattern = self.regex(args[1], "the pattern of matches()")
            self.check_string_operand(args[0], args[0].col, "matches()")
        ty = sig.result
        if ty == "common":
            ty = common_type([a.ty for a in (args[1:] if name == "if" else args)])
        if name in ("coalesce",):  # generated as nested conditionals
            depth = self.depth_of(name_tok.col, *args, extra=len(args))
        else:
            depth = self.depth_of(name_tok.col, *args)
        if pattern is not None:
            return Match(name_tok.col, BOOL, depth, args[0], pattern, False)
        return Call(name_tok.col, ty, depth, name, tuple(args))


def parse_tree(text: str) -> Node:
    """The typed syntax tree of ``text``; raises :class:`ExpressionError` only."""
    if not isinstance(text, str):
        raise ExpressionError(1, f"an expression must be text, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(1, f"expression longer than {MAX_LENGTH} characters")
    try:
        return Parser(text).parse()
    except RecursionError:  # not expected: nesting is limited well below the stack
        raise ExpressionError(1, "expression nested too deeply") from None
