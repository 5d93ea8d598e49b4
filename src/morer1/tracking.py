"""MLflow tracking: one parent run per pipeline execution, one nested run per stage.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite file in the project's state folder
(`MORER1_STATE_DIR`, default `.state/`). The flow starts the parent run and passes its id to the stage
processes in `MORER1_PARENT_RUN_ID`; a stage run without it is a top-level run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

PARENT_RUN_ENV = "MORER1_PARENT_RUN_ID"
EXPERIMENT_ENV = "MORER1_EXPERIMENT"
DEFAULT_EXPERIMENT = "morer1"


def state_dir() -> Path:
    """Folder of generated local state (MLflow DB and artifacts, Prefect home)."""
    return Path(os.environ.get("MORER1_STATE_DIR", ".state")).resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the project's local SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    state_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def setup(experiment: str | None = None):
    """Point mlflow at the tracking store and select the experiment (created on first use); return mlflow."""
    import mlflow

    local = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports the variable
    mlflow.set_tracking_uri(tracking_uri())
    name = experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None:
        location = (state_dir() / "mlartifacts").as_uri() if local else None
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return mlflow


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD commit of the project (with `-dirty` when the tree has changes), or `unknown`."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_lock_hash(cwd: str | Path = ".") -> str:
    """sha256 of `dvc.lock` (the data and pipeline version), or `none` before the first run."""
    path = Path(cwd) / "dvc.lock"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "none"


def version_tags(cwd: str | Path = ".") -> dict[str, str]:
    return {"git_commit": git_commit(cwd), "dvc_lock_sha256": dvc_lock_hash(cwd)}


def flat_params(prefix: str, config: BaseModel) -> dict[str, str]:
    """A config as flat `prefix.field` params (nested models and lists rendered as text)."""
    out = {}
    for key, value in config.model_dump().items():
        if isinstance(value, dict):
            out.update({f"{prefix}.{key}.{k}": str(v) for k, v in value.items()})
        else:
            out[f"{prefix}.{key}"] = str(value)
    return out


@contextmanager
def stage_run(stage: str, config: BaseModel | None = None):
    """An MLflow run for one stage, nested under the pipeline run when there is one."""
    mlflow = setup()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"morer1.stage": stage, **version_tags()}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as run:
        if config is not None:
            mlflow.log_params(flat_params(stage, config))
        yield run
