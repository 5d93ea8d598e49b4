"""A tiny GRPO run with the real reward functions on a curriculum stream: parameters change, order kept, resume
(with the checkpoint's weights, continuing the uninterrupted run)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_facts import write_facts

from configs import small_config
from morer1 import curriculum, difficulty
from morer1.grpo import GRPOConfig, run
from morer1.rollout import RolloutConfig
from morer1.sft import SFTConfig
from morer1.sft import run as sft
from morer1.synthesize import SynthesizeConfig, synthesize
from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus
from morer1.training import LoraSettings

SHORT = "<think>" + " ".join(f"Step {i}: ok." for i in range(1, 7)) + "</think><answer>{label}</answer>"


class ShortTeacher:
    """Short six-step rationales, so a tiny model learns the format in a few SFT steps."""

    def generate(self, requests):
        return [SHORT.format(label=r.fact["relation"]) for r in requests]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    facts = write_facts(root / "facts")
    synthesize(facts, root / "sft", small_config(SynthesizeConfig, splits=("train",), none_fraction=None, min_kept_fraction=0.0),
               teacher=ShortTeacher())
    build_tiny_model(root / "tiny", sft_corpus(root / "sft"), small_config(TinyModelConfig, vocab_size=600))
    sft(small_config(SFTConfig, model=str(root / "tiny"), learning_rate=1e-2, max_steps=80, per_device_train_batch_size=4,
                  logging_steps=10, save_steps=100, checkpoint_dir=str(root / "ckpt")), root / "sft", root / "sftmodel")
    difficulty.run(small_config(difficulty.DifficultyConfig), _rollout(root), facts, root / "difficulty")
    curriculum.run(curriculum.CurriculumConfig(phases=2, phase_size=4), root / "difficulty", root / "stream")
    return root


def _rollout(root) -> RolloutConfig:
    """Difficulty's rollouts and GRPO's, from one config."""
    return RolloutConfig(model=str(root / "sftmodel"), num_generations=4, temperature=0.7, max_completion_length=48)


def _grpo(root, out: str, **kw) -> dict:
    base = dict(learning_rate=5e-3, per_device_train_batch_size=4, logging_steps=1, save_steps=2,
                completions_log_every=2, checkpoint_dir=str(root / "ckpt-grpo"))
    return run(small_config(GRPOConfig, **{**base, **kw}), _rollout(root), root / "facts", root / "stream", root / out)


def test_grpo_changes_parameters_and_trains_in_stream_order(sft_model):
    root = sft_model
    before = load_file(root / "sftmodel" / "model.safetensors")  # the parameters GRPO starts from
    summary = _grpo(root, "out")
    stream = [json.loads(line)["id"] for line in (root / "stream" / "stream.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(stream)  # one prompt x 4 generations per step, one pass over the stream
    assert [ids[0] for ids in summary["trained_ids"]] == stream  # the curriculum order, not reshuffled
    assert all(len(set(ids)) == 1 for ids in summary["trained_ids"])  # a step is one prompt's group
    after = load_file(root / "out" / "model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0
    assert json.loads((root / "out" / "grpo_summary.json").read_text())["steps"] == summary["steps"]


def test_grpo_resumes_at_the_same_data_position(sft_model):
    root = sft_model
    full = _grpo(root, "out-a", checkpoint_dir=str(root / "ckpt-resume"))
    last = max((root / "ckpt-resume" / "grpo").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(last)  # as if the job died after the previous checkpoint
    resumed = _grpo(root, "out-b", checkpoint_dir=str(root / "ckpt-resume"))
    assert resumed["resumed_from"] and resumed["steps"] == full["steps"]
    done = int(resumed["resumed_from"].rsplit("-", 1)[1])
    assert resumed["trained_ids"] == full["trained_ids"][done:]


def _history(checkpoint) -> dict[int, dict]:
    """Logged metrics per step, from a checkpoint's trainer state (a resumed run's includes the steps before the kill)."""
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e for e in history if "loss" in e}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_grpo_run_killed_after_a_checkpoint_resumes_its_weights_and_continues_the_uninterrupted_run(
        sft_model, kill_after_checkpoint, weights_at_resume, checkpoint_state, lora):
    root, name = sft_model, "lora" if lora else "full"

    def train(attempt):
        return _grpo(root, f"out-{name}-{attempt}", checkpoint_dir=str(root / f"ckpt-{name}-{attempt}"), save_steps=4,
                     lora=LoraSettings(enabled=lora, r=4, alpha=8))

    whole = train("whole")
    with kill_after_checkpoint(4):
        train("killed")
    resumed = train("killed")
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == whole["steps"] == 8
    assert resumed["trained_ids"] == whole["trained_ids"][4:]

    [(checkpoint, start)] = weights_at_resume  # the weights the resumed training starts from
    assert checkpoint.name == "checkpoint-4"
    reference = checkpoint_state(checkpoint, root / "sftmodel")
    assert start.keys() == reference.keys() and all(torch.equal(start[k], reference[k]) for k in start)

    before = _history(root / f"ckpt-{name}-whole/grpo/checkpoint-8")
    after = _history(root / f"ckpt-{name}-killed/grpo/checkpoint-8")
    assert sorted(after) == sorted(before) == list(range(1, 9))
    for metric in ("loss", "reward", "kl"):  # same sampled completions, same rewards, same policy
        assert [after[s][metric] for s in range(5, 9)] == pytest.approx([before[s][metric] for s in range(5, 9)],
                                                                       rel=1e-5, abs=1e-7)
    a, b = load_file(root / f"out-{name}-whole/model.safetensors"), load_file(root / f"out-{name}-killed/model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    base = load_file(root / "sftmodel" / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the run trained: the comparison is not vacuous
