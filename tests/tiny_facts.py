"""Eight ingested facts over one photo, with crops, written as the ingest stage would."""

import json

from PIL import Image

from morer1.labels import DEFAULT_LABELS

RELATIONS = ["none", "/per/per/partner", "/per/loc/place_of_birth", "/org/loc/locate_at"]


def write_facts(root):
    """Eight ingested facts over one 120x90 photo, with crops."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "crops" / "train").mkdir(parents=True)
    Image.new("RGB", (120, 90), (20, 120, 200)).save(root / "images/train/a.jpg")
    facts = []
    for i in range(1, 9):
        rel = RELATIONS[i % 4]
        types = rel.strip("/").split("/")[:2] if rel != "none" else [None, None]
        crop = f"crops/train/train-{i:06d}.png"
        Image.new("RGB", (30 + i, 30), (200, 10 * i, 0)).save(root / crop)
        facts.append({"id": f"train-{i:06d}", "split": "train", "img_id": "a.jpg", "image": "images/train/a.jpg",
                      "width": 120, "height": 90, "text": f"red partner Alice meets Bob in Lyon {i}",
                      "tokens": [], "entity": {"name": "Lyon", "start": 6, "end": 7},
                      "object": {"name": f"object {i}", "box": [0, 0, 30 + i, 30], "crop": crop, "caption": "a red circle"},
                      "relation": rel, "object_type": types[0], "entity_type": types[1]})
    (root / "train.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    (root / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    return root


def write_sft_project(root):
    """The eight facts in `root/facts`, the template teacher's rationales for them in `root/sft` (train only) and a
    tiny model built on those rationales in `root/tiny`; `root`."""
    from configs import small_config
    from morer1.synthesize import SynthesizeConfig, synthesize
    from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus

    facts = write_facts(root / "facts")
    synthesize(facts, root / "sft", small_config(SynthesizeConfig, splits=("train",), none_fraction=None))
    build_tiny_model(root / "tiny", sft_corpus(root / "sft"), small_config(TinyModelConfig, vocab_size=600))
    return root
