"""End to end: the Prefect flow runs the DVC stages on a tiny demo in a copy of the project."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# A demo small enough for CI that a model still learns: one entity per title (the title words to read are
# the ones before it), 1200 SFT steps. The rule is learned somewhere between 600 and 1000 steps (dev F1
# measured at 800 steps: 0.29 and 0.61 in two runs, 0.73 in a third), so 1200 leave a margin. The test
# asserts that the model beats the baselines, so it fails when training breaks (a loss mask, the prompt,
# the teacher, the parser).
# The plumbing only (the servers test): every stage runs, in seconds, and learns nothing.
SMALL = {"demo_data": {"train_pairs": 16, "valid_pairs": 6, "test_pairs": 6},
         "synthesize": {"max_facts": 16},
         "tiny_model": {"vocab_size": 800},
         "sft": {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "dev_f1_max_new_tokens": 8,
                 "generation_caps_check": "warn"},  # 8-token caps: the preflight only warns
         "difficulty": {"max_samples": 4},
         "rollout": {"num_generations": 2, "max_completion_length": 8},
         "curriculum": {"phases": 2},
         "grpo": {"per_device_train_batch_size": 2},
         "evaluate": {"max_facts": 6, "max_new_tokens": 8},
         "register": {"max_new_tokens": 8},
         # a model that learned nothing (all answers invalid, F1 0) must still reach register here: the predictions
         # gate's bounds switched off (the LEARNABLE run passes the gate at the demo's bounds)
         "validate": {"predictions_max_invalid_rate": 1.0, "predictions_max_label_share": 1.0,
                      "predictions_min_f1_margin": -1.0}}
LEARNABLE = {"demo_data": {"train_pairs": 400, "valid_pairs": 24, "test_pairs": 12, "entities_per_title": [1, 1],
                      "objects_per_image": [2, 3]},
        "synthesize": {"max_facts": None},
        "sft": {"max_steps": 1200, "save_steps": 600, "logging_steps": 20, "dev_f1_every": 600, "dev_f1_samples": 16},
        "difficulty": {"max_samples": 8},
        "rollout": {"num_generations": 2},
        "curriculum": {"phases": 2},
        "grpo": {"per_device_train_batch_size": 2, "max_steps": 3},
        "evaluate": {"max_facts": 48}}  # the generation caps stay the demo's: the preflight checks them


def _project(tmp_path: Path, overrides: dict = SMALL) -> Path:
    """A fresh git + DVC project holding this repo's pipeline files and params.yaml with `overrides`."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "src", "expectations", "infra", "data/sft_supplement"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, project / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=project, check=True)
    return project


def _flow(project: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MORER1_STATE_DIR=str(project / ".state"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(REPO / "flows" / "pipeline.py"), "--project-dir", str(project)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=1800)


def _runs(project: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / '.state' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["morer1"], output_format="list")


@pytest.mark.e2e
def test_flow_runs_every_stage_nested_in_one_mlflow_run_then_nothing_to_do(tmp_path):
    project = _project(tmp_path, LEARNABLE)
    proc = _flow(project, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    summary = json.loads((project / "data" / "ingested" / "summary.json").read_text())
    assert summary["rejects"] == 0 and all(n > 0 for n in summary["facts"].values())
    for gate in ("facts", "sft", "predictions"):  # the predictions gate at the demo's bounds: the model learned
        assert json.loads((project / "data" / "validation" / gate / "report.json").read_text())["success"] is True
    sft = json.loads((project / "models" / "sft" / "sft_summary.json").read_text())
    assert sft["steps"] == 1200 and sft["last_logged_loss"] < sft["first_logged_loss"] / 5

    runs = _runs(project)
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(stages)
    assert children["ingest"].data.metrics["facts.train"] == summary["facts"]["train"]
    assert "train_loss" in children["sft"].data.metrics  # the trainer logged into the stage's nested run
    assert "rewards/format/mean" in children["grpo"].data.metrics and "planned_share_hard" in children["curriculum"].data.metrics
    assert (project / "models" / "grpo" / "model.safetensors").exists()

    metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
    assert metrics["dev"]["n"] == min(48, summary["facts"]["dev"]) and 0 <= metrics["test"]["f1"] <= 1
    assert metrics["test"]["n"] == min(48, summary["facts"]["test"])
    assert children["evaluate"].data.metrics["test_f1"] == metrics["test"]["f1"]
    # the model learned: micro F1 (MORE protocol) clearly above the majority (always `none`: F1 0) and the
    # random baseline on dev, accuracy clearly above random (measured after 800 steps: F1 0.29 and 0.61,
    # accuracy 0.69 and 0.65 against 0.42)
    dev = metrics["dev"]
    assert dev["f1"] >= max(dev["baseline_random_f1"], dev["baseline_majority_f1"]) + 0.25, dev
    assert dev["accuracy"] >= dev["baseline_random_accuracy"] + 0.1 and dev["invalid_rate"] <= 0.1, dev
    assert set(metrics["candidates"]) == {"sft", "grpo"}
    # every headline figure with its pair-bootstrap interval, and GRPO against SFT paired on the same facts
    assert dev["f1_lo"] <= dev["f1"] <= dev["f1_hi"] and dev["baseline_random_f1_lo"] <= dev["baseline_random_f1_hi"]
    assert children["evaluate"].data.metrics["test_f1_lo"] == metrics["test"]["f1_lo"]
    paired = metrics["comparisons"]["grpo_vs_sft"]["dev"]
    assert paired["n"] == dev["n"] and paired["delta_f1_lo"] <= paired["delta_f1"] <= paired["delta_f1_hi"]
    assert paired["delta_f1"] == pytest.approx(metrics["candidates"]["grpo"]["dev_f1"]
                                               - metrics["candidates"]["sft"]["dev_f1"])
    for curve in ("sft/loss.csv", "sft/dev_f1.csv", "sft/curves.png", "grpo/rewards.csv", "grpo/phases.csv"):
        assert (project / "reports" / curve).stat().st_size > 0, curve
    assert (project / "reports" / "eval" / "report" / "index.html").exists()
    registered = json.loads((project / "reports" / "registry" / "registered.json").read_text())
    assert registered["version"] == "1" and registered["promotion"]["decision"] == "promoted"
    from mlflow import MlflowClient

    # the chosen model is registered as candidate (alias challenger) and promotion copies it into the served model
    aliases = {name: {alias: int(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}
               for name in ("morer1-candidates", "morer1")}  # versions: int from a local store, str over REST
    assert aliases == {"morer1-candidates": {"challenger": 1}, "morer1": {"champion": 1}}
    assert parent.data.tags["dvc_lock_sha256"] != "none" and parent.data.tags["git_commit"]
    # the run ends with what happened: a line per stage, each candidate's F1 with its interval, the decision; the
    # champion's headline figures are metrics of the pipeline's run
    chosen = json.loads((project / "reports" / "eval" / "chosen.json").read_text())["metrics"]
    out = proc.stdout
    assert f"morer1 pipeline: {len(stages)} stages ran, 0 up to date" in out, out[-3000:]
    assert "rationales kept train" in out and f"{sft['steps']} steps, loss " in out and "reward " in out
    sft_dev = metrics["candidates"]["sft"]
    assert f"sft: dev F1 {sft_dev['dev_f1']:.3f} [{sft_dev['dev_f1_lo']:.3f}, {sft_dev['dev_f1_hi']:.3f}]" in out
    assert "grpo − sft: dev ΔF1 " in out and "promoted: no champion yet" in out
    assert parent.data.metrics["dev_f1"] == pytest.approx(chosen["dev_f1"])
    assert parent.data.metrics["test_f1_lo"] == pytest.approx(chosen["test_f1_lo"])

    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    noop = _flow(project, tmp_path)  # nothing to do: it says so, with the headline figures
    assert noop.returncode == 0 and f"nothing changed: all {len(stages)} stages are up to date" in noop.stdout
    assert f"champion morer1 version 1: dev F1 {chosen['dev_f1']:.3f}" in noop.stdout, noop.stdout[-2000:]

    # a failing gate stops the flow with the reason; it is not retried and earlier stages are skipped
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"].update(none_fraction_min=0.0, none_fraction_max=0.1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _flow(project, tmp_path)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "stage 'validate_facts' failed (data validation failed)" in log
    assert log.count("Task run 'dvc-validate_facts") <= 2 and "Retrying" not in log  # no retry of a failed gate
    # the gate's message once, then where the details are; Prefect's tracebacks only in the log file
    gate = next(line for line in log.splitlines() if "expectations failed:" in line)
    assert log.count(gate) == 1 and log.count("stage 'validate_facts' failed") == 1, log
    assert "Traceback" not in log and len(log.splitlines()) < 80, log
    details = next(line for line in log.splitlines() if line.startswith("details: full log, tracebacks included: "))
    log_file = Path(details.split("included: ")[1].split(";")[0])
    assert "Traceback" in log_file.read_text() and gate in log_file.read_text()
    failed = [r for r in _runs(project) if r.info.run_name == "pipeline" and r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["morer1.failed_stage"] == "validate_facts"

    # the predictions gate refuses a model whose answers collapsed (here: a bound no model meets) before register, in
    # one line naming the params key; the facts' bounds back as they were, only the predictions gate runs again
    original = yaml.safe_load((REPO / "params.yaml").read_text())["validate"]
    params["validate"].update(none_fraction_min=original["none_fraction_min"],
                              none_fraction_max=original["none_fraction_max"], predictions_max_label_share=0.1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _flow(project, tmp_path)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "stage 'validate_predictions' failed (data validation failed)" in log and "Retrying" not in log
    [line] = [line for line in log.splitlines() if "predictions gate failed: " in line]
    assert "predictions collapsed: " in line and "above validate.predictions_max_label_share 0.1" in line, line
    assert line.endswith("(report: data/validation/predictions/report.json)"), line
    report = json.loads((project / "data" / "validation" / "predictions" / "report.json").read_text())
    assert report["success"] is False and report["summary"]["failed"] == 1
    [failed] = [r for r in _runs(project) if r.info.status == "FAILED" and r.info.run_name == "pipeline"
                and r.data.tags.get("morer1.failed_stage") == "validate_predictions"]
    ran = {r.info.run_name for r in _runs(project) if r.data.tags.get("mlflow.parentRunId") == failed.info.run_id}
    assert ran == {"validate_predictions"}  # register did not run: the registered version is still the first
    assert json.loads((project / "reports" / "registry" / "registered.json").read_text())["version"] == "1"
