"""Two checkouts of the project in different folders reproduce the data stages with the same DVC hashes.

So a shared DVC cache or remote hits across machines, and no local path ends up in an output. The two
checkouts are copies of this working tree (its changes included), each a fresh git repository with the same
small MORE-layout source inside it (`ingest.source: more`, so the demo stage is not run), reproduced from
`ingest` up to the SFT gate at the same time. Their processes share one bytecode cache: where bytecode is not
written (PYTHONDONTWRITEBYTECODE), compiling MLflow and Great Expectations would take most of each stage's time.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from configs import small_config
from morer1.demo_data import DemoDataConfig, generate_demo

REPO = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "validate_facts", "synthesize", "validate_sft")
SMALL = {"ingest": {"source": "more"}, "synthesize": {"max_facts": 12}}


def _checkout(root: Path, source: Path) -> Path:
    """A fresh git repository at `root` with this working tree's tracked files and `src/`, a copy of the MORE
    folder `source` as `more/`, and small params."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not there
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source, root / "more")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def _repro(project: Path, pycache: Path) -> subprocess.Popen:
    """`dvc repro` of the last stage in `project`, started in the background."""
    env = {**os.environ, "MORER1_STATE_DIR": str(project / ".state"), "PYTHONPYCACHEPREFIX": str(pycache),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_TRACKING_URI", "MORER1_PARENT_RUN_ID", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro", STAGES[-1]], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _out_hashes(project: Path) -> dict[str, dict[str, str]]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {stage: {out["path"]: out["md5"] for out in lock[stage]["outs"]} for stage in STAGES}


def test_two_checkouts_in_different_folders_give_the_same_hashes_and_no_local_path(tmp_path):
    generate_demo(tmp_path / "more", small_config(DemoDataConfig, train_pairs=12, valid_pairs=4, test_pairs=4))
    projects = [_checkout(tmp_path / "a", tmp_path / "more"), _checkout(tmp_path / "some" / "other", tmp_path / "more")]
    runs = [_repro(project, tmp_path / "pycache") for project in projects]
    for project, proc in zip(projects, runs):
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{project}:\n{log[-3000:]}"

    first, second = (_out_hashes(project) for project in projects)
    assert first == second
    assert set(first["validate_facts"]) == {"data/validation/facts"}
    assert set(first["validate_sft"]) == {"data/validation/sft"}
    for project in projects:
        for folder in ("data/ingested", "data/validation", "data/sft"):
            for path in (project / folder).rglob("*"):
                if path.is_file():
                    assert str(tmp_path).encode() not in path.read_bytes(), path
