"""Teachers that write six-step rationales for the SFT set, behind one interface.

`template` writes them deterministically from the annotations of any MORE-layout data (no endpoint);
`demo` derives them from the demo dataset's rule (docs/demo_data.md), step by step from the evidence;
`openai` asks any OpenAI-compatible chat endpoint (`morer1.teacher_openai`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from morer1.labels import NONE, labels_for_pair, type_pair


@dataclass(frozen=True)
class TeacherRequest:
    """One fact to explain: the ingested record, the label set, its prompt turns and image paths."""

    fact: dict
    labels: tuple[str, ...]
    messages: list = field(hash=False)
    images: tuple[str, ...]


class Teacher(Protocol):
    def generate(self, requests: list[TeacherRequest]) -> list[str | None]:
        """One completion per request (None when the teacher gave none)."""


TYPE_WORDS = {"per": "a person", "org": "an organisation", "loc": "a location", "misc": "something else (misc)"}


def template_rationale(fact: dict, labels: tuple[str, ...]) -> str:
    """A deterministic six-step rationale ending in the fact's label, written from its annotations."""
    obj, ent = fact["object"], fact["entity"]["name"]
    x0, y0, x1, y1 = obj["box"]
    look = obj["caption"] or obj["name"]
    where = (f"at pixels ({x0}, {y0})-({x1}, {y1}) of the {fact['width']}x{fact['height']} photo")
    steps = [f"Step 1: The first image is the news photo; the second is a crop {where}, showing {look}."]
    label = fact["relation"]
    if label == NONE:
        steps += [
            f"Step 2: The photo illustrates the title \"{fact['text']}\", but the crop is only one part of it.",
            f"Step 3: Nothing in the crop of {obj['name']} points to \"{ent}\"; the object cannot be grounded "
            "to the target entity.",
            f"Step 4: The object is {obj['name']}; without a grounding, its type gives no relation to \"{ent}\".",
            "Step 5: With no link between object and entity, only none remains among the candidates.",
            "Step 6: The relation is none.",
        ]
    else:
        o_type, e_type = type_pair(label)
        pair = [lab for lab in labels_for_pair(labels, o_type, e_type) if lab != NONE]
        steps += [
            f"Step 2: The photo is relevant to the title \"{fact['text']}\": the crop shows {look}.",
            f"Step 3: The object {obj['name']} is linked in the title to \"{ent}\".",
            f"Step 4: The object is {TYPE_WORDS[o_type]} ({o_type}) and \"{ent}\" is {TYPE_WORDS[e_type]} ({e_type}).",
            f"Step 5: The candidates of the pair {o_type}/{e_type} are {', '.join(pair)} and none.",
            f"Step 6: The title's wording around \"{ent}\" fits {label}, so the relation is {label}.",
        ]
    return "<think>" + "\n".join(steps) + "</think>\n<answer>" + label + "</answer>"


class TemplateTeacher:
    """Writes rationales from the annotations: deterministic, free, and always ends in the gold label."""

    def generate(self, requests: list[TeacherRequest]) -> list[str | None]:
        return [template_rationale(r.fact, r.labels) for r in requests]


def demo_rationale(fact: dict) -> str | None:
    """Six short steps that derive a demo fact's label from its evidence, in the order the rule needs it.

    1. the entity and its type; 2. the two title words just before the entity; 3. the crop: colour and shape,
    hence the object type; 4. whether that colour word is the crop's colour; 5. the relation the cue word
    names and whether its type pair is the pair of steps 1 and 3; 6. the label those steps give. The title is
    read before the crop is described, so the title's words cannot be copied from the crop's colour. Every
    statement is read from the inputs (the caption is what the crop shows, the tokens are the title), and
    step 6 follows from steps 4 and 5 alone. None when the fact is not from the demo generator (its caption
    or entity is not in the demo's vocabulary): this teacher only knows the demo's rule.
    """
    from morer1.demo_data import CUE_WORDS, ENTITY_NAMES, PALETTE, SHAPES

    shape_type = {shape: kind for kind, shape in SHAPES.items()}
    entity_type = {name: kind for kind, names in ENTITY_NAMES.items() for name in names}
    cue_relation = {cue: relation for relation, cue in CUE_WORDS.items()}
    caption = re.fullmatch(r"an? (\w+) (\w+)", fact["object"].get("caption") or "")
    ent = fact["entity"]["name"]
    if not caption or caption[1] not in PALETTE or caption[2] not in shape_type or ent not in entity_type:
        return None
    color, shape = caption[1], caption[2]
    o_type, e_type = shape_type[shape], entity_type[ent]
    before = fact["tokens"][max(0, fact["entity"]["start"] - 2):fact["entity"]["start"]]
    steps = [f"Step 1: The entity {ent} is {e_type}.",
             f"Step 2: In the title, {ent} follows {' '.join(before)}." if before
             else f"Step 2: In the title, {ent} comes first.",
             f"Step 3: The crop shows a {color} {shape}, so the object is {o_type}."]
    linked = len(before) == 2 and before[0] in PALETTE and before[1] in cue_relation
    if not linked:
        steps += [f"Step 4: No colour and cue come before {ent}, so nothing links it to the crop.",
                  "Step 5: No cue, so no relation.",
                  "Step 6: No link, so the relation is none."]
        label = NONE
    else:
        word, cue = before
        relation = cue_relation[cue]
        r_obj, r_ent = type_pair(relation)
        match, fits = word == color, (r_obj, r_ent) == (o_type, e_type)
        steps.append(f"Step 4: The title says {word} and the crop is {color}: "
                     + ("they match." if match else "they differ."))
        steps.append(f"Step 5: {cue} names {relation}, for {r_obj}/{r_ent}; the pair is {o_type}/{e_type}: "
                     + ("it fits." if fits else "it does not fit."))
        label = relation if match and fits else NONE
        why = ("colour and pair agree" if match and fits else "the colours differ" if not match
               else "the pair does not fit")
        steps.append(f"Step 6: {why[0].upper() + why[1:]}, so the relation is {label}.")
    return "<think>" + "\n".join(steps) + "</think>\n<answer>" + label + "</answer>"


class DemoTeacher:
    """Derives each rationale from the demo rule's evidence (`demo_rationale`); None for facts it cannot read."""

    def generate(self, requests: list[TeacherRequest]) -> list[str | None]:
        return [demo_rationale(r.fact) for r in requests]
