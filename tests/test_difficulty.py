"""Difficulty: a rollout passes exactly when GRPO's accuracy reward pays it; pools, summary, the stage's run()."""

import json

import pytest
import yaml
from tiny_facts import write_facts

from configs import small_config
from morer1 import cli, generation
from morer1.difficulty import DifficultyConfig, difficulty_summary, pool_of, run, score_rollouts, select_facts
from morer1.files import read_jsonl
from morer1.labels import DEFAULT_LABELS
from morer1.rewards import RewardsConfig, make_accuracy_reward
from morer1.rollout import RolloutConfig
from morer1.tiny_model import TinyModelConfig, build_tiny_model


def say(label: str) -> str:
    return f"<think>Step 1: a</think><answer>{label}</answer>"


def test_scoring_pools_and_summary():
    facts = [{"id": f"f{i}", "relation": rel} for i, rel in enumerate(["none", "/per/per/partner", "/org/loc/locate_at"])]
    completions = [
        [say("none")] * 4,  # solved
        [say("/per/per/partner"), say("none"), "garbage", say("per/per/partner/")],  # 2 of 4
        [say("none"), "<answer>/org/loc/locate_at", say("/org/loc/locate_at /per/per/partner"), say("none")],  # 0
    ]
    result = score_rollouts(facts, completions, DEFAULT_LABELS, RewardsConfig())
    assert [(r["id"], r["passes"], r["rollouts"], r["pass_rate"]) for r in result] == [
        ("f0", 4, 4, 1.0), ("f1", 2, 4, 0.5), ("f2", 0, 4, 0.0)]
    summary = difficulty_summary(result)
    assert (summary["solved"], summary["learnable"], summary["hard"]) == (1, 1, 1)
    assert [b["count"] for b in summary["histogram"]] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert summary["by_relation"]["none"] == {"learnable": 0, "hard": 0, "solved": 1}


@pytest.mark.parametrize("requires_format", [True, False], ids=["format-required", "format-not-required"])
def test_a_rollout_passes_exactly_when_the_accuracy_reward_pays_it(requires_format):
    rewards = RewardsConfig(accuracy_requires_format=requires_format)
    unformatted = "Step 1: a red circle.<answer>/per/per/partner</answer>"  # no think block: tags not valid
    cased = "<think>Step 1: a</think><answer> Per/PER/partner. </answer>"
    facts = [{"id": "canonical", "relation": "/per/per/partner"},
             {"id": "gold-cased", "relation": " /PER/per/Partner "},  # the reward normalises the gold, too
             {"id": "none", "relation": "none"}]
    completions = [[say("/per/per/partner"), unformatted, cased, say("none")],
                   [say("/per/per/partner"), unformatted, cased, say("none")],
                   [say("none"), "<think>x</think><answer>NONE</answer>", "<answer>none</answer>", "none"]]
    accuracy = make_accuracy_reward(rewards, DEFAULT_LABELS)
    rows = score_rollouts(facts, completions, DEFAULT_LABELS, rewards)
    for fact, texts, row in zip(facts, completions, rows):
        paid = accuracy(texts, [fact["relation"]] * len(texts))
        assert row["passes"] == sum(score == 1.0 for score in paid)
    assert [r["passes"] for r in rows] == ([2, 2, 2] if requires_format else [3, 3, 3])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("difficulty")
    write_facts(root / "facts")
    build_tiny_model(root / "tiny", [say(label) for label in DEFAULT_LABELS], small_config(TinyModelConfig, vocab_size=600))
    return root


def _rollout(tiny, **kw):
    return RolloutConfig(**{"model": str(tiny / "tiny"), "num_generations": 2, "max_completion_length": 8, **kw})


def test_run_samples_k_rollouts_per_fact_in_file_order_and_logs_them(tiny, tmp_path):
    import mlflow

    facts = read_jsonl(tiny / "facts" / "train.jsonl")
    summary = run(small_config(DifficultyConfig, batch_size=3), _rollout(tiny), tiny / "facts", tmp_path / "all")
    rows = read_jsonl(tmp_path / "all" / "difficulty.jsonl")
    assert [r["id"] for r in rows] == [f["id"] for f in facts]
    assert all(r["rollouts"] == 2 and r["pass_rate"] == r["passes"] / 2 for r in rows)
    assert json.loads((tmp_path / "all" / "difficulty_summary.json").read_text()) == summary == difficulty_summary(rows)

    stage = mlflow.last_active_run()
    assert stage.data.tags["morer1.stage"] == "difficulty"
    assert stage.data.params["rollout.num_generations"] == "2" and stage.data.params["difficulty.batch_size"] == "3"
    assert stage.data.metrics["facts"] == len(facts)

    run(small_config(DifficultyConfig, max_samples=3), _rollout(tiny), tiny / "facts", tmp_path / "sample")
    order = [f["id"] for f in facts]
    sample = [order.index(r["id"]) for r in read_jsonl(tmp_path / "sample" / "difficulty.jsonl")]
    assert len(sample) == 3 and sample == sorted(sample)


def _scripted(calls):
    """Fact i answers its gold in (i mod 5) of k rollouts (4 or more: all), half of them without the think block."""

    def generate(model, processor, facts, facts_dir, labels, *, num_return_sequences, **decoding):
        calls.update(k=num_return_sequences, **decoding)
        out = []
        for i, fact in enumerate(facts):
            passes = min(i % 5, num_return_sequences)
            good = [say(fact["relation"]) if j % 2 else f"<answer>{fact['relation']}</answer>" for j in range(passes)]
            out.append(good + [say("/loc/loc/contain")] * (num_return_sequences - passes))
        return out

    return generate


@pytest.mark.parametrize("requires_format", [False, True])
def test_run_draws_as_the_rollout_section_says_and_scores_with_its_rewards(tiny, tmp_path, monkeypatch, requires_format):
    calls = {}
    monkeypatch.setattr(generation, "generate_completions", _scripted(calls))
    rollout = _rollout(tiny, num_generations=4, temperature=0.9, max_completion_length=20,
                       rewards=RewardsConfig(accuracy_requires_format=requires_format))
    run(small_config(DifficultyConfig, batch_size=5, seed=3), rollout, tiny / "facts", tmp_path)
    assert calls == {"k": 4, "do_sample": True, "temperature": 0.9, "max_new_tokens": 20, "top_p": 1.0, "top_k": 0,
                     "batch_size": 5, "seed": 3, "prompt": "full"}
    rows = read_jsonl(tmp_path / "difficulty.jsonl")
    answered = [0, 1, 2, 3, 4, 0, 1, 2]  # per fact; the even-numbered of them lack the think block
    assert [r["passes"] for r in rows] == (answered if not requires_format else [n // 2 for n in answered])
    assert [pool_of(r["passes"], r["rollouts"]) for r in rows][:5] == (
        ["hard", "learnable", "learnable", "learnable", "solved"] if not requires_format
        else ["hard", "hard", "learnable", "learnable", "learnable"])


def test_the_cli_reads_the_rollout_section(tiny, tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(generation, "generate_completions", _scripted(calls))
    params = {"rollout": {"model": str(tiny / "tiny"), "num_generations": 3, "temperature": 0.5,
                          "max_completion_length": 9}, "difficulty": {"batch_size": 2, "max_samples": None}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cli.main(["--params", str(tmp_path / "params.yaml"), "difficulty", "--facts", str(tiny / "facts"),
              "--out", str(tmp_path / "out")])
    assert (calls["k"], calls["temperature"], calls["max_new_tokens"], calls["batch_size"]) == (3, 0.5, 9, 2)
    assert len(read_jsonl(tmp_path / "out" / "difficulty.jsonl")) == 8


def test_a_seeded_sample_of_facts_keeps_file_order():
    facts = [{"id": str(i)} for i in range(100)]
    sample = select_facts(facts, 10, seed=0)
    assert len(sample) == 10 and sample == sorted(sample, key=lambda f: int(f["id"]))
    assert sample == select_facts(facts, 10, seed=0) != select_facts(facts, 10, seed=1)
    assert select_facts(facts, None, 0) == facts
