"""Fast checks of the orchestration files: prefect.yaml, flows/serve.py, and the flows' markdown summaries."""

import json
import sys

import pytest
import yaml
from test_pipeline_e2e import REPO

from morer1.errors import BadInputError
from morer1.orchestrate import summary_markdown


@pytest.fixture
def flows_env(tmp_path, monkeypatch):
    """Importing a flow file sets Prefect defaults: keep its home out of the repo; make `flows/` importable."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    yield
    for name in ("pipeline", "promote", "serve", "flywheel", "ablate"):
        sys.modules.pop(name, None)


def test_prefect_yaml_deployments_name_flows_that_exist(flows_env):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly", "manual", "flywheel", "gpu", "gpu-k8s"}
    flows = {name: load_flow_from_entrypoint(str(REPO / d["entrypoint"])) for name, d in deployments.items()}
    assert flows["nightly"].name == "morer1-pipeline" and flows["manual"].name == "morer1-promote"
    # the promoter's worker alone holds the credentials that may move champion: promotion has its own pool
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools == {"nightly": "morer1-process", "flywheel": "morer1-process", "manual": "morer1-promote",
                     "gpu": "gpu", "gpu-k8s": "gpu-k8s"}
    # a stage deployment is named as its pool (the flow submits morer1-stage/<pool>) and its runs send heartbeats
    for name in ("gpu", "gpu-k8s"):
        assert flows[name].name == "morer1-stage"
        assert int(deployments[name]["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30
    for name, deployment in deployments.items():
        assert set(deployment["parameters"]) <= set(flows[name].parameters.properties)
    for name in ("nightly", "flywheel"):
        [schedule] = deployments[name]["schedules"]
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or zone
    assert "nothing" in deployments["nightly"]["description"] and not deployments["manual"].get("schedules")


def test_serve_builds_a_scheduled_pipeline_and_an_unscheduled_promotion(flows_env):
    import serve

    nightly, manual, flywheel = serve.deployments("*/5 * * * *")
    assert (nightly.flow_name, nightly.name, manual.flow_name, manual.name, flywheel.flow_name, flywheel.name) == (
        "morer1-pipeline", "nightly", "morer1-promote", "manual", "morer1-flywheel", "flywheel")
    assert [s.schedule.cron for s in nightly.schedules] == ["*/5 * * * *"] and not manual.schedules
    assert [s.schedule.cron for s in flywheel.schedules] == [serve.WEEKLY]


DECISION = {"model_name": "morer1", "metric": "dev_f1", "challenger_version": "3", "champion_version": "2",
            "rule": "promote when the 95 % paired-bootstrap lower bound of Δdev_f1 > 0.0 (2000 resamples of "
                    "image-title pairs, seed 0)",
            "challenger_value": 0.5, "champion_value": 0.25, "delta": 0.25, "delta_lo": 0.1, "delta_hi": 0.4,
            "decision": "promoted", "reason": "dev_f1 +0.2500 [+0.1000, +0.4000] over champion (own predictions, same "
                                              "dev set): lower bound above 0.0 (n=600 facts, 100 pairs, p=0.001)"}


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
    assert "version 3" in text and "**promoted**" in text and "[+0.1000, +0.4000] over champion" in text
    assert "paired-bootstrap lower bound of Δdev_f1 > 0.0" in text

    failed = [{"stage": "validate", "status": "failed", "seconds": None}]  # stale reports of an earlier run
    text = summary_markdown(tmp_path, failed, "abc123", "1")
    assert "| validate | failed | – |" in text and "Evaluation" not in text and "Registry" not in text


def test_summary_of_a_profile_run_names_the_experiment_not_the_workspace_reports(tmp_path):
    _write_reports(tmp_path)  # the workspace's reports: not the experiment's
    done = [{"stage": "evaluate", "status": "ran", "seconds": None}]
    exp = {"profile": "big", "experiment": "big-20250101-000000", "rev": "0123456789abcdef"}
    text = summary_markdown(tmp_path, done, "abc123", "1", exp)
    assert "DVC experiment `big-20250101-000000` (`0123456`)" in text and "dvc exp apply big-20250101-000000" in text
    assert "| evaluate | ran | – |" in text and "Evaluation" not in text and "Registry" not in text


# --- DVC state, not log text: a toy DVC project ------------------------------------------------------------------

TOY_PARAMS = """\
# toy params: the comments and layout must survive a profile run
a:
  x: 1      # the value a profile changes
  lr: 0.002
  names: [p, q]
b:
  y: hello
  nested: {k: 2}
"""
# listed out of dependency order: the order must come from DVC's graph, not the file
TOY_DVC = """\
stages:
  second:
    cmd: python -c "import json, yaml; p = yaml.safe_load(open('params.yaml'))['b']; import sys; p['y'] == 'fail' and sys.exit(3); json.dump([p, json.load(open('first.json'))], open('second.json', 'w'))"
    deps: [first.json]
    params: [b]
    outs: [second.json]
  first:
    cmd: python -c "import json, yaml; json.dump(yaml.safe_load(open('params.yaml'))['a'], open('first.json', 'w'))"
    params: [a]
    outs: [first.json]
  lonely:
    cmd: python -c "open('lonely.txt', 'w').write('x')"
    outs: [lonely.txt]
"""


def toy_project(root, dvc_yaml: str = TOY_DVC, params: str = TOY_PARAMS):
    """A committed git + DVC project with a two-stage pipeline and a stage on its own."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text(dvc_yaml)
    (root / "params.yaml").write_text(params)
    (root / ".gitignore").write_text("/.state/\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "toy"], cwd=root, check=True)
    return root


def test_plan_follows_dvc_graph_and_status_then_repro_reports_dvc_outcome(tmp_path):
    from morer1.orchestrate import StageFailed, plan_pipeline, repro_stage

    project = toy_project(tmp_path / "toy")
    plan = plan_pipeline(project)
    assert plan.stages == ["first", "second", "lonely"] and plan.changed == {"first", "second", "lonely"}
    assert plan.upstream == {"first": set(), "second": {"first"}, "lonely": set()}
    assert repro_stage(project, "first").status == "ran"
    assert repro_stage(project, "first").status == "skipped"  # DVC's answer, not its log
    assert repro_stage(project, "second").status == "ran"
    assert repro_stage(project, "lonely").status == "ran"

    plan = plan_pipeline(project)
    assert plan.changed == set() and not any(plan.needs_run(s, set()) for s in plan.stages)  # a no-op run
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("x: 1 ", "x: 5 "))
    plan = plan_pipeline(project, ["second", "first"])
    assert plan.stages == ["first", "second"] and plan.changed == {"first"}
    assert plan.needs_run("first", set()) and plan.needs_run("second", {"first"}) and not plan.needs_run("second", set())
    with pytest.raises(BadInputError, match="no such stage: third"):
        plan_pipeline(project, ["third"])

    (project / "params.yaml").write_text(params.replace("y: hello", "y: fail"))  # `second` exits with 3
    with pytest.raises(StageFailed) as failed:
        repro_stage(project, "second")
    assert failed.value.exit_code == 3 and not failed.value.transient and "exited with 3" in failed.value.log_tail


def test_exit_code_recorded_by_the_command_wins_over_the_launcher_s(tmp_path):
    """`accelerate launch` turns every failure into exit code 1: the code the morer1 CLI records is used instead."""
    from morer1.orchestrate import StageFailed, repro_stage

    project = toy_project(tmp_path / "toy", dvc_yaml="""\
stages:
  gate:
    cmd: python -c "from morer1.errors import record_exit; record_exit(3, 'gate failed'); raise SystemExit(1)"
    outs: [never.txt]
""")
    with pytest.raises(StageFailed) as failed:
        repro_stage(project, "gate")
    assert failed.value.exit_code == 3 and "data validation failed" in str(failed.value)
