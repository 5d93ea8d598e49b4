"""The tiny Qwen2.5-VL: builds offline, loads through the shared loader, takes two images, generates, trains."""

import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from configs import small_config  # noqa: E402
from morer1.errors import BadInputError  # noqa: E402
from morer1.modeling import (  # noqa: E402
    ModelFolderError,
    image_token_count,
    load_model_and_processor,
)
from morer1.tiny_model import (  # noqa: E402
    REASONING_TOKENS,
    TinyModelConfig,
    build_tiny_model,
    run,
    train_tokenizer,
)

DEMO_ANSWER = (
    "<think>\n"
    "Step 1: The first image shows a stage; the crop is a person at its left, clearly visible.\n"
    "Step 2: The image matches the title \"Angela Merkel speaks in Berlin\".\n"
    "Step 3: The object is Angela Merkel; the target entity is Berlin.\n"
    "Step 4: The object is per, the entity is loc.\n"
    "Step 5: Candidates: none, /per/loc/place_of_birth, /per/loc/place_of_residence, /per/loc/place_of_governance.\n"
    "Step 6: She governs from Berlin.\n"
    "</think>\n"
    "<answer>/per/loc/place_of_governance</answer>"
)
CORPUS = [
    DEMO_ANSWER,
    "Title: Barack Obama meets Angela Merkel at the summit in Brussels",
    "Target entity: Brussels. Candidate labels: none /per/per/partner /org/loc/locate_at /loc/loc/contain",
    "Types: per org loc misc. Reason step by step inside <think> </think>, answer inside <answer> </answer>.",
] * 20
CFG = small_config(TinyModelConfig, vocab_size=600)


def two_image_message(text="Title: Obama meets Merkel. Entity: Merkel."):
    """A user turn with a full image (128x96) and an object crop (40x40), as the MORE-R1 prompt has."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (128, 96), (200, 30, 30))},
                {"type": "image", "image": Image.new("RGB", (40, 40), (30, 30, 200))},
                {"type": "text", "text": text},
            ],
        }
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(summary, folder) of one tiny model built for the whole module."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    start = time.perf_counter()
    summary = build_tiny_model(out, CORPUS, CFG)
    summary["build_seconds"] = round(time.perf_counter() - start, 2)
    print("tiny model:", summary)
    return summary, out


@pytest.fixture(scope="module")
def loaded(built):
    return load_model_and_processor(built[1])


def test_folder_loads_with_auto_classes(built, loaded):
    summary, folder = built
    model, processor = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.video_processor is not None
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(summary["files"])
    assert summary["parameters"] == sum(p.numel() for p in model.parameters()) < 1_000_000
    assert summary["vocab_size"] == len(processor.tokenizer) == model.config.text_config.vocab_size
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    assert processor.tokenizer.padding_side == "left"
    assert "{%- generation %}" in processor.chat_template
    assert not folder.with_name("model.tmp").exists()


def test_image_token_counts(loaded):
    _, processor = loaded
    assert image_token_count(processor, 128, 128) == 16
    assert image_token_count(processor, 40, 40) == 4
    assert image_token_count(processor, 160, 96) <= 16


def test_two_images_through_chat_template_and_generate(loaded):
    model, processor = loaded
    inputs = processor.apply_chat_template(
        two_image_message(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["image_grid_thw"].shape == (2, 3)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == image_token_count(processor, 128, 96) + image_token_count(processor, 40, 40)

    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert prompt_length < output.shape[1] <= prompt_length + 8


def test_processor_call_batches_prompts_with_left_padding(loaded):
    model, processor = loaded
    texts = [
        processor.apply_chat_template(two_image_message(text), add_generation_prompt=True, tokenize=False)
        for text in ("short", "a much longer title with many more words in it")
    ]
    assert texts[0].endswith("<|im_start|>assistant\n")
    images = [[m["image"] for m in two_image_message()[0]["content"][:2]] for _ in texts]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[0] == 2


def test_reasoning_tags_survive_decode_and_round_trip(loaded):
    _, processor = loaded
    tokenizer = processor.tokenizer
    ids = tokenizer(DEMO_ANSWER + "<|im_end|>")["input_ids"]
    for tag in REASONING_TOKENS:
        assert tokenizer.convert_tokens_to_ids(tag) in ids  # one token each
    assert tokenizer.decode(ids, skip_special_tokens=True) == DEMO_ANSWER
    assert tokenizer.decode(ids) == DEMO_ANSWER + "<|im_end|>"
    odd = "Ünïcode 東京 — 3.14 <think>  two  spaces </think>"
    assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd


def test_assistant_mask_covers_exactly_the_answer(loaded):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    _, processor = loaded
    messages = two_image_message() + [{"role": "assistant", "content": [{"type": "text", "text": DEMO_ANSWER}]}]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    mask = out["assistant_masks"][0].bool()
    assert processor.tokenizer.decode(out["input_ids"][0][mask]) == DEMO_ANSWER + "<|im_end|>\n"
    assert is_chat_template_stop_token_trained(processor)


def test_same_seed_same_weights(built, tmp_path):
    _, folder = built
    again = build_tiny_model(tmp_path / "again", CORPUS, CFG)
    other = build_tiny_model(tmp_path / "other", CORPUS, CFG.model_copy(update={"seed": 1}))
    reference = load_file(folder / "model.safetensors")
    same = load_file(tmp_path / "again" / "model.safetensors")
    different = load_file(tmp_path / "other" / "model.safetensors")
    assert reference.keys() == same.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert any(not torch.equal(reference[k], different[k]) for k in reference)
    assert (folder / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()
    assert again["parameters"] == other["parameters"]


def test_training_step_changes_parameters(built):
    model, processor = load_model_and_processor(built[1])
    model.train()
    messages = two_image_message() + [{"role": "assistant", "content": [{"type": "text", "text": DEMO_ANSWER}]}]
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert any(name.startswith("model.visual.") for name in changed)
    assert any(name.startswith("model.language_model.") for name in changed)


def test_stage_trains_the_tokenizer_on_the_sft_set_and_logs_its_summary(tmp_path):
    import json

    from morer1 import tracking

    sft = tmp_path / "sft"
    sft.mkdir()
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CORPUS[1]}]},
                        {"role": "assistant", "content": [{"type": "text", "text": DEMO_ANSWER}]}]}
    (sft / "train.jsonl").write_text((json.dumps(row) + "\n") * 20)
    summary = run(CFG, sft, tmp_path / "model")
    assert summary["parameters"] < 1_000_000 and (tmp_path / "model" / "tokenizer.json").is_file()
    _, processor = load_model_and_processor(tmp_path / "model")
    assert processor.tokenizer.get_vocab() == train_tokenizer([CORPUS[1], DEMO_ANSWER] * 20, CFG.vocab_size).get_vocab()
    mlflow = tracking.setup()
    (logged,) = mlflow.search_runs(output_format="list")
    assert logged.info.run_name == "tiny_model" and logged.data.metrics["vocab_size"] == summary["vocab_size"]


def test_rebuild_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(BadInputError, match=str(tmp_path)):
        build_tiny_model(tmp_path, CORPUS, CFG)


def test_loader_names_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelFolderError, match=str(tmp_path)):
        load_model_and_processor(tmp_path)


def test_tokenizer_alone_keeps_tags_as_single_tokens():
    tokenizer = train_tokenizer(CORPUS, 400)
    ids = tokenizer("<answer>none</answer>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<answer>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("</answer>")


@pytest.mark.parametrize(
    "bad",
    [
        {"hidden_size": 60, "num_attention_heads": 4},  # odd head dim
        {"num_attention_heads": 4, "num_key_value_heads": 3},
        {"vision_hidden_size": 24, "vision_num_heads": 4},  # vision head dim 6
        {"min_pixels": 100},
        {"min_pixels": 28 * 28 * 20},  # above max_pixels
        {"unknown_key": 1},
    ],
)
def test_config_rejects_bad_shapes(bad):
    with pytest.raises(ValidationError):
        TinyModelConfig(**bad)
