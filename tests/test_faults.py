"""Fault suite (issue 12): each test states a fault, the promise the pipeline makes under it, and checks the effect.

Marked `faults` and left out of the default `pytest` run (minutes of real process kills and servers on a tiny
project): `make test-faults` runs them. Every fault is real: SIGKILL to the flow's whole process group, a second
flow process, a real `mlflow server` stopped, a truncated file. The projects are tiny (the e2e plumbing params of
test_pipeline_e2e with a few more steps), trained on CPU with one seed, so runs are compared weight for weight.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from servers import free_port, hold_pipeline_lock, start_server, stop_group, wait_healthy
from test_pipeline_e2e import REPO, SMALL, _project
from tiny_facts import write_facts

from configs import small_config

pytestmark = pytest.mark.faults

BIN = Path(sys.executable).parent
SFT_STEPS, SFT_SAVE = 12, 4  # the SFT stage of the fault project checkpoints at steps 4, 8 and 12
GRPO_STEPS, GRPO_SAVE = 6, 2
FAULT_PARAMS = {**SMALL, "sft": {**SMALL["sft"], "max_steps": SFT_STEPS, "save_steps": SFT_SAVE},
                "grpo": {**SMALL["grpo"], "max_steps": GRPO_STEPS, "save_steps": GRPO_SAVE, "logging_steps": 1}}
FROM_GRPO = "grpo,evaluate,validate_predictions,register"  # the pipeline after `prepared` (`make run` may run further stages)


# --- driving a project ------------------------------------------------------------------------------------------

def _env(project: Path, **extra) -> dict:
    """The environment of a stage or flow process of `project` (`morer1` and `dvc` on PATH, its own state folder)."""
    from morer1.orchestrate import stage_env

    env = stage_env(dict(MORER1_STATE_DIR=str(project / ".state"), PREFECT_HOME=str(project / ".state" / "prefect"),
                         PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra))
    env.pop("MORER1_PARENT_RUN_ID", None)
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _dvc(project: Path, *args, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=_env(project, **env),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"dvc {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _start_flow(project: Path, log: Path, *args) -> subprocess.Popen:
    """The pipeline flow (flows/pipeline.py), as `make run` starts it, in its own process group."""
    return start_server([sys.executable, str(REPO / "flows" / "pipeline.py"), "--project-dir", str(project), *args],
                        log, _env(project))


def _flow(project: Path, log: Path, *args) -> subprocess.CompletedProcess:
    proc = _start_flow(project, log, *args)
    proc.wait(timeout=1800)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return proc


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    """Wait until `path` exists; fail early when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {path} appeared\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the whole process group: the flow, its Prefect server, the stage helper, accelerate, the trainer."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _copy(prepared: Path, tmp_path: Path, name: str = "project") -> Path:
    """A copy of a prepared project (git, DVC cache, outputs, MLflow store; modification times kept)."""
    return Path(shutil.copytree(prepared, tmp_path / name, symlinks=True))


def _forget(project: Path, stage: str) -> None:
    """DVC forgets that `stage` ran (its dvc.lock entry, the run cache, its outputs) and its checkpoints are gone: the
    next run trains it from nothing instead of checking its outputs out of DVC's cache."""
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [o["path"] for o in lock["stages"].pop(stage)["outs"]]
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(project / ".dvc" / "cache" / "runs")
    for out in map(project.joinpath, outs):  # the model folder and the curves DVC tracks as plots
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    shutil.rmtree(project / ".state" / "checkpoints" / stage)


def _runs(project: Path, uri: str | None = None):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri or f"sqlite:///{project / '.state' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("morer1").experiment_id])


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-6, f"{a} and {b} differ by up to {worst}"


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A fault project run by DVC (no flow) up to the GRPO stage: its SFT model is an uninterrupted run's."""
    project = _project(tmp_path_factory.mktemp("faults"), FAULT_PARAMS)
    _dvc(project, "repro", "curriculum")
    return project


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """The prepared project run by DVC through `register`, uninterrupted: the outputs a faulted run must reproduce."""
    project = _copy(prepared, tmp_path_factory.mktemp("reference"))
    _dvc(project, "repro", "register")
    return project


# --- 1. kill -9 during training ---------------------------------------------------------------------------------

def _assert_killed_attempt_ended(project: Path, killed_parent: str, stage: str) -> None:
    runs = {r.info.run_id: r for r in _runs(project)}
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []
    assert runs[killed_parent].info.status == "KILLED"
    [killed_stage] = [r for r in runs.values()
                      if r.info.run_name == stage and r.data.tags.get("mlflow.parentRunId") == killed_parent]
    assert killed_stage.info.status == "KILLED"
    [parent] = [r for r in runs.values() if r.info.run_name == "pipeline" and r.info.run_id != killed_parent]
    assert parent.info.status == "FINISHED" and parent.data.tags["morer1.ended_stale_runs"] == killed_parent
    [rerun] = [r for r in runs.values() if r.info.run_name == stage
               and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert rerun.info.status == "FINISHED" and rerun.data.tags["resumed_run_id"] == killed_stage.info.run_id


def _parent_run_of(project: Path) -> str:
    [parent] = [r for r in _runs(project) if r.info.run_name == "pipeline" and r.info.status == "RUNNING"]
    return parent.info.run_id


def test_kill_9_of_the_flow_during_sft_resumes_from_the_last_checkpoint_to_the_uninterrupted_weights(prepared, tmp_path):
    """Fault: SIGKILL to the flow's whole process group in the middle of SFT, after its first checkpoint.
    Promise: the next run resumes from the last checkpoint (not step 0), stops at the same final step with the same
    weights as an uninterrupted run, and the killed attempt's MLflow runs (pipeline and stage) end as KILLED."""
    project = _copy(prepared, tmp_path)
    _forget(project, "sft")
    flow = _start_flow(project, tmp_path / "killed.log", "--stages", "sft")
    ckpt = project / ".state" / "checkpoints" / "sft"
    _wait_for(ckpt / f"checkpoint-{SFT_SAVE}" / "trainer_state.json", flow, tmp_path / "killed.log")
    _kill_group(flow)
    killed_parent = _parent_run_of(project)  # RUNNING: its process is gone
    assert not (project / "models" / "sft").exists()
    done = [int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*")]
    assert done and max(done) < SFT_STEPS, done  # killed mid-training

    _flow(project, tmp_path / "rerun.log", "--stages", "sft")
    summary = _json(project / "models" / "sft" / "sft_summary.json")
    resumed_at = int(Path(summary["resumed_from"]).name.split("-")[1])
    assert 0 < resumed_at < SFT_STEPS and summary["steps"] == SFT_STEPS
    assert summary["steps"] == _json(prepared / "models" / "sft" / "sft_summary.json")["steps"]
    _assert_same_weights(project / "models" / "sft", prepared / "models" / "sft")
    _assert_killed_attempt_ended(project, killed_parent, "sft")


def test_kill_9_of_the_flow_during_grpo_resumes_and_ends_with_the_uninterrupted_metrics(prepared, reference, tmp_path):
    """Fault: SIGKILL to the flow's whole process group in the middle of GRPO, after its first checkpoint.
    Promise: the rerun of the pipeline resumes GRPO from the last checkpoint, ends at the same step with the same
    weights, and evaluation gives the same metrics as an uninterrupted run; the killed attempt's runs end KILLED."""
    project = _copy(prepared, tmp_path)
    flow = _start_flow(project, tmp_path / "killed.log", "--stages", FROM_GRPO)
    ckpt = project / ".state" / "checkpoints" / "grpo"
    _wait_for(ckpt / f"checkpoint-{GRPO_SAVE}" / "trainer_state.json", flow, tmp_path / "killed.log")
    _kill_group(flow)
    killed_parent = _parent_run_of(project)  # RUNNING: its process is gone
    done = [int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*")]
    assert done and max(done) < GRPO_STEPS, done

    _flow(project, tmp_path / "rerun.log", "--stages", FROM_GRPO)
    summary = _json(project / "models" / "grpo" / "grpo_summary.json")
    resumed_at = int(Path(summary["resumed_from"]).name.split("-")[1])
    assert 0 < resumed_at < GRPO_STEPS and summary["steps"] == GRPO_STEPS
    whole = _json(reference / "models" / "grpo" / "grpo_summary.json")
    # the resumed run trained the batches after its checkpoint, as the uninterrupted run did
    assert summary["steps"] == whole["steps"] and summary["trained_ids"] == whole["trained_ids"][resumed_at:]
    _assert_same_weights(project / "models" / "grpo", reference / "models" / "grpo")
    assert _json(project / "reports" / "eval" / "metrics.json") == _json(reference / "reports" / "eval" / "metrics.json")
    _assert_killed_attempt_ended(project, killed_parent, "grpo")


# --- 3. two pipeline runs at once -------------------------------------------------------------------------------

def test_a_second_pipeline_run_in_the_same_checkout_stops_at_once_in_one_line(prepared, reference, tmp_path):
    """Fault: a second `make run` while the first is running in the same checkout.
    Promise: the second stops at once, with one line saying another run holds the lock; the first finishes
    untouched: its outputs are a solo run's."""
    project = _copy(prepared, tmp_path)
    first = _start_flow(project, tmp_path / "first.log", "--stages", FROM_GRPO)
    _wait_for(project / ".state" / "checkpoints" / "grpo", first, tmp_path / "first.log")  # well into the run
    start = time.monotonic()
    second = subprocess.run([sys.executable, str(REPO / "flows" / "pipeline.py"), "--project-dir", str(project),
                             "--stages", FROM_GRPO],
                            env=_env(project), capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    assert first.poll() is None  # the first is still running
    assert second.returncode == 1 and second.stdout == ""
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"morer1 pipeline: another pipeline run (pid {first.pid}) holds the lock "), line
    assert took < 120, took  # imports and exits: no DVC status, no MLflow run, no stage (seconds on an idle machine)

    first.wait(timeout=1800)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-4000:]
    _assert_same_weights(project / "models" / "grpo", reference / "models" / "grpo")
    assert _json(project / "reports" / "eval" / "metrics.json") == _json(reference / "reports" / "eval" / "metrics.json")
    parents = [r for r in _runs(project) if r.info.run_name == "pipeline"]
    assert [r.info.status for r in parents] == ["FINISHED"]  # the second never opened a run


def test_the_pipeline_lock_is_reentrant_refuses_other_processes_and_dies_with_its_holder(tmp_path):
    """Fault: the run holding the pipeline lock is killed with SIGKILL. Promise: the lock goes with it (the next run
    is not blocked by a stale lock file), while a live holder refuses every other process, naming its pid."""
    from morer1.orchestrate import PipelineLocked, pipeline_lock

    holder = hold_pipeline_lock(tmp_path)
    with pytest.raises(PipelineLocked, match=rf"^another pipeline run \(pid {holder.pid}\) holds the lock "):
        with pipeline_lock(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with pipeline_lock(tmp_path), pipeline_lock(tmp_path):  # free again; re-entrant in one process
        pass


def test_a_stage_that_meets_dvcs_lock_stops_in_one_line_without_retries(prepared, tmp_path, monkeypatch):
    """Fault: another DVC process (e.g. a manual `dvc repro`) holds DVC's repo lock when a stage starts.
    Promise: the stage stops with one line saying so, and the flow does not retry it."""
    from morer1.orchestrate import PipelineLocked, repro_stage

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # importing the flow file sets Prefect up
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    import pipeline as flow_module

    project = _copy(prepared, tmp_path)
    _forget(project, "sft")
    holder = subprocess.Popen([sys.executable, "-c", "import zc.lockfile, time\n"
                               f"held = zc.lockfile.LockFile({str(project / '.dvc' / 'tmp' / 'lock')!r})\n"
                               "print('held', flush=True)\ntime.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineLocked) as err:
            repro_stage(project, "sft", _env(project))
    finally:
        holder.kill()
        holder.wait()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"another DVC process holds a lock of {project}: Unable to acquire lock")
    assert not (project / "models" / "sft").exists()

    class Failed:  # the state of a task run that raised
        def result(self, raise_on_failure):
            return err.value

    assert flow_module._transient(None, None, Failed()) is False
    sys.modules.pop("pipeline", None)


# --- 5. a corrupt checkpoint ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory) -> Path:
    from morer1.synthesize import SynthesizeConfig, synthesize
    from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus

    root = tmp_path_factory.mktemp("corrupt")
    facts = write_facts(root / "facts")
    synthesize(facts, root / "sft", small_config(SynthesizeConfig, splits=("train",), none_fraction=None))
    build_tiny_model(root / "tiny", sft_corpus(root / "sft"), small_config(TinyModelConfig, vocab_size=600))
    return root


def _sft(root: Path, name: str) -> dict:
    from morer1.sft import SFTConfig, run

    cfg = small_config(SFTConfig, model=str(root / "tiny"), learning_rate=5e-3, max_steps=6, per_device_train_batch_size=2,
                       logging_steps=1, save_steps=2, checkpoint_dir=str(root / f"ckpt-{name}"), max_length=2048)
    return run(cfg, root / "sft", root / f"out-{name}")


def _truncate(file: Path) -> None:
    with file.open("r+b") as f:
        f.truncate(file.stat().st_size // 2)


@pytest.mark.parametrize("killed_after, truncated, resumes_from", [
    (4, "model.safetensors", "checkpoint-2"),
    (2, "optimizer.pt", None),
], ids=["previous-good-one", "starts-over"])
def test_a_truncated_file_in_the_latest_checkpoint_is_detected_and_training_falls_back(
        sft_setup, kill_after_checkpoint, caplog, killed_after, truncated, resumes_from):
    """Fault: a file of the latest checkpoint is truncated (a full disk, a node lost while the file was copied).
    Promise: the rerun detects it, says in a warning which checkpoint it resumes from instead (or that it starts
    over), and ends with the weights of an uninterrupted run."""
    name = f"{killed_after}-{truncated}"
    whole = _sft(sft_setup, f"whole-{name}")
    with kill_after_checkpoint(killed_after):
        _sft(sft_setup, name)
    latest = sft_setup / f"ckpt-{name}" / "sft" / f"checkpoint-{killed_after}"
    _truncate(latest / truncated)

    with caplog.at_level("WARNING", logger="morer1.training"):
        resumed = _sft(sft_setup, name)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "morer1.training" and r.levelname == "WARNING"]
    assert f"{latest} ({truncated}: " in warning, warning
    if resumes_from:
        assert resumed["resumed_from"].endswith(resumes_from)
        assert warning.endswith(f"resuming from the previous good one, {latest.parent / resumes_from}")
    else:
        assert resumed["resumed_from"] is None
        assert warning.endswith("no usable checkpoint left: training starts over from step 0")
    assert resumed["steps"] == whole["steps"] == 6
    _assert_same_weights(sft_setup / f"out-{name}", sft_setup / f"out-whole-{name}")


# --- 4. the tracking server goes away --------------------------------------------------------------------------

def _mlflow_server(store: Path, port: int, log: Path) -> subprocess.Popen:
    server = start_server([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                           "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"], log, dict(os.environ))
    wait_healthy(f"http://127.0.0.1:{port}/health", server, log, timeout=600)  # minutes on a loaded 2-core machine
    return server


def _start_stage(project: Path, stage: str, log: Path, **env) -> subprocess.Popen:
    """`dvc repro <stage>` in its own process group, output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=project, env=_env(project, **env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_the_tracking_server_going_away_mid_stage_fails_clearly_and_the_rerun_resumes(prepared, tmp_path):
    """Fault: the MLflow tracking server (a real `mlflow server` on loopback) stops while SFT trains.
    Promise: the stage fails with a message naming the server, no trained weights are lost (the checkpoints stay),
    and the rerun against the restarted server resumes from the last checkpoint to the uninterrupted weights."""
    from morer1.training import checkpoint_problem

    project = _copy(prepared, tmp_path)
    _forget(project, "sft")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # MLflow's client retries a refused connection 7 times with back-off (minutes): here it gives up at once; the
    # timeout is for a server slowed down by a loaded machine
    env = dict(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="120")
    server = _mlflow_server(tmp_path, port, tmp_path / "mlflow-1.log")
    try:
        stage = _start_stage(project, "sft", tmp_path / "stage.log", **env)
        ckpt = project / ".state" / "checkpoints" / "sft"
        _wait_for(ckpt / f"checkpoint-{SFT_SAVE}" / "trainer_state.json", stage, tmp_path / "stage.log")
    finally:
        stop_group(server)
    assert stage.wait(timeout=1800) != 0
    log = (tmp_path / "stage.log").read_text()
    assert (f"TrackingServerLost: the MLflow tracking server {uri} stopped answering during stage 'sft' "
            f"(ConnectionError); the checkpoints written so far stay in {ckpt}: rerun when the server is back") in log, log[-4000:]
    kept = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*") if checkpoint_problem(p) is None)
    assert kept and kept[-1] < SFT_STEPS and not (project / "models" / "sft").exists()

    server = _mlflow_server(tmp_path, port, tmp_path / "mlflow-2.log")
    try:
        rerun = _start_stage(project, "sft", tmp_path / "rerun.log", **env)
        assert rerun.wait(timeout=1800) == 0, (tmp_path / "rerun.log").read_text()[-4000:]
        runs = _runs(project, uri)
    finally:
        stop_group(server)
    summary = _json(project / "models" / "sft" / "sft_summary.json")
    assert Path(summary["resumed_from"]).name == f"checkpoint-{kept[-1]}" and summary["steps"] == SFT_STEPS
    _assert_same_weights(project / "models" / "sft", prepared / "models" / "sft")
    assert sorted((r.info.status, r.info.run_id == summary["resumed_run_id"]) for r in runs) == [
        ("FINISHED", False), ("KILLED", True)]  # the lost attempt's run is ended by the rerun, which names it


# --- 6. determinism ---------------------------------------------------------------------------------------------

def test_two_fresh_runs_with_one_seed_give_identical_metrics_predictions_and_weights(reference, tmp_path):
    """Fault: none; the promise under every fault above. Two fresh runs of the pipeline with one seed on CPU give
    identical `reports/eval/metrics.json`, predictions and model weights. On the fault project, not on the demo
    (12 minutes a run): the demo's own check is a benchmark item."""
    project = _project(tmp_path, FAULT_PARAMS)
    _dvc(project, "repro", "register")
    assert _json(project / "reports" / "eval" / "metrics.json") == _json(reference / "reports" / "eval" / "metrics.json")
    for predictions in ("predictions_dev.jsonl", "predictions_test.jsonl"):
        assert (project / "reports" / "eval" / predictions).read_text() == (reference / "reports" / "eval" / predictions).read_text()
    for model in ("sft", "grpo"):
        _assert_same_weights(project / "models" / model, reference / "models" / model)
