"""The six-step reasoning prompt (template in `templates/prompt.txt`) as chat messages with two images."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

SYSTEM = "You extract relations between objects in news images and entities in news titles. Reason step by step."


@cache
def template() -> str:
    return files("morer1").joinpath("templates/prompt.txt").read_text(encoding="utf-8")


def prompt_text(title: str, entity: str, labels: list[str] | tuple[str, ...]) -> str:
    """The user instruction for one fact."""
    return template().format(title=title, entity=entity, labels="\n".join(labels)).strip()


def prompt_messages(fact: dict, labels: list[str] | tuple[str, ...]) -> list[dict]:
    """System and user turns for one ingested fact; the two `{"type": "image"}` slots are the photo and the crop."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": prompt_text(fact["text"], fact["entity"]["name"], labels)},
        ]},
    ]


def fact_images(fact: dict, facts_dir) -> list[str]:
    """Paths of the photo and the crop of a fact, in prompt order."""
    from pathlib import Path

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
