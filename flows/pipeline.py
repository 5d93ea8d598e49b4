"""Prefect flow: run the DVC pipeline stage by stage, in DVC's dependency order, under one MLflow parent run.

    python flows/pipeline.py [--project-dir DIR] [--stages a,b,...] [--profile NAME]

DVC is asked once which stages changed; a stage runs (`dvc repro --single-item`, a Prefect task) when it
changed or a stage it depends on ran, so a run where nothing changed calls no stage and takes seconds; it is
still recorded (the MLflow run, every stage `skipped`, the Prefect flow run and its summary artifact).
With `--profile NAME` the pipeline runs as the DVC experiment `NAME-<UTC time>` with the overlay
`profiles/NAME.yaml` applied (`dvc exp run --temp -S ...`); params.yaml and the workspace are left as they are.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from morer1.orchestrate import (
    StageFailed,
    experiment_name,
    experiment_stage_results,
    plan_pipeline,
    repro_stage,
    run_experiment,
    set_env_defaults,
    set_param_overrides,
    summary_markdown,
)

PROJECT = Path(__file__).resolve().parent.parent
set_env_defaults(PROJECT)

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from morer1 import tracking


def _transient(task, task_run, state) -> bool:
    """Retry a stage only for faults that a rerun can fix (not bad data, not a failed gate)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, StageFailed) or exc.transient


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, task_run_name="dvc-{stage}")
def run_stage(project_dir: str, stage: str, parent_run_id: str) -> dict:
    """One DVC stage; its MLflow run nests under the pipeline run."""
    result = repro_stage(project_dir, stage, {tracking.PARENT_RUN_ENV: parent_run_id})
    get_run_logger().info("stage %s %s in %.1f s", stage, result.status, result.seconds)
    return vars(result)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_transient, task_run_name="dvc-exp-{name}")
def run_profile_experiment(project_dir: str, name: str, overrides: list[str], stages: list[str] | None,
                           parent_run_id: str) -> dict:
    """The pipeline as a DVC experiment in a temporary workspace; stage runs nest under the pipeline run. A retry
    restores the stages that finished from DVC's run cache."""
    result = run_experiment(project_dir, name, overrides, stages, {tracking.PARENT_RUN_ENV: parent_run_id})
    get_run_logger().info("experiment %s (%s) done in %.1f s", name, result["rev"], result["seconds"])
    return result


@flow(name="morer1-pipeline", log_prints=True)
def pipeline(project_dir: str = str(PROJECT), stages: list[str] | None = None, profile: str | None = None) -> list[dict]:
    """Run `stages` (default: the whole pipeline) in DVC's order; post the summary artifact `pipeline-summary`.

    `profile` names an overlay in `profiles/`: the run is then a DVC experiment with it applied, and params.yaml
    is not touched. None runs params.yaml as it is (the demo, unless changed).
    """
    logger = get_run_logger()
    mlflow = tracking.setup()
    overrides = set_param_overrides(project_dir, profile) if profile else None  # a stale key stops here
    plan = _PLANS.pop((project_dir, tuple(stages or ())), None) or plan_pipeline(project_dir, stages)
    if not profile and not plan.changed:
        logger.info("DVC reports no changes: every stage is up to date")
    exp: dict | None = {"profile": profile, "experiment": experiment_name(profile)} if profile else None
    tags = {"prefect.flow_run_id": str(flow_run.id)}
    if exp:
        tags.update({"morer1.profile": profile, "dvc.experiment": exp["experiment"]})
    results: list[dict] = []
    with mlflow.start_run(run_name="pipeline", tags=tags) as run:
        try:
            if exp:
                try:
                    exp.update(run_profile_experiment(project_dir, exp["experiment"], overrides, stages,
                                                      run.info.run_id))
                except StageFailed as exc:
                    results.append({"stage": f"experiment {exp['experiment']}", "status": "failed", "seconds": None})
                    mlflow.set_tag("morer1.failed_stage", f"experiment {exp['experiment']}")
                    mlflow.log_text(str(exc), "failure.txt")
                    raise
                mlflow.set_tag("dvc.experiment_rev", exp["rev"])
                results = experiment_stage_results(project_dir, exp["rev"], plan.stages)
            else:
                ran: set[str] = set()
                for stage in plan.stages:
                    if not plan.needs_run(stage, ran):
                        results.append({"stage": stage, "status": "skipped", "seconds": None})
                        continue
                    try:
                        results.append(run_stage(project_dir, stage, run.info.run_id))
                    except StageFailed as exc:
                        results.append({"stage": stage, "status": "failed", "seconds": None})
                        mlflow.set_tag("morer1.failed_stage", stage)
                        mlflow.log_text(str(exc), "failure.txt")
                        raise
                    if results[-1]["status"] == "ran":
                        ran.add(stage)
        finally:
            mlflow.set_tags(tracking.version_tags(project_dir))
            mlflow.log_dict({"stages": results, **({"dvc_experiment": exp} if exp else {})}, "pipeline_summary.json")
            create_markdown_artifact(
                key="pipeline-summary",
                markdown=summary_markdown(project_dir, results, run.info.run_id, run.info.experiment_id, exp),
                description="Stages run or skipped by DVC, evaluation metrics, registered version and promotion",
            )
    return results


_PLANS: dict = {}  # (project_dir, stages) -> Plan computed while the temporary server starts (see below)


def _start_temporary_server() -> threading.Thread | None:
    """Without `PREFECT_API_URL`, start the temporary Prefect server the flow would start, in a thread, now; return
    once its process is launched. It boots (seconds of imports, in its own process) while this process does what
    the flow does first: MLflow's store and DVC's status. The flow then finds it running (Prefect keeps one
    `SubprocessASGIServer` per process). None when a server is configured."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    launching = threading.Event()

    def start() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
        finally:
            launching.set()
        server.start()  # launches the process at once, then waits until it answers

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    launching.wait()
    return thread


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument("--profile", help="params profile of profiles/ to run as a DVC experiment (default: none)")
    args = parser.parse_args()
    stages = args.stages.split(",") if args.stages else None
    server = _start_temporary_server()
    if server:
        try:
            tracking.setup()
            _PLANS[(args.project_dir, tuple(stages or ()))] = plan_pipeline(args.project_dir, stages)
        except Exception:  # noqa: BLE001 - the flow does it again and reports the error
            pass
        server.join()
    pipeline(args.project_dir, stages, args.profile)
