"""The SFT preflight (issue 24 §2): caught before anything is trained or a teacher is paid, in one line per problem
naming the params keys and the numbers."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_facts import write_sft_project

from configs import small_config
from morer1.files import read_jsonl
from morer1.modeling import load_model_and_processor
from morer1.preflight import (
    GENERATION_CAPS,
    PreflightError,
    PromptBudget,
    check_sft,
    completion_lengths,
    generation_caps,
    rows_of,
)
from morer1.sft import SFTConfig, run
from morer1.synthesize import SynthesizeConfig, synthesize
from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus

REPO = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The template teacher's rationales (the issue's case: the longest ones) and a tiny model built on them."""
    return write_sft_project(tmp_path_factory.mktemp("preflight"))


def _cfg(root, **kw):
    base = dict(model=str(root / "tiny"), max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_steps=2,
                checkpoint_dir=str(root / "ckpt"), max_length=2048)
    return small_config(SFTConfig, **{**base, **kw})


def _longest(root) -> tuple[int, int]:
    """Tokens of the longest SFT completion of the fixture, and its row number in train.jsonl."""
    _, processor = load_model_and_processor(root / "tiny")
    rows = rows_of(root / "sft" / "train.jsonl", read_jsonl(root / "sft" / "train.jsonl"))
    lengths = completion_lengths(processor.tokenizer, rows)
    longest = max(lengths)
    return longest, lengths.index(longest) + 1


def test_a_generation_cap_below_the_longest_rationale_fails_before_training_naming_keys_and_numbers(setup):
    longest, row = _longest(setup)
    caps = {"rollout.max_completion_length": longest - 1, "evaluate.max_new_tokens": longest,
            "register.max_new_tokens": 8}
    with pytest.raises(PreflightError) as failure:
        run(_cfg(setup, checkpoint_dir=str(setup / "ckpt-caps")), setup / "sft", setup / "out-caps", caps=caps)
    message = str(failure.value)
    assert message.startswith(
        f"preflight: the longest SFT rationale is {longest} tokens ({setup / 'sft' / 'train.jsonl'} row {row}) but "
        f"rollout.max_completion_length is {longest - 1}, register.max_new_tokens 8: raise them to at least {longest}")
    assert "evaluate.max_new_tokens" not in message  # it holds the longest rationale
    assert not (setup / "out-caps").exists() and not (setup / "ckpt-caps").exists()  # nothing was trained
    # caps that hold it pass; `warn` trains anyway
    summary = run(_cfg(setup, checkpoint_dir=str(setup / "ckpt-warn"), generation_caps_check="warn", max_steps=1),
                  setup / "sft", setup / "out-warn", caps=caps)
    assert summary["steps"] == 1 and summary["longest_rationale_tokens"] == longest


def test_the_caps_are_read_from_every_section_of_params_and_dvc_reruns_sft_when_they_change(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"rollout": {"max_completion_length": 100}, "evaluate": {"max_new_tokens": 90},
                                      "register": {"max_new_tokens": 80}, "sft": {"dev_f1_max_new_tokens": 70}}))
    assert generation_caps(params, dev_f1_every=500, dev_f1_max_new_tokens=70) == {
        "rollout.max_completion_length": 100, "evaluate.max_new_tokens": 90, "sft.dev_f1_max_new_tokens": 70,
        "register.max_new_tokens": 80}
    assert "sft.dev_f1_max_new_tokens" not in generation_caps(params, dev_f1_every=0, dev_f1_max_new_tokens=70)
    assert generation_caps(None, 0, 70) == {}
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sft"]["params"]
    for key in GENERATION_CAPS:
        assert key in declared or key.split(".")[0] in declared, key


def test_the_demo_data_passes_with_the_demo_params(tmp_path):
    """The demo as params.yaml runs it (demo teacher, compact prompt, tiny model), on a small draw of its data."""
    from morer1.demo_data import DemoDataConfig, generate_demo
    from morer1.ingest import IngestConfig, ingest
    from morer1.modeling import set_pixel_bounds

    generate_demo(tmp_path / "demo", DemoDataConfig(**{**PARAMS["demo_data"], "train_pairs": 60, "valid_pairs": 6,
                                                       "test_pairs": 1}))
    ingest(tmp_path / "demo", tmp_path / "facts", IngestConfig(**{**PARAMS["ingest"], "workers": 0}))
    synthesize(tmp_path / "facts", tmp_path / "sft", SynthesizeConfig(**PARAMS["synthesize"]))
    build_tiny_model(tmp_path / "tiny", sft_corpus(tmp_path / "sft"), TinyModelConfig(**PARAMS["tiny_model"]))
    cfg = SFTConfig(**{**PARAMS["sft"], "model": str(tmp_path / "tiny")})
    model, processor = load_model_and_processor(cfg.model)
    set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    caps = generation_caps(REPO / "params.yaml", cfg.dev_f1_every, cfg.dev_f1_max_new_tokens)
    assert set(caps) == set(GENERATION_CAPS)
    train, dev = tmp_path / "sft" / "train.jsonl", tmp_path / "sft" / "dev.jsonl"
    checked = check_sft(model, processor, {train: read_jsonl(train)}, {dev: read_jsonl(dev)},
                        max_length=cfg.max_length, max_dropped_fraction=cfg.max_dropped_fraction, caps=caps)
    assert checked.numbers["dropped_overlong"] == 0 and len(checked.kept[train]) == len(read_jsonl(train))
    assert 0 < checked.numbers["longest_rationale_tokens"] <= min(caps.values())


def _tampered(root, name: str, edit) -> Path:
    """A copy of the tiny model with one of its JSON files edited."""
    copy = root / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root / "tiny", copy)
    file, change = edit
    data = json.loads((copy / file).read_text())
    change(data)
    (copy / file).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("edit, found", [
    (("processor_config.json", lambda d: d["image_processor"].update(merge_size=4)),
     "image processor merge_size 4.* but the model's vision tower gives \\d+ image features .*do not match"),
    (("processor_config.json", lambda d: d["image_processor"].update(merge_size=1)),
     "merge_size 1.* but the model's vision tower cannot encode those pixels"),
    (("config.json", lambda d: d.update(image_token_id=d["video_token_id"])),
     "writes 0 image placeholder tokens .*vision tower gives \\d+ image features"),
], ids=["processor-merge-size-4", "processor-merge-size-1", "model-image-token-id"])
def test_an_image_token_count_that_differs_between_processor_and_model_is_caught(setup, edit, found):
    model, processor = load_model_and_processor(_tampered(setup, "tampered", edit))
    train = setup / "sft" / "train.jsonl"
    with pytest.raises(PreflightError) as failure:
        check_sft(model, processor, {train: read_jsonl(train)}, {}, max_length=4096, max_dropped_fraction=0.05, caps={})
    message = str(failure.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"preflight: on {train} row 1 (2 images: photo + crop)")
    assert re.search(found, message), message
    model, processor = load_model_and_processor(setup / "tiny")  # the untouched model passes
    check_sft(model, processor, {train: read_jsonl(train)}, {}, max_length=4096, max_dropped_fraction=0.05, caps={})


def test_samples_longer_than_max_length_fail_above_the_bound_and_are_dropped_below_it(setup):
    from morer1.preflight import sequence_length

    model, processor = load_model_and_processor(setup / "tiny")
    train = setup / "sft" / "train.jsonl"
    rows = read_jsonl(train)
    lengths = sorted(sequence_length(processor, r["messages"], r["images"]) for r in rows)
    below_longest = lengths[-1] - 1  # drops the longest row(s) only
    dropped = sum(n > below_longest for n in lengths)
    kept = check_sft(model, processor, {train: rows}, {}, max_length=below_longest,
                     max_dropped_fraction=dropped / len(rows), caps={}, check_images=False)
    assert kept.numbers["dropped_overlong"] == dropped and len(kept.kept[train]) == len(rows) - dropped
    with pytest.raises(PreflightError, match=re.escape(
            f"preflight: {dropped} of {len(rows)} SFT training samples ({dropped / len(rows):.1%}) are longer than "
            f"sft.max_length {below_longest} tokens and would be dropped (the longest {lengths[-1]} tokens")) as failure:
        check_sft(model, processor, {train: rows}, {}, max_length=below_longest, max_dropped_fraction=0.0, caps={},
                  check_images=False)
    assert f"raise sft.max_length to at least {lengths[-1]}" in str(failure.value)
    with pytest.raises(PreflightError, match="would be dropped .*: all of them"):  # all dropped fails at any bound
        check_sft(model, processor, {train: rows}, {}, max_length=16, max_dropped_fraction=1.0, caps={},
                  check_images=False)


def test_prompts_too_long_for_sft_fail_before_the_teacher_is_asked(setup, tmp_path):
    class Teacher:
        stats: dict = {}

        def generate(self, requests):
            raise AssertionError("the teacher was asked")

    cfg = small_config(SynthesizeConfig, splits=("train",), none_fraction=None)
    budget = PromptBudget(str(setup / "tiny"), max_length=20, max_dropped_fraction=0.05)
    with pytest.raises(PreflightError, match=r"^preflight: 8 of 8 train prompts with their images, before any "
                                             r"rationale, \(100.0%\) are longer than sft.max_length 20 tokens .*"
                                             r"train fact train-\d+.*before the teacher is paid"):
        synthesize(setup / "facts", tmp_path / "sft", cfg, teacher=Teacher(), budget=budget)
    assert not (tmp_path / "sft").exists()
    # a base model that is not there yet (the tiny model is built from the SFT set): checked at the start of sft
    missing = PromptBudget(str(tmp_path / "no-model"), max_length=20, max_dropped_fraction=0.05)
    with pytest.raises(AssertionError, match="the teacher was asked"):
        synthesize(setup / "facts", tmp_path / "sft", cfg, teacher=Teacher(), budget=missing)


def test_the_synthesize_command_checks_the_prompts_against_the_sft_params_before_a_paid_teacher(setup, tmp_path,
                                                                                                capsys):
    from morer1 import cli
    from morer1.errors import EXIT_BAD_INPUT

    params = {"synthesize": {"teacher": "openai", "prompt": "full", "splits": ["train"], "none_fraction": None,
                             "openai": {"base_url": "http://127.0.0.1:9/v1", "cache_dir": str(tmp_path / "cache")}},
              "sft": {**PARAMS["sft"], "model": str(setup / "tiny"), "max_length": 20}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    with pytest.raises(SystemExit) as exit_:  # no endpoint is there: the preflight stops it before any request
        cli.main(["--params", str(tmp_path / "params.yaml"), "synthesize", "--facts", str(setup / "facts"),
                  "--out", str(tmp_path / "sft")])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "morer1 synthesize: error: preflight: 8 of 8 train prompts with their images" in capsys.readouterr().err
