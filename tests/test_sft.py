"""A tiny SFT run on template rationales: parameters change, loss falls, a rerun resumes from a checkpoint with its
weights and continues the uninterrupted run; image pixel bounds go with the saved model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_facts import write_sft_project

from configs import small_config
from morer1.files import read_jsonl
from morer1.modeling import load_model_and_processor
from morer1.preflight import sequence_length
from morer1.sft import SFTConfig, run
from morer1.training import LoraSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_sft_project(tmp_path_factory.mktemp("sft"))


def _sft(root, out: str, cfg: SFTConfig) -> dict:
    return run(cfg, root / "sft", root / out)


def _cfg(root, **kw):
    base = dict(model=str(root / "tiny"), learning_rate=5e-3, max_steps=6, per_device_train_batch_size=2,
                logging_steps=1, save_steps=3, checkpoint_dir=str(root / "ckpt"), max_length=2048)
    return small_config(SFTConfig, **{**base, **kw})


def test_sft_changes_parameters_and_lowers_the_loss(setup):
    summary = _sft(setup, "out", _cfg(setup))
    assert summary["steps"] == 6 and summary["train_samples"] == 8 and summary["dropped_overlong"] == 0
    assert summary["last_logged_loss"] < summary["first_logged_loss"]
    before, after = load_file(setup / "tiny" / "model.safetensors"), load_file(setup / "out" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert json.loads((setup / "out" / "sft_summary.json").read_text())["steps"] == 6
    _, saved = load_model_and_processor(setup / "out")
    _, base = load_model_and_processor(setup / "tiny")
    assert saved.image_processor.size == base.image_processor.size  # no pixel bounds set: the base processor's own


def test_a_rerun_resumes_from_the_last_checkpoint(setup):
    cfg = _cfg(setup, checkpoint_dir=str(setup / "ckpt-resume"))
    _sft(setup, "out2", cfg)
    shutil.rmtree(setup / "ckpt-resume" / "sft" / "checkpoint-6")  # as if the job died after step 3
    summary = _sft(setup, "out2", cfg)
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 6
    other = _sft(setup, "out3", _cfg(setup, checkpoint_dir=cfg.checkpoint_dir, learning_rate=1e-3))
    assert other["resumed_from"] is None  # another job never resumes from these checkpoints


def _losses(checkpoint) -> dict[int, float]:
    """Logged loss per step, from a checkpoint's trainer state (a resumed run's includes the steps before the kill)."""
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_run_killed_after_a_checkpoint_resumes_its_weights_and_continues_the_uninterrupted_run(
        setup, kill_after_checkpoint, weights_at_resume, checkpoint_state, lora):
    name = "lora" if lora else "full"

    def train(attempt):
        cfg = _cfg(setup, checkpoint_dir=str(setup / f"ckpt-{name}-{attempt}"), lora=LoraSettings(enabled=lora, r=4, alpha=8))
        return _sft(setup, f"out-{name}-{attempt}", cfg)

    whole = train("whole")
    with kill_after_checkpoint(3):
        train("killed")
    resumed = train("killed")
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == whole["steps"] == 6

    [(checkpoint, start)] = weights_at_resume  # the weights the resumed training starts from
    assert checkpoint.name == "checkpoint-3"
    reference = checkpoint_state(checkpoint, setup / "tiny")
    assert start.keys() == reference.keys() and all(torch.equal(start[k], reference[k]) for k in start)
    base = checkpoint_state(setup / "tiny", setup / "tiny") if not lora else None
    trained = [k for k in start if ("lora_B" in k if lora else not torch.equal(start[k], base[k]))]
    assert trained and all(start[k].abs().sum() > 0 for k in trained)  # the checkpoint is not the initial model

    before, after = _losses(setup / f"ckpt-{name}-whole/sft/checkpoint-6"), _losses(setup / f"ckpt-{name}-killed/sft/checkpoint-6")
    assert sorted(after) == sorted(before) == [1, 2, 3, 4, 5, 6]
    assert [after[s] for s in (4, 5, 6)] == pytest.approx([before[s] for s in (4, 5, 6)], rel=1e-5)
    a, b = load_file(setup / f"out-{name}-whole/model.safetensors"), load_file(setup / f"out-{name}-killed/model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_rerun_ends_the_mlflow_run_of_the_killed_attempt_and_names_it(setup, kill_after_checkpoint):
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient

    from morer1 import tracking

    cfg = _cfg(setup, checkpoint_dir=str(setup / "ckpt-mlflow"))
    with kill_after_checkpoint(3):
        _sft(setup, "out-mlflow", cfg)
    killed = mlflow.last_active_run()  # the stage run that run() opened
    assert killed.data.tags["morer1.stage"] == "sft"
    client = MlflowClient()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client.update_run(killed.info.run_id, status="RUNNING")  # what SIGKILL leaves: RUNNING, and a dead process
    client.set_tag(killed.info.run_id, tracking.PID_TAG, str(gone.pid))

    summary = _sft(setup, "out-mlflow", cfg)
    rerun = mlflow.last_active_run()
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["resumed_run_id"] == killed.info.run_id
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    tags = client.get_run(rerun.info.run_id).data.tags
    assert tags[tracking.RESUMED_TAG] == killed.info.run_id and tags["morer1.ended_stale_runs"] == killed.info.run_id


def test_a_rewritten_base_model_starts_a_new_job(setup):
    import os

    cfg = _cfg(setup, checkpoint_dir=str(setup / "ckpt-base"), max_steps=2, save_steps=2)
    _sft(setup, "out4", cfg)
    assert _sft(setup, "out4", cfg)["resumed_from"]  # same job: resumes (nothing left to do)
    weights = setup / "tiny" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert _sft(setup, "out4", cfg)["resumed_from"] is None  # e.g. the tiny model was rebuilt


def test_pixel_bounds_change_the_image_tokens_and_are_saved_with_the_model(setup):
    from morer1.modeling import image_token_count, set_pixel_bounds

    bound = 28 * 28 * 6  # the tiny model's own max_pixels is 28 * 28 * 16
    _, base = load_model_and_processor(setup / "tiny")
    _, bounded = load_model_and_processor(setup / "tiny")
    set_pixel_bounds(bounded, None, bound)
    assert image_token_count(base, 1200, 800) == 12 and image_token_count(bounded, 1200, 800) == 6
    rows = read_jsonl(setup / "sft" / "train.jsonl")
    lengths = {name: [sequence_length(p, r["messages"], r["images"]) for r in rows]
               for name, p in (("base", base), ("bounded", bounded))}
    fits_bounded_only = max(lengths["bounded"])  # the 120x90 photo: 12 image tokens unbounded, 4 bounded
    assert max(lengths["base"]) > fits_bounded_only

    cfg = _cfg(setup, checkpoint_dir=str(setup / "ckpt-pixels"), max_steps=1, max_pixels=bound,
               max_length=fits_bounded_only)
    summary = _sft(setup, "out-pixels", cfg)
    assert summary["dropped_overlong"] == 0  # SFT sized the images with the bound
    _, saved = load_model_and_processor(setup / "out-pixels")
    assert saved.image_processor.size["longest_edge"] == bound
    assert saved.image_processor.size["shortest_edge"] == base.image_processor.size["shortest_edge"]
    assert image_token_count(saved, 1200, 800) == 6


def test_pixel_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="min_pixels must be <= max_pixels"):
        small_config(SFTConfig, min_pixels=5000, max_pixels=4000)
