"""Requirements expressions: the HTCondor ClassAd subset a job uses to choose machines."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from dispatch import requirements
from dispatch.errors import InvalidJobError, InvalidRequirementsError
from dispatch.requirements import ERROR, UNDEFINED, Expression, parse

MACHINE: dict[str, object] = {
    "Memory": 4096,
    "Cpus": 8,
    "Arch": "X86_64",
    "OpSys": "LINUX",
    "Machine": "node-12",
    "Groups": "cpu, gpu,fast",
    "LoadAvg": 0.25,
    "HasDocker": True,
}
ARM_MACHINE: dict[str, object] = {**MACHINE, "Arch": "AARCH64", "Memory": 1024,
                                  "Groups": "cpu", "Machine": "pi"}


def value(text: str, attrs: dict[str, object] | None = None) -> object:
    return parse(text).value(MACHINE if attrs is None else attrs)


def parse_error(text: str) -> str:
    with pytest.raises(InvalidRequirementsError) as caught:
        parse(text)
    assert caught.value.field == "Requirements"
    message = str(caught.value)
    assert message.startswith("Requirements: ")
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- HTCondor examples

@pytest.mark.parametrize(("text", "on_x86", "on_arm"), [
    ("TRUE", True, True),
    ('Memory >= 2048 && Arch == "X86_64"', True, False),
    ('(Arch == "INTEL" || Arch == "X86_64") && OpSys == "LINUX"', True, False),
    ('stringListMember("gpu", Groups)', True, False),
    ('regexp("^node-[0-9]+$", Machine)', True, False),
])
def test_htcondor_examples_match_the_machines_they_describe(text, on_x86, on_arm):
    expression = parse(text)
    assert expression.evaluate(MACHINE) is on_x86
    assert expression.evaluate(ARM_MACHINE) is on_arm


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_or_blank_text_means_true(text):
    assert parse(text).evaluate({}) is True
    assert parse(text).value({}) is True


def test_an_expression_is_parsed_once_and_evaluated_against_many_machines():
    expression = parse("Memory >= 2048")
    assert [expression.evaluate({"Memory": mb}) for mb in (1024, 2048, 8192)] == [
        False, True, True]


def test_an_expression_is_immutable_and_equal_to_another_with_the_same_text():
    expression = parse("Memory >= 2048")
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.text = "TRUE"  # type: ignore[misc]
    assert expression == parse("Memory >= 2048")
    assert len({expression, parse("Memory >= 2048")}) == 1
    assert isinstance(expression, Expression)


def test_the_special_values_have_readable_reprs():
    assert repr(UNDEFINED) == "UNDEFINED"
    assert repr(ERROR) == "ERROR"
    assert value("UNDEFINED") is UNDEFINED
    assert value("error") is ERROR


# ---------------------------------------------------------------------------- attributes

@pytest.mark.parametrize("text", [
    "MY.Memory >= 2048", "TARGET.Memory >= 2048", "my.memory >= 2048", "target.MEMORY >= 2048",
])
def test_my_and_target_prefixes_both_refer_to_the_machine(text):
    assert parse(text).evaluate(MACHINE) is True
    assert parse(text).attribute_names() <= {"Memory", "memory", "MEMORY"}


def test_missing_attribute_makes_a_comparison_undefined_and_the_requirement_false():
    expression = parse("Gpus >= 1")
    assert expression.value(MACHINE) is UNDEFINED
    assert expression.evaluate(MACHINE) is False


def test_an_attribute_set_to_none_is_undefined_and_one_of_an_odd_type_is_an_error():
    assert value("Gpus", {"Gpus": None}) is UNDEFINED
    assert value("Gpus", {"Gpus": object()}) is ERROR
    assert value("Gpus + 1", {"Gpus": 2**70}) is ERROR


def test_a_list_valued_attribute_can_be_searched_with_member():
    attrs = {"Archs": ["INTEL", "X86_64"], "Arch": "x86_64"}
    assert value("member(Arch, Archs)", attrs) is True
    assert value("size(Archs)", attrs) == 2
    assert value("Archs == 1", attrs) is ERROR


def test_attribute_names_lists_references_as_written_without_prefixes():
    expression = parse('MY.Memory >= 2048 && TARGET.Arch == "X86_64" && '
                       'stringListMember("gpu", Groups) && member(OpSys, {"LINUX", Kernel})')
    assert expression.attribute_names() == {"Memory", "Arch", "Groups", "OpSys", "Kernel"}


def test_keywords_and_function_names_are_not_attribute_names():
    assert parse("TRUE && isUndefined(Foo) || undefined").attribute_names() == {"Foo"}
    assert parse("").attribute_names() == frozenset()


# ---------------------------------------------------------------------------- case rules

@pytest.mark.parametrize(("text", "expected"), [
    ("memory == 4096", True),                     # attribute lookup ignores case
    ("MEMORY == 4096", True),
    ("True && tRuE", True),                       # keywords ignore case
    ('STRINGLISTMEMBER("gpu", Groups)', True),    # function names ignore case
    ('ToLower(Arch) == "x86_64"', True),
    ('Arch == "x86_64"', True),                   # == on strings ignores case
    ('Arch != "x86_64"', False),
    ('"apple" < "BANANA"', True),                 # so do < and friends
    ('Arch =?= "x86_64"', False),                 # meta-equals does not
    ('Arch =?= "X86_64"', True),
    ('Arch IS "X86_64"', True),
    ('Arch ISNT "x86_64"', True),
    ('stringListMember("GPU", Groups)', False),   # stringListMember is case-sensitive
    ('stringListIMember("GPU", Groups)', True),
])
def test_case_sensitivity_follows_classad_rules(text, expected):
    assert value(text) is expected


def test_an_exact_case_attribute_wins_over_another_spelling():
    assert value("memory", {"Memory": 1, "memory": 2}) == 2


# ---------------------------------------------------------------------------- three-valued logic

T, F, U, E = True, False, UNDEFINED, ERROR
LITERAL = {T: "TRUE", F: "FALSE", U: "UNDEFINED", E: "ERROR"}


@pytest.mark.parametrize(("left", "right", "expected"), [
    (T, T, T), (T, F, F), (T, U, U), (T, E, E),
    (F, T, F), (F, F, F), (F, U, F), (F, E, F),
    (U, T, U), (U, F, F), (U, U, U), (U, E, E),
    (E, T, E), (E, F, E), (E, U, E), (E, E, E),
])
def test_and_is_three_valued_and_false_wins(left, right, expected):
    assert value(f"{LITERAL[left]} && {LITERAL[right]}") is expected


@pytest.mark.parametrize(("left", "right", "expected"), [
    (T, T, T), (T, F, T), (T, U, T), (T, E, T),
    (F, T, T), (F, F, F), (F, U, U), (F, E, E),
    (U, T, T), (U, F, U), (U, U, U), (U, E, E),
    (E, T, E), (E, F, E), (E, U, E), (E, E, E),
])
def test_or_is_three_valued_and_true_wins(left, right, expected):
    assert value(f"{LITERAL[left]} || {LITERAL[right]}") is expected


@pytest.mark.parametrize(("operand", "expected"), [(T, F), (F, T), (U, U), (E, E)])
def test_not_keeps_undefined_and_error(operand, expected):
    assert value(f"!{LITERAL[operand]}") is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("1 && TRUE", True), ("0 || FALSE", False), ("2.5 && TRUE", True), ("!0", True),
    ('"yes" && TRUE', ERROR), ('FALSE || "yes"', ERROR), ('!"yes"', ERROR),
])
def test_numbers_are_true_when_nonzero_and_strings_are_errors_in_logic(text, expected):
    assert value(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Memory", True), ("0", False), ('"yes"', False), ("UNDEFINED", False), ("ERROR", False),
])
def test_evaluate_is_true_only_for_a_true_value(text, expected):
    assert parse(text).evaluate(MACHINE) is expected


# ---------------------------------------------------------------------------- operators

@pytest.mark.parametrize(("text", "expected"), [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("10 - 4 - 3", 3), ("100 / 10 / 5", 2),
    ("7 / 2", 3), ("-7 / 2", -3), ("7 / -2", -3), ("-7 % 2", -1), ("7 % -2", 1),
    ("7.0 / 2", 3.5), ("1 + 2.5", 3.5), ("1e3", 1000.0), (".5 * 2", 1.0), ("-Memory", -4096),
    ("+3", 3), ("TRUE + 1", 2), ("9223372036854775807 + 1", -(2**63)),
    ("5 & 3", 1), ("5 | 3", 7), ("5 ^ 3", 6), ("1 | 2 ^ 3 & 4", 3),
    ('Memory > 1000 ? "big" : "small"', "big"), ("FALSE ? 1 : TRUE ? 2 : 3", 2),
    ('"a\\"b\\\\c"', 'a"b\\c'), ('"tab\\there\\n"', "tab\there\n"),
])
def test_arithmetic_follows_classad_rules(text, expected):
    result = value(text)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("text", [
    "1 / 0", "1.5 / 0", "1 % 0", '"a" + 1', '"a" + "b"', '-"a"', "1.5 & 1",
    '1 < "2"', 'Memory == "4096"', "ERROR + 1", "UNDEFINED + ERROR", '"s" ? 1 : 2',
])
def test_nonsense_operations_are_error(text):
    assert value(text) is ERROR


@pytest.mark.parametrize("text", [
    "Gpus + 1", "-Gpus", "Gpus == 1", "Gpus == Gpus", "Gpus < 1", "Gpus ? 1 : 2", "!Gpus",
])
def test_arithmetic_or_comparison_with_undefined_is_undefined(text):
    assert value(text) is UNDEFINED


@pytest.mark.parametrize(("text", "expected"), [
    ("Gpus =?= UNDEFINED", True), ("Gpus is undefined", True), ("Gpus isnt UNDEFINED", False),
    ("Gpus =!= 1", True), ("1 =?= 1.0", False), ("1 == 1.0", True), ("TRUE =?= 1", False),
    ("ERROR =?= ERROR", True), ("Memory =!= 4096", False), ('"a" =?= "a"', True),
])
def test_meta_equals_never_gives_undefined_and_compares_types(text, expected):
    assert value(text) is expected


# ---------------------------------------------------------------------------- functions

@pytest.mark.parametrize(("text", "expected"), [
    ("isUndefined(Gpus)", True), ("isUndefined(Memory)", False),
    ("isError(1 / 0)", True), ("isError(Gpus)", False),
    ('ifThenElse(Memory > 1, "a", "b")', "a"), ("ifThenElse(Gpus, 1, 2)", UNDEFINED),
    ("int(3.7)", 3), ("int(-3.7)", -3), ('int("42")', 42), ('int("3.9")', 3), ("int(TRUE)", 1),
    ('int("x")', ERROR), ("int(1e300)", ERROR), (f'int("{"9" * 30}")', ERROR),
    ("real(3)", 3.0), ('real("1e3")', 1000.0), ('real("x")', ERROR), ("real(Gpus)", UNDEFINED),
    ("string(42)", "42"), ("string(TRUE)", "true"), ("string(1.5)", "1.5"),
    ('toLower("AbC")', "abc"), ("toUpper(Arch)", "X86_64"),
    ('size("hello")', 5), ("size(Gpus)", UNDEFINED), ("size(3)", ERROR),
    ('strcat("a", 1, "b")', "a1b"), ('strcat(Gpus, "a")', UNDEFINED), ("strcat()", ""),
    ('substr("abcdef", 2)', "cdef"), ('substr("abcdef", 1, 3)', "bcd"),
    ('substr("abcdef", -2)', "ef"), ('substr("abcdef", 1, -2)', "bcd"),
    ('substr("abc", 10)', ""), ("substr(1, 0)", ERROR),
    ('regexp("^NODE", Machine)', False), ('regexp("^NODE", Machine, "i")', True),
    ('regexp("[", "x")', ERROR), ('regexp("a", 1)', ERROR), ('regexp("a", "a", "q")', ERROR),
    ('stringListMember("fast", Groups)', True), ('stringListMember("gp", Groups)', False),
    ('stringListMember("b", "a:b:c", ":")', True), ('stringListMember("gpu", Gpus)', UNDEFINED),
    ("member(2, {1, 2, 3})", True), ("member(4, {1, 2, 3})", False),
    ('member("x86_64", {"INTEL", Arch})', True), ("member(Gpus, {1})", UNDEFINED),
    ("member(1, {})", False), ("member(1, 2)", ERROR),
])
def test_builtin_functions_follow_classad_rules(text, expected):
    result = value(text)
    assert result == expected
    assert type(result) is type(expected)


def test_regexp_refuses_overlong_patterns_and_targets():
    assert value(f'regexp("{"a" * 256}", Long)', {"Long": "a" * 256}) is True
    assert value(f'regexp("{"a" * 257}", Long)', {"Long": "a" * 257}) is ERROR
    assert value('regexp("a", Long)', {"Long": "a" * 4096}) is True
    assert value('regexp("a", Long)', {"Long": "a" * 4097}) is ERROR


@pytest.mark.timeout(5)
@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|a)*$", "(a|aa)+$"])
def test_a_catastrophic_regexp_gives_up_promptly_and_the_requirement_is_not_met(pattern):
    expression = parse(f'regexp("{pattern}", Machine)')
    attrs = {**MACHINE, "Machine": "a" * 4000 + "!"}
    assert expression.evaluate(attrs) is False


@pytest.mark.timeout(5)
def test_an_exponential_regexp_search_is_error_rather_than_a_raised_timeout():
    assert value('regexp("(a|a)*$", Machine)', {"Machine": "a" * 60 + "!"}) is ERROR
    assert value('isError(regexp("(a|a)*$", Machine))', {"Machine": "a" * 60 + "!"}) is True


@pytest.mark.timeout(5)
@pytest.mark.parametrize("pattern", [
    "a{4294967294}", "a{1000000,}", "(?:a{1000}){1000}", "((a{100}){100}){100}",
    "(?:a{9}){9}(?:a{9}){9}(?:a{9}){9}",
])
def test_a_regexp_whose_counted_repeats_would_take_long_to_compile_is_error(pattern):
    assert value(f'regexp("{pattern}", "a")') is ERROR


@pytest.mark.parametrize(("pattern", "expected"), [
    ("^node-[0-9]{1,3}$", True), ("^node-[0-9]{3}$", False), ("^(?:[a-z]{2,4}-){1}", True),
    ("a{10000}", False),
])
def test_a_regexp_with_modest_counted_repeats_still_works(pattern, expected):
    assert value(f'regexp("{pattern}", Machine)') is expected


# ---------------------------------------------------------------------------- parse errors

@pytest.mark.parametrize(("text", "fragment"), [
    ("Memory >= 2048)", "unexpected ')' at 14 in 'Memory >= 2048)'"),
    ("(Memory >= 2048", "expected ')' but found end of input at 15"),
    ("Memory >=", "unexpected end of input at 9"),
    ("Memory >= 2048 Arch", "unexpected 'Arch' at 15"),
    ("Memory $ 2048", "unexpected character '$' at 7"),
    ("Memory = 2048", "unexpected character '=' at 7 in 'Memory = 2048' (use == to compare)"),
    ("Arch == 'X86_64'", "(strings use double quotes)"),
    ('Arch == "X86_64', "unterminated string starting at 8"),
    ('Arch == "X86_64\\', "unterminated string starting at 8"),
    ('"\\q"', "unknown escape '\\q' in string at 1"),
    ("nosuch(Memory)", "unknown function 'nosuch' at 0"),
    ("Arch.name(1)", "unknown function 'Arch.name' at 0"),
    ("substr(Arch)", "substr() takes 2 to 3 arguments, not 1 at 0"),
    ("isUndefined()", "isUndefined() takes 1 argument, not 0"),
    ("{1, 2}", "unexpected '{' at 0"),
    ("TRUE ? 1", "expected ':' but found end of input at 8"),
    ("MY.", "bad attribute reference 'MY.' at 0"),
    ("99999999999999999999", "integer 99999999999999999999 is out of range at 0"),
])
def test_every_parse_error_says_what_and_where(text, fragment):
    assert fragment in parse_error(text)


def test_a_parse_error_is_the_senders_fault_and_names_the_field_once():
    with pytest.raises(InvalidJobError) as caught:
        parse("Memory >= 2048)")
    assert caught.value.reason == "Requirements: unexpected ')' at 14 in 'Memory >= 2048)'"


def test_control_characters_in_the_text_are_escaped_in_the_one_line_message():
    assert "in 'Memory\\n)'" in parse_error("Memory\n)")


def test_text_longer_than_4096_characters_is_rejected():
    assert parse("TRUE" + " " * 4092).evaluate({}) is True
    message = parse_error("TRUE" + " " * 4093)
    assert "expression is 4097 characters, more than 4096" in message
    assert len(message) < 200


def test_more_than_1024_tokens_are_rejected():
    assert parse("-" + " + ".join(["1"] * 512)).value({}) == 510  # 1024 tokens
    assert "more than 1024 tokens" in parse_error(" + ".join(["1"] * 513))


@pytest.mark.parametrize(("opening", "closing"), [
    ("(", ")"), ("!", ""), ("-", ""), ("int(", ")"), ("member(1, {", "})"), ("TRUE ? 1 : ", ""),
])
def test_nesting_deeper_than_64_is_rejected(opening, closing):
    assert parse(opening * 20 + "1" + closing * 20).value({}) is not None
    assert "nested deeper than 64 levels" in parse_error(opening * 65 + "1" + closing * 65)


def test_sixty_four_levels_of_parentheses_are_allowed():
    assert parse("(" * 64 + "1" + ")" * 64).value({}) == 1


def test_no_expression_within_the_limits_can_raise_recursion_error():
    level = "a || a && a | a ^ a & a == a < a + a * -"
    for depth in range(1, 26):
        text = (level + "(") * depth + "a" + ")" * depth
        try:
            expression = parse(text)
        except InvalidRequirementsError as error:
            assert "nested deeper than 64 levels" in str(error)
            break
        assert expression.value({"a": 1}) is not ERROR
    else:
        pytest.fail("the nesting limit was never reached")


@pytest.mark.parametrize("text", [
    '__import__("os").system("x")', '__import__("os")', 'eval("1")', 'exec("x")',
    'open("/etc/passwd")', "().__class__", "lambda: 1", "[1][0]",
])
def test_python_code_is_a_parse_error_and_never_runs(text, monkeypatch):
    def forbidden(*args: object) -> int:
        raise AssertionError("os.system was called")
    monkeypatch.setattr(os, "system", forbidden)
    parse_error(text)


def test_a_dunder_attribute_name_is_only_looked_up_in_the_machine_attributes():
    assert value("Memory.__class__") is UNDEFINED
    assert value("__class__", {"__class__": "ok"}) == "ok"


# ---------------------------------------------------------------------------- failing_terms

def test_failing_terms_name_each_conjunct_that_is_not_true():
    expression = parse('Memory >= 8192 && Arch == "X86_64" && OpSys == "WINDOWS"')
    assert expression.failing_terms(MACHINE) == ["Memory >= 8192", 'OpSys == "WINDOWS"']


def test_failing_terms_are_empty_when_the_requirement_holds():
    expression = parse('Memory >= 2048 && Arch == "X86_64"')
    assert expression.evaluate(MACHINE) is True
    assert expression.failing_terms(MACHINE) == []


def test_failing_terms_include_undefined_and_error_conjuncts():
    expression = parse('Gpus >= 1 && Memory >= 1 && Arch > 3')
    assert expression.failing_terms(MACHINE) == ["Gpus >= 1", "Arch > 3"]


def test_a_parenthesised_conjunct_is_reported_with_its_parentheses():
    expression = parse('(Arch == "INTEL" || Arch == "ARM") && !(Memory < 1)')
    assert expression.failing_terms(MACHINE) == ['(Arch == "INTEL" || Arch == "ARM")']


@pytest.mark.parametrize("text", ["  Memory >= 8192  ", "Memory >= 8192 || FALSE && TRUE"])
def test_an_expression_that_is_not_an_and_chain_is_one_term(text):
    assert parse(text).failing_terms(MACHINE) == [text.strip()]


# ---------------------------------------------------------------------------- modules

def test_the_public_api_is_parse_expression_and_the_two_special_values():
    assert sorted(requirements.__all__) == ["ERROR", "Expression", "UNDEFINED", "parse"]


@pytest.mark.parametrize("module", [
    "dispatch.classad.values", "dispatch.classad.functions", "dispatch.classad.tree",
    "dispatch.classad.parser", "dispatch.requirements",
])
def test_each_classad_module_imports_on_its_own(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=30)
