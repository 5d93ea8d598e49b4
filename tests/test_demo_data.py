"""The demo dataset: deterministic, in the official MORE layout, and labelled by the documented rule."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from configs import small_config
from morer1.demo_data import (
    CUE_WORDS,
    ENTITY_NAMES,
    JOINS,
    LEADS,
    PALETTE,
    SHAPES,
    SPLITS,
    TAILS,
    TYPE_PAIRS,
    DemoDataConfig,
    generate_demo,
    run,
)
from morer1.errors import BadInputError
from morer1.labels import DEFAULT_LABELS, NONE, type_pair

SMALL = dict(train_pairs=4, valid_pairs=2, test_pairs=3)
SHAPE_TYPE = {shape: t for t, shape in SHAPES.items()}
ENTITY_TYPE = {name: t for t, names in ENTITY_NAMES.items() for name in names}
CUE_RELATION = {cue: relation for relation, cue in CUE_WORDS.items()}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_records(root: Path, split: str) -> list[dict]:
    lines = (root / "txt" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    return [ast.literal_eval(line) for line in lines]


def nearest_color(rgb) -> str:
    return min(PALETTE, key=lambda c: sum((a - b) ** 2 for a, b in zip(PALETTE[c], rgb)))


def read_object(pixels: np.ndarray, box: list[int]) -> tuple[str, str]:
    """(shape, colour) of the object in a pixel box, from the pixels alone.

    Colour: nearest palette colour at the box centre. Shape: share of the box in that colour (square ~1,
    circle ~0.79, triangle and diamond ~0.5), and for the last two the share of it in the lower half
    (triangle ~0.75, diamond ~0.5).
    """
    x0, y0, x1, y1 = box
    color = nearest_color(pixels[(y0 + y1) // 2, (x0 + x1) // 2].astype(int))
    crop = pixels[y0:y1, x0:x1].astype(int)
    inside = ((crop - np.array(PALETTE[color])) ** 2).sum(axis=-1) < 60 ** 2
    fill = inside.mean()
    lower = inside[(y1 - y0) // 2:].sum() / inside.sum()
    shape = "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle" if lower > 0.62 else "diamond"
    return shape, color


def pixel_box(pos, width: int, height: int) -> list[int]:
    cx, cy, w, h = (float(v) for v in pos)
    return [round((cx - w / 2) * width), round((cy - h / 2) * height),
            round((cx + w / 2) * width), round((cy + h / 2) * height)]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "more"
    run(small_config(DemoDataConfig, seed=3, **SMALL), out)
    return out


@pytest.fixture(scope="module")
def default_summary(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "more"
    return out, generate_demo(out, small_config(DemoDataConfig))


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    again = generate_demo(tmp_path / "again", small_config(DemoDataConfig, seed=3, **SMALL))
    assert files(tmp_path / "again") == files(small)
    assert again["facts"] == {s: len(read_records(small, s)) for s in SPLITS}
    generate_demo(tmp_path / "other", small_config(DemoDataConfig, seed=4, **SMALL))
    other = files(tmp_path / "other")
    assert other.keys() == files(small).keys()
    assert other["txt/train.txt"] != files(small)["txt/train.txt"]
    assert other["img_org/train/demo-train-00000.jpg"] != files(small)["img_org/train/demo-train-00000.jpg"]


def test_stage_logs_its_summary_to_its_mlflow_run(tmp_path, small):
    from morer1 import tracking

    summary = run(small_config(DemoDataConfig, seed=3, **SMALL), tmp_path / "more")
    assert files(tmp_path / "more") == files(small)
    mlflow = tracking.setup()
    (logged,) = mlflow.search_runs(output_format="list")
    assert logged.info.run_name == "demo_data" and logged.data.metrics["pairs.test"] == SMALL["test_pairs"]
    assert logged.data.metrics["facts.train"] == summary["facts"]["train"] == len(read_records(small, "train"))


def test_official_layout(small):
    rel2id = json.loads((small / "rel2id.json").read_text())
    assert list(rel2id) == list(DEFAULT_LABELS) and list(rel2id.values()) == list(range(len(DEFAULT_LABELS)))
    captions = json.loads((small / "caption_dict.json").read_text())
    for split in SPLITS:
        objects = torch.load(small / f"ent_{split}_dict.pth", weights_only=True)
        assert isinstance(objects, dict) and len(objects) == SMALL[f"{split}_pairs"]
        assert {p.name for p in (small / "img_org" / split).iterdir()} == set(objects)
        records = read_records(small, split)
        assert {r["img_id"] for r in records} == set(objects)
        for r in records:
            assert set(r) - {"text"} == {"img_id", "token", "h", "t", "relation"}
            assert r.get("text", " ".join(r["token"])) == " ".join(r["token"])
            start, end = r["h"]["pos"]
            assert r["token"][start:end] == r["h"]["name"]
            assert [float(v) for v in r["t"]["pos"]] == objects[r["img_id"]][r["t"]["name"]]
            assert r["relation"] in rel2id
        for img_id, boxes in objects.items():
            assert set(captions[img_id]) == set(boxes)
            pairs = {(tuple(r["h"]["pos"]), r["t"]["name"]) for r in records if r["img_id"] == img_id}
            entities = {e for e, _ in pairs}
            assert pairs == {(e, o) for e in entities for o in boxes}  # every object-entity combination


@pytest.mark.parametrize("dataset", ["small", "default_summary"])
def test_labels_follow_the_rule_from_pixels_and_tokens(dataset, request):
    out = request.getfixturevalue(dataset)
    out = out[0] if isinstance(out, tuple) else out
    captions = json.loads((out / "caption_dict.json").read_text())
    for split in SPLITS:
        images, objects = {}, {}
        for r in read_records(out, split):
            if r["img_id"] not in images:
                images[r["img_id"]] = np.asarray(Image.open(out / "img_org" / split / r["img_id"]).convert("RGB"))
            pixels = images[r["img_id"]]
            height, width = pixels.shape[:2]
            x0, y0, x1, y1 = box = pixel_box(r["t"]["pos"], width, height)
            assert min(x1 - x0, y1 - y0) >= 16 and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            key = (r["img_id"], r["t"]["name"])
            if key not in objects:
                objects[key] = read_object(pixels, box)
            shape, color = objects[key]
            assert captions[r["img_id"]][r["t"]["name"]] == f"a {color} {shape}"
            tokens, (start, end) = r["token"], r["h"]["pos"]
            ent_type = ENTITY_TYPE[" ".join(tokens[start:end])]
            expected = NONE
            if start >= 2 and tokens[start - 2] == color and tokens[start - 1] in CUE_RELATION:
                relation = CUE_RELATION[tokens[start - 1]]
                if type_pair(relation) == (SHAPE_TYPE[shape], ent_type):
                    expected = relation
            assert r["relation"] == expected, (r, shape, color)


def test_objects_are_disjoint_and_filler_words_are_not_rule_words(small):
    rule_words = set(PALETTE) | set(CUE_WORDS.values())
    names = [tok for name in ENTITY_TYPE for tok in name.split()]
    fillers = [tok for group in (LEADS, JOINS, TAILS) for phrase in group for tok in phrase]
    assert not rule_words & {w.lower() for w in names + fillers}
    assert len(set(CUE_WORDS.values())) == len(CUE_WORDS) == len(DEFAULT_LABELS) - 1
    for boxes in torch.load(small / "ent_train_dict.pth", weights_only=True).values():
        img_boxes = [pixel_box(b, 1000, 1000) for b in boxes.values()]
        for i, a in enumerate(img_boxes):
            for b in img_boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_box_and_text_fractions(tmp_path, fraction):
    generate_demo(tmp_path, small_config(DemoDataConfig, string_box_fraction=fraction, text_field_fraction=fraction, **SMALL))
    records = [r for s in SPLITS for r in read_records(tmp_path, s)]
    assert all(isinstance(r["t"]["pos"], tuple) for r in records)
    assert {type(v) for r in records for v in r["t"]["pos"]} == ({str} if fraction else {float})
    assert all(("text" in r) == bool(fraction) for r in records)


def test_default_sizes_cover_every_type_pair_and_label(default_summary):
    out, summary = default_summary
    captions = json.loads((out / "caption_dict.json").read_text())
    assert summary["pairs"] == {"train": 120, "valid": 180, "test": 180}
    for split in SPLITS:
        records = read_records(out, split)
        counts = Counter(r["relation"] for r in records)
        assert summary["facts"][split] == len(records) and summary["labels"][split] == dict(counts)
        assert 0.6 <= counts[NONE] / len(records) <= 0.8
        pairs = {(SHAPE_TYPE[captions[r["img_id"]][r["t"]["name"]].split()[-1]], ENTITY_TYPE[" ".join(r["h"]["name"])])
                 for r in records}
        assert pairs == set(TYPE_PAIRS)
        ratios = Counter(isinstance(r["t"]["pos"][0], str) for r in records)
        assert min(ratios.values()) > 0.3 * len(records)
    assert set(summary["labels"]["train"]) == set(DEFAULT_LABELS)


def test_replaces_an_earlier_demo_but_nothing_else(tmp_path):
    out = tmp_path / "more"
    generate_demo(out, small_config(DemoDataConfig, train_pairs=5, valid_pairs=1, test_pairs=1))
    generate_demo(out, small_config(DemoDataConfig, train_pairs=2, valid_pairs=1, test_pairs=1))
    assert len(list((out / "img_org" / "train").iterdir())) == 2
    assert not out.with_name("more.partial").exists() and not out.with_name("more.old").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a demo dataset"):
        generate_demo(out, small_config(DemoDataConfig))
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad", [
    {"objects_per_image": (3, 2)},
    {"objects_per_image": (2, 11)},
    {"entities_per_title": (0, 2)},
    {"image_size": (40, 160), "objects_per_image": (2, 10)},
    {"train_pairs": 0},
    {"string_box_fraction": 1.5},
    {"unknown": 1},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        DemoDataConfig(**bad)
