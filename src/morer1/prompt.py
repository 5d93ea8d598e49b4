"""The six-step reasoning prompt as chat messages with two images, in one of the named templates.

`full` (`templates/prompt.txt`, with a system turn) is the MORE-R1 prompt for real models: the task, the
types, the candidate labels and the six steps. `compact` (`templates/prompt_compact.txt`, no system turn)
is the entity and the title with the entity marked in it, for a small model trained from scratch that learns the steps from its
SFT rationales (a long instruction stops a ~1M-parameter model from learning, docs/method.md).

A model is queried with the template it was trained on: `synthesize` writes the template name into the
SFT set (`PROMPT_FILE`), and SFT and GRPO copy that file into the model folders they save, where
generation, difficulty, evaluation and the served model read it (`model_prompt`).
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Literal

from morer1.errors import BadInputError

SYSTEM = "You extract relations between objects in news images and entities in news titles. Reason step by step."
PromptName = Literal["full", "compact"]
TEMPLATES: dict[str, tuple[str, str | None]] = {  # name -> (template file, system turn)
    "full": ("templates/prompt.txt", SYSTEM),
    "compact": ("templates/prompt_compact.txt", None),
}
DEFAULT_PROMPT = "full"  # what a folder without PROMPT_FILE (e.g. a base checkpoint) is asked with
PROMPT_FILE = "morer1_prompt.json"


@cache
def template(name: str = DEFAULT_PROMPT) -> str:
    """The text of a named template, with `{title}`, `{marked_title}` (the target entity between `[ ` and ` ]`),
    `{entity}` and `{labels}` fields."""
    if name not in TEMPLATES:
        raise BadInputError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    return files("morer1").joinpath(TEMPLATES[name][0]).read_text(encoding="utf-8")


def prompt_text(title: str, entity: str, labels: list[str] | tuple[str, ...], name: str = DEFAULT_PROMPT,
                marked_title: str | None = None) -> str:
    """The user instruction for one fact; `marked_title` (default: the title) fills `{marked_title}`."""
    return template(name).format(title=title, entity=entity, labels="\n".join(labels),
                                 marked_title=title if marked_title is None else marked_title).strip()


def mark_entity(fact: dict) -> str:
    """The title with the target entity between `[ ` and ` ]`: at its token span when the fact has one (ingested
    facts), else at the first whole-word occurrence of the entity's name; the plain title when it is not found."""
    tokens, entity = fact.get("tokens"), fact["entity"]
    start, end = entity.get("start"), entity.get("end")
    if tokens and start is not None and end is not None and 0 <= start < end <= len(tokens):
        return " ".join([*tokens[:start], "[", *tokens[start:end], "]", *tokens[end:]])
    title, name = fact["text"], entity["name"]
    match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", title) if name else None
    if match is None:
        return title
    return f"{title[:match.start()]}[ {name} ]{title[match.end():]}"


def prompt_messages(fact: dict, labels: list[str] | tuple[str, ...], name: str = DEFAULT_PROMPT) -> list[dict]:
    """The turns for one ingested fact: the template's system turn, if any, then the user turn with the photo and
    the crop (two `{"type": "image"}` slots, in that order) and the text."""
    system = TEMPLATES[name][1] if name in TEMPLATES else None
    user = {"role": "user", "content": [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": prompt_text(fact["text"], fact["entity"]["name"], labels, name, mark_entity(fact))},
    ]}
    return ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [user]


def write_prompt_name(folder: str | Path, name: str) -> None:
    """Record in `folder` (an SFT set or a model) which template its prompts use."""
    template(name)  # refuse unknown names before writing
    (Path(folder) / PROMPT_FILE).write_text(json.dumps({"template": name}) + "\n", encoding="utf-8")


def model_prompt(folder: str | Path) -> str:
    """The template a model folder (or SFT set) was trained with; `full` when it records none."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return DEFAULT_PROMPT
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["template"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{path}: not a prompt record ({{\"template\": NAME}}): {exc}") from exc
    template(name)
    return name


def fact_images(fact: dict, facts_dir) -> list[str]:
    """Paths of the photo and the crop of a fact, in prompt order."""
    root = Path(facts_dir)
    return [str(root / fact["image"]), str(root / fact["object"]["crop"])]


def teacher_instruction(fact: dict) -> str:
    """Gold-conditioned instruction for a teacher: the types and the label, to be reached as if unknown."""
    types = (f"the object type is {fact['object_type']} and the entity type is {fact['entity_type']}"
             if fact["object_type"] else "the object and the entity are not related")
    return (
        f"For your information only: {types}, and the correct label is {fact['relation']}. "
        "Write the six steps as if you did not know this, reasoning only from the two images and the title, "
        "so that step 6 arrives at that label. Never mention that you were told the label or the types. "
        "Answer in the exact format: <think>Step 1: ... Step 6: ...</think><answer>LABEL</answer>"
    )
