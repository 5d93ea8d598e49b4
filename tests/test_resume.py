"""Resuming restores the checkpoint's weights for real or fails naming the checkpoint; the MLflow run of a killed
stage does not stay RUNNING forever.

The training-level checks (weights at resume, loss curve and final weights against an uninterrupted run) are in
test_sft.py and test_grpo.py.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs import small_config
from morer1 import tracking
from morer1.errors import BadInputError
from morer1.tiny_model import TinyModelConfig, build_tiny_model
from morer1.training import CheckpointMismatchError, LoraSettings, apply_lora, load_checkpoint_weights

CORPUS = ["<think>Step 1: a red circle in the crop. Step 6: none.</think><answer>none</answer>",
          "Alice meets Bob in Lyon; the partner of Alice was born in Paris."]
LORA = LoraSettings(enabled=True, r=4, alpha=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    build_tiny_model(root / "tiny", CORPUS, small_config(TinyModelConfig, vocab_size=600))
    build_tiny_model(root / "wide", CORPUS, small_config(TinyModelConfig, vocab_size=600, intermediate_size=96))
    return root


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)


def _nudged(model, seed=1):
    """The model with every weight moved, as training would: a checkpoint that differs from the base model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return model


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_key_layout_differs_and_its_weights_are_still_loaded(models, tmp_path):
    trained = _nudged(_load(models / "tiny"))
    trained.save_pretrained(tmp_path / "checkpoint-3")  # what the Trainer writes into a checkpoint
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    model = _load(models / "tiny")
    # the trap: saved as model.layers.* / visual.*, held as model.language_model.* / model.visual.*
    assert any(k.startswith("visual.") for k in saved) and not any(k.startswith("visual.") for k in model.state_dict())
    assert len(set(saved) & set(model.state_dict())) < len(saved) // 2  # a plain load_state_dict misses most

    assert load_checkpoint_weights(model, tmp_path / "checkpoint-3") == len(saved)
    assert _same(model.state_dict(), trained.state_dict())
    assert not _same(model.state_dict(), _load(models / "tiny").state_dict())


def test_a_checkpoint_of_another_model_fails_naming_it(models, tmp_path):
    _load(models / "wide").save_pretrained(tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-3.*shape mismatches.*mlp") as err:
        load_checkpoint_weights(_load(models / "tiny"), tmp_path / "checkpoint-3")
    assert isinstance(err.value, BadInputError)  # the CLI's exit code 2: retrying will not help
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop(sorted(k for k in w if k.startswith("model.layers."))[0]), "1 missing weights"),
    (lambda w: w.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}), "1 unexpected weights"),
], ids=["missing", "unexpected"])
def test_missing_or_unexpected_weights_fail_before_anything_is_loaded(models, tmp_path, change, message):
    _nudged(_load(models / "tiny")).save_pretrained(tmp_path / "checkpoint-3")
    weights = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    change(weights)
    save_file(weights, tmp_path / "checkpoint-3" / "model.safetensors", metadata={"format": "pt"})
    model = _load(models / "tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=message):
        load_checkpoint_weights(model, tmp_path / "checkpoint-3")
    assert _same(model.state_dict(), before)


def test_a_lora_checkpoint_is_loaded_for_real(models, tmp_path):
    trained = _nudged(apply_lora(_load(models / "tiny"), LORA, seed=1), seed=2)
    trained.save_pretrained(tmp_path / "checkpoint-3")  # adapter_model.safetensors only, as the Trainer writes it
    model = apply_lora(_load(models / "tiny"), LORA, seed=0)
    assert not _same(model.state_dict(), trained.state_dict())
    assert load_checkpoint_weights(model, tmp_path / "checkpoint-3") == 4 * 2 * 2  # 4 modules x 2 layers x A, B
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert lora and _same(lora, {k: v for k, v in trained.state_dict().items() if "lora_" in k})


def test_every_adapter_of_a_lora_checkpoint_is_loaded(models, tmp_path):
    """TRL's GRPO adds a frozen `ref` copy of the adapter as its reference model; it is saved in a subfolder."""

    def with_ref(seed):
        model = _nudged(apply_lora(_load(models / "tiny"), LORA, seed=seed), seed=seed)
        model.add_adapter("ref", model.peft_config["default"])
        return _nudged(model, seed=seed + 10)

    trained = with_ref(1)
    trained.save_pretrained(tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3" / "ref" / "adapter_model.safetensors").is_file()
    model = with_ref(2)
    assert load_checkpoint_weights(model, tmp_path / "checkpoint-3") == 2 * 16
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(".ref." in k for k in lora) and _same(lora, {k: v for k, v in trained.state_dict().items() if "lora_" in k})

    apply_lora(_load(models / "tiny"), LORA).save_pretrained(tmp_path / "no-ref" / "checkpoint-3")
    with pytest.raises(CheckpointMismatchError, match=r"no-ref/checkpoint-3: no ref/adapter_model.safetensors"):
        load_checkpoint_weights(with_ref(3), tmp_path / "no-ref" / "checkpoint-3")


def test_lora_and_full_checkpoints_do_not_mix(models, tmp_path):
    _nudged(_load(models / "tiny")).save_pretrained(tmp_path / "full" / "checkpoint-3")
    apply_lora(_load(models / "tiny"), LORA).save_pretrained(tmp_path / "lora" / "checkpoint-3")
    apply_lora(_load(models / "tiny"), LORA.model_copy(update={"r": 8})).save_pretrained(tmp_path / "r8" / "checkpoint-3")
    with pytest.raises(CheckpointMismatchError, match=r"full/checkpoint-3: no adapter_model.safetensors"):
        load_checkpoint_weights(apply_lora(_load(models / "tiny"), LORA), tmp_path / "full" / "checkpoint-3")
    with pytest.raises(CheckpointMismatchError, match=r"lora/checkpoint-3: no model.safetensors"):
        load_checkpoint_weights(_load(models / "tiny"), tmp_path / "lora" / "checkpoint-3")
    with pytest.raises(CheckpointMismatchError, match=r"r8/checkpoint-3: its LoRA weights of adapter 'default' do not match.*16 shape mismatches.*lora_A.* \(8, 64\) vs \(4, 64\)"):
        load_checkpoint_weights(apply_lora(_load(models / "tiny"), LORA), tmp_path / "r8" / "checkpoint-3")


def test_lora_adapters_start_from_the_seed(models):
    """A rerun of the same job starts from the same adapters, whatever ran before in the process."""
    torch.manual_seed(123)
    a = apply_lora(_load(models / "tiny"), LORA, seed=7).state_dict()
    torch.manual_seed(456)
    b = apply_lora(_load(models / "tiny"), LORA, seed=7).state_dict()
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and all(torch.equal(a[k], b[k]) for k in lora_a)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run(run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id)


def test_a_stage_run_killed_outright_is_ended_as_killed_by_the_next_run_of_the_stage():
    from mlflow.tracking import MlflowClient

    tracking.setup()
    killed = subprocess.run(  # the process dies inside its stage run, as on SIGKILL or out of memory
        [sys.executable, "-c", "import os, signal\nfrom morer1 import tracking\n"
         "with tracking.stage_run('sft') as run:\n    print(run.info.run_id, flush=True)\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n"], capture_output=True, text=True, env=os.environ.copy())
    assert killed.returncode == -signal.SIGKILL
    killed_id = killed.stdout.strip()
    assert _run(killed_id).info.status == "RUNNING"

    client = MlflowClient()
    experiment = _run(killed_id).info.experiment_id

    def running(stage, host, pid):
        run = client.create_run(experiment, tags={"morer1.stage": stage, tracking.HOST_TAG: host,
                                                  tracking.PID_TAG: str(pid)})
        return run.info.run_id

    alive = running("sft", socket.gethostname(), os.getpid())  # e.g. a concurrent run: its process is alive
    elsewhere = running("sft", "another-node", _dead_pid())  # its process cannot be checked from here
    other_stage = running("grpo", socket.gethostname(), _dead_pid())  # the grpo stage's next run will see to it

    with tracking.stage_run("sft") as rerun:
        pass
    assert _run(killed_id).info.status == "KILLED"
    assert _run(killed_id).data.tags["morer1.ended_by_run_id"] == rerun.info.run_id
    assert _run(rerun.info.run_id).data.tags["morer1.ended_stale_runs"] == killed_id
    assert [_run(r).info.status for r in (alive, elsewhere, other_stage)] == ["RUNNING"] * 3
    assert _run(rerun.info.run_id).data.tags[tracking.PID_TAG] == str(os.getpid())


def test_resuming_a_checkpoint_names_the_run_that_wrote_it_and_ends_it(tmp_path):
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "ckpt" / "sft"
    folder.mkdir(parents=True)
    tracking.setup()
    with tracking.stage_run("sft") as first:
        assert tracking.link_resumed_run(folder, resuming=False) is None
    client = MlflowClient()
    client.update_run(first.info.run_id, status="RUNNING")  # as if killed, on a node this one cannot check
    client.set_tag(first.info.run_id, tracking.HOST_TAG, "another-node")

    with tracking.stage_run("sft") as second:
        assert _run(first.info.run_id).info.status == "RUNNING"  # another host: the stage sweep leaves it
        assert tracking.link_resumed_run(folder, resuming=True) == first.info.run_id
    assert _run(second.info.run_id).data.tags[tracking.RESUMED_TAG] == first.info.run_id
    assert _run(first.info.run_id).info.status == "KILLED"  # its checkpoints are trained on by another run now
    assert (folder / tracking.RUN_MARKER).read_text().strip() == second.info.run_id

    with tracking.stage_run("sft") as third:
        assert tracking.link_resumed_run(folder, resuming=False) is None  # a fresh start resumes nothing
    assert tracking.RESUMED_TAG not in _run(third.info.run_id).data.tags


def test_a_lost_tracking_server_ends_the_command_in_one_line_with_a_retryable_exit_code(tmp_path, monkeypatch,
                                                                                         capsys):
    """A training stage whose tracking server does not answer (a closed loopback port, so a real refused
    connection) fails in one line naming the server and the kept checkpoints, exit code 1, recorded for the
    orchestrator, which retries it; no traceback of the HTTP client."""
    import json

    from morer1 import cli
    from morer1.orchestrate import StageFailed
    from morer1.sft import SFTConfig
    from morer1.training import main_process_run
    from servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MORER1_EXIT_FILE", str(tmp_path / "exit.json"))
    config = small_config(SFTConfig, model="models/tiny", checkpoint_dir=str(tmp_path / "ckpt"))
    entered = []

    def stage(args):
        with main_process_run("sft", config):
            entered.append(True)

    monkeypatch.setattr(cli, "cmd_sft", stage)
    with pytest.raises(SystemExit) as exc:
        cli.main(["sft", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 1 and not entered
    err = capsys.readouterr().err
    kept = (tmp_path / "ckpt" / "sft").resolve()
    assert err == (f"morer1 sft: error: TrackingServerLost: the MLflow tracking server {uri} stopped answering "
                   f"during stage 'sft' (ConnectionError); the checkpoints written so far stay in {kept}: rerun "
                   "when the server is back to resume from the last one\n")
    recorded = json.loads((tmp_path / "exit.json").read_text())
    assert recorded["exit_code"] == 1 and uri in recorded["message"]
    assert StageFailed("sft", recorded["exit_code"], err).transient
