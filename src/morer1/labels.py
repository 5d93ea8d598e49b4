"""The MORE label set: typed labels `/<object type>/<entity type>/<relation>` plus `none`."""

from __future__ import annotations

import json
from pathlib import Path

from morer1.errors import BadInputError

NONE = "none"
TYPES = ("per", "org", "loc", "misc")

DEFAULT_LABELS = (
    NONE,
    "/per/per/opponent", "/per/per/partner", "/per/per/relatives", "/per/per/alternate_names",
    "/per/org/opposed_to", "/per/org/leader_of", "/per/org/member_of",
    "/per/loc/place_of_birth", "/per/loc/place_of_residence", "/per/loc/place_of_governance",
    "/per/misc/present_in", "/per/misc/awarded", "/per/misc/party", "/per/misc/nationality",
    "/per/misc/president",
    "/org/org/alternate_names", "/org/org/subsidiary", "/org/loc/locate_at", "/org/misc/present_in",
    "/loc/loc/contain",
)


def type_pair(label: str) -> tuple[str, str] | None:
    """(object type, entity type) of a typed label; None for `none`."""
    if label == NONE:
        return None
    parts = label.strip("/").split("/")
    if len(parts) != 3 or parts[0] not in TYPES or parts[1] not in TYPES:
        raise ValueError(f"not a typed MORE label: {label!r}")
    return parts[0], parts[1]


def labels_for_pair(labels: tuple[str, ...] | list[str], obj_type: str, ent_type: str) -> list[str]:
    """Candidate labels of one type pair, `none` first (a pair with no relation allows only `none`)."""
    return [NONE] + [lab for lab in labels if lab != NONE and type_pair(lab) == (obj_type, ent_type)]


def load_rel2id(path: str | Path) -> dict[str, int]:
    """Read `rel2id.json` (one JSON object label -> id) and check that every label is typed or `none`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}:1: expected a non-empty JSON object label -> id")
    for label in data:
        if label != NONE:
            try:
                type_pair(label)
            except ValueError as exc:
                raise ValueError(f"{path}:1: {exc}") from exc
    return {str(k): int(v) for k, v in data.items()}


def read_labels(path: str | Path) -> tuple[str, ...]:
    """The label set of an ingested folder's `labels.json`; BadInputError if it is missing or not a list of labels."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: missing (the ingest stage writes it)") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(lab, str) for lab in labels):
        raise BadInputError(f"{path}: expected a non-empty JSON list of labels")
    return tuple(labels)
