"""MLflow tracking: one parent run per pipeline execution, one nested run per stage.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite file in the project's state folder
(`MORER1_STATE_DIR`, default `.state/`). The flow starts the parent run and passes its id to the stage
processes in `MORER1_PARENT_RUN_ID`; a stage run without it is a top-level run.
`MORER1_RUN_TAGS` (a JSON object) adds tags to every stage run, e.g. the ablation grid and cell of `morer1 ablate`.

The experiment is tagged as a model-training one (`EXPERIMENT_KIND_TAG`), which MLflow 3's UI reads to open it in
its model-training view rather than the GenAI one (traces, judges), and every stage run carries one source name,
`morer1 <stage>` (MLflow would name the entry script: `morer1`, or `__main__.py` under `accelerate launch`).

A stage run records the host and pid of its process. A process that is killed outright (SIGKILL, out of memory,
a lost node) cannot end its run, which would stay RUNNING forever: the next run of the same stage ends such runs as
KILLED when their process is gone, and a training stage that resumes a checkpoint tags its run with the run that
wrote the checkpoint (`resumed_run_id`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

PARENT_RUN_ENV = "MORER1_PARENT_RUN_ID"
RUN_TAGS_ENV = "MORER1_RUN_TAGS"
EXPERIMENT_ENV = "MORER1_EXPERIMENT"
DEFAULT_EXPERIMENT = "morer1"
HOST_TAG, PID_TAG = "morer1.host", "morer1.pid"
RESUMED_TAG = "resumed_run_id"
RUN_MARKER = "RUN"  # in a checkpoint folder: the MLflow run that trains into it
# MLflow 3's experiment kind (its UI's enum ExperimentKind): "custom_model_development" is "Machine learning", the
# model-training view (runs, metrics, models); without the tag the UI falls back to its GenAI view (traces)
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
SOURCE_TAG = "mlflow.source.name"

logger = logging.getLogger(__name__)


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


def in_pipeline() -> bool:
    """Whether this process runs as a pipeline stage: under `dvc repro` (DVC sets `DVC_STAGE` for a stage's command)
    or in a flow's parent run (`MORER1_PARENT_RUN_ID`)."""
    return bool(os.environ.get("DVC_STAGE") or os.environ.get(PARENT_RUN_ENV))


def standalone_tracked(asked: bool = False) -> bool:
    """Whether a command that also runs on its own (`morer1 ingest` checking a release) logs an MLflow run: always as a
    pipeline stage; on its own only when asked (`--track`) or when `MLFLOW_TRACKING_URI` names a store, so that a
    check of a folder leaves nothing in the project's experiment (nor a `.state/` where there is no project)."""
    return asked or in_pipeline() or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def setup(experiment: str | None = None):
    """Point mlflow at the tracking store and select the experiment (created on first use); return mlflow."""
    import mlflow

    local = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports the variable
    mlflow.set_tracking_uri(tracking_uri())
    name = experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        location = (state_dir() / "mlartifacts").as_uri() if local else None
        mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    elif EXPERIMENT_KIND_TAG not in (found.tags or {}):  # made before the tag, or by someone else: tag it once
        mark_training_experiment(found.experiment_id)
    mlflow.set_experiment(name)
    return mlflow


def mark_training_experiment(experiment_id: str) -> None:
    """Tag an experiment as a model-training one (`EXPERIMENT_KIND_TAG`); a kind someone chose in the UI is never
    replaced (the caller sets it only where none is). An account that may only read the experiment leaves it as is."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    except MlflowException as exc:
        logger.info("experiment %s left without %s: %s", experiment_id, EXPERIMENT_KIND_TAG, exc.message)


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


def source_tags(name: str, commit: str | None = None) -> dict[str, str]:
    """MLflow's source tags of a run of `name` (a stage, `pipeline`): source `morer1 <name>` whatever script started
    the process, and the git commit (`commit`, as `git_commit` gives it) where known, which MLflow itself records only
    for a script inside the checkout."""
    tags = {SOURCE_TAG: f"morer1 {name}", "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


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
    tags = {"morer1.stage": stage, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), **version_tags()}
    tags.update(source_tags(stage, tags["git_commit"]))
    extra = json.loads(os.environ.get(RUN_TAGS_ENV) or "{}")
    if not isinstance(extra, dict):
        raise ValueError(f"{RUN_TAGS_ENV} must be a JSON object of tags, not {extra!r}")
    tags.update({str(k): str(v) for k, v in extra.items()})
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as run:
        ended = end_stale_runs(stage, run.info.run_id)
        if ended:
            mlflow.set_tag("morer1.ended_stale_runs", ",".join(ended))
        if config is not None:
            mlflow.log_params(flat_params(stage, config))
        yield run


def numeric_leaves(summary: dict, prefix: str = "") -> dict[str, float]:
    """Numbers (not bools) anywhere in a nested summary, as flat `a.b.c` keys."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_leaves(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def log_summary(summary: dict) -> None:
    """The one way a stage logs its outcome to its active MLflow run: every number of the summary as a metric,
    and the summary itself as `summary.json`."""
    import mlflow

    mlflow.log_metrics(numeric_leaves(summary))
    mlflow.log_dict(summary, "summary.json")


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _gone(run) -> bool:
    """A RUNNING run whose process is known to be gone: it ran on this host and its pid is no longer alive."""
    tags = run.data.tags
    pid = tags.get(PID_TAG, "")
    return tags.get(HOST_TAG) == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def _end_as_killed(client, run, by_run_id: str, why: str) -> None:
    client.set_tag(run.info.run_id, "morer1.ended_by_run_id", by_run_id)
    client.set_terminated(run.info.run_id, status="KILLED")
    logger.warning("MLflow run %s (%s) was still RUNNING: %s; ended as KILLED by run %s",
                   run.info.run_id, run.data.tags.get("morer1.stage", "?"), why, by_run_id)


def end_stale_runs(stage: str, current_run_id: str) -> list[str]:
    """End as KILLED the runs of `stage` in the current run's experiment that are still RUNNING although their process
    (same host, recorded pid) is gone; return their ids. Runs of other hosts are left alone: their process cannot be
    checked from here."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(current_run_id).info.experiment_id
    running = client.search_runs([experiment], filter_string=f"tags.`morer1.stage` = '{stage}' and "
                                 "attributes.status = 'RUNNING'")
    ended = []
    for run in running:
        if run.info.run_id != current_run_id and _gone(run):
            _end_as_killed(client, run, current_run_id, f"its process {run.data.tags[PID_TAG]} is gone")
            ended.append(run.info.run_id)
    return ended


def link_resumed_run(checkpoint_folder: str | Path, resuming: bool) -> str | None:
    """Record the active MLflow run as the one training into `checkpoint_folder`; when resuming, tag it with the run
    that wrote the checkpoints (`resumed_run_id`), end that run as KILLED if it is still RUNNING (unless its process is
    alive on this host), and return its id. No active run (e.g. a library call without a stage run): nothing to do."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    active = mlflow.active_run()
    if active is None:
        return None
    marker = Path(checkpoint_folder) / RUN_MARKER
    previous = marker.read_text().strip() if resuming and marker.is_file() else ""
    marker.write_text(active.info.run_id + "\n")
    if not previous or previous == active.info.run_id:
        return None
    mlflow.set_tag(RESUMED_TAG, previous)
    client = MlflowClient()
    try:
        run = client.get_run(previous)
    except MlflowException:  # another tracking store, or the run was deleted
        logger.warning("resuming checkpoints of MLflow run %s, which this tracking store does not know", previous)
        return previous
    pid = run.data.tags.get(PID_TAG, "")
    alive_here = run.data.tags.get(HOST_TAG) == socket.gethostname() and pid.isdigit() and process_alive(int(pid))
    if run.info.status == "RUNNING" and not alive_here:
        _end_as_killed(client, run, active.info.run_id, "its checkpoints are resumed by a new run")
    logger.warning("MLflow run %s resumes the checkpoints of run %s", active.info.run_id, previous)
    return previous
