"""A1111 prompt syntax: emphasis, escapes, BREAK, editing, alternation -- and strict errors."""

from __future__ import annotations

import pytest

from danqing.conditioning.prompt_parser import parse_attention, prompt_schedule, strip_extra_networks
from danqing.errors import PromptSyntaxError


def test_a1111_attention_examples():
    assert parse_attention("normal text") == [("normal text", 1.0)]
    assert parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("") == [("", 1.0)]


def test_nested_weights_use_a1111_float_operations():
    # A1111's own example, with its unbalanced '(' closed at the end (danqing refuses it open):
    # everything inside the outer "(" gets x1.1; house: 1.3 (its own), x1.1 (the "((") and x1.1 (outer); [on]: /1.1.
    got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)")
    expected = [
        ("a ", 1.0),
        ("house", 1.3 * 1.1 * 1.1),
        (" ", 1.1),
        ("on", 1.1 * (1 / 1.1)),
        (" a ", 1.1),
        ("hill", 0.5 * 1.1),
        (", sun, ", 1.1),
        ("sky", 1.1 * 1.1 * 1.1 * 1.1),
        (".", 1.1),
    ]
    assert [p for p, _ in got] == [p for p, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        assert w == pytest.approx(e, rel=1e-12)
    assert parse_attention("((word))")[0][1] == 1.1 * 1.1
    assert parse_attention("[word]")[0][1] == 1 / 1.1
    assert parse_attention("(word:1.3)") == [("word", 1.3)]
    assert parse_attention("time: 5pm") == [("time: 5pm", 1.0)]


def test_editing_fraction_and_absolute_steps():
    assert prompt_schedule("a [cat:dog:10] on a mat", 20) == [(10, "a cat on a mat"), (20, "a dog on a mat")]
    assert prompt_schedule("a [cat:dog:0.25]", 20) == [(5, "a cat"), (20, "a dog")]
    assert prompt_schedule("[hat:5] on", 10) == [(5, " on"), (10, "hat on")]
    assert prompt_schedule("[hat::5] on", 10) == [(5, "hat on"), (10, " on")]
    # A switch after the last step never happens.
    assert prompt_schedule("[a:b:30]", 20) == [(20, "a")]


def test_nested_editing_and_weights_pass_through():
    sched = prompt_schedule("[(red:1.2) [cube:sphere:6]:blue ball:8]", 10)
    assert sched == [(6, "(red:1.2) cube"), (8, "(red:1.2) sphere"), (10, "blue ball")]
    # Escapes and emphasis survive stage 1 untouched for stage 2.
    assert prompt_schedule("\\(x\\) [y] ((z))", 4) == [(4, "\\(x\\) [y] ((z))")]


def test_alternation_every_step():
    assert prompt_schedule("[cat|dog] photo", 4) == [(1, "cat photo"), (2, "dog photo"), (3, "cat photo"), (4, "dog photo")]
    assert [t for _, t in prompt_schedule("[a|b|c]", 4)] == ["a", "b", "c", "a"]


def test_editing_with_alternation():
    assert prompt_schedule("[[a|b]:c:2]", 3) == [(1, "a"), (2, "b"), (3, "c")]


@pytest.mark.parametrize(
    "prompt, needle",
    [
        ("a (red circle", "unbalanced '(' at position 2"),
        ("a red) circle", "unbalanced ')' at position 5"),
        ("a [red circle", "unbalanced '[' at position 2"),
        ("a red] circle", "unbalanced ']' at position 5"),
        ("[cat:dog:soon]", "needs a number for 'when'"),
        ("[a:b:c:1]", "more than two ':'"),
        ("(x:-1)", "weight"),
    ],
)
def test_strict_errors_name_position_and_fix(prompt, needle):
    with pytest.raises(PromptSyntaxError) as exc:
        for _, text in prompt_schedule(prompt, 10):
            parse_attention(text)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_strip_extra_networks():
    text, nets = strip_extra_networks("a girl <lora:style_a:0.8> smiling <hypernet:h:1>")
    assert text == "a girl  smiling "
    assert nets == [("lora", ["style_a", "0.8"]), ("hypernet", ["h", "1"])]
