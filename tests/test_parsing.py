"""Parsing completions: blocks, steps, label normalisation and the invalid answers."""

import pytest

from morer1.labels import DEFAULT_LABELS, NONE
from morer1.parsing import answer_label, normalize_label, parse_completion

SIX = "\n".join(f"Step {i}: thought {i}." for i in range(1, 7))


@pytest.mark.parametrize("text,expected", [
    ("/per/per/opponent", "/per/per/opponent"),
    ("per/per/opponent", "/per/per/opponent"),
    ("  /PER/Per/Opponent  ", "/per/per/opponent"),
    ("/per/ per /opponent/", "/per/per/opponent"),
    ("None", NONE),
    ("none.", NONE),
    ("/per/per/enemy", None),
    ("opponent", None),
])
def test_normalize_label(text, expected):
    assert normalize_label(text, DEFAULT_LABELS) == expected


@pytest.mark.parametrize("answer", ["", "   ", "/per/per/opponent, /per/per/partner", "none or /org/loc/locate_at",
                                    "/per/per/opponent /per/per/opponent", "something else"])
def test_invalid_answers(answer):
    assert answer_label(answer, DEFAULT_LABELS) is None


def test_well_formed_completion():
    p = parse_completion(f"<think>{SIX}</think>\n<answer> per/loc/place_of_birth </answer>", DEFAULT_LABELS)
    assert p.well_formed and p.steps_in_order and p.label == "/per/loc/place_of_birth"
    assert p.steps == (1, 2, 3, 4, 5, 6) and p.n_think == p.n_answer == 1


@pytest.mark.parametrize("text", [
    "<answer>none</answer>",                                          # no think
    f"<think>{SIX}</think><answer>none</answer> and more text",       # trailing text
    f"<think>{SIX}</think><think>again</think><answer>none</answer>",  # two think blocks
    f"<answer>none</answer><think>{SIX}</think>",                      # wrong order
    f"<think>{SIX}</think><answer>none</answer><answer>none</answer>",  # two answers
    f"<think>{SIX}</think> junk </think><answer>none</answer>",         # stray closing tag
    f"<think>{SIX}</think><answer>none</answer></answer>",
])
def test_malformed_completions(text):
    assert not parse_completion(text, DEFAULT_LABELS).well_formed


def test_two_answer_blocks_give_no_label_and_steps_out_of_order_are_seen():
    text = "<think>Step 2: b. Step 1: a.</think><answer>none</answer><answer>/per/per/partner</answer>"
    p = parse_completion(text, DEFAULT_LABELS)
    assert p.label is None and p.steps == (2, 1) and not p.steps_in_order
