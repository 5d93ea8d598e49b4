"""Prefect flow: run the DVC stages of dvc.yaml in order, under one MLflow parent run.

    python flows/pipeline.py [--project-dir DIR] [--stages a,b,...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MORER1_STATE_DIR", str(PROJECT / ".state"))
os.environ.setdefault("PREFECT_HOME", str(Path(os.environ["MORER1_STATE_DIR"]) / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from morer1 import tracking  # noqa: E402
from morer1.orchestrate import StageFailed, dvc_stages, repro_stage  # noqa: E402


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
def pipeline(project_dir: str = str(PROJECT), stages: list[str] | None = None) -> list[dict]:
    """Run `stages` (default: all of dvc.yaml) in order; post a summary artifact."""
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
            rows = "\n".join(f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results)
            create_markdown_artifact(
                key="pipeline-summary",
                markdown=f"# morer1 pipeline\n\nMLflow run `{run.info.run_id}` "
                         f"(experiment `{run.info.experiment_id}`)\n\n| stage | status | seconds |\n|---|---|---|\n{rows}\n",
                description="Stages run or skipped by DVC in this flow run",
            )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    args = parser.parse_args()
    pipeline(args.project_dir, args.stages.split(",") if args.stages else None)
