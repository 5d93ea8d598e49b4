"""End to end against real servers: an `mlflow server` and a `prefect server` on 127.0.0.1, the pipeline flow
run against both, the promotion flow run through prefect.yaml's deployment by a process worker, both servers stopped."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from servers import free_port, listening, stop_group
from test_pipeline_e2e import REPO, _project

BIN = Path(sys.executable).parent
HEALTH_TIMEOUT = 120


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A server in its own process group (its workers die with the group), output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: server exited\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}: not healthy after {HEALTH_TIMEOUT} s\n{log.read_text()[-3000:]}")


def _run(cmd: list[str], project: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _flow_runs(api: str, flow: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).raise_for_status().json()


def _artifact(api: str, key: str, flow_run_id: str) -> str:
    body = {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}}}
    [artifact] = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30).raise_for_status().json()
    return artifact["data"]


@pytest.mark.e2e
def test_pipeline_and_promotion_against_real_mlflow_and_prefect_servers(tmp_path):
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_uri, api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    server_env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    servers = []
    try:
        servers.append(_start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(mlflow_port), "--workers", "1"], tmp_path / "mlflow.log", server_env))
        servers.append(_start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
                               "--no-ui"], tmp_path / "prefect.log", server_env))
        project = _project(tmp_path)  # while the servers boot
        shutil.copytree(REPO / "flows", project / "flows")
        shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
        _wait_healthy(f"{mlflow_uri}/health", servers[0], tmp_path / "mlflow.log")
        _wait_healthy(f"{api}/health", servers[1], tmp_path / "prefect.log")

        env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, PREFECT_API_URL=api,
                   PREFECT_HOME=str(tmp_path / "prefect-client"), MORER1_STATE_DIR=str(project / ".state"))
        env.pop("MORER1_PARENT_RUN_ID", None)
        _run([sys.executable, "flows/pipeline.py"], project, env)

        prefect = [str(BIN / "prefect"), "--no-prompt"]
        _run(prefect + ["work-pool", "create", "morer1-process", "--type", "process"], project, env)
        _run(prefect + ["work-pool", "create", "morer1-promote", "--type", "process"], project, env)
        _run(prefect + ["deploy", "--name", "nightly", "--name", "manual", "--name", "flywheel"], project, env)
        _run(prefect + ["deployment", "run", "morer1-promote/manual"], project, env)
        _run(prefect + ["worker", "start", "--pool", "morer1-promote", "--run-once"], project, env)

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri)
        runs = client.search_runs([client.get_experiment_by_name("morer1").experiment_id])
        [parent] = [r for r in runs if r.info.run_name == "pipeline"]
        children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert parent.info.status == "FINISHED"
        assert children == set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
        aliases = {name: {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}
                   for name in ("morer1-candidates", "morer1")}
        assert aliases == {"morer1-candidates": {"challenger": 1}, "morer1": {"champion": 1}}
        assert client.get_model_version("morer1-candidates", "1").tags["promotion.decision"] == "promoted"

        [pipeline_run] = [r for r in _flow_runs(api, "morer1-pipeline") if r["deployment_id"] is None]  # not nightly's
        assert pipeline_run["state_type"] == "COMPLETED" and parent.data.tags["prefect.flow_run_id"] == pipeline_run["id"]
        summary = _artifact(api, "pipeline-summary", pipeline_run["id"])
        assert parent.info.run_id in summary and "| test |" in summary and "**promoted**" in summary

        [promote_run] = _flow_runs(api, "morer1-promote")
        assert promote_run["state_type"] == "COMPLETED" and promote_run["deployment_id"]
        assert "**already_champion** — candidate version 1 is already champion (version 1 of 'morer1')" in _artifact(api, "promotion", promote_run["id"])
        deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).raise_for_status().json()
        nightly = {d["name"]: d for d in deployments}["nightly"]
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    finally:
        for proc in servers:
            stop_group(proc)
    assert not listening(mlflow_port) and not listening(prefect_port)
