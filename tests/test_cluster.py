"""Two work pools on this machine (issue 14): the pipeline's training stages run on a `gpu` pool's worker, in that
worker's own clone, with the data moving through a folder DVC remote.

Real servers on 127.0.0.1 (a Prefect server, an MLflow server), two process workers (`local`, `gpu`) each in its
own clone of one origin repository, the deployments of prefect.yaml. The `gpu` worker is killed (its whole process
tree, as when its machine dies) once, mid-SFT: Prefect marks the stage run Crashed when its heartbeats stop, the
pipeline task's retry submits a new run, and SFT resumes from its checkpoint. Marked `cluster` (about 10 minutes):
`make test-cluster`.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from servers import free_port, listening, start_server, stop_group, wait_healthy
from test_faults import FAULT_PARAMS, SFT_SAVE, SFT_STEPS
from test_pipeline_e2e import REPO, _project

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
PLACED = {"sft": "gpu", "grpo": "gpu"}


def _env(clone: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MORER1_", "PREFECT_", "MLFLOW_"))}
    env.update({"MORER1_STATE_DIR": str(clone / ".state"), "PREFECT_HOME": str(clone / ".state" / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd, dict(os.environ))


def _origin(root: Path, placement: dict) -> Path:
    """The team's repository: the fault project's params with `placement`, a folder DVC remote, committed."""
    project = _project(root, FAULT_PARAMS)
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["placement"].update(placement)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(root / "dvc-remote")], project,
         dict(os.environ))
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "project")
    return project


@contextmanager
def _servers(root: Path):
    """An MLflow and a Prefect server on free loopback ports, their stores and logs under `root`. Yields their URLs,
    a function that returns once both answer (call it after other set-up: they boot meanwhile) and their processes;
    stops both."""
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_uri, api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    env = _env(root, PREFECT_HOME=str(root / "prefect-server"))
    procs = []
    try:
        procs.append(start_server([str(BIN / "mlflow"), "server", "--backend-store-uri",
                                   f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
                                   str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
                                   "--workers", "1"],
                                  root / "mlflow.log", env))
        procs.append(start_server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                   str(prefect_port), "--no-ui"], root / "prefect.log", env))

        def wait() -> None:
            wait_healthy(f"{mlflow_uri}/health", procs[0], root / "mlflow.log")
            wait_healthy(f"{api}/health", procs[1], root / "prefect.log")

        yield mlflow_uri, api, wait, procs
    finally:
        for proc in procs:
            stop_group(proc)
    assert not listening(mlflow_port) and not listening(prefect_port)


def _api(api: str, method: str, path: str, **kwargs):
    return httpx.request(method, f"{api}{path}", timeout=30, **kwargs).raise_for_status().json()


def _kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a worker and every process under it (the flow run starts its own session): its machine died."""
    root = psutil.Process(proc.pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


def _wait_for(path: Path, timeout: float, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s\n" + "\n".join(
            log.read_text()[-3000:] for log in logs)
        time.sleep(0.05)


def _final_flow_run(api: str, run_id: str, timeout: float, *logs: Path) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = _api(api, "GET", f"/flow_runs/{run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"flow run {run_id} not done in {timeout} s\n" + "\n".join(
            log.read_text()[-3000:] for log in logs)
        time.sleep(2)


def test_training_stages_run_on_the_gpu_pool_and_a_killed_worker_resumes(tmp_path):
    procs: dict[str, subprocess.Popen] = {}  # the workers
    logs = {name: tmp_path / f"{name}.log" for name in ("local", "gpu", "gpu-2")}
    with _servers(tmp_path) as (mlflow_uri, api, wait_for_servers, servers):
        try:
            (tmp_path / "origin").mkdir()
            origin = _origin(tmp_path / "origin", {"pools": PLACED, "pickup_timeout_s": 600})
            clones = {name: tmp_path / name for name in ("local", "gpu", "reference")}
            for clone in clones.values():
                _git(tmp_path, "clone", "-q", str(origin), str(clone))
            wait_for_servers()

            env = {name: _env(clone, PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_uri)
                   for name, clone in clones.items()}
            prefect = [str(BIN / "prefect"), "--no-prompt"]
            for pool in ("local", "gpu"):
                _run(prefect + ["work-pool", "create", pool, "--type", "process"], clones["local"], env["local"])
            _run(prefect + ["deploy", "--name", "nightly", "--pool", "local"], clones["local"], env["local"])
            _run(prefect + ["deploy", "--name", "gpu"], clones["gpu"], env["gpu"])  # from the GPU node's checkout
            for name in ("local", "gpu"):
                procs[name] = start_server(prefect + ["worker", "start", "--pool", name], logs[name], env[name])

            nightly = _api(api, "GET", "/deployments/name/morer1-pipeline/nightly")
            pipeline_run = _api(api, "POST", f"/deployments/{nightly['id']}/create_flow_run", json={})
            ckpt = clones["gpu"] / ".state" / "checkpoints" / "sft"
            _wait_for(ckpt / f"checkpoint-{SFT_SAVE}" / "trainer_state.json", 1200, logs["local"], logs["gpu"])
            _kill_tree(procs.pop("gpu"))
            done = [int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*")]
            assert done and max(done) < SFT_STEPS, done  # killed mid-training
            procs["gpu-2"] = start_server(prefect + ["worker", "start", "--pool", "gpu"], logs["gpu-2"], env["gpu"])

            final = _final_flow_run(api, pipeline_run["id"], 1800, logs["local"], logs["gpu"], logs["gpu-2"])
            assert final["state_type"] == "COMPLETED", (final["state"], logs["local"].read_text()[-5000:])

            # the training stages ran in the gpu clone, by the gpu workers' flow runs, and nowhere else
            stage_runs = _api(api, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["morer1-stage"]}}})
            by_name = {}
            for run in sorted(stage_runs, key=lambda r: r["created"]):
                by_name.setdefault(run["name"], []).append(run)
            assert {n: [r["state_type"] for r in runs] for n, runs in by_name.items()} == {
                "sft": ["CRASHED", "COMPLETED"], "grpo": ["COMPLETED"]}
            for name, runs in by_name.items():
                [artifact] = _api(api, "POST", "/artifacts/filter", json={
                    "artifacts": {"key": {"any_": ["morer1-stage-result"]}, "flow_run_id": {"any_": [runs[-1]["id"]]}}})
                result = json.loads(artifact["data"].split("```json\n", 1)[1].rsplit("\n```", 1)[0])
                assert result["checkout"] == str(clones["gpu"].resolve()) and result["status"] == "ran"
                # a child of the pipeline's flow run (run_deployment's task run there), submitted by its
                # `dvc-<stage>` task
                for run in runs:
                    task_run = _api(api, "GET", f"/task_runs/{run['parent_task_run_id']}")
                    assert task_run["flow_run_id"] == pipeline_run["id"]
                    [parent] = task_run["task_inputs"]["__parents__"]
                    assert _api(api, "GET", f"/task_runs/{parent['id']}")["name"].startswith(f"dvc-{name}")
            assert not (clones["local"] / ".state" / "checkpoints").exists()  # no training in the flow's clone
            assert (clones["gpu"] / ".state" / "checkpoints" / "grpo").is_dir()
            summary = json.loads((clones["local"] / "models" / "sft" / "sft_summary.json").read_text())
            resumed_at = int(Path(summary["resumed_from"]).name.split("-")[1])
            assert 0 < resumed_at < SFT_STEPS and summary["steps"] == SFT_STEPS

            # MLflow: every stage's run under the pipeline's run; the training ones tagged with the gpu clone
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=mlflow_uri)
            runs = client.search_runs([client.get_experiment_by_name("morer1").experiment_id])
            [parent] = [r for r in runs if r.info.run_name == "pipeline"]
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            stages = set(yaml.safe_load((clones["local"] / "dvc.yaml").read_text())["stages"])
            assert {r.info.run_name for r in children} == stages and len(children) == len(stages) + 1  # sft twice
            for run in children:
                placed = run.info.run_name in PLACED
                assert run.data.tags.get("morer1.checkout") == (str(clones["gpu"].resolve()) if placed else None)
            assert sorted(r.info.status for r in children if r.info.run_name == "sft") == ["FINISHED", "KILLED"]
            assert parent.info.status == "FINISHED"
            for proc in (*servers, *procs.values()):
                assert proc.poll() is None  # the servers and workers outlived the kill

            # the same pipeline run fully in one clone gives the same metrics and the same training outputs
            _run([sys.executable, "-m", "dvc", "repro", "evaluate"], clones["reference"], _env(clones["reference"]))
            pair = (clones["local"], clones["reference"])
            metrics = [json.loads((c / "reports/eval/metrics.json").read_text()) for c in pair]
            assert metrics[0] == metrics[1]
            locks = [yaml.safe_load((c / "dvc.lock").read_text())["stages"] for c in pair]
            for stage in ("ingest", "difficulty", "curriculum", "grpo"):  # byte for byte (DVC's md5 of each output)
                assert locks[0][stage]["outs"] == locks[1][stage]["outs"], stage
            # SFT, killed and resumed: the same bytes but its summary, which says where it resumed (and the loss of the
            # steps it ran after that)
            ours, theirs = (c / "models" / "sft" for c in (clones["local"], clones["reference"]))
            assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
            for path in ours.iterdir():
                if path.name != "sft_summary.json":
                    assert path.read_bytes() == (theirs / path.name).read_bytes(), path.name
            resume_keys = {"resumed_from", "resumed_run_id", "train_loss"}
            reference = json.loads((theirs / "sft_summary.json").read_text())
            assert ({k: v for k, v in summary.items() if k not in resume_keys}
                    == {k: v for k, v in reference.items() if k not in resume_keys})
        finally:
            for proc in procs.values():
                stop_group(proc)


def _failed_flow_last_line(clone: Path, env: dict) -> str:
    """Run the pipeline flow as `make run` does; it must fail: the last line it printed."""
    flow = subprocess.run([sys.executable, "flows/pipeline.py"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)
    assert flow.returncode != 0, flow.stdout[-3000:]
    return flow.stderr.strip().splitlines()[-1]


def test_a_stage_that_no_worker_takes_fails_the_flow_in_one_line_naming_the_pool(tmp_path):
    with _servers(tmp_path) as (mlflow_uri, api, wait_for_servers, _):
        (tmp_path / "origin").mkdir()
        origin = _origin(tmp_path / "origin", {"pools": {"demo_data": "gpu"}, "pickup_timeout_s": 15})
        clone = tmp_path / "clone"
        _git(tmp_path, "clone", "-q", str(origin), str(clone))
        wait_for_servers()
        env = _env(clone, PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_uri)
        prefect = [str(BIN / "prefect"), "--no-prompt"]
        _run(prefect + ["work-pool", "create", "gpu", "--type", "process"], clone, env)
        _run(prefect + ["deploy", "--name", "gpu"], clone, env)  # a deployment, but no worker on its pool

        assert _failed_flow_last_line(clone, env) == (
            "morer1 pipeline: stage demo_data: no worker of work pool 'gpu' started it within 15 s (deployment "
            "morer1-stage/gpu); start one: prefect worker start --pool gpu")
        [stage_run] = _api(api, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["morer1-stage"]}}})
        assert stage_run["state_type"] == "CANCELLED"  # a worker that starts later does not run it behind the flow
        [task_run] = _api(api, "POST", "/task_runs/filter", json={"task_runs": {"name": {"like_": "dvc-demo_data"}}})
        assert task_run["run_count"] == 1  # not retried
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri)
        [parent] = [r for r in client.search_runs([client.get_experiment_by_name("morer1").experiment_id])
                    if r.info.run_name == "pipeline"]
        assert parent.data.tags["morer1.failed_stage"] == "demo_data" and parent.info.status == "FAILED"
        assert not (clone / "data" / "demo").exists()

        params = yaml.safe_load((clone / "params.yaml").read_text())
        params["placement"]["pools"] = {"demo_data": "nowhere"}
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _git(clone, "commit", "-qam", "a pool without a deployment")
        assert _failed_flow_last_line(clone, env) == (
            "morer1 pipeline: stage demo_data: the Prefect server has no deployment morer1-stage/nowhere; deploy it "
            "from the checkout that pool's workers use: prefect deploy --name nowhere")
