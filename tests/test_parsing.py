"""Parsing completions: blocks, steps, label normalisation and the invalid answers."""

import pytest

from morer1.labels import DEFAULT_LABELS, NONE
from morer1.parsing import answer_label, normalize_label, parse_completion, step_headers

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


# ---- step headers, not step mentions (issue 9) ----------------------------------------------------------------------

CITING = (  # one step per line, the prose citing earlier steps the way instruction-tuned teachers write them
    "Step 1: The first image is a rally photo; the crop shows a man at a lectern in its centre.\n"
    "Step 2: The photo is relevant to the title, as shown in step 1. The lectern matches the speech.\n"
    "Step 3: From step 2, the man is the speaker named in the title, Alice Moreau; she was born in Lyon.\n"
    "Step 4: Building on Step 3: the object is a person (per) and Lyon is a location (loc).\n"
    "Step 5: Given step 4, the candidates of per/loc are place_of_birth, place_of_residence and none.\n"
    "Step 6: The title says she is a Lyon native, which with step 3 and step 5. gives place_of_birth."
)
STYLES = {
    "one step per line": SIX,
    "one line": " ".join(f"Step {i}: thought {i}." for i in range(1, 7)),
    "one line citing steps": "Step 1: a crop of a man. Step 2: relevant, as shown in step 1. Step 3: from step 2, "
                             "it is Alice! Step 4: per and loc, per step 3. Step 5: keep step 4. pairs? "
                             "Step 6: place_of_birth (cf. Step 3: Lyon).",
    "markdown bold": "\n\n".join(f"**Step {i}:** thought {i}." for i in range(1, 7)),
    "bold number then colon": "\n".join(f"**Step {i}**: thought {i}." for i in range(1, 7)),
    "bold title": "\n".join(f"**Step {i} - Part {i}.** Thought {i}." for i in range(1, 7)),
    "markdown headings": "\n".join(f"### Step {i}: Part {i}\nThought {i}, before step {i + 1}." for i in range(1, 7)),
    "bullets and numbers": "\n".join(f"{'-' if i % 2 else f'{i}.'} Step {i}. Thought {i}." for i in range(1, 7)),
    "citing earlier steps": CITING,
    "trailing summary": SIX + "\nIn summary, Steps 1-6 point to place_of_birth, as step 6. concluded.",
    "intro and en dash": "Let me reason step by step.\n" + "\n".join(f"Step {i} – thought {i}." for i in range(1, 7)),
}


@pytest.mark.parametrize("think", STYLES.values(), ids=STYLES.keys())
def test_six_step_headers_in_the_styles_teachers_write(think):
    p = parse_completion(f"<think>{think}</think>\n<answer>/per/loc/place_of_birth</answer>", DEFAULT_LABELS)
    assert p.steps == (1, 2, 3, 4, 5, 6) and p.steps_in_order and p.well_formed
    assert p.label == "/per/loc/place_of_birth"


def test_step_mentions_in_prose_are_not_headers():
    assert step_headers("Step 3: as shown in step 1. From step 2, it holds (see Step 1.), e.g. Step 2: no.") == (3,)
    assert step_headers("Step 1: a.\nIt follows step 1:\nthe crop.") == (1,)


@pytest.mark.parametrize("think", [
    "Step 2: b. Step 1: a. Step 3: c. Step 4: d. Step 5: e. Step 6: f.",   # out of order
    SIX + "\nStep 6: again.",                                              # a step repeated
    SIX.replace("Step 4:", "**Step 3:**"),                                 # a step repeated, another missing
    "\n".join(f"Step {i}: thought {i}." for i in range(1, 6)),             # five steps
    "Step 1: a. Step 2: b. Step 3: c. Step 4: d. Step 5: e. Step 6: f. Step 7: g.",  # seven steps
    "Step 1: Step 2: Step 3: Step 4: Step 5: Step 6: none.",               # bare chain: only the first is a header
    "The crop, step 1: a; then step 2: b; step 3: c; step 4: d; step 5: e; step 6: f.",  # mentions only
])
def test_steps_not_six_headers_in_order(think):
    p = parse_completion(f"<think>{think}</think><answer>none</answer>", DEFAULT_LABELS)
    assert p.well_formed and not p.steps_in_order


@pytest.mark.parametrize("text", [
    f"{SIX}\n<answer>none</answer>",                      # steps outside the think tags
    f"Sure! <think>{SIX}</think><answer>none</answer>",   # text before the think block
    f"<think>{SIX}</think><answer>none</answer> Step 7: more.",  # text after the answer
])
def test_six_steps_with_text_outside_the_tags_are_not_well_formed(text):
    assert not parse_completion(text, DEFAULT_LABELS).well_formed


def test_step_headers_of_the_template_teachers_layout():
    text = "<think>" + "\n".join(f"Step {i}: The step {i - 1} result holds." for i in range(1, 7)) + \
        "</think>\n<answer>none</answer>"
    p = parse_completion(text, DEFAULT_LABELS)
    assert p.steps_in_order and p.well_formed and p.label == NONE
