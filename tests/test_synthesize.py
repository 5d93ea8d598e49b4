"""Prompt building, the rationale filter (each reason), template rationales, and the synthesize stage."""

import json

import pytest

from morer1.labels import DEFAULT_LABELS, NONE
from morer1.parsing import parse_completion
from morer1.prompt import prompt_messages, prompt_text, teacher_instruction
from morer1.synthesize import (
    SynthesisError,
    SynthesizeConfig,
    rejection_reason,
    select_facts,
    synthesize,
)
from morer1.teachers import template_rationale

LEAK = SynthesizeConfig().leakage_phrases


def make_fact(i=1, relation="/per/loc/place_of_birth", split="train"):
    types = relation.strip("/").split("/")[:2] if relation != NONE else [None, None]
    return {"id": f"{split}-{i:06d}", "split": split, "img_id": "a.jpg", "image": "images/train/a.jpg",
            "width": 120, "height": 90, "text": "red native Alice Moreau returns to Lyon",
            "tokens": "red native Alice Moreau returns to Lyon".split(),
            "entity": {"name": "Lyon", "start": 6, "end": 7},
            "object": {"name": "object 1", "box": [10, 20, 50, 70], "crop": f"crops/train/{split}-{i:06d}.png",
                       "caption": "a red circle"},
            "relation": relation, "object_type": types[0], "entity_type": types[1]}


def test_prompt_has_two_images_title_entity_labels_types_steps_and_format():
    messages = prompt_messages(make_fact(), DEFAULT_LABELS)
    user = messages[-1]["content"]
    assert [p["type"] for p in user] == ["image", "image", "text"]
    text = user[2]["text"]
    assert '"red native Alice Moreau returns to Lyon"' in text and 'Target entity: "Lyon"' in text
    assert all(label in text for label in DEFAULT_LABELS)
    assert all(f"Step {i}:" in text for i in range(1, 7)) and "<think></think>" in text and "<answer></answer>" in text
    assert "per (person)" in text and "misc (anything else)" in text
    assert prompt_text("t", "e", ["none"]).count("\n") > 6


def test_teacher_instruction_gives_gold_and_forbids_mentioning_it():
    text = teacher_instruction(make_fact())
    assert "/per/loc/place_of_birth" in text and "object type is per" in text and "Never mention" in text
    assert "not related" in teacher_instruction(make_fact(relation=NONE))


@pytest.mark.parametrize("relation", DEFAULT_LABELS)
def test_template_rationales_pass_the_filter_for_every_label(relation):
    rationale = template_rationale(make_fact(relation=relation), DEFAULT_LABELS)
    assert rejection_reason(rationale, relation, DEFAULT_LABELS, LEAK) is None
    assert parse_completion(rationale, DEFAULT_LABELS).steps_in_order


GOOD = "<think>" + " ".join(f"Step {i}: x." for i in range(1, 7)) + "</think><answer>none</answer>"


@pytest.mark.parametrize("completion,reason", [
    (None, "no_completion"),
    ("The relation is none.", "unparsable"),
    (GOOD + " trailing", "unparsable"),
    (GOOD.replace("Step 3", "Step 4"), "steps_not_six_in_order"),
    (GOOD.replace("Step 6: x.", ""), "steps_not_six_in_order"),
    (GOOD.replace("none</answer>", "/per/per/partner</answer>"), "answer_not_gold"),
    (GOOD.replace("none</answer>", "none, /per/per/partner</answer>"), "answer_not_gold"),
    (GOOD.replace("Step 6: x.", "Step 6: the gold label is none."), "leakage"),
    (GOOD.replace("Step 6: x.", "Step 6: As instructed, none."), "leakage"),
    (GOOD.replace("Step 1: x.", "Step 1: a Golden Lion trophy."), None),  # a word inside a name is no leak
    (GOOD, None),
])
def test_filter_reasons(completion, reason):
    assert rejection_reason(completion, NONE, DEFAULT_LABELS, LEAK) == reason


def test_select_facts_balances_none_and_caps_in_source_order():
    facts = [make_fact(i, NONE) for i in range(1, 31)] + [make_fact(i, "/per/per/partner") for i in range(31, 41)]
    chosen = select_facts(facts, SynthesizeConfig(none_fraction=0.5, max_facts=None))
    assert sum(f["relation"] == NONE for f in chosen) == 10 and len(chosen) == 20
    assert [f["id"] for f in chosen] == sorted(f["id"] for f in chosen)
    assert len(select_facts(facts, SynthesizeConfig(none_fraction=None, max_facts=7))) == 7


class _Scripted:
    def __init__(self, texts):
        self.texts, self.stats = texts, {"requests": len(texts)}

    def generate(self, requests):
        return self.texts[: len(requests)]


def _facts_dir(tmp_path, n=4):
    d = tmp_path / "facts"
    d.mkdir()
    (d / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    (d / "train.jsonl").write_text("".join(json.dumps(make_fact(i)) + "\n" for i in range(1, n + 1)))
    return d


def test_synthesize_writes_chat_rows_with_images_and_a_report(tmp_path):
    report = synthesize(_facts_dir(tmp_path), tmp_path / "sft", SynthesizeConfig(splits=("train",)))
    rows = [json.loads(line) for line in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()]
    assert report["splits"]["train"] == {"requested": 4, "kept": 4, "rejected": {},
                                         "labels": {"/per/loc/place_of_birth": 4}}
    row = rows[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["images"] == [str(tmp_path / "facts" / "images/train/a.jpg"),
                             str(tmp_path / "facts" / "crops/train/train-000001.png")]
    assert row["messages"][-1]["content"][0]["text"].endswith("<answer>/per/loc/place_of_birth</answer>")
    assert json.loads((tmp_path / "sft" / "report.json").read_text())["teacher"] == "template"


def test_synthesize_fails_when_the_teacher_gives_too_little(tmp_path):
    teacher = _Scripted([GOOD.replace("none", "/per/loc/place_of_birth"), None, None, "junk"])
    with pytest.raises(SynthesisError, match=r"train: kept 1 of 4 rationales"):
        synthesize(_facts_dir(tmp_path), tmp_path / "sft", SynthesizeConfig(splits=("train",)), teacher=teacher)
    report = json.loads((tmp_path / "sft" / "report.json").read_text())
    assert report["splits"]["train"]["rejected"] == {"no_completion": 2, "unparsable": 1}


def test_filter_keeps_a_rationale_whose_prose_cites_earlier_steps():
    completion = ("<think>Step 1: The crop shows a man at a lectern; the photo is a rally.\n"
                  "Step 2: The photo is relevant to the title, as shown in step 1.\n"
                  "Step 3: From step 2, the man is not linked to any entity of the title.\n"
                  "Step 4: **Step 3** found no grounding, so the types give no relation (see step 3.)\n"
                  "**Step 5:** Only none remains, per step 4.\n"
                  "Step 6: As step 5. left only none, the relation is none.</think>\n<answer>none</answer>")
    assert rejection_reason(completion, NONE, DEFAULT_LABELS, LEAK) is None
