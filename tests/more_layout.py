"""Build small folders in the official MORE layout by hand, independent of the demo generator."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from morer1.labels import DEFAULT_LABELS

SPLIT_FILES = ("train", "valid", "test")


def fact(img_id: str, pos, relation: str = "none", entity=(0, 1), tokens=None, **extra) -> dict:
    """A source record as the official release writes it."""
    tokens = tokens or ["Alice", "Smith", "visits", "Paris", "today"]
    start, end = entity
    return {"img_id": img_id, "token": tokens, "h": {"name": tokens[start:end], "pos": [start, end]},
            "t": {"name": "woman", "pos": pos}, "relation": relation, **extra}


def write_more(root: Path, lines: dict[str, list], images: dict[str, dict[str, tuple[int, int]]] | None = None,
               object_dicts: dict | None = None) -> Path:
    """Write `txt/<split>.txt` (records as repr, or raw strings as-is), images of the given sizes, rel2id."""
    (root / "txt").mkdir(parents=True, exist_ok=True)
    for split in SPLIT_FILES:
        rows = lines.get(split, [])
        text = "".join((r if isinstance(r, str) else repr(r)) + "\n" for r in rows)
        (root / "txt" / f"{split}.txt").write_text(text, encoding="utf-8")
        (root / "img_org" / split).mkdir(parents=True, exist_ok=True)
        for img_id, (w, h) in (images or {}).get(split, {}).items():
            Image.new("RGB", (w, h), (200, 30, 30)).save(root / "img_org" / split / img_id)
    (root / "rel2id.json").write_text(json.dumps({lab: i for i, lab in enumerate(DEFAULT_LABELS)}))
    if object_dicts is not None:
        import torch

        for split, data in object_dicts.items():
            torch.save(data, root / f"ent_{split}_dict.pth")
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
