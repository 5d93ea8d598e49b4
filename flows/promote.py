"""Prefect flow: copy the `challenger` candidate into the served model and move alias `champion` to it if it wins on
dev with confidence (`morer1 promote`): the paired-bootstrap interval of the difference on the same dev facts.

On servers with auth it runs with the promoter's MLflow account (`MLFLOW_TRACKING_USERNAME`/`_PASSWORD` of the
worker of work pool `morer1-promote`), the only one that may write to `register.model_name`.

    python flows/promote.py [--project-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from morer1.orchestrate import promotion_markdown, set_env_defaults

PROJECT = Path(__file__).resolve().parent.parent
set_env_defaults(PROJECT)

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from morer1 import registry
from morer1.params import load_section


@flow(name="morer1-promote")
def promote(project_dir: str = str(PROJECT)) -> dict:
    """Promote with the `register` section of `<project_dir>/params.yaml`; post the decision as artifact `promotion`.

    `register.facts`, when relative, is read under `project_dir`: the challenger's dev facts on which the champion is
    re-scored when it was scored on other dev data (without them the decision is `refused`)."""
    cfg = load_section("register", registry.RegisterConfig, Path(project_dir) / "params.yaml")
    cfg = cfg.model_copy(update={"facts": str(Path(project_dir) / cfg.facts)})  # an absolute facts stays as it is
    decision = registry.promote(cfg)
    get_run_logger().info("%s", registry.decision_line(decision))
    create_markdown_artifact(key="promotion", markdown="# morer1 promotion\n\n" + promotion_markdown(decision),
                             description="Decision of the champion/challenger comparison")
    return decision


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    promote(parser.parse_args().project_dir)
