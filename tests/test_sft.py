"""A tiny SFT run on template rationales: parameters change, loss falls, a rerun resumes from a checkpoint."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from morer1.labels import DEFAULT_LABELS
from morer1.sft import SFTConfig, drop_overlong, read_sft_rows, train_sft
from morer1.synthesize import SynthesizeConfig, synthesize
from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus

RELATIONS = ["none", "/per/per/partner", "/per/loc/place_of_birth", "/org/loc/locate_at"]


def _facts(root):
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    facts = _facts(root / "facts")
    synthesize(facts, root / "sft", SynthesizeConfig(splits=("train",), none_fraction=None))
    build_tiny_model(root / "tiny", sft_corpus(root / "sft"), TinyModelConfig(vocab_size=600))
    return root


def _cfg(root, **kw):
    base = dict(model=str(root / "tiny"), learning_rate=5e-3, max_steps=6, per_device_train_batch_size=2,
                logging_steps=1, save_steps=3, checkpoint_dir=str(root / "ckpt"), max_length=2048)
    return SFTConfig(**{**base, **kw})


def test_sft_changes_parameters_and_lowers_the_loss(setup):
    summary = train_sft(setup / "sft", setup / "out", _cfg(setup))
    assert summary["steps"] == 6 and summary["train_samples"] == 8 and summary["dropped_overlong"] == 0
    assert summary["last_logged_loss"] < summary["first_logged_loss"]
    before, after = load_file(setup / "tiny" / "model.safetensors"), load_file(setup / "out" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert (setup / "out" / "processor_config.json").exists() or (setup / "out" / "preprocessor_config.json").exists()
    assert json.loads((setup / "out" / "sft_summary.json").read_text())["steps"] == 6


def test_a_rerun_resumes_from_the_last_checkpoint(setup):
    cfg = _cfg(setup, checkpoint_dir=str(setup / "ckpt-resume"))
    train_sft(setup / "sft", setup / "out2", cfg)
    shutil.rmtree(setup / "ckpt-resume" / "sft" / "checkpoint-6")  # as if the job died after step 3
    summary = train_sft(setup / "sft", setup / "out2", cfg)
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 6
    other = train_sft(setup / "sft", setup / "out3", _cfg(setup, checkpoint_dir=cfg.checkpoint_dir, learning_rate=1e-3))
    assert other["resumed_from"] is None  # another job never resumes from these checkpoints


def test_overlong_samples_are_dropped_not_truncated(setup):
    from morer1.modeling import load_model_and_processor

    _, processor = load_model_and_processor(setup / "tiny")
    rows = read_sft_rows(setup / "sft" / "train.jsonl")
    kept, dropped = drop_overlong(rows, processor, max_length=10)
    assert kept == [] and dropped == len(rows)
