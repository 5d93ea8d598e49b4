"""Running DVC stages from an orchestrator: stage order, one `dvc repro` per stage, exit-code triage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from morer1.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED

TAIL_LINES = 40


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "skipped"
    seconds: float


class StageFailed(Exception):
    """A DVC stage failed; `exit_code` is the stage command's own exit code when DVC reports it."""

    def __init__(self, stage: str, exit_code: int | None, log_tail: str):
        self.stage, self.exit_code, self.log_tail = stage, exit_code, log_tail
        what = {EXIT_GATE_FAILED: "data validation failed", EXIT_BAD_INPUT: "bad input or params"}.get(
            exit_code, f"exit code {exit_code}")
        super().__init__(f"stage '{stage}' failed ({what}):\n{log_tail}")

    @property
    def transient(self) -> bool:
        """Worth retrying: not a data gate, not bad input."""
        return self.exit_code not in (EXIT_BAD_INPUT, EXIT_GATE_FAILED)


def dvc_stages(project_dir: str | Path) -> list[str]:
    """Stage names of dvc.yaml in file order (DVC's dependency order for a linear pipeline)."""
    return list(yaml.safe_load((Path(project_dir) / "dvc.yaml").read_text())["stages"])


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage commands: this interpreter's bin folder first on PATH (for `morer1`, `dvc`)."""
    env = dict(os.environ, **(extra or {}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def repro_stage(project_dir: str | Path, stage: str, env: dict[str, str] | None = None) -> StageResult:
    """`dvc repro --single-item <stage>`; StageFailed with the log tail when it fails."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=project_dir,
                          env=stage_env(env), capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        code = re.search(r"exited with (\d+)", log)
        tail = "\n".join(log.strip().splitlines()[-TAIL_LINES:])
        raise StageFailed(stage, int(code.group(1)) if code else None, tail)
    skipped = f"Stage '{stage}' didn't change, skipping" in log
    return StageResult(stage, "skipped" if skipped else "ran", round(time.monotonic() - start, 1))
