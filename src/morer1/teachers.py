"""Teachers that write six-step rationales for the SFT set, behind one interface.

`template` writes them deterministically from the annotations (no endpoint); `openai` asks any
OpenAI-compatible chat endpoint (`morer1.teacher_openai`).
"""

from __future__ import annotations

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
