"""Prefect flow: run one DVC stage in this checkout, for a pipeline flow running elsewhere (morer1.placement).

Deployed once per work pool as `morer1-stage/<pool>` (prefect.yaml), from the checkout that pool's workers use;
the pipeline flow submits it with `run_deployment` for each stage that `placement.pools` puts on that pool.
"""

from __future__ import annotations

import json
from pathlib import Path

from morer1.errors import EXIT_BAD_INPUT, BadInputError
from morer1.orchestrate import StageFailed, set_env_defaults

PROJECT = Path(__file__).resolve().parent.parent
set_env_defaults(PROJECT)

from prefect import flow, get_run_logger  # noqa: E402 - after the state and Prefect home defaults
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from morer1 import placement, tracking  # noqa: E402


@flow(name=placement.STAGE_FLOW, flow_run_name="{stage}", log_prints=True)
def stage(stage: str, commit: str, dvc_lock: str | None = None, dvc_remote: str = "", parent_run_id: str = "",
          tracking_uri: str = "", experiment: str = tracking.DEFAULT_EXPERIMENT, pool: str = "") -> dict:
    """Run `stage` at `commit` with the pipeline's `dvc_lock`, data through `dvc_remote`; the stage's MLflow run
    nests under `parent_run_id` on `tracking_uri`. Posts the result as the artifact `morer1-stage-result`."""
    env = {tracking.PARENT_RUN_ENV: parent_run_id, tracking.EXPERIMENT_ENV: experiment,
           tracking.RUN_TAGS_ENV: json.dumps({"morer1.pool": pool, "morer1.checkout": str(PROJECT)})}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        result = placement.run_stage_here(PROJECT, stage, commit, dvc_lock, dvc_remote, env)
    except (StageFailed, BadInputError) as exc:  # the flow retries neither bad input nor a failed gate
        failed = ({"exit_code": exc.exit_code, "log_tail": exc.log_tail} if isinstance(exc, StageFailed) else
                  {"exit_code": EXIT_BAD_INPUT, "log_tail": str(exc)})
        create_markdown_artifact(key=placement.RESULT_KEY, markdown=placement.result_markdown(
            {"stage": stage, "status": "failed", **failed}))
        raise
    get_run_logger().info("stage %s %s in %.1f s in %s", stage, result["status"], result["seconds"], PROJECT)
    create_markdown_artifact(key=placement.RESULT_KEY, markdown=placement.result_markdown(result),
                             description=f"stage {stage}: where it ran and its dvc.lock")
    return {k: v for k, v in result.items() if k != "dvc_lock"}
