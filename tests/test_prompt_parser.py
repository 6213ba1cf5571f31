"""A1111 prompt syntax: emphasis, escapes, BREAK, editing, alternation -- and strict errors."""

from __future__ import annotations

import pytest

from danqing.conditioning.prompt_parser import MAX_NESTING, parse_attention, prompt_schedule, strip_extra_networks
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


# danqing refuses these where A1111 quietly repairs them or reads them as text; docs/prompts.md
# lists A1111's result beside each.
@pytest.mark.parametrize(
    "prompt, needle",
    [
        ("a (red circle", "unbalanced '(' at position 2"),
        ("a red) circle", "unbalanced ')' at position 5"),
        ("a [red circle", "unbalanced '[' at position 2"),
        ("a red] circle", "unbalanced ']' at position 5"),
        ("[a:b:c:1]", "more than two ':'"),
        ("[a|b:3]", "mixes ':' and '|'"),
        ("(x:1.2.3)", "weight '1.2.3' at position 3 is not a number"),
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


# ---------------------------------------------------------------------------------------------
# A1111 conformance. Expected values are A1111's (stable-diffusion-webui >= 1.6,
# modules/prompt_parser.py): its doctests where one exists, otherwise the output of its grammar
# (`plain` takes a backslash and any character; a `[...]` that is not an edit or alternation is
# kept as text by `start`) and of `parse_prompt_attention` (a lone backslash becomes "").
# danqing merges consecutive steps with equal text; `per_step` expands both to one text a step.
# ---------------------------------------------------------------------------------------------
def per_step(schedule, steps):
    """[(end_at_step, text), ...] -> the text used at each 1-based step (A1111's lookup rule)."""
    return [next(text for end, text in schedule if step <= end) for step in range(1, steps + 1)]


@pytest.mark.parametrize(
    "prompt, a1111",
    [  # A1111's doctests of get_learned_conditioning_prompt_schedules, 10 steps
        ("test", [[10, "test"]]),
        ("a [b:3]", [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
        ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
        ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
        ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
        ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
        # SIGNED_NUMBER: a sign, an exponent and spaces around the number are all a number;
        # a negative step is never reached, so the edit shows "after" from the start.
        ("[a:b:+3]", [[3, "a"], [10, "b"]]),
        ("[a:b: 3 ]", [[3, "a"], [10, "b"]]),
        ("[a:b:1e0]", [[1, "a"], [10, "b"]]),
        ("[a:b:-1]", [[10, "b"]]),
    ],
)
def test_schedule_matches_a1111(prompt, a1111):
    assert per_step(prompt_schedule(prompt, 10), 10) == per_step([tuple(x) for x in a1111], 10)


@pytest.mark.parametrize(
    "prompt, a1111",
    [
        # \: and \| are a literal colon and pipe inside editing and alternation; the backslash
        # stays in the schedule's text and is removed by the emphasis pass.
        ("[a\\:b:c:5]", [[5, [("a:b", 1.0)]], [10, [("c", 1.0)]]]),
        ("[a\\|b|c]", [[s, [("a|b" if s % 2 else "c", 1.0)]] for s in range(1, 11)]),
        # Escaped brackets are literal text and never open an edit.
        ("\\[cat:dog:5\\]", [[10, [("[cat:dog:5]", 1.0)]]]),
        ("\\(x\\) \\[y\\]", [[10, [("(x) [y]", 1.0)]]]),
        # A backslash before any other character is dropped; "\\" is one literal backslash.
        ("a\\b", [[10, [("ab", 1.0)]]]),
        ("a\\\\b", [[10, [("a\\b", 1.0)]]]),
        ("a\\", [[10, [("a", 1.0)]]]),
        # [text: more text] with no number is not an edit: the brackets stay, so the emphasis
        # pass reads them as [x] (/1.1), and edits inside still work.
        ("[text: more text]", [[10, [("text: more text", 1 / 1.1)]]]),
        ("[cat:dog:soon]", [[10, [("cat:dog:soon", 1 / 1.1)]]]),
        ("(time: 5pm)", [[10, [("time: 5pm", 1.1)]]]),
        # Negative attention weights.
        ("(word:-1)", [[10, [("word", -1.0)]]]),
        ("((word:-1))", [[10, [("word", -1.0 * 1.1)]]]),
        ("(a:-1)(b:-1)", [[10, [("ab", -1.0)]]]),
        ("a (b:-0.5) c", [[10, [("a ", 1.0), ("b", -0.5), (" c", 1.0)]]]),
        # A1111 also keeps an empty ("", 1.0) piece after BREAK; it tokenizes to nothing and
        # danqing drops it. The -1 weight next to BREAK stays an ordinary weight.
        ("a BREAK (b:-1)", [[10, [("a", 1.0), ("BREAK", -1.0), ("b", -1.0)]]]),
    ],
)
def test_escapes_literal_brackets_and_negative_weights_match_a1111(prompt, a1111):
    steps = 10
    got = [(end, parse_attention(text)) for end, text in prompt_schedule(prompt, steps)]
    want = [(end, pieces) for end, pieces in a1111]
    assert len(per_step(got, steps)) == steps
    for g, w in zip(per_step(got, steps), per_step(want, steps)):
        assert [p for p, _ in g] == [p for p, _ in w]
        assert [x for _, x in g] == pytest.approx([x for _, x in w], rel=1e-12)


def test_edits_inside_literal_brackets_still_apply():
    # A1111's Earley parse of this prompt is ambiguous: with 7 of 8 PYTHONHASHSEEDs tried it gives
    # this schedule, with the other it keeps the whole text. danqing always applies the inner edit.
    assert prompt_schedule("[note: [cat:dog:2]]", 10) == [(2, "[note: cat]"), (10, "[note: dog]")]


def test_backslash_never_reaches_the_tokenizer():
    for prompt in ("a\\b", "a\\:b", "a\\|b", "x\\", "[a\\:b:c:5]", "\\q (w\\e:1.2)"):
        for _, text in prompt_schedule(prompt, 10):
            assert all("\\" not in piece for piece, _ in parse_attention(text)), prompt
    assert parse_attention("a\\\\b") == [("a\\b", 1.0)]  # only an escaped backslash does


def test_escaped_colon_is_literal_even_before_a_number():
    # danqing: "\:" is always a literal colon. A1111 drops the backslash in its emphasis pass, so
    # there "(a\:1.2)" still reads ":1.2)" as a weight (docs/prompts.md lists this difference).
    assert parse_attention("(a\\:1.2)") == [("a:1.2", 1.1)]


def test_negative_weight_pieces_are_not_breaks():
    # A weight of exactly -1 is an ordinary weight; only BREAK starts a new chunk.
    from danqing.conditioning.text import tokenize_prompt
    from danqing.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    (chunk,) = tokenize_prompt(tok, "a (cat:-1) ( :-1) dog")
    cat = chunk.ids.index(2368)
    assert chunk.weights[cat] == -1.0
    assert len(tokenize_prompt(tok, "a BREAK dog")) == 2


@pytest.mark.parametrize("prompt", ["(" * 1000 + "x", "[a:" * 3000 + "x", "[" * 5000, "(" * 200 + "x" + ")" * 200])
def test_deep_nesting_is_a_prompt_error_not_a_recursion_error(prompt):
    with pytest.raises(PromptSyntaxError) as exc:
        prompt_schedule(prompt, 10)
    msg = str(exc.value)
    assert f"at most {MAX_NESTING}" in msg and "nest" in msg and "\n" not in msg


def test_nesting_up_to_the_limit_parses():
    prompt = "(" * MAX_NESTING + "x" + ")" * MAX_NESTING
    ((_, text),) = prompt_schedule(prompt, 10)
    assert parse_attention(text) == [("x", pytest.approx(1.1**MAX_NESTING, rel=1e-9))]
    edits = "[a:" * (MAX_NESTING // 2) + "b" + ":1]" * (MAX_NESTING // 2)
    assert prompt_schedule(edits, 4)[-1] == (4, "b")


def test_huge_when_is_a_prompt_error():
    with pytest.raises(PromptSyntaxError, match="when"):
        prompt_schedule("[a:b:1e999]", 10)


def test_embedding_with_a_negative_weight_is_still_found(tiny_components, tmp_path):
    from types import SimpleNamespace

    import torch

    from danqing.customise.embeddings import EmbeddingLibrary, save_embedding_a1111

    path = save_embedding_a1111(tmp_path / "zqxstyle.pt", "zqxstyle", {"emb_params": torch.zeros(1, 32)})
    library = EmbeddingLibrary(SimpleNamespace(scan=lambda kind: [SimpleNamespace(path=path)]))
    used = library.for_prompts(["a (zqxstyle:-1) BREAK b"], tiny_components["tiny-sd1"])
    assert [e.name for e in used] == ["zqxstyle"]


def test_deep_nesting_in_a_request_is_an_invalid_request():
    from danqing import GenerationRequest
    from danqing.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as exc:
        GenerationRequest.create(prompt="[a:" * 3000, model="tiny-sd1")
    # refused by the pre-scan before the parser (conditioning/prompt_limits.py), with the same bound
    assert exc.value.field == "prompt" and f"limit of {MAX_NESTING}" in str(exc.value) and "nested" in str(exc.value)
