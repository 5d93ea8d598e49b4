"""Placement: which Prefect work pool runs each DVC stage, and how a stage's data travels to a worker and back.

A stage listed in `placement.pools` runs as a flow run of the `morer1-stage/<pool>` deployment (flows/stage.py) on
a worker of that pool, in the worker's own checkout of the repository; every other stage runs in the pipeline
flow's process. The flow and the worker share three things only: the git commit (checked by the worker), a DVC
remote (the stage's inputs go up before it runs, its outputs come back after), and the dvc.lock text (sent as a
parameter, returned in the stage run's artifact `morer1-stage-result`).

The flow's side: `prepare_remote_stage` (checks, push the inputs), `submit_stage` (the deployment run, a child of
the calling task), `wait_for_stage` (pickup timeout, terminal state), `finish_remote_stage` (write the worker's
dvc.lock, pull the outputs). The worker's side: `run_stage_here`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import chdir
from pathlib import Path

from pydantic import Field, ValidationError

from morer1.errors import BadInputError
from morer1.orchestrate import StageFailed, load_profile, repro_stage
from morer1.params import ParamsError, StageConfig, load_section

STAGE_FLOW = "morer1-stage"  # flows/stage.py; its deployment for pool P is `morer1-stage/P`
RESULT_KEY = "morer1-stage-result"  # the stage run's artifact: what the flow needs back, as a JSON block
ZOMBIE_AUTOMATION = "morer1: crash zombie stage runs"
HEARTBEAT_GRACE_S = 90  # a running stage whose heartbeats (every 30 s, prefect.yaml) stop this long is Crashed


class PlacementConfig(StageConfig):
    """params.yaml `placement`: read by the pipeline flow only, never a dependency of a stage."""

    pools: dict[str, str] = Field(default_factory=dict, description="Stage -> Prefect work pool that runs it, as a run of the deployment morer1-stage/<pool>; stages not listed run in the pipeline flow's process.")
    dvc_remote: str = Field("", description="DVC remote that carries a remote stage's inputs to its worker and its outputs back ('': the repository's default remote).")
    pickup_timeout_s: float = Field(900, description="A remote stage that no worker of its pool starts within this many seconds fails the pipeline, naming the pool.")
    poll_s: float = Field(2.0, description="How often the flow reads a remote stage run's state, in seconds.")


class PoolUnavailable(Exception):
    """A remote stage's pool has no stage deployment, or no worker of it started the run in time: not retried (a
    retry would wait for the same pool)."""


def placement_config(project_dir: str | Path, profile: str | None = None) -> PlacementConfig:
    """The project's `placement` section, with the `placement` of `profiles/<profile>.yaml` on top (its `pools`
    added to those of params.yaml, as DVC merges the profile's keys); ParamsError naming the profile if it is bad."""
    base = load_section("placement", PlacementConfig, Path(project_dir) / "params.yaml")
    overlay = load_profile(project_dir, profile).get("placement") if profile else None
    if overlay is None:
        return base
    where = Path(project_dir) / "profiles" / f"{profile}.yaml"
    if not isinstance(overlay, dict):
        raise ParamsError(f"{where}: section 'placement': expected a mapping, got {type(overlay).__name__}")
    values = {**base.model_dump(), **overlay}
    if isinstance(overlay.get("pools"), dict):
        values["pools"] = {**base.pools, **overlay["pools"]}
    try:
        return PlacementConfig(**values)
    except ValidationError as exc:
        raise ParamsError(f"{where}: section 'placement': {exc}") from exc


# --- the checkout both sides must share ----------------------------------------------------------------------

def _git(project: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if proc.returncode:
        raise BadInputError(f"{project}: git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def checkout_commit(project_dir: str | Path) -> str:
    """HEAD of the checkout; BadInputError when a tracked file other than dvc.lock differs from it (the other side
    would run other code or params than this one)."""
    project = Path(project_dir).resolve()
    if not (project / ".git").exists():
        raise BadInputError(f"{project}: not a git checkout; remote stages run the same commit on both sides")
    commit = _git(project, "rev-parse", "--verify", "HEAD")
    changed = [path for path in _git(project, "diff", "--name-only", "HEAD").splitlines() if path != "dvc.lock"]
    if changed:
        raise BadInputError(f"{project}: tracked files differ from commit {commit[:12]}: {', '.join(changed[:8])}; "
                            "commit them first: a remote stage runs the committed code and params")
    return commit


# --- what a stage reads and writes through the DVC remote ----------------------------------------------------

def _input_targets(repo, stage_name: str) -> list[str]:
    """The outputs of other stages (or .dvc files) that `stage_name` depends on, as DVC targets (paths)."""
    stage = repo.stage.collect(stage_name)[0]
    outs = [out for s in repo.index.stages for out in s.outs if s is not stage and out.use_cache]
    targets = []
    for dep in stage.deps:
        for out in outs:
            if out.fs_path == dep.fs_path or out.fs_path.startswith(dep.fs_path + os.sep) \
                    or dep.fs_path.startswith(out.fs_path + os.sep):
                rel = os.path.relpath(out.fs_path, repo.root_dir)
                if rel not in targets:
                    targets.append(rel)
    return targets


def push_inputs(project_dir: str | Path, stage: str, remote: str) -> list[str]:
    """Push what `stage` reads to the DVC remote; the targets pushed."""
    from dvc.repo import Repo

    with chdir(project_dir), Repo() as repo:
        targets = _input_targets(repo, stage)
        if targets:
            repo.push(targets=targets, remote=remote or None)
    return targets


def pull_inputs(project_dir: str | Path, stage: str, remote: str) -> list[str]:
    """Pull what `stage` reads from the DVC remote into the workspace (as dvc.lock names it); the targets."""
    from dvc.repo import Repo

    with chdir(project_dir), Repo() as repo:
        targets = _input_targets(repo, stage)
        if targets:
            repo.pull(targets=targets, remote=remote or None, force=True)
    return targets


def push_outputs(project_dir: str | Path, stage: str, remote: str) -> None:
    from dvc.repo import Repo

    with chdir(project_dir), Repo() as repo:
        repo.push(targets=[stage], remote=remote or None)


def pull_outputs(project_dir: str | Path, stage: str, remote: str) -> None:
    from dvc.repo import Repo

    with chdir(project_dir), Repo() as repo:
        repo.pull(targets=[stage], remote=remote or None, force=True)


def check_remote(project_dir: str | Path, remote: str) -> None:
    """BadInputError when the DVC remote `remote` ('' = the default) is not configured in the project."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        remotes = repo.config.get("remote", {})
        name = remote or repo.config.get("core", {}).get("remote")
    if not name or name not in remotes:
        raise BadInputError(f"{project_dir}: remote stages need a DVC remote both sides reach; "
                            + (f"no remote named {name!r} (remotes: {', '.join(remotes) or 'none'})" if name else
                               "none is the default: `dvc remote add -d NAME URL`, or name one in placement.dvc_remote"))


# --- the worker's side ---------------------------------------------------------------------------------------

def run_stage_here(project_dir: str | Path, stage: str, commit: str, dvc_lock: str | None, remote: str,
                   env: dict[str, str] | None = None) -> dict:
    """Run one stage in this checkout for a pipeline elsewhere: refuse another commit, take the pipeline's dvc.lock,
    pull the stage's inputs, `dvc repro --single-item`, push its outputs. What the flow needs back, as a dict."""
    project = Path(project_dir).resolve()
    here = checkout_commit(project)
    if here != commit:
        raise BadInputError(f"{project} is at commit {here[:12]}, the pipeline runs {commit[:12]}: check it out "
                            f"here (`git fetch && git checkout {commit[:12]}`) before this worker takes stages")
    lock = project / "dvc.lock"
    if dvc_lock is None:
        lock.unlink(missing_ok=True)
    else:
        lock.write_text(dvc_lock, encoding="utf-8")
    pulled = pull_inputs(project, stage, remote)
    result = repro_stage(project, stage, env)
    push_outputs(project, stage, remote)
    return {"stage": stage, "status": result.status, "seconds": result.seconds, "inputs": pulled,
            "dvc_lock": lock.read_text(encoding="utf-8"), "host": socket.gethostname(), "pid": os.getpid(),
            "checkout": str(project), "commit": here}


def result_markdown(result: dict) -> str:
    """The stage run's artifact: a line for people, the result as a JSON block for the flow."""
    where = f"on `{result['host']}` in `{result['checkout']}` (pid {result['pid']})" if "host" in result else ""
    return (f"# stage {result['stage']}: {result['status']} {where}\n\n"
            f"```json\n{json.dumps(result, indent=1)}\n```\n")


def parse_result_markdown(text: str) -> dict:
    start = text.index("```json\n") + len("```json\n")
    return json.loads(text[start:text.rindex("\n```")])


# --- the flow's side -----------------------------------------------------------------------------------------

def remote_stages(project_dir: str | Path, config: PlacementConfig, stages: list[str], experiment: bool,
                  tracking_uri: str) -> dict[str, str]:
    """Stage -> pool for the chosen `stages` that `config` places on a work pool. BadInputError for a pool given
    to no such stage, for remote stages inside a DVC experiment (a temporary copy of the workspace, which no
    worker sees), or with a tracking store the workers cannot reach."""
    import yaml

    known = (yaml.safe_load((Path(project_dir) / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    unknown = sorted(set(config.pools) - set(known))
    if unknown:
        raise BadInputError(f"placement.pools names no such stage: {', '.join(unknown)}; stages: {', '.join(known)}")
    pools = {stage: pool for stage, pool in config.pools.items() if stage in stages}
    if pools and experiment:
        raise BadInputError("a profile that changes params runs as a DVC experiment in a temporary copy of the "
                            "workspace, which cannot send stages to work pools: put its placement in params.yaml's "
                            "`placement` or in a profile of placement keys only")
    if pools and not tracking_uri.startswith(("http://", "https://")):
        raise BadInputError(f"stages {', '.join(pools)} run on work pools, but MLflow tracks into {tracking_uri}, which "
                            "their workers cannot reach: set MLFLOW_TRACKING_URI to a tracking server both sides reach")
    return pools


def prepare_remote_stage(project_dir: str | Path, stage: str, config: PlacementConfig) -> str:
    """Before submitting `stage`: the commit the worker must be at (no uncommitted tracked changes here), and its
    inputs pushed to the DVC remote."""
    commit = checkout_commit(project_dir)
    check_remote(project_dir, config.dvc_remote)
    push_inputs(project_dir, stage, config.dvc_remote)
    return commit


def ensure_zombie_automation() -> None:
    """Prefect's recipe for runs whose process died with their machine: an automation that marks a stage run
    Crashed when its heartbeats stop (docs: detect-zombie-flows). Created once per server, by name."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # runs of the stage flow only, which beat every 30 s (prefect.yaml); other flows beat every 180 s by default
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": STAGE_FLOW}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=HEARTBEAT_GRACE_S),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {HEARTBEAT_GRACE_S} s: its process or machine died")],
    ).create()


def wait_for_stage(flow_run_id, stage: str, pool: str, config: PlacementConfig):
    """Wait for the stage run to end; its final FlowRun. PoolUnavailable (the run cancelled) when no worker of
    `pool` started it within `pickup_timeout_s`."""
    from prefect import get_client
    from prefect.states import Cancelled

    deadline = time.monotonic() + config.pickup_timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and state.is_final():
                return run
            started = state is not None and (state.is_running() or run.start_time is not None)
            if not started and time.monotonic() > deadline:
                client.set_flow_run_state(flow_run_id, Cancelled(message="no worker picked it up"), force=True)
                raise PoolUnavailable(
                    f"stage {stage}: no worker of work pool '{pool}' started it within {config.pickup_timeout_s:g} s "
                    f"(deployment {STAGE_FLOW}/{pool}); start one: prefect worker start --pool {pool}")
            time.sleep(config.poll_s)


def stage_result(run, stage: str) -> dict:
    """What the stage run reported (its `morer1-stage-result` artifact); StageFailed when it failed or crashed.
    A crash (no result) is transient: the task's retry submits a new run, which resumes from the checkpoints."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=[RESULT_KEY])))
    result = parse_result_markdown(artifacts[0].data) if artifacts else None
    if run.state.is_completed() and result and result["status"] in ("ran", "skipped"):
        return result
    if result and result["status"] == "failed":
        raise StageFailed(stage, result.get("exit_code"), result.get("log_tail", ""))
    raise StageFailed(stage, None, f"its run {run.name} ({run.id}) ended {run.state.name}: {run.state.message or ''}")


def finish_remote_stage(project_dir: str | Path, stage: str, result: dict, config: PlacementConfig) -> None:
    """After the stage ran elsewhere: its dvc.lock (the worker's, byte for byte) and its outputs here."""
    (Path(project_dir) / "dvc.lock").write_text(result["dvc_lock"], encoding="utf-8")
    pull_outputs(project_dir, stage, config.dvc_remote)
