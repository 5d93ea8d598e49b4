"""A copy of the project (pipeline files, src, params.yaml with overrides) as a fresh git + DVC repo, as
tests/test_pipeline_e2e.py builds one; and the fixture the other benchmarks take their data and models from.

The fixture is a copy run by `dvc repro curriculum` (every stage up to the curriculum: demo data, ingested facts,
SFT set, tiny model, SFT model, difficulty, stream), built once per size and reused while params.yaml, dvc.yaml and src/morer1 are the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from common import REPO, env, scratch

# The plumbing sizes of tests/test_pipeline_e2e.py (SMALL): every stage runs, in seconds, and learns nothing.
SMALL = {"demo_data": {"train_pairs": 16, "valid_pairs": 6, "test_pairs": 6},
         "synthesize": {"max_facts": 16},
         "tiny_model": {"vocab_size": 800},
         "sft": {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "dev_f1_max_new_tokens": 8,
                 "generation_caps_check": "warn"},  # 8-token caps: the preflight only warns
         "difficulty": {"max_samples": 4},
         "rollout": {"num_generations": 2, "max_completion_length": 8},
         "curriculum": {"phases": 2},
         "grpo": {"per_device_train_batch_size": 2},
         "evaluate": {"max_facts": 6, "max_new_tokens": 8},
         "register": {"max_new_tokens": 8},
         # a model that learned nothing (all answers invalid, F1 0) must still reach register here: the predictions
         # gate's bounds switched off (the LEARNABLE run passes the gate at the demo's bounds)
         "validate": {"predictions_max_invalid_rate": 1.0, "predictions_max_label_share": 1.0,
                      "predictions_min_f1_margin": -1.0}}
# The fixture at full size: the demo's data, model and settings, but short SFT and a small RL pool, so that it is
# built in minutes (bench_training measures SFT and GRPO themselves on it).
FIXTURE = {"synthesize": {"max_facts": 512},
           "sft": {"max_steps": 60, "save_steps": 1000, "dev_f1_every": 0},
           "difficulty": {"max_samples": 32}}


def make_project(dest: Path, overrides: dict) -> Path:
    """A fresh git + DVC project at `dest` holding this repo's pipeline files and params.yaml with `overrides`."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "src", "expectations", "infra", "data/sft_supplement"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=dest, check=True, env=project_env(dest))
    return dest


def project_env(project: Path) -> dict:
    """The environment `make run` gives the stages, with the project's own state folder."""
    out = env()
    out["MORER1_STATE_DIR"] = str(project / ".state")
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("MORER1_PARENT_RUN_ID", None)
    return out


def fixture(quick: bool) -> Path:
    """The fixture project for these sizes, built (`dvc repro curriculum`) unless an identical one is there."""
    overrides = SMALL if quick else FIXTURE
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode())
    for path in [REPO / "params.yaml", REPO / "dvc.yaml", *sorted((REPO / "src" / "morer1").rglob("*.py"))]:
        digest.update(path.read_bytes())
    key = digest.hexdigest()[:12]
    dest = scratch() / ("fixture-quick" if quick else "fixture")
    stamp = dest / ".bench-fixture"
    if stamp.exists() and stamp.read_text() == key:
        return dest
    print(f"building the benchmark fixture in {dest} (dvc repro curriculum) ...", flush=True)
    make_project(dest, overrides)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "curriculum"], cwd=dest, env=project_env(dest),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fixture build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    stamp.write_text(key)
    return dest
