"""Prefect flow: run the DVC pipeline stage by stage, in DVC's dependency order, under one MLflow parent run.

    python flows/pipeline.py [--project-dir DIR] [--stages a,b,...] [--profile NAME]

DVC is asked once which stages changed; a stage runs (`dvc repro --single-item`, a Prefect task) when it
changed or a stage it depends on ran, so a run where nothing changed calls no stage and takes seconds; it is
still recorded (the MLflow run, every stage `skipped`, the Prefect flow run and its summary artifact).
With `--profile NAME` the pipeline runs as the DVC experiment `NAME-<UTC time>` with the overlay
`profiles/NAME.yaml` applied (`dvc exp run --temp -S ...`); params.yaml and the workspace are left as they are.
A stage that `placement.pools` (params.yaml, or a profile made of `placement` keys only) puts on a work pool runs
there, as a child flow run of the `morer1-stage/<pool>` deployment (flows/stage.py, morer1.placement).

As a script it ends with a summary: per stage one line of what its outputs say (facts kept and rejected, rationales,
losses, rewards, each candidate's dev/test F1 with its interval, the promotion decision and its reason), or "nothing
changed" and the champion's figures; the flow run's `pipeline-summary` artifact holds the same. A failed stage or gate
prints its message once, then where the details are: Prefect's console lines stay one line each, without
tracebacks, and everything goes in full to `$MORER1_STATE_DIR/logs/pipeline-<UTC time>.log` (morer1.console).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

from morer1.orchestrate import (
    PipelineLocked,
    StageFailed,
    champion_metrics,
    experiment_name,
    experiment_stage_results,
    pipeline_lock,
    plan_pipeline,
    repro_stage,
    run_experiment,
    run_summary,
    set_env_defaults,
    set_param_overrides,
    summary_markdown,
)
from morer1 import prefect_server

PROJECT = Path(__file__).resolve().parent.parent
set_env_defaults(PROJECT)


def _script_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument("--profile", help="params profile of profiles/ to run as a DVC experiment (default: none)")
    return parser.parse_args()


SERVER = None
if __name__ == "__main__":
    # As a script: the pipeline lock first (a second run stops here, in one line; the kernel frees the lock when
    # this process ends), then, without PREFECT_API_URL, Prefect's temporary server boots in its own process while
    # this one imports Prefect, MLflow and DVC and asks DVC what changed (morer1.prefect_server).
    ARGS = _script_args()
    LOCK = ExitStack()  # held in a module global for the process's life: a dropped context manager would release it
    try:
        LOCK.enter_context(pipeline_lock(ARGS.project_dir))
    except PipelineLocked as exc:
        sys.exit(f"morer1 pipeline: {exc}")
    SERVER = prefect_server.launch()

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run

from morer1 import placement, tracking
from morer1.console import failure_lines, log_file, quiet_console
from morer1.errors import BadInputError

LOG_FILE = None
if __name__ == "__main__":  # Prefect has configured logging on import: its console lines short, everything in a file
    LOG_FILE = quiet_console(log_file(tracking.state_dir()))
LAST_RUN: dict = {}  # the script prints the closing summary of the flow run it started (`_run_pipeline` fills it)


def _transient(task, task_run, state) -> bool:
    """Retry a stage only for faults that a rerun can fix (not bad data, not a failed gate, not a held lock)."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, (PipelineLocked, placement.PoolUnavailable, BadInputError)):
        return False
    return not isinstance(exc, StageFailed) or exc.transient


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, task_run_name="dvc-{stage}")
def run_stage(project_dir: str, stage: str, parent_run_id: str) -> dict:
    """One DVC stage; its MLflow run nests under the pipeline run."""
    result = repro_stage(project_dir, stage, {tracking.PARENT_RUN_ENV: parent_run_id})
    get_run_logger().info("stage %s %s in %.1f s", stage, result.status, result.seconds)
    return vars(result)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, task_run_name="dvc-{stage}")
def run_remote_stage(project_dir: str, stage: str, pool: str, parent_run_id: str, config: dict) -> dict:
    """One DVC stage on a worker of `pool`: its inputs pushed to the DVC remote, a run of `morer1-stage/<pool>` (a
    child of this task run), then the worker's dvc.lock and the stage's outputs pulled here. A run that crashed
    (its worker died) is retried: the new run resumes from the checkpoints the stage left."""
    settings = placement.PlacementConfig(**config)
    commit = placement.prepare_remote_stage(project_dir, stage, settings)
    lock = Path(project_dir) / "dvc.lock"
    mlflow = tracking.setup()
    try:
        run = run_deployment(f"{placement.STAGE_FLOW}/{pool}", timeout=0, flow_run_name=stage, parameters={
            "stage": stage, "commit": commit, "dvc_lock": lock.read_text(encoding="utf-8") if lock.is_file() else None,
            "dvc_remote": settings.dvc_remote, "parent_run_id": parent_run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
            "experiment": os.environ.get(tracking.EXPERIMENT_ENV, tracking.DEFAULT_EXPERIMENT), "pool": pool})
    except ObjectNotFound:
        raise placement.PoolUnavailable(
            f"stage {stage}: the Prefect server has no deployment {placement.STAGE_FLOW}/{pool}; deploy it from the "
            f"checkout that pool's workers use: prefect deploy --name {pool}") from None
    logger = get_run_logger()
    logger.info("stage %s submitted to work pool %s as flow run %s", stage, pool, run.name)
    result = placement.stage_result(placement.wait_for_stage(run.id, stage, pool, settings), stage)
    placement.finish_remote_stage(project_dir, stage, result, settings)
    logger.info("stage %s %s in %.1f s on %s in %s", stage, result["status"], result["seconds"], result["host"],
                result["checkout"])
    return {key: result[key] for key in ("stage", "status", "seconds", "host", "checkout")} | {"pool": pool}


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
    with pipeline_lock(project_dir):  # a second run in this checkout stops here (`__main__` takes it before this)
        return _run_pipeline(project_dir, stages, profile)


def _run_pipeline(project_dir: str, stages: list[str] | None, profile: str | None) -> list[dict]:
    """The flow's body, under the pipeline lock."""
    logger = get_run_logger()
    mlflow = tracking.setup()
    overrides = set_param_overrides(project_dir, profile) if profile else []  # a stale key stops here
    settings = placement.placement_config(project_dir, profile)
    overrides = [o for o in overrides if not o.lstrip("+").startswith("placement.")]  # where, not what
    plan = _PLANS.pop((project_dir, tuple(stages or ())), None) or plan_pipeline(project_dir, stages)
    pools = placement.remote_stages(project_dir, settings, plan.stages, bool(overrides), mlflow.get_tracking_uri())
    if pools:
        placement.ensure_zombie_automation()  # a stage run whose worker dies is marked Crashed, then retried
    noop = not overrides and not plan.changed
    if noop:
        logger.info("DVC reports no changes: every stage is up to date")
    exp: dict | None = {"profile": profile, "experiment": experiment_name(profile)} if overrides else None
    # the stage tag, host and pid let the next pipeline run end this one as KILLED if its process dies outright
    tags = {"prefect.flow_run_id": str(flow_run.id), "morer1.stage": "pipeline",
            tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: str(os.getpid()),
            **tracking.source_tags("pipeline"), "morer1.noop": str(noop).lower()}
    if exp:
        tags.update({"morer1.profile": profile, "dvc.experiment": exp["experiment"]})
    results: list[dict] = []
    # a run where DVC found nothing to do says so in the runs list: `pipeline (no-op)`, not a second `pipeline` row
    with mlflow.start_run(run_name="pipeline (no-op)" if noop else "pipeline", tags=tags) as run:
        ended = tracking.end_stale_runs("pipeline", run.info.run_id)
        if ended:
            mlflow.set_tag("morer1.ended_stale_runs", ",".join(ended))
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
                        results.append(run_remote_stage(project_dir, stage, pools[stage], run.info.run_id,
                                                        settings.model_dump()) if stage in pools else
                                       run_stage(project_dir, stage, run.info.run_id))
                    except (StageFailed, placement.PoolUnavailable) as exc:  # recorded as the failed stage
                        results.append({"stage": stage, "status": "failed", "seconds": None})
                        mlflow.set_tag("morer1.failed_stage", stage)
                        mlflow.log_text(str(exc), "failure.txt")
                        raise
                    if results[-1]["status"] == "ran":
                        ran.add(stage)
        finally:
            mlflow.set_tags(tracking.version_tags(project_dir))
            mlflow.log_dict({"stages": results, **({"dvc_experiment": exp} if exp else {})}, "pipeline_summary.json")
            champion = None if exp else champion_metrics(project_dir)
            if champion:  # the served model's headline figures on the run of the pipeline
                mlflow.log_metrics(champion["metrics"])
                mlflow.set_tags({"morer1.champion": f"{champion['model_name']}/{champion['version']}"})
            create_markdown_artifact(
                key="pipeline-summary",
                markdown=summary_markdown(project_dir, results, run.info.run_id, run.info.experiment_id, exp, champion),
                description="Stages run or skipped by DVC with what their outputs say, the champion's figures, "
                            "evaluation metrics, registered version and promotion",
            )
            lines = run_summary(project_dir, results, champion, exp)
            LAST_RUN.update(run_id=run.info.run_id, lines=lines)
            if LOG_FILE is None:  # a deployment's run: the summary in its log (the script prints it itself)
                logger.info("\n".join(lines))
    return results


_PLANS: dict = {}  # (project_dir, stages) -> Plan computed while the temporary server boots (see below)


if __name__ == "__main__":
    stages = ARGS.stages.split(",") if ARGS.stages else None
    if SERVER:
        try:
            tracking.setup()
            _PLANS[(ARGS.project_dir, tuple(stages or ()))] = plan_pipeline(ARGS.project_dir, stages)
        except Exception:  # noqa: BLE001 - the flow does it again and reports the error
            pass
        SERVER.wait_ready(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    try:
        pipeline(ARGS.project_dir, stages, ARGS.profile)  # takes the lock again (re-entrant): held since the start
    except (PipelineLocked, placement.PoolUnavailable) as exc:  # DVC's own lock held elsewhere; no worker came
        sys.exit(f"morer1 pipeline: {exc}")
    except (StageFailed, BadInputError) as exc:  # its message once (Prefect's console lines name only its type)
        print("\n".join(failure_lines(str(exc), LOG_FILE, LAST_RUN.get("run_id"))), file=sys.stderr)
        code = getattr(exc, "exit_code", None)
        sys.exit(code if code in (2, 3) else 2 if isinstance(exc, BadInputError) else 1)
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback in the log file
        import traceback

        with LOG_FILE.open("a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        print("\n".join(failure_lines(f"{type(exc).__name__}: {exc}", LOG_FILE, LAST_RUN.get("run_id"))),
              file=sys.stderr)
        sys.exit(1)
    print("\n".join(LAST_RUN.get("lines", [])))
