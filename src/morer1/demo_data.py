"""Synthetic demo dataset in the official MORE layout, labelled by a rule that needs image and title.

The rule (docs/demo_data.md): an object's type is the shape drawn in its box (circle per, square org,
triangle loc, diamond misc) and each object of an image has its own colour; an entity's type is given
by its name. The title may put a colour word and a cue word just before an entity. A fact is labelled
with the cue's relation when that colour is the object's colour and the cue's type pair is
(object type, entity type); every other fact is `none`.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import swap_in
from morer1.labels import DEFAULT_LABELS, NONE, TYPES, labels_for_pair, type_pair
from morer1.params import StageConfig

SPLITS = ("train", "valid", "test")
RELATIONS = tuple(label for label in DEFAULT_LABELS if label != NONE)
TYPE_PAIRS = tuple((o, e) for o in TYPES for e in TYPES)

SHAPES = {"per": "circle", "org": "square", "loc": "triangle", "misc": "diamond"}
PALETTE = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "orange": (245, 140, 30), "purple": (130, 50, 180), "pink": (240, 120, 190), "brown": (130, 80, 40),
    "black": (25, 25, 25), "cyan": (40, 190, 210),
}
CUE_WORDS = {
    "/per/per/opponent": "rival", "/per/per/partner": "ally", "/per/per/relatives": "kin",
    "/per/per/alternate_names": "alias", "/per/org/opposed_to": "critic", "/per/org/leader_of": "chief",
    "/per/org/member_of": "member", "/per/loc/place_of_birth": "native",
    "/per/loc/place_of_residence": "resident", "/per/loc/place_of_governance": "governor",
    "/per/misc/present_in": "attendee", "/per/misc/awarded": "laureate", "/per/misc/party": "partisan",
    "/per/misc/nationality": "citizen", "/per/misc/president": "president",
    "/org/org/alternate_names": "rebranded", "/org/org/subsidiary": "subsidiary", "/org/loc/locate_at": "based",
    "/org/misc/present_in": "exhibitor", "/loc/loc/contain": "containing",
}
ENTITY_NAMES = {
    "per": (
        "Alice Moreau", "Rahul Mehta", "Chen Wei", "Olga Petrova", "Tomas Berg", "Amara Okafor",
        "Lucia Fernandez", "Kenji Sato", "Nadia Haddad", "Pieter van Dijk", "Sofia Rossi", "Omar Farouk",
        "Greta Lindqvist", "Mateo Alvarez", "Ingrid Olsen", "Yusuf Demir", "Hana Kim", "Beatriz Costa",
        "Samuel Mensah", "Zaria",
    ),
    "org": (
        "Northwind Bank", "Helix Labs", "United Farmers Union", "Orion Motors", "Atlas Airways",
        "Vega Telecom", "Kestrel Media", "Summit Partners", "Global Health Fund", "Nova Energy",
        "Meridian Press", "Harbor Council", "Pioneer Football Club", "Apex Mining", "Lumen Institute",
        "Civic League", "Tidewater Rail", "Polaris Group", "Granite Trust", "Unicorp",
    ),
    "loc": (
        "Lisbon", "Nairobi", "Osaka", "Quebec", "Valparaiso", "Tbilisi", "Cape Town", "New Delhi",
        "Buenos Aires", "Rio de Janeiro", "Bavaria", "Patagonia", "Lake Victoria", "Crete", "Yukon", "Kyoto",
        "Marseille", "Gdansk", "Accra", "Hanoi",
    ),
    "misc": (
        "World Cup", "Nobel Prize", "Golden Lion", "Olympic Games", "Canadian", "Brazilian", "Labour Party",
        "Liberal Party", "Grammy Award", "Davis Cup", "Climate Summit", "Finnish", "Kenyan", "Peace Accord",
        "Booker Prize", "Tour de France", "Film Festival", "Senate Race", "Youth Olympics", "Chess Olympiad",
    ),
}
LEADS = ((), (), ("Breaking:",), ("Exclusive:",), ("Analysis:",))
JOINS = (
    ("meets",), ("faces",), ("joins",), ("and",), ("with",), ("visits",), ("backs",), ("after",), ("at",),
    ("over",), ("ahead", "of"), ("talks", "with"), ("amid", "row", "with"), ("praises",), ("versus",),
)
TAILS = (
    (), ("in", "landmark", "deal"), ("amid", "protests"), ("this", "week"), ("as", "talks", "stall"),
    ("after", "vote"), ("on", "Monday"), ("in", "final"),
)
MIN_SIDE = 16  # smallest object side in pixels
GAP = 2  # free pixels around each object inside its grid cell
JPEG_QUALITY = 95
LAYOUT = {"txt", "img_org", "rel2id.json", "caption_dict.json", *(f"ent_{s}_dict.pth" for s in SPLITS)}


class DemoDataConfig(StageConfig):
    """Parameters of the synthetic demo dataset (`morer1 demo-data`)."""

    seed: int = Field(0, description="Seed of the generator; the same seed and config give byte-identical files.")
    train_pairs: int = Field(..., ge=1, description="Image-title pairs in the train split.")
    valid_pairs: int = Field(180, ge=1, description="Image-title pairs in the valid split.")
    test_pairs: int = Field(180, ge=1, description="Image-title pairs in the test split.")
    image_size: tuple[int, int] = Field(
        (96, 160), description="Min and max image side in pixels; width and height are drawn independently."
    )
    objects_per_image: tuple[int, int] = Field(
        ..., description="Min and max objects drawn per image (at most 10, one colour each)."
    )
    entities_per_title: tuple[int, int] = Field(..., description="Min and max entities named per title.")
    link_fraction: float = Field(
        0.7, ge=0.0, le=1.0,
        description="Chance that an entity beyond the planted one is linked to an object it can relate to.",
    )
    distractor_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Chance that an unlinked entity gets a colour and cue that fit no object (a hard none).",
    )
    string_box_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of records whose `t.pos` is written as strings, not floats."
    )
    text_field_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of records that also carry `text`.")

    @model_validator(mode="after")
    def _check_ranges(self) -> DemoDataConfig:
        for name, upper in (("image_size", None), ("objects_per_image", len(PALETTE)), ("entities_per_title", 8)):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi or (upper is not None and hi > upper):
                raise ValueError(f"{name} must be 1 <= min <= max{f' <= {upper}' if upper else ''}, got {(lo, hi)}")
        side = self.image_size[0]
        cols, rows = _grid(self.objects_per_image[1], side, side)
        if min(side // cols, side // rows) - 2 * GAP < MIN_SIDE:
            raise ValueError(f"image_size min {side} px is too small for {self.objects_per_image[1]} objects")
        return self

    def pairs(self, split: str) -> int:
        """Image-title pairs of one split."""
        return getattr(self, f"{split}_pairs")


@dataclass(frozen=True)
class DemoObject:
    name: str
    type: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive

    @property
    def caption(self) -> str:
        return f"a {self.color} {SHAPES[self.type]}"


@dataclass(frozen=True)
class DemoEntity:
    type: str
    name: tuple[str, ...]
    link: tuple[str, str] | None  # (colour word, relation of the cue word) written before the name


def relations_for(obj_type: str, ent_type: str) -> list[str]:
    """The relations of one type pair (empty when the pair allows only `none`)."""
    return labels_for_pair(DEFAULT_LABELS, obj_type, ent_type)[1:]


def rule_label(obj_type: str, obj_color: str, ent_type: str, link: tuple[str, str] | None) -> str:
    """The demo rule: the cue's relation if the linked colour is the object's and the type pair fits, else none."""
    if link is None:
        return NONE
    color, relation = link
    return relation if color == obj_color and type_pair(relation) == (obj_type, ent_type) else NONE


def _grid(n: int, width: int, height: int) -> tuple[int, int]:
    """(cols, rows) with at least n cells that maximises the smaller cell side."""
    return max(((c, -(-n // c)) for c in range(1, n + 1)), key=lambda g: min(width // g[0], height // g[1]))


def _place_boxes(rng: random.Random, n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """n disjoint pixel boxes, one per random grid cell, each side >= MIN_SIDE and aspect <= 1.25."""
    cols, rows = _grid(n, width, height)
    cell_w, cell_h = width // cols, height // rows
    room_w, room_h = cell_w - 2 * GAP, cell_h - 2 * GAP
    boxes = []
    for cell in rng.sample(range(cols * rows), n):
        side = rng.randint(MIN_SIDE, min(room_w, room_h))
        w = min(room_w, side + rng.randint(0, side // 4))
        h = min(room_h, side + rng.randint(0, side // 4))
        x0 = (cell % cols) * cell_w + GAP + rng.randint(0, room_w - w)
        y0 = (cell // cols) * cell_h + GAP + rng.randint(0, room_h - h)
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _link(rng: random.Random, cfg: DemoDataConfig, ent_type: str, objects: list[tuple[str, str]]):
    """Colour and cue relation written before an entity: a true link, a distractor, or None."""
    if rng.random() < cfg.link_fraction:
        fitting = [(t, c) for t, c in objects if relations_for(t, ent_type)]
        if fitting:
            obj_type, color = rng.choice(fitting)
            return color, rng.choice(relations_for(obj_type, ent_type))
    if rng.random() < cfg.distractor_fraction:
        relation = rng.choice([r for r in RELATIONS if type_pair(r)[1] == ent_type])
        wrong_shape = [c for t, c in objects if t != type_pair(relation)[0]]
        absent = [c for c in PALETTE if c not in {c for _, c in objects}]
        kinds = [pool for pool in (wrong_shape, absent) if pool]
        if kinds:
            return rng.choice(rng.choice(kinds)), relation
    return None


def _make_pair(rng: random.Random, cfg: DemoDataConfig, relation: str, types: tuple[str, str]):
    """(width, height, objects, entities) of one pair that plants `relation` and holds type pair `types`."""
    width, height = rng.randint(*cfg.image_size), rng.randint(*cfg.image_size)
    n_obj, n_ent = rng.randint(*cfg.objects_per_image), rng.randint(*cfg.entities_per_title)
    rel_obj, rel_ent = type_pair(relation)
    obj_types = [rel_obj, types[0]][:n_obj] + [rng.choice(TYPES) for _ in range(n_obj - 2)]
    ent_types = [rel_ent, types[1]][:n_ent] + [rng.choice(TYPES) for _ in range(n_ent - 2)]
    objects = list(zip(obj_types, rng.sample(list(PALETTE), n_obj)))
    links = [(objects[0][1], relation)] + [_link(rng, cfg, t, objects) for t in ent_types[1:]]
    used: set[str] = set()
    entities = []
    for ent_type, link in zip(ent_types, links):
        name = rng.choice([n for n in ENTITY_NAMES[ent_type] if n not in used])
        used.add(name)
        entities.append(DemoEntity(ent_type, tuple(name.split()), link))
    rng.shuffle(objects)
    rng.shuffle(entities)
    boxes = _place_boxes(rng, n_obj, width, height)
    demo_objects = [DemoObject(f"object {k + 1}", t, c, b) for k, ((t, c), b) in enumerate(zip(objects, boxes))]
    return width, height, demo_objects, entities


def _make_title(rng: random.Random, entities: list[DemoEntity]) -> tuple[list[str], list[tuple[int, int]]]:
    """Headline tokens and the [start, end) span of each entity's name."""
    tokens = list(rng.choice(LEADS))
    spans = []
    for k, ent in enumerate(entities):
        if k:
            tokens += rng.choice(JOINS)
        if ent.link:
            tokens += [ent.link[0], CUE_WORDS[ent.link[1]]]
        spans.append((len(tokens), len(tokens) + len(ent.name)))
        tokens += ent.name
    tokens += rng.choice(TAILS)
    return tokens, spans


def _draw_image(width: int, height: int, objects: list[DemoObject], background: tuple[int, int, int]):
    """The image: each object's shape filled with its colour, touching all four sides of its box."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        right, bottom, mid_x, mid_y = x1 - 1, y1 - 1, (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        fill = PALETTE[obj.color]
        shape = SHAPES[obj.type]
        if shape == "circle":
            draw.ellipse((x0, y0, right, bottom), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, right, bottom), fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0, bottom), (right, bottom), (mid_x, y0)], fill=fill)
        else:
            draw.polygon([(mid_x, y0), (right, mid_y), (mid_x, bottom), (x0, mid_y)], fill=fill)
    return img


def _normalised_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[float, ...]:
    """(cx, cy, w, h) of a pixel box, rounded to 6 decimals."""
    x0, y0, x1, y1 = box
    return tuple(round(v, 6) for v in ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                        (x1 - x0) / width, (y1 - y0) / height))


def _write_split(out: Path, split: str, cfg: DemoDataConfig, captions: dict) -> Counter:
    """Images, txt lines and object dict of one split; returns its label counts."""
    import torch

    (out / "img_org" / split).mkdir(parents=True)
    lines, object_dict, labels = [], {}, Counter()
    for index in range(cfg.pairs(split)):
        rng = random.Random(f"{cfg.seed}/{split}/{index}")
        relation, types = RELATIONS[index % len(RELATIONS)], TYPE_PAIRS[index % len(TYPE_PAIRS)]
        width, height, objects, entities = _make_pair(rng, cfg, relation, types)
        tokens, spans = _make_title(rng, entities)
        img_id = f"demo-{split}-{index:05d}.jpg"
        background = tuple(rng.randint(215, 245) for _ in range(3))
        _draw_image(width, height, objects, background).save(
            out / "img_org" / split / img_id, format="JPEG", quality=JPEG_QUALITY, subsampling=0
        )
        boxes = {obj.name: _normalised_box(obj.box, width, height) for obj in objects}
        object_dict[img_id] = {name: list(box) for name, box in boxes.items()}
        captions[img_id] = {obj.name: obj.caption for obj in objects}
        for ent, (start, end) in zip(entities, spans):
            for obj in objects:
                label = rule_label(obj.type, obj.color, ent.type, ent.link)
                labels[label] += 1
                pos = boxes[obj.name]
                if rng.random() < cfg.string_box_fraction:
                    pos = tuple(str(v) for v in pos)
                record = {"img_id": img_id}
                if rng.random() < cfg.text_field_fraction:
                    record["text"] = " ".join(tokens)
                record.update(token=tokens, h={"name": list(ent.name), "pos": [start, end]},
                              t={"name": obj.name, "pos": pos}, relation=label)
                lines.append(repr(record))
    (out / "txt" / f"{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    buffer = io.BytesIO()  # saved via a buffer so the archive name inside the zip does not depend on the path
    torch.save(object_dict, buffer)
    (out / f"ent_{split}_dict.pth").write_bytes(buffer.getvalue())
    return labels


def _is_demo_output(path: Path) -> bool:
    """True when `path` holds nothing but an earlier demo dataset (so replacing it loses no real data)."""
    return {p.name for p in path.iterdir()} <= LAYOUT and all(
        p.name.startswith("demo-") for p in path.glob("img_org/*/*")
    )


def generate_demo(out_dir: Path, cfg: DemoDataConfig) -> dict:
    """Write the demo dataset into `out_dir` (official MORE layout); return facts and label counts per split.

    The dataset is built in `<out_dir>.partial` and swapped in at the end. An existing `out_dir` is
    replaced only if it is empty or an earlier demo dataset; anything else raises BadInputError.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not _is_demo_output(out_dir):
        raise BadInputError(f"{out_dir}: exists and is not a demo dataset; refusing to overwrite it")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "txt").mkdir(parents=True)

    captions: dict = {}
    summary: dict = {"pairs": {}, "facts": {}, "labels": {}}
    for split in SPLITS:
        labels = _write_split(staging, split, cfg, captions)
        summary["pairs"][split] = cfg.pairs(split)
        summary["facts"][split] = sum(labels.values())
        summary["labels"][split] = {label: labels[label] for label in DEFAULT_LABELS if labels[label]}
    (staging / "rel2id.json").write_text(json.dumps({label: i for i, label in enumerate(DEFAULT_LABELS)}) + "\n")
    (staging / "caption_dict.json").write_text(json.dumps(captions, indent=1) + "\n")

    swap_in(staging, out_dir)
    return summary


def run(cfg: DemoDataConfig, out: str | Path) -> dict:
    """The demo_data stage: `generate_demo` into `out` in an MLflow stage run; return and log the summary."""
    with tracking.stage_run("demo_data", cfg):
        summary = generate_demo(Path(out), cfg)
        tracking.log_summary(summary)
    return summary
