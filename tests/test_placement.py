"""A stage run in another checkout through a DVC remote (morer1.placement), without Prefect: the worker's side
(`run_stage_here`) and the flow's (`prepare_remote_stage`, `finish_remote_stage`) between two clones and a folder
remote give the same dvc.lock and the same output bytes as running the stage in place; what must be refused is."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline_e2e import SMALL, _project

from morer1 import placement
from morer1.errors import BadInputError
from morer1.orchestrate import stage_env


def _env(project: Path) -> dict:
    return {"MORER1_STATE_DIR": str(project / ".state"), "PREFECT_HOME": str(project / ".state" / "prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / '.state' / 'mlflow.db'}"}


def _run(project: Path, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=project, env=stage_env(_env(project)), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _git(project: Path, *args: str) -> str:
    return _run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", *args)


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def flow_side(tmp_path_factory) -> Path:
    """The flow's checkout: a committed project with a folder DVC remote, run by DVC up to `demo_data`."""
    root = tmp_path_factory.mktemp("placement")
    project = _project(root, SMALL)
    _run(project, sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(root / "remote"))
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "project")
    _run(project, sys.executable, "-m", "dvc", "repro", "demo_data")
    return project


def _clone(flow_side: Path, tmp_path: Path, name: str) -> Path:
    clone = tmp_path / name
    _git(flow_side, "clone", "-q", str(flow_side), str(clone))
    return clone


def test_a_stage_run_in_another_clone_gives_the_local_run_bytes_and_dvc_lock(flow_side, tmp_path):
    local = Path(shutil.copytree(flow_side, tmp_path / "local", symlinks=True))
    _run(local, sys.executable, "-m", "dvc", "repro", "--single-item", "ingest")

    flow = Path(shutil.copytree(flow_side, tmp_path / "flow", symlinks=True))
    worker = _clone(flow_side, tmp_path, "worker")
    assert not (worker / "data" / "difficulty").exists()  # the worker has the code, not the data
    settings = placement.PlacementConfig()
    commit = placement.prepare_remote_stage(flow, "ingest", settings)
    result = placement.run_stage_here(worker, "ingest", commit, (flow / "dvc.lock").read_text(), "",
                                      _env(worker))
    assert result["status"] == "ran" and result["checkout"] == str(worker.resolve())
    assert result["inputs"] == ["data/demo"]
    assert (worker / "data" / "ingested").is_dir()
    assert not (flow / "data" / "ingested").exists()  # nothing ran in the flow's checkout

    placement.finish_remote_stage(flow, "ingest", result, settings)
    assert (flow / "dvc.lock").read_bytes() == (local / "dvc.lock").read_bytes()
    assert _files(flow / "data" / "ingested") == _files(local / "data" / "ingested")
    status = _run(flow, sys.executable, "-m", "dvc", "status", "ingest")
    assert "up to date" in status, status


def test_the_worker_refuses_another_commit_and_uncommitted_changes(flow_side, tmp_path):
    worker = _clone(flow_side, tmp_path, "worker")
    commit = placement.checkout_commit(flow_side)
    (worker / "NOTE").write_text("x")
    _git(worker, "add", "NOTE")
    _git(worker, "commit", "-qm", "another commit")
    with pytest.raises(BadInputError, match=f"the pipeline runs {commit[:12]}"):
        placement.run_stage_here(worker, "ingest", commit, None, "", _env(worker))

    _git(worker, "reset", "-q", "--hard", commit)
    params = worker / "params.yaml"
    params.write_text(params.read_text().replace("seed: 0", "seed: 1", 1))
    with pytest.raises(BadInputError, match="params.yaml"):
        placement.run_stage_here(worker, "ingest", commit, None, "", _env(worker))
    assert not (worker / "data" / "ingested").exists()


def test_the_flow_needs_a_dvc_remote(flow_side, tmp_path):
    project = Path(shutil.copytree(flow_side, tmp_path / "p", symlinks=True))
    with pytest.raises(BadInputError, match="no remote named 'elsewhere'"):
        placement.prepare_remote_stage(project, "ingest", placement.PlacementConfig(dvc_remote="elsewhere"))
    _run(project, sys.executable, "-m", "dvc", "remote", "remove", "shared")
    _git(project, "commit", "-qam", "no remote")
    with pytest.raises(BadInputError, match="dvc remote add -d"):
        placement.prepare_remote_stage(project, "ingest", placement.PlacementConfig())


def test_stage_result_round_trips_through_its_markdown():
    result = {"stage": "sft", "status": "ran", "seconds": 1.5, "dvc_lock": "schema: '2.0'\nstages: {}\n```x",
              "host": "h", "pid": 1, "checkout": "/c"}
    text = placement.result_markdown(result)
    assert text.startswith("# stage sft: ran on `h` in `/c`")
    assert placement.parse_result_markdown(text) == result


def test_remote_stages_are_checked_before_anything_runs():
    from test_pipeline_e2e import REPO

    config = placement.PlacementConfig(pools={"sft": "gpu", "grpo": "gpu"})
    http = "http://127.0.0.1:5000"
    assert placement.remote_stages(REPO, config, ["ingest", "sft", "grpo"], False, http) == {"sft": "gpu", "grpo": "gpu"}
    assert placement.remote_stages(REPO, config, ["ingest"], False, "sqlite:///x.db") == {}  # none chosen: no checks
    assert placement.remote_stages(REPO, placement.PlacementConfig(), ["sft"], True, "sqlite:///x.db") == {}
    with pytest.raises(BadInputError, match="no such stage: spft"):
        placement.remote_stages(REPO, placement.PlacementConfig(pools={"spft": "gpu"}), ["sft"], False, http)
    with pytest.raises(BadInputError, match="DVC experiment"):
        placement.remote_stages(REPO, config, ["sft"], True, http)
    with pytest.raises(BadInputError, match="MLflow tracks into sqlite:///x.db"):
        placement.remote_stages(REPO, config, ["sft"], False, "sqlite:///x.db")


def test_a_profiles_placement_adds_its_pools_and_a_bad_one_is_refused_naming_the_profile(tmp_path):
    from morer1.params import ParamsError

    (tmp_path / "profiles").mkdir()
    (tmp_path / "params.yaml").write_text("placement:\n  pools: {evaluate: cpu-big}\n  poll_s: 2\n")
    (tmp_path / "profiles" / "gpu.yaml").write_text("placement:\n  pools: {sft: gpu}\n  pickup_timeout_s: 30\n")
    config = placement.placement_config(tmp_path, "gpu")
    assert config.pools == {"evaluate": "cpu-big", "sft": "gpu"}
    assert (config.pickup_timeout_s, config.poll_s) == (30, 2)
    assert placement.placement_config(tmp_path).pools == {"evaluate": "cpu-big"}
    bad = tmp_path / "profiles" / "bad.yaml"
    for text, reason in (("placement:\n  poll_s: soon\n", "poll_s"), ("placement:\n  pools: [sft]\n", "pools"),
                         ("placement: gpu\n", "expected a mapping, got str")):
        bad.write_text(text)
        with pytest.raises(ParamsError, match=f"{bad}: section 'placement': (.|\\n)*{reason}"):
            placement.placement_config(tmp_path, "bad")
