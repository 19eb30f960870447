"""Safe expressions for `when` conditions and `${{ ... }}` substitutions.

A small grammar of our own, parsed by hand and evaluated by walking the tree: never `eval`, never
attribute access on Python objects, never calls other than the few functions listed below.

Grammar, loosest binding first::

    expression := or
    or         := and ( "||" and )*
    and        := equality ( "&&" equality )*
    equality   := comparison [ ( "==" | "!=" ) comparison ]       -- not chainable
    comparison := unary [ ( "<" | "<=" | ">" | ">=" ) unary ]      -- not chainable
    unary      := "!" unary | postfix
    postfix    := primary ( "." NAME | "[" expression "]" )*       -- only after a name, call or ( )
    primary    := STRING | NUMBER | "true" | "false" | "null"
                | NAME | FUNCTION "(" [ expression ( "," expression )* ] ")" | "(" expression ")"

- NAME: a letter or `_`, then letters, digits, `_` and `-`, not ending in `-` (`jobs.build-linux.status`).
  There is no arithmetic, so `a-b` is one name. After `.` any name is a key, `true` and `null` too;
  keys that are not names (`'my key'`, `0`) take the index form: `matrix['arch']`, `variables.LIST[0]`.
- STRING: single or double quotes; escapes `\\\\ \\' \\" \\n \\r \\t \\0 \\uXXXX`.
- NUMBER: `12`, `-3`, `1.5`, `2e3` (an integer without `.` or exponent, else a float).

Values are the plain data of the context (mappings, lists, strings, numbers, booleans, None).
Evaluation never raises for a well-formed expression:

- A name or key that is not there is null (None); so is any key or index into a non-container.
- `&&` and `||` short-circuit and answer one of their operand values, as in JavaScript:
  `a || 'default'`. `!` answers a boolean. Truthiness (`truthy`): null, false, 0, NaN and '' are
  false; everything else, empty lists and mappings included, is true.
- `==` / `!=`: null equals only null; booleans equal only booleans; strings compare exactly
  (case-sensitive); numbers compare numerically (`1 == 1.0`). A number and a *numeric string*
  compare as numbers (`variables.COUNT == 3` holds when COUNT is "3" or "3.0"); a numeric string
  is a plain decimal such as `3`, `-2.5`, `1e3`, with no spaces. No other coercion: `'true' != true`,
  `'' != null`, `0 != false`. Lists and mappings are equal when their items are.
- `<` `<=` `>` `>=` order two numbers, two strings (by code point), or a number and a numeric string
  (as numbers); any other pair, null included, is false.

Functions (the only callable names; arity is checked at parse time):

- `contains(haystack, needle)`: a substring test when haystack is a string (needle rendered as by
  `interpolate`, null never contained), an `==` membership test when it is a list; else false.
- `startsWith(text, prefix)`, `endsWith(text, suffix)`: false unless both are strings. Case-sensitive.
- `always()`: true.
- `success()`: no job or step in the context (`jobs.*.status`, `steps.*.status`) is `failed`,
  `cancelled` or `timeout`.
- `failure()`: some job or step in the context is `failed` or `timeout`.

Limits: an expression is at most `MAX_LENGTH` characters and nests at most `MAX_DEPTH` levels of
parentheses, `!`, `[...]` and call arguments. Positions in errors are 0-based character offsets into
the text given (for templates: into the whole template).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 64

ALLOWED_ROOTS: Final[frozenset[str]] = frozenset(
    {"variables", "secrets", "matrix", "trigger", "jobs", "steps", "run", "pipeline", "env"}
)

# name -> number of arguments
FUNCTIONS: Final[Mapping[str, int]] = {
    "contains": 2,
    "startsWith": 2,
    "endsWith": 2,
    "always": 0,
    "success": 0,
    "failure": 0,
}

_KEYWORDS: Final[Mapping[str, bool | None]] = {"true": True, "false": False, "null": None}
_NOT_SUCCESS: Final = frozenset({"failed", "cancelled", "timeout"})
_FAILURE: Final = frozenset({"failed", "timeout"})


class ExpressionError(ValueError):
    """A malformed expression or template. `position` is a 0-based character offset."""

    def __init__(self, message: str, position: int) -> None:
        self.message = message
        self.position = position
        super().__init__(f"{message} at position {position}")

    def shifted(self, offset: int) -> ExpressionError:
        return ExpressionError(self.message, self.position + offset)


# ---------------------------------------------------------------------------------------------- AST


class Expr:
    """A node of a parsed expression. Immutable; `pos` is where it starts (ignored by ==)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Literal(Expr):
    value: str | int | float | bool | None
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Var(Expr):
    """A root name looked up in the context: `variables`, `jobs`, ..."""

    name: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Access(Expr):
    """`target.a['b'][0]`: each key is an expression (`.a` is the literal 'a')."""

    target: Expr
    keys: tuple[Expr, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Not(Expr):
    operand: Expr
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Compare(Expr):
    op: str  # == != < <= > >=
    left: Expr
    right: Expr
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Logical(Expr):
    """`a && b && c` or `a || b || c`, flat so that long chains do not nest."""

    op: str  # && ||
    operands: tuple[Expr, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Call(Expr):
    name: str
    args: tuple[Expr, ...]
    pos: int = field(default=0, compare=False)


# ---------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # name string number op end
    value: Any
    pos: int
    text: str


_NAME_RE: Final = re.compile(r"[A-Za-z_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")
_NUMBER_RE: Final = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMERIC_STRING_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER_RE: Final = re.compile(r"[+-]?[0-9]+")
_OPERATORS: Final = ("==", "!=", "<=", ">=", "&&", "||", "!", "<", ">", "(", ")", "[", "]", ".", ",")
_LONE: Final = {"=": "use '==' to compare", "&": "use '&&'", "|": "use '||'"}
_ESCAPES: Final = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t", "0": "\0"}


def _describe(tok: _Token) -> str:
    if tok.kind == "end":
        return "end of expression"
    if tok.kind == "op":
        return f"'{tok.text}'"
    return f"{tok.kind} {tok.text}" if tok.kind != "name" else f"name '{tok.text}'"


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The string literal opening at `start`, and the index just after its closing quote."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            e = text[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
                continue
            if e == "u":
                digits = text[i + 2 : i + 6]
                if len(digits) == 4 and all(d in "0123456789abcdefABCDEF" for d in digits):
                    out.append(chr(int(digits, 16)))
                    i += 6
                    continue
                raise ExpressionError("'\\u' must be followed by four hex digits", i)
            raise ExpressionError(f"unknown escape '\\{e}' in string", i)
        out.append(c)
        i += 1
    raise ExpressionError("unterminated string", start)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c in "'\"":
            value, end = _read_string(text, i)
            tokens.append(_Token("string", value, i, text[i:end]))
            i = end
            continue
        m = _NAME_RE.match(text, i)
        if m:
            tokens.append(_Token("name", m.group(), i, m.group()))
            i = m.end()
            continue
        m = _NUMBER_RE.match(text, i)
        if m:
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] == "_"):
                raise ExpressionError(f"invalid number '{text[i : end + 1]}'", i)
            raw = m.group()
            number: int | float = float(raw) if (m.group(1) or m.group(2)) else int(raw)
            tokens.append(_Token("number", number, i, raw))
            i = end
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                tokens.append(_Token("op", op, i, op))
                i += len(op)
                break
        else:
            if c in _LONE:
                raise ExpressionError(f"unexpected '{c}'; {_LONE[c]}", i)
            if c == "-":
                raise ExpressionError("unexpected '-'; expressions have no arithmetic", i)
            raise ExpressionError(f"unexpected character {c!r}", i)
    tokens.append(_Token("end", None, n, ""))
    return tokens


# ------------------------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def at_op(self, *ops: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "op" and tok.value in ops

    def expect_op(self, op: str, what: str) -> _Token:
        tok = self.peek()
        if tok.kind == "op" and tok.value == op:
            return self.advance()
        raise ExpressionError(f"expected '{op}' {what}; found {_describe(tok)}", tok.pos)

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"expression is nested too deeply (more than {MAX_DEPTH} levels)", pos)

    def leave(self) -> None:
        self.depth -= 1

    def parse(self) -> Expr:
        if self.peek().kind == "end":
            raise ExpressionError("empty expression", 0)
        expr = self.expression()
        tok = self.peek()
        if tok.kind != "end":
            raise ExpressionError(f"unexpected {_describe(tok)}; expected an operator or the end", tok.pos)
        return expr

    def expression(self) -> Expr:
        return self.logical("||", self.and_)

    def and_(self) -> Expr:
        return self.logical("&&", self.equality)

    def logical(self, op: str, operand: Callable[[], Expr]) -> Expr:
        first = operand()
        operands = [first]
        while self.at_op(op):
            self.advance()
            operands.append(operand())
        if len(operands) == 1:
            return first
        return Logical(op, tuple(operands), pos=_pos(first))

    def equality(self) -> Expr:
        return self.binary(("==", "!="), self.comparison)

    def comparison(self) -> Expr:
        return self.binary(("<", "<=", ">", ">="), self.unary)

    def binary(self, ops: tuple[str, ...], operand: Callable[[], Expr]) -> Expr:
        left = operand()
        if not self.at_op(*ops):
            return left
        op_tok = self.advance()
        right = operand()
        if self.at_op(*ops):
            tok = self.peek()
            raise ExpressionError(f"'{op_tok.value}' and '{tok.value}' cannot be chained; add parentheses", tok.pos)
        return Compare(op_tok.value, left, right, pos=_pos(left))

    def unary(self) -> Expr:
        if self.at_op("!"):
            tok = self.advance()
            self.enter(tok.pos)
            operand = self.unary()
            self.leave()
            return Not(operand, pos=tok.pos)
        return self.postfix()

    def postfix(self) -> Expr:
        tok = self.peek()
        target: Expr
        if tok.kind == "name":
            self.advance()
            if tok.value in _KEYWORDS:
                return Literal(_KEYWORDS[tok.value], pos=tok.pos)
            if self.at_op("("):
                target = self.call(tok)
            else:
                target = Var(tok.value, pos=tok.pos)
        elif tok.kind in ("string", "number"):
            self.advance()
            return Literal(tok.value, pos=tok.pos)
        elif tok.kind == "op" and tok.value == "(":
            self.advance()
            self.enter(tok.pos)
            target = self.expression()
            self.leave()
            self.expect_op(")", f"to close the '(' opened at position {tok.pos}")
        elif tok.kind == "end":
            raise ExpressionError("unexpected end of expression", tok.pos)
        else:
            raise ExpressionError(f"unexpected {_describe(tok)}", tok.pos)

        keys: list[Expr] = []
        while self.at_op(".", "["):
            op = self.advance()
            if op.value == ".":
                name = self.peek()
                if name.kind != "name":
                    raise ExpressionError(f"expected a name after '.', found {_describe(name)}", name.pos)
                self.advance()
                keys.append(Literal(name.value, pos=name.pos))
            else:
                self.enter(op.pos)
                keys.append(self.expression())
                self.leave()
                self.expect_op("]", f"to close the '[' opened at position {op.pos}")
        if self.at_op("("):
            raise ExpressionError(
                "only these functions can be called: " + ", ".join(f"{f}()" for f in FUNCTIONS), self.peek().pos
            )
        return Access(target, tuple(keys), pos=_pos(target)) if keys else target

    def call(self, name: _Token) -> Expr:
        if name.value not in FUNCTIONS:
            raise ExpressionError(
                f"unknown function '{name.value}'; available: " + ", ".join(f"{f}()" for f in FUNCTIONS), name.pos
            )
        open_tok = self.advance()
        self.enter(open_tok.pos)
        args: list[Expr] = []
        if not self.at_op(")"):
            args.append(self.expression())
            while self.at_op(","):
                self.advance()
                args.append(self.expression())
        self.leave()
        self.expect_op(")", f"to close the call of {name.value}()")
        arity = FUNCTIONS[name.value]
        if len(args) != arity:
            plural = "argument" if arity == 1 else "arguments"
            raise ExpressionError(f"{name.value}() takes {arity} {plural}, got {len(args)}", name.pos)
        return Call(name.value, tuple(args), pos=name.pos)


def _pos(expr: Expr) -> int:
    pos = getattr(expr, "pos", 0)
    return pos if isinstance(pos, int) else 0


# ---------------------------------------------------------------------------------------- public API


@lru_cache(maxsize=2048)
def parse(text: str) -> Expr:
    """Parse one expression (no `${{ }}` around it). Raises ExpressionError(message, position)."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    return _Parser(text).parse()


def parse_condition(text: str) -> Expr:
    """Parse a `when`: a bare expression, or one wrapped whole in a single `${{ }}`."""
    inner, offset = _unwrap_condition(text)
    try:
        return parse(inner)
    except ExpressionError as exc:
        raise exc.shifted(offset) from None


def evaluate(expr: Expr, context: Mapping[str, Any]) -> Any:
    """The value of `expr` over `context` (root name -> plain data). Never raises for parsed input."""
    if isinstance(expr, Literal):
        return expr.value
    if isinstance(expr, Var):
        return context.get(expr.name)
    if isinstance(expr, Access):
        value = evaluate(expr.target, context)
        for key in expr.keys:
            if value is None:
                return None
            value = _lookup(value, evaluate(key, context))
        return value
    if isinstance(expr, Not):
        return not truthy(evaluate(expr.operand, context))
    if isinstance(expr, Logical):
        want = expr.op == "||"
        result: Any = None
        for operand in expr.operands:
            result = evaluate(operand, context)
            if truthy(result) is want:
                return result
        return result
    if isinstance(expr, Compare):
        left = evaluate(expr.left, context)
        right = evaluate(expr.right, context)
        if expr.op == "==":
            return _equal(left, right)
        if expr.op == "!=":
            return not _equal(left, right)
        return _order(expr.op, left, right)
    if isinstance(expr, Call):
        return _call(expr, context)
    raise TypeError(f"not an expression node: {expr!r}")


def truthy(value: Any) -> bool:
    """JavaScript-like: null, false, 0, NaN and '' are false; anything else is true."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, float):
        return value != 0.0 and not math.isnan(value)
    if isinstance(value, str):
        return value != ""
    return True


def evaluate_condition(text: str, context: Mapping[str, Any]) -> bool:
    """Whether a `when` holds. Raises ExpressionError when malformed (validation should catch it first)."""
    return truthy(evaluate(parse_condition(text), context))


def render(value: Any) -> str:
    """How a value appears in a substituted string: null -> '', booleans -> true/false,
    numbers plainly (3.0 -> '3'), lists and mappings as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_plain(value), separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


def interpolate(template: str, context: Mapping[str, Any]) -> str:
    """Replace every `${{ expr }}` in `template` by its rendered value. Raises ExpressionError
    (position into the template) when the template is malformed. Text outside `${{ }}` is kept as
    is; a literal `${{` can be written `${{ '${{' }}`."""
    if "${{" not in template:
        return template
    out: list[str] = []
    for part in _scan_template(template):
        if isinstance(part, str):
            out.append(part)
        else:
            inner, offset = part
            try:
                expr = parse(inner)
            except ExpressionError as exc:
                raise exc.shifted(offset) from None
            out.append(render(evaluate(expr, context)))
    return "".join(out)


def referenced_roots(expr: Expr) -> set[str]:
    """The root names an expression reads, e.g. {'variables', 'jobs'} (functions are not roots)."""
    return {v.name for v in _vars(expr)}


def check(text: str, roots: Collection[str] | None = ALLOWED_ROOTS) -> str | None:
    """Validate a `when` (bare or wrapped in one `${{ }}`): None when fine, else one message with a
    position. Names outside `roots` are errors (pass None to allow any name)."""
    try:
        inner, offset = _unwrap_condition(text)
        try:
            expr = parse(inner)
        except ExpressionError as exc:
            raise exc.shifted(offset) from None
        _check_roots(expr, roots, offset)
    except ExpressionError as exc:
        return str(exc)
    return None


def template_errors(template: str, roots: Collection[str] | None = ALLOWED_ROOTS) -> list[str]:
    """Every problem in a string with `${{ }}` substitutions, each with a position into the template.
    Empty when the template is fine (a string without `${{` always is)."""
    errors: list[str] = []
    if "${{" not in template:
        return errors
    try:
        for part in _scan_template(template):
            if isinstance(part, str):
                continue
            inner, offset = part
            try:
                try:
                    expr = parse(inner)
                except ExpressionError as exc:
                    raise exc.shifted(offset) from None
                _check_roots(expr, roots, offset)
            except ExpressionError as exc:
                errors.append(str(exc))
    except ExpressionError as exc:  # unterminated: nothing after it can be read
        errors.append(str(exc))
    return errors


# ---------------------------------------------------------------------------------------- internals


def _scan_template(template: str) -> Iterator[str | tuple[str, int]]:
    """Literal text (str) and expressions (inner text, offset of the inner text in the template), in
    order. `}}` inside a quoted string does not close an expression. Raises on an unterminated one."""
    pos = 0
    n = len(template)
    while True:
        start = template.find("${{", pos)
        if start < 0:
            if pos < n:
                yield template[pos:]
            return
        if start > pos:
            yield template[pos:start]
        j = start + 3
        while True:
            if j >= n:
                raise ExpressionError("'${{' is not closed by '}}'", start)
            c = template[j]
            if c in "'\"":
                k = j + 1
                while k < n and template[k] != c:
                    k += 2 if template[k] == "\\" else 1
                if k >= n:
                    raise ExpressionError("unterminated string", j)
                j = k + 1
            elif template.startswith("}}", j):
                break
            else:
                j += 1
        yield template[start + 3 : j], start + 3
        pos = j + 2


def _unwrap_condition(text: str) -> tuple[str, int]:
    """A condition's expression text and its offset in `text`: `${{ a }}` -> (' a ', 3)."""
    if not text.strip().startswith("${{"):
        return text, 0
    parts = list(_scan_template(text))
    exprs = [p for p in parts if not isinstance(p, str)]
    texts = [p for p in parts if isinstance(p, str)]
    if len(exprs) != 1 or any(t.strip() for t in texts):
        extra = next((i for i, c in enumerate(text) if not c.isspace()), 0)
        raise ExpressionError("a condition is one expression, bare or wrapped whole in one '${{ }}'", extra)
    return exprs[0]


def _vars(expr: Expr) -> Iterator[Var]:
    stack: list[Expr] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Var):
            yield node
        elif isinstance(node, Access):
            stack.append(node.target)
            stack.extend(node.keys)
        elif isinstance(node, Not):
            stack.append(node.operand)
        elif isinstance(node, Compare):
            stack.extend((node.left, node.right))
        elif isinstance(node, Logical):
            stack.extend(node.operands)
        elif isinstance(node, Call):
            stack.extend(node.args)


def _check_roots(expr: Expr, roots: Collection[str] | None, offset: int) -> None:
    if roots is None:
        return
    for var in sorted(_vars(expr), key=lambda v: v.pos):
        if var.name not in roots:
            known = ", ".join(sorted(roots))
            raise ExpressionError(f"unknown name '{var.name}' (expressions can read {known})", var.pos + offset)


def _lookup(value: Any, key: Any) -> Any:
    if isinstance(value, Mapping):
        return value.get(key) if isinstance(key, str) else None
    if isinstance(value, list | tuple) and _is_number(key):
        if isinstance(key, float):
            if not key.is_integer():
                return None
            key = int(key)
        return value[key] if 0 <= key < len(value) else None
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numeric(value: str) -> int | float | None:
    if _NUMERIC_STRING_RE.fullmatch(value) is None:
        return None
    return int(value) if _INTEGER_RE.fullmatch(value) else float(value)


def _as_numbers(a: Any, b: Any) -> tuple[int | float, int | float] | None:
    """Both as numbers when they compare numerically: two numbers, or a number and a numeric string."""
    if _is_number(a):
        if _is_number(b):
            return a, b
        if isinstance(b, str):
            nb = _numeric(b)
            return None if nb is None else (a, nb)
    elif _is_number(b) and isinstance(a, str):
        na = _numeric(a)
        return None if na is None else (na, b)
    return None


def _equal(a: Any, b: Any) -> bool:
    numbers = _as_numbers(a, b)
    if numbers is not None:
        return numbers[0] == numbers[1]
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return False


def _order(op: str, a: Any, b: Any) -> bool:
    pair: tuple[Any, Any] | None = _as_numbers(a, b)
    if pair is None:
        if not (isinstance(a, str) and isinstance(b, str)):
            return False
        pair = (a, b)
    x, y = pair
    if op == "<":
        return bool(x < y)
    if op == "<=":
        return bool(x <= y)
    if op == ">":
        return bool(x > y)
    return bool(x >= y)


def _statuses(context: Mapping[str, Any]) -> Iterator[Any]:
    for root in ("jobs", "steps"):
        results = context.get(root)
        if isinstance(results, Mapping):
            for result in results.values():
                if isinstance(result, Mapping):
                    yield result.get("status")


def _call(call: Call, context: Mapping[str, Any]) -> bool:
    name = call.name
    if name == "always":
        return True
    if name == "success":
        return not any(s in _NOT_SUCCESS for s in _statuses(context) if isinstance(s, str))
    if name == "failure":
        return any(s in _FAILURE for s in _statuses(context) if isinstance(s, str))
    a, b = (evaluate(arg, context) for arg in call.args)
    if name == "contains":
        if isinstance(a, str):
            return b is not None and isinstance(b, str | int | float | bool) and render(b) in a
        if isinstance(a, list | tuple):
            return any(_equal(item, b) for item in a)
        return False
    if name == "startsWith":
        return isinstance(a, str) and isinstance(b, str) and a.startswith(b)
    if name == "endsWith":
        return isinstance(a, str) and isinstance(b, str) and a.endswith(b)
    raise ExpressionError(f"unknown function '{name}'", call.pos)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
