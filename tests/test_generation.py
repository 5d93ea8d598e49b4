"""Batched generation with the tiny Qwen2.5-VL."""

import json

import pytest
import torch
from PIL import Image

from configs import small_config
from morer1 import generation
from morer1.generation import generate_completions
from morer1.labels import DEFAULT_LABELS
from morer1.modeling import load_model_and_processor
from morer1.prompt import prompt_messages, prompt_text
from morer1.tiny_model import TinyModelConfig, build_tiny_model

RELATIONS = ["none", "/per/per/partner", "/per/loc/place_of_birth", "/org/loc/locate_at"]
LABELS = list(DEFAULT_LABELS)
N_FACTS = 6


def _facts(root):
    """Six facts with titles of different lengths and crops of different shapes (different prompt lengths)."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "crops" / "train").mkdir(parents=True)
    Image.new("RGB", (120, 90), (20, 120, 200)).save(root / "images/train/a.jpg")
    facts = []
    for i in range(1, N_FACTS + 1):
        rel = RELATIONS[i % 4]
        types = rel.strip("/").split("/")[:2] if rel != "none" else [None, None]
        crop = f"crops/train/train-{i:06d}.png"
        Image.new("RGB", (20 + 25 * i, 30), (200, 30 * i, 0)).save(root / crop)
        title = "Alice meets Bob in Lyon " + " ".join(["again"] * (3 * i))
        facts.append({"id": f"train-{i:06d}", "split": "train", "img_id": "a.jpg", "image": "images/train/a.jpg",
                      "width": 120, "height": 90, "text": title, "tokens": title.split(),
                      "entity": {"name": "Lyon", "start": 4, "end": 5},
                      "object": {"name": f"object {i}", "box": [0, 0, 20 + 25 * i, 30], "crop": crop, "caption": None},
                      "relation": rel, "object_type": types[0], "entity_type": types[1]})
    (root / "train.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    return facts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Facts and a tiny model whose weights are scaled up so that its greedy output depends on the input.

    At its initial scale (std 0.02) the random model repeats one token whatever the prompt, which would make
    every batch-invariance check pass trivially.
    """
    root = tmp_path_factory.mktemp("gen")
    facts = _facts(root / "facts")
    texts = [prompt_text(f["text"], "Lyon", LABELS) for f in facts] + ["<think>Step 1: a</think><answer>none</answer>"]
    build_tiny_model(root / "tiny", texts, small_config(TinyModelConfig, vocab_size=600))
    model, _ = load_model_and_processor(root / "tiny")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(root / "tiny")
    model, processor = load_model_and_processor(root / "tiny")
    return {"root": root, "facts": facts, "model": model, "processor": processor}


def _gen(tiny, facts=None, **kw):
    kw = {"max_new_tokens": 12, "batch_size": 4, "progress": False, **kw}
    return generate_completions(tiny["model"], tiny["processor"], tiny["facts"] if facts is None else facts,
                                tiny["root"] / "facts", LABELS, **kw)


def test_prompts_differ_in_length(tiny):
    processor = tiny["processor"]
    lengths = {len(processor(text=[processor.apply_chat_template(prompt_messages(f, LABELS), tokenize=False,
                                                                 add_generation_prompt=True)],
                             images=[[generation.load_rgb(p) for p in (tiny["root"] / "facts" / f["image"],
                                                                       tiny["root"] / "facts" / f["object"]["crop"])]],
                             return_tensors="pt")["input_ids"][0]) for f in tiny["facts"]}
    assert len(lengths) == N_FACTS


def test_greedy_gives_one_string_per_fact_and_is_deterministic(tiny):
    first = _gen(tiny)
    assert len(first) == N_FACTS and all(len(c) == 1 and isinstance(c[0], str) and c[0] for c in first)
    assert _gen(tiny) == first
    assert len({c[0] for c in first}) > 1  # the output depends on the prompt


def test_left_padded_batches_match_one_fact_at_a_time(tiny):
    batched = _gen(tiny, batch_size=N_FACTS)
    alone = [_gen(tiny, facts=[f], batch_size=1)[0] for f in tiny["facts"]]
    assert batched == alone
    assert _gen(tiny, facts=tiny["facts"][::-1], batch_size=3) == batched[::-1]


def test_sampling_gives_k_strings_per_fact_reproducibly(tiny):
    k = 3
    sampled = _gen(tiny, num_return_sequences=k, do_sample=True, seed=5)
    assert len(sampled) == N_FACTS and all(len(c) == k for c in sampled)
    assert _gen(tiny, num_return_sequences=k, do_sample=True, seed=5) == sampled
    assert _gen(tiny, num_return_sequences=k, do_sample=True, seed=6) != sampled
    assert any(len(set(c)) > 1 for c in sampled)  # the k rollouts of a fact differ
    before = torch.random.get_rng_state()
    _gen(tiny, do_sample=True, seed=9)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone


def test_the_k_samples_of_a_fact_belong_to_that_fact(tiny):
    """At a vanishing temperature sampling is greedy: each group of k equals that fact's greedy output."""
    greedy = _gen(tiny, max_new_tokens=6)
    cold = _gen(tiny, max_new_tokens=6, num_return_sequences=2, do_sample=True, temperature=1e-4)
    assert cold == [[g[0], g[0]] for g in greedy]


def test_greedy_refuses_several_sequences(tiny):
    with pytest.raises(ValueError):
        _gen(tiny, num_return_sequences=2)
    assert _gen(tiny, facts=[]) == []
