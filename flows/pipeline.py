"""Prefect flow: run the DVC stages of dvc.yaml in order, under one MLflow parent run.

    python flows/pipeline.py [--project-dir DIR] [--stages a,b,...] [--profile NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from morer1.orchestrate import (
    StageFailed,
    apply_profile,
    dvc_stages,
    repro_stage,
    set_env_defaults,
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


@flow(name="morer1-pipeline", log_prints=True)
def pipeline(project_dir: str = str(PROJECT), stages: list[str] | None = None, profile: str | None = None) -> list[dict]:
    """Run `stages` (default: all of dvc.yaml) in order; post the summary artifact `pipeline-summary`.

    `profile` names a params file in `profiles/` to run with (it becomes params.yaml; the previous one is
    backed up); None runs params.yaml as it is (the demo, unless changed).
    """
    if profile:
        backup = apply_profile(project_dir, profile)
        get_run_logger().info("params profile %s in place%s", profile, f"; previous params.yaml saved to {backup}"
                              if backup else "")
    stages = stages or dvc_stages(project_dir)
    mlflow = tracking.setup()
    results: list[dict] = []
    with mlflow.start_run(run_name="pipeline", tags={"prefect.flow_run_id": str(flow_run.id)}) as run:
        try:
            for stage in stages:
                try:
                    results.append(run_stage(project_dir, stage, run.info.run_id))
                except StageFailed as exc:
                    results.append({"stage": stage, "status": "failed", "seconds": None})
                    mlflow.set_tag("morer1.failed_stage", stage)
                    mlflow.log_text(str(exc), "failure.txt")
                    raise
        finally:
            mlflow.set_tags(tracking.version_tags(project_dir))
            mlflow.log_dict({"stages": results}, "pipeline_summary.json")
            create_markdown_artifact(
                key="pipeline-summary",
                markdown=summary_markdown(project_dir, results, run.info.run_id, run.info.experiment_id),
                description="Stages run or skipped by DVC, evaluation metrics, registered version and promotion",
            )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument("--profile", help="params profile of profiles/ to run with (default: params.yaml as it is)")
    args = parser.parse_args()
    pipeline(args.project_dir, args.stages.split(",") if args.stages else None, args.profile)
