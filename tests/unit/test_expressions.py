"""Conditions and `${{ }}` substitutions (domain/expressions.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.expressions import (
    ALLOWED_ROOTS,
    MAX_DEPTH,
    MAX_LENGTH,
    Access,
    Call,
    Compare,
    ExpressionError,
    Literal,
    Logical,
    Not,
    Var,
    check,
    evaluate,
    evaluate_condition,
    interpolate,
    parse,
    parse_condition,
    referenced_roots,
    render,
    template_errors,
    truthy,
)

CONTEXT: dict[str, Any] = {
    "variables": {"PUBLISH": "yes", "COUNT": "3", "EMPTY": "", "NAME": "Release", "LIST": ["a", "b"]},
    "matrix": {"arch": "amd64", "os": "linux", "shard": 2},
    "trigger": {"type": "cron", "branch": "main"},
    "jobs": {"build-linux": {"status": "succeeded"}, "image": {"status": "succeeded"}},
    "steps": {"compile": {"status": "succeeded"}},
}


def ev(text: str, context: dict[str, Any] | None = None) -> Any:
    return evaluate(parse(text), CONTEXT if context is None else context)


def error_of(text: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as info:
        parse(text)
    return info.value


# ------------------------------------------------------------------------------------------- literals


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("'hello'", "hello"),
        ('"hello"', "hello"),
        ("''", ""),
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'a\\b'", "a\\b"),
        (r"'tab\there'", "tab\there"),
        (r"'line\nnext'", "line\nnext"),
        (r"'\u00e9t\u00E9'", "été"),
        ("'}}'", "}}"),
        ("42", 42),
        ("-7", -7),
        ("0", 0),
        ("1.5", 1.5),
        ("2e3", 2000.0),
        ("-1.25E-2", -0.0125),
        ("true", True),
        ("false", False),
        ("null", None),
    ],
)
def test_literals_evaluate_to_their_values(text: str, value: Any) -> None:
    result = ev(text)
    assert result == value
    assert type(result) is type(value)


def test_integers_without_a_fraction_stay_integers_and_others_are_floats() -> None:
    assert parse("12") == Literal(12)
    assert isinstance(ev("12"), int)
    assert isinstance(ev("12.0"), float)


# ---------------------------------------------------------------------------------------------- paths


def test_the_design_example_publish_condition() -> None:
    assert evaluate_condition("variables.PUBLISH == 'yes'", CONTEXT) is True
    assert evaluate_condition("variables.PUBLISH == 'yes'", {"variables": {"PUBLISH": "no"}}) is False
    assert evaluate_condition("variables.PUBLISH == 'yes'", {}) is False


def test_dotted_paths_read_nested_values_and_names_may_contain_dashes() -> None:
    assert ev("jobs.build-linux.status") == "succeeded"
    assert ev("trigger.branch") == "main"
    assert parse("jobs.build-linux.status") == Access(Var("jobs"), (Literal("build-linux"), Literal("status")))


def test_matrix_index_access_is_the_same_as_dotted_access() -> None:
    assert ev("matrix['arch']") == "amd64"
    assert ev('matrix["os"]') == "linux"
    assert parse("matrix['arch']") == parse("matrix.arch")
    assert ev("jobs['build-linux']['status']") == "succeeded"


def test_list_index_and_computed_keys() -> None:
    assert ev("variables.LIST[0]") == "a"
    assert ev("variables.LIST[1]") == "b"
    assert ev("variables.LIST[2]") is None
    assert ev("variables.LIST[-1]") is None  # no negative indexing
    assert ev("variables.LIST[0.5]") is None
    assert ev("variables.LIST[1.0]") == "b"
    assert ev("variables.LIST['0']") is None
    assert ev("matrix[trigger.type == 'cron' && 'arch' || 'os']") == "amd64"


def test_unknown_paths_are_null_not_errors() -> None:
    assert ev("variables.MISSING") is None
    assert ev("nothing.at.all") is None
    assert ev("variables.PUBLISH.length") is None  # keys into a string
    assert ev("variables.LIST.first") is None
    assert ev("matrix[0]") is None  # a number into a mapping
    assert ev("variables.MISSING == null") is True


def test_keywords_are_plain_keys_after_a_dot() -> None:
    ctx = {"variables": {"true": "T", "null": "N"}}
    assert ev("variables.true", ctx) == "T"
    assert ev("variables.null", ctx) == "N"


def test_parenthesized_expressions_and_calls_take_keys_too() -> None:
    assert ev("(matrix).arch") == "amd64"
    assert ev("(variables || matrix).PUBLISH") == "yes"


def test_context_objects_are_never_reached_through_python_attributes() -> None:
    class Secretive:
        status = "leak"

        def __repr__(self) -> str:
            return "Secretive()"

    ctx = {"jobs": {"x": Secretive()}}
    assert ev("jobs.x.status", ctx) is None
    assert ev("jobs.x.__class__", ctx) is None


# ---------------------------------------------------------------------------------------- operators


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("'a' == 'a'", True),
        ("'a' == 'A'", False),  # case-sensitive
        ("'a' != 'A'", True),
        ("1 == 1.0", True),
        ("null == null", True),
        ("null == ''", False),
        ("null == false", False),
        ("0 == false", False),
        ("'true' == true", False),
        ("true == true", True),
        ("true != false", True),
        ("variables.COUNT == 3", True),  # a numeric string compares as a number
        ("3 == variables.COUNT", True),
        ("'3.0' == 3", True),
        ("'1e3' == 1000", True),
        ("' 3' == 3", False),  # not a plain decimal
        ("'three' == 3", False),
        ("'' == 0", False),
        ("'3' == '3.0'", False),  # two strings compare as strings
        ("variables.LIST == variables.LIST", True),
        ("2 < 10", True),
        ("'2' < '10'", False),  # strings order by code point
        ("'10' < 2", False),  # number and numeric string: numerically
        ("variables.COUNT >= 3", True),
        ("variables.COUNT > 3", False),
        ("variables.COUNT <= 2.5", False),
        ("'abc' < 'abd'", True),
        ("'B' < 'a'", True),
        ("null < 1", False),
        ("null >= null", False),
        ("true > false", False),
        ("'x' < 1", False),
        ("(1 < 2) == true", True),
    ],
)
def test_comparisons(text: str, value: bool) -> None:
    assert ev(text) is value


def test_precedence_not_binds_tighter_than_and_which_binds_tighter_than_or() -> None:
    assert parse("!a && b || c") == Logical("||", (Logical("&&", (Not(Var("a")), Var("b"))), Var("c")))
    assert parse("a || b && c") == Logical("||", (Var("a"), Logical("&&", (Var("b"), Var("c")))))
    assert parse("a == b && c != d") == Logical(
        "&&", (Compare("==", Var("a"), Var("b")), Compare("!=", Var("c"), Var("d")))
    )
    assert parse("!a == b") == Compare("==", Not(Var("a")), Var("b"))
    assert parse("a < b == c") == Compare("==", Compare("<", Var("a"), Var("b")), Var("c"))
    truth = {"a": False, "b": True, "c": False}
    assert ev("!a && b || c", truth) is True
    assert ev("!(a || b) || c", truth) is False
    assert ev("!a && (b || c)", truth) is True


def test_long_chains_are_flat() -> None:
    chain = "||".join(["a"] * 1000)
    expr = parse(chain)
    assert isinstance(expr, Logical)
    assert len(expr.operands) == 1000
    assert ev(chain, {"a": 0}) == 0


def test_and_or_return_operand_values_like_javascript() -> None:
    assert ev("variables.MISSING || 'default'") == "default"
    assert ev("variables.NAME || 'default'") == "Release"
    assert ev("variables.EMPTY || null") is None
    assert ev("variables.NAME && matrix.arch") == "amd64"
    assert ev("variables.EMPTY && matrix.arch") == ""
    assert ev("0 || false") is False
    assert ev("!variables.NAME") is False
    assert ev("!!variables.NAME") is True


def test_and_or_short_circuit() -> None:
    class Exploding(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            if key == "boom":
                raise AssertionError("evaluated the right-hand side")
            return super().get(key, default)

    ctx = Exploding(yes=True, no=False)
    assert ev("no && boom", ctx) is False
    assert ev("yes || boom", ctx) is True
    assert ev("no && boom.x[boom]", ctx) is False
    with pytest.raises(AssertionError):
        ev("yes && boom", ctx)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (False, False),
        (True, True),
        (0, False),
        (0.0, False),
        (float("nan"), False),
        (-1, True),
        (0.1, True),
        ("", False),
        ("0", True),
        ("false", True),
        ([], True),
        ({}, True),
        (["x"], True),
    ],
)
def test_truthiness(value: Any, expected: bool) -> None:
    assert truthy(value) is expected


def test_conditions_use_truthiness() -> None:
    assert evaluate_condition("variables.NAME", CONTEXT) is True
    assert evaluate_condition("variables.EMPTY", CONTEXT) is False
    assert evaluate_condition("variables.MISSING", CONTEXT) is False
    assert evaluate_condition("matrix.shard", CONTEXT) is True


def test_a_condition_may_be_wrapped_in_one_template_marker() -> None:
    assert evaluate_condition("${{ variables.PUBLISH == 'yes' }}", CONTEXT) is True
    assert evaluate_condition("  ${{ false }}  ", CONTEXT) is False
    assert parse_condition("${{ a }}") == Var("a")


# ---------------------------------------------------------------------------------------- functions


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("contains('release-1.2', 'release')", True),
        ("contains('release-1.2', 'Release')", False),
        ("contains('v12', 12)", True),
        ("contains('abc', null)", False),
        ("contains(variables.LIST, 'b')", True),
        ("contains(variables.LIST, 'c')", False),
        ("contains(variables.MISSING, 'a')", False),
        ("startsWith(trigger.branch, 'ma')", True),
        ("startsWith(trigger.branch, 'MA')", False),
        ("endsWith(trigger.branch, 'in')", True),
        ("startsWith(3, 3)", False),
        ("always()", True),
        ("success()", True),
        ("failure()", False),
        ("!failure() && success()", True),
    ],
)
def test_functions(text: str, value: bool) -> None:
    assert ev(text) is value


@pytest.mark.parametrize(
    ("statuses", "success", "failure"),
    [
        ({}, True, False),
        ({"a": "succeeded", "b": "skipped"}, True, False),
        ({"a": "succeeded", "b": "failed"}, False, True),
        ({"a": "timeout"}, False, True),
        ({"a": "cancelled"}, False, False),
    ],
)
def test_success_and_failure_look_at_every_job_and_step_status(
    statuses: dict[str, str], success: bool, failure: bool
) -> None:
    ctx = {"jobs": {k: {"status": v} for k, v in statuses.items()}, "steps": {"ok": {"status": "succeeded"}}}
    assert ev("success()", ctx) is success
    assert ev("failure()", ctx) is failure
    steps_only = {"steps": {k: {"status": v} for k, v in statuses.items()}}
    assert ev("success()", steps_only) is success
    assert ev("failure()", steps_only) is failure


# ------------------------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("", "empty expression", 0),
        ("   ", "empty expression", 0),
        ("a ==", "unexpected end of expression", 4),
        ("a = b", "unexpected '='; use '==' to compare", 2),
        ("a & b", "unexpected '&'; use '&&'", 2),
        ("a | b", "unexpected '|'; use '||'", 2),
        ("a - b", "unexpected '-'; expressions have no arithmetic", 2),
        ("a b", "unexpected name 'b'; expected an operator or the end", 2),
        ("a 'b'", "unexpected string 'b'; expected an operator or the end", 2),
        ("(a", "expected ')' to close the '(' opened at position 0; found end of expression", 2),
        ("(a]", "expected ')' to close the '(' opened at position 0; found ']'", 2),
        ("x[0", "expected ']' to close the '[' opened at position 1; found end of expression", 3),
        ("a.", "expected a name after '.', found end of expression", 2),
        ("a.'b'", "expected a name after '.', found string 'b'", 2),
        ("a.0", "expected a name after '.', found number 0", 2),
        (")", "unexpected ')'", 0),
        ("&& a", "unexpected '&&'", 0),
        ("'abc", "unterminated string", 0),
        ("x == 'abc\\", "unterminated string", 5),
        ("'a\\qb'", "unknown escape '\\q' in string", 2),
        ("'\\u12'", "'\\u' must be followed by four hex digits", 1),
        ("12abc", "invalid number '12a'", 0),
        ("a # b", "unexpected character '#'", 2),
        ("a == b == c", "'==' and '==' cannot be chained; add parentheses", 7),
        ("1 < 2 < 3", "'<' and '<' cannot be chained; add parentheses", 6),
        ("a != b == c", "'!=' and '==' cannot be chained; add parentheses", 7),
        ("'x'.y", "unexpected '.'; expected an operator or the end", 3),
        ("a-", "unexpected '-'; expressions have no arithmetic", 1),
    ],
)
def test_parse_errors_say_what_and_where(text: str, message: str, position: int) -> None:
    err = error_of(text)
    assert err.message == message
    assert err.position == position
    assert str(err) == f"{message} at position {position}"


def test_only_listed_functions_can_be_called() -> None:
    err = error_of("variables.X && eval('1')")
    assert err.position == 15
    assert err.message.startswith("unknown function 'eval'; available: contains(), startsWith(), endsWith()")
    err = error_of("variables.keys()")
    assert err.position == 14
    assert err.message.startswith("only these functions can be called")
    err = error_of("__import__('os')")
    assert err.message.startswith("unknown function '__import__'")


def test_function_arity_is_checked_when_parsing() -> None:
    assert error_of("contains('a')").message == "contains() takes 2 arguments, got 1"
    assert error_of("always(1)").message == "always() takes 0 arguments, got 1"
    err = error_of("x || success(1, 2)")
    assert (err.message, err.position) == ("success() takes 0 arguments, got 2", 5)
    assert error_of("contains('a' 'b')").message == ("expected ')' to close the call of contains(); found string 'b'")


def test_expressions_longer_than_the_limit_are_refused() -> None:
    ok = "a" * MAX_LENGTH
    assert parse(ok) == Var(ok)
    err = error_of("a" * (MAX_LENGTH + 1))
    assert err.message == f"expression is longer than {MAX_LENGTH} characters"


def test_nesting_deeper_than_the_limit_is_refused_with_a_clear_error() -> None:
    assert ev("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == 1
    assert ev("!" * MAX_DEPTH + "0") is (MAX_DEPTH % 2 == 1)
    err = error_of("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))
    assert err.message == f"expression is nested too deeply (more than {MAX_DEPTH} levels)"
    assert err.position == MAX_DEPTH
    assert error_of("!" * (MAX_DEPTH + 1) + "a").position == MAX_DEPTH
    nested_index = "a" + "[a" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert error_of(nested_index).message.startswith("expression is nested too deeply")
    nested_calls = "contains(" * (MAX_DEPTH + 1) + "a, b" + "), b" * MAX_DEPTH + ")"
    assert error_of(nested_calls).message.startswith("expression is nested too deeply")


@given(st.text(max_size=80))
def test_parse_either_succeeds_or_raises_expression_error(text: str) -> None:
    try:
        expr = parse(text)
    except ExpressionError as exc:
        assert 0 <= exc.position <= len(text)
    else:
        evaluate(expr, CONTEXT)  # never raises once parsed


@given(st.text(alphabet="()![]'\"ab.=&|<>, 0", max_size=60))
def test_operator_soup_never_crashes(text: str) -> None:
    try:
        evaluate(parse(text), {"a": {"b": [1, "x"]}, "b": "0"})
    except ExpressionError as exc:
        assert 0 <= exc.position <= len(text)


# ----------------------------------------------------------------------------------- interpolation


def test_interpolate_replaces_every_substitution() -> None:
    text = "make image ARCH=${{ matrix.arch }} OS=${{matrix.os}} SHARD=${{ matrix.shard }}"
    assert interpolate(text, CONTEXT) == "make image ARCH=amd64 OS=linux SHARD=2"


def test_interpolate_renders_null_booleans_and_numbers_plainly() -> None:
    ctx = {"variables": {"f": 1.5, "whole": 3.0, "big": 10**20, "flag": True, "obj": {"a": [1, None]}}}
    assert interpolate("[${{ variables.missing }}]", ctx) == "[]"
    assert interpolate("${{ variables.flag }}/${{ !variables.flag }}", ctx) == "true/false"
    assert interpolate("${{ variables.f }} ${{ variables.whole }} ${{ variables.big }}", ctx) == (
        "1.5 3 100000000000000000000"
    )
    assert interpolate("${{ variables.obj }}", ctx) == '{"a":[1,null]}'
    assert interpolate("${{ 'x' == 'x' }}", ctx) == "true"


def test_text_without_substitutions_is_returned_unchanged() -> None:
    text = "echo $HOME ${PATH} {{ not }} }} $ {"
    assert interpolate(text, CONTEXT) is text
    assert template_errors(text) == []


def test_closing_braces_inside_a_string_do_not_end_the_substitution() -> None:
    assert interpolate("a${{ '}}' }}b", {}) == "a}}b"
    assert interpolate('${{ "x}}" || 1 }}', {}) == "x}}"
    assert interpolate("${{ '${{' }} literal", {}) == "${{ literal"


def test_adjacent_substitutions_and_trailing_braces() -> None:
    ctx = {"matrix": {"a": "1", "b": "2"}}
    assert interpolate("${{matrix.a}}${{matrix.b}}", ctx) == "12"
    assert interpolate("${{ matrix.a }}}", ctx) == "1}"
    assert interpolate("{${{ matrix.a }}}", ctx) == "{1}"


@pytest.mark.parametrize(
    ("template", "message", "position"),
    [
        ("echo ${{ matrix.arch", "'${{' is not closed by '}}'", 5),
        ("echo ${{ }}", "empty expression", 8),
        ("x=${{ matrix. }}", "expected a name after '.', found end of expression", 14),
        ("x=${{ 'abc }}", "unterminated string", 6),
        ("a ${{ b = c }}", "unexpected '='; use '==' to compare", 8),
        ("${{ ${{ a }} }}", "unexpected character '$'", 4),
    ],
)
def test_malformed_templates_raise_with_a_position_in_the_template(template: str, message: str, position: int) -> None:
    with pytest.raises(ExpressionError) as info:
        interpolate(template, CONTEXT)
    assert (info.value.message, info.value.position) == (message, position)
    assert template_errors(template)[0] == f"{message} at position {position}"


def test_template_errors_lists_every_bad_substitution() -> None:
    template = "${{ matrix.arch }} ${{ a = b }} ${{ matrix.os }} ${{ foo.bar }} ${{ x ==  }}"
    assert template_errors(template) == [
        "unexpected '='; use '==' to compare at position 25",
        "unknown name 'foo' (expressions can read env, jobs, matrix, pipeline, run, secrets, steps, trigger, "
        "variables) at position 53",
        "unexpected end of expression at position 74",
    ]
    assert template_errors("ok ${{ matrix.arch }} then ${{ broken") == ["'${{' is not closed by '}}' at position 27"]
    assert template_errors("${{ foo }}", roots=None) == []
    assert template_errors("${{ foo }}", roots={"foo"}) == []


# --------------------------------------------------------------------------------------- validation


def test_check_accepts_good_conditions() -> None:
    assert check("variables.PUBLISH == 'yes'") is None
    assert check("${{ jobs.build-linux.status == 'succeeded' && matrix['arch'] != 'arm64' }}") is None
    assert check("success() || failure()") is None


def test_check_reports_the_first_problem_with_its_position() -> None:
    assert check("variables.PUBLISH = 'yes'") == "unexpected '='; use '==' to compare at position 18"
    assert check("${{ variables.X ==  }}") == "unexpected end of expression at position 20"
    assert check("workspace.path") == (
        "unknown name 'workspace' (expressions can read env, jobs, matrix, pipeline, run, secrets, steps, "
        "trigger, variables) at position 0"
    )
    assert check("matrix.a || foo") is not None
    assert check("${{ matrix.a || foo }}") == (
        "unknown name 'foo' (expressions can read env, jobs, matrix, pipeline, run, secrets, steps, "
        "trigger, variables) at position 16"
    )
    assert check("${{ a }} && ${{ b }}") == (
        "a condition is one expression, bare or wrapped whole in one '${{ }}' at position 0"
    )
    assert check("foo", roots=None) is None


def test_referenced_roots_lists_root_names_only() -> None:
    expr = parse("variables.PUBLISH == 'yes' && jobs.image.status == 'succeeded' || matrix[trigger.key]")
    assert referenced_roots(expr) == {"variables", "jobs", "matrix", "trigger"}
    assert referenced_roots(parse("success() && contains(steps.x.status, 'ed')")) == {"steps"}
    assert referenced_roots(parse("'variables' == true")) == set()
    assert referenced_roots(parse("env")) <= ALLOWED_ROOTS


def test_ast_nodes_are_immutable_and_compare_without_positions() -> None:
    expr = parse("  f || always()")
    assert expr == Logical("||", (Var("f"), Call("always", ())))
    assert isinstance(expr, Logical)
    assert expr.operands[0] == Var("f", pos=99)
    assert getattr(expr.operands[0], "pos") == 2  # noqa: B009
    with pytest.raises(AttributeError):
        expr.op = "&&"  # type: ignore[misc]


def test_render_of_special_floats() -> None:
    assert render(float("inf")) == "Infinity"
    assert render(float("-inf")) == "-Infinity"
    assert render(float("nan")) == "NaN"
    assert render(0.1) == "0.1"
    assert render(-2.0) == "-2"
