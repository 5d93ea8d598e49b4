"""Fast checks of the orchestration files: prefect.yaml, flows/serve.py, and the flows' markdown summaries."""

import json
import sys

import pytest
import yaml
from test_pipeline_e2e import REPO

from morer1.orchestrate import summary_markdown


@pytest.fixture
def flows_env(tmp_path, monkeypatch):
    """Importing a flow file sets Prefect defaults: keep its home out of the repo; make `flows/` importable."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    yield
    for name in ("pipeline", "promote", "serve"):
        sys.modules.pop(name, None)


def test_prefect_yaml_deployments_name_flows_that_exist(flows_env):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly", "manual"}
    flows = {name: load_flow_from_entrypoint(str(REPO / d["entrypoint"])) for name, d in deployments.items()}
    assert flows["nightly"].name == "morer1-pipeline" and flows["manual"].name == "morer1-promote"
    for name, deployment in deployments.items():
        assert deployment["work_pool"]["name"] == "morer1-process"
        assert set(deployment["parameters"]) <= set(flows[name].parameters.properties)
    [schedule] = deployments["nightly"]["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or zone
    assert "nothing" in deployments["nightly"]["description"] and not deployments["manual"].get("schedules")


def test_serve_builds_a_scheduled_pipeline_and_an_unscheduled_promotion(flows_env):
    import serve

    nightly, manual = serve.deployments("*/5 * * * *")
    assert (nightly.flow_name, nightly.name, manual.flow_name, manual.name) == (
        "morer1-pipeline", "nightly", "morer1-promote", "manual")
    assert [s.schedule.cron for s in nightly.schedules] == ["*/5 * * * *"] and not manual.schedules


DECISION = {"model_name": "morer1", "metric": "dev_f1", "margin": 0.005, "challenger_version": "3",
            "champion_version": "2", "challenger_value": 0.5, "champion_value": 0.25, "decision": "promoted",
            "reason": "dev_f1 0.5000 beats champion 0.2500 by more than 0.005"}


def _write_reports(project):
    (project / "reports" / "eval").mkdir(parents=True)
    (project / "reports" / "registry").mkdir(parents=True)
    split = {"n": 6, "accuracy": 0.5, "precision": 0.25, "recall": 0.125, "f1": 0.1667, "invalid_rate": 0.0,
             "baseline_majority_accuracy": 0.8333, "baseline_majority_f1": 0.0, "macro_f1": 0.1}
    (project / "reports" / "eval" / "metrics.json").write_text(json.dumps({"dev": split, "test": split}))
    (project / "reports" / "registry" / "registered.json").write_text(
        json.dumps({"model_name": "morer1", "version": "3", "promotion": DECISION}))


def test_summary_shows_metrics_and_promotion_of_the_stages_that_succeeded(tmp_path):
    _write_reports(tmp_path)
    done = [{"stage": s, "status": "skipped", "seconds": 0.4} for s in ("evaluate", "register")]
    text = summary_markdown(tmp_path, done, "abc123", "1")
    assert "MLflow run `abc123`" in text and "| evaluate | skipped | 0.4 |" in text
    assert "| dev | 6 | 0.5000 | 0.2500 | 0.1250 | 0.1667 | 0.0000 | 0.8333 | 0.0000 |" in text
    assert "version 3" in text and "**promoted**" in text and "beats champion" in text

    failed = [{"stage": "validate", "status": "failed", "seconds": None}]  # stale reports of an earlier run
    text = summary_markdown(tmp_path, failed, "abc123", "1")
    assert "| validate | failed | – |" in text and "Evaluation" not in text and "Registry" not in text


def test_apply_profile_swaps_params_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from morer1.errors import BadInputError
    from morer1.orchestrate import apply_profile

    monkeypatch.setenv("MORER1_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "big.yaml").write_text("sft: {max_steps: 9}\n")
    (tmp_path / "params.yaml").write_text("sft: {max_steps: 1}\n")
    backup = apply_profile(tmp_path, "big")
    assert (tmp_path / "params.yaml").read_text() == "sft: {max_steps: 9}\n"
    assert backup.read_text() == "sft: {max_steps: 1}\n" and backup.parent == tmp_path / "state" / "params-backups"
    assert apply_profile(tmp_path, "big") is None  # already in place: nothing to back up
    with pytest.raises(BadInputError, match="no such params profile; profiles: big"):
        apply_profile(tmp_path, "huge")
