"""Prefect flow: the ablation grid (`morer1.ablate`), one task per cell (a DVC experiment), the table as an artifact.

    python flows/ablate.py [--project-dir DIR] [--grid ablation.yaml] [--profile NAME] [--force] [--from-dvc]

Cells run one after the other; a failed cell is a line of the table and the others go on. The table is printed
(stdout), written under `reports/ablation/<grid>/`, logged to MLflow and posted as the artifact `ablation-table`.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from morer1.orchestrate import PipelineLocked, StageFailed, pipeline_lock, set_env_defaults

PROJECT = Path(__file__).resolve().parent.parent
set_env_defaults(PROJECT)

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from morer1 import ablate


def _transient(task, task_run, state) -> bool:
    """Retry a cell only for faults that a rerun can fix (not bad data, not bad params)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, StageFailed) or exc.transient


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_transient, task_run_name="cell-{name}")
def run_cell(project_dir: str, name: str, overrides: list[str], env: dict[str, str]) -> dict:
    """One cell as a DVC experiment; a retry restores the stages that finished from DVC's run cache."""
    result = ablate.run_cell(project_dir, name, overrides, env)
    get_run_logger().info("cell %s (%s) done in %.1f s", name, result["rev"], result["seconds"])
    return result


@flow(name="morer1-ablate", log_prints=True)
def ablation(project_dir: str = str(PROJECT), grid: str = "ablation.yaml", profile: str | None = None,
             force: bool = False, from_dvc: bool = False) -> str:
    """Run the grid file `grid` (relative to `project_dir`); post the table as the artifact `ablation-table`; return
    the table (markdown)."""
    project = Path(project_dir)
    spec, cells = ablate.load_grid(project / grid, project, profile)  # a bad grid stops here, before any cell
    result = ablate.run(spec, cells, project, project / "reports" / "ablation", force=force, read_only=from_dvc,
                        cell_runner=run_cell)
    get_run_logger().info("table: %s", ", ".join(str(f) for f in result["files"]))
    create_markdown_artifact(key="ablation-table", markdown=result["markdown"],
                             description=f"Ablation grid {spec.name}: rows over seeds, and each cell")
    return result["markdown"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    parser.add_argument("--grid", default="ablation.yaml", help="grid file, relative to the project")
    parser.add_argument("--profile", help="profiles/<name>.yaml under every cell (instead of the grid's)")
    parser.add_argument("--force", action="store_true", help="run every cell again")
    parser.add_argument("--from-dvc", action="store_true", help="run nothing: read the cells' DVC experiments")
    args = parser.parse_args()
    try:  # before the flow starts: a pipeline run or another grid in this checkout stops this one in one line
        with pipeline_lock(args.project_dir, "ablation run") if not args.from_dvc else nullcontext():
            print(ablation(args.project_dir, args.grid, args.profile, args.force, args.from_dvc))
    except PipelineLocked as exc:
        sys.exit(f"morer1 ablate: {exc}")
