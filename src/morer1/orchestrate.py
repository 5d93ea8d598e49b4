"""Running DVC stages from an orchestrator: stage order, one `dvc repro` per stage, exit-code triage, and the
markdown summaries the Prefect flows post."""

from __future__ import annotations

import json
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


def apply_profile(project_dir: str | Path, profile: str) -> Path | None:
    """Make `profiles/<profile>.yaml` the project's params.yaml; return where the previous one was saved.

    The previous params.yaml is kept under `<state>/params-backups/` (nothing is lost); None when the
    profile is already in place. Raises BadInputError naming the profiles that exist when it is unknown.
    """
    import shutil
    from datetime import datetime, timezone

    from morer1.errors import BadInputError

    project = Path(project_dir)
    source = project / "profiles" / f"{profile}.yaml"
    if not source.is_file():
        known = sorted(p.stem for p in (project / "profiles").glob("*.yaml"))
        raise BadInputError(f"{source}: no such params profile; profiles: {', '.join(known) or 'none'}")
    target = project / "params.yaml"
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return None
    backup = None
    if target.is_file():
        folder = Path(os.environ.get("MORER1_STATE_DIR", project / ".state")) / "params-backups"
        folder.mkdir(parents=True, exist_ok=True)
        backup = folder / f"params.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.yaml"
        shutil.copyfile(target, backup)
    shutil.copyfile(source, target)
    return backup


def set_env_defaults(project_dir: str | Path) -> None:
    """Default `MORER1_STATE_DIR` (`<project>/.state`), a Prefect home inside it, no Prefect analytics, and a
    patient start-up timeout for Prefect's temporary server.

    Call before importing prefect: Prefect reads its settings at import.
    """
    os.environ.setdefault("MORER1_STATE_DIR", str(Path(project_dir) / ".state"))
    os.environ.setdefault("PREFECT_HOME", str(Path(os.environ["MORER1_STATE_DIR"]) / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server may need more than Prefect's default 20 s to start on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level


METRIC_COLUMNS = (("n", "n"), ("accuracy", "accuracy"), ("precision", "P"), ("recall", "R"), ("f1", "F1"),
                  ("invalid_rate", "invalid rate"), ("baseline_majority_accuracy", "majority accuracy"),
                  ("baseline_majority_f1", "majority F1"))


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "–" if value is None else str(value)


def promotion_markdown(decision: dict) -> str:
    """A promotion decision of `morer1.registry.promote` as a markdown paragraph."""
    return (f"Promotion of `{decision['model_name']}` version {decision['challenger_version']}: "
            f"**{decision['decision']}** — {decision['reason']} (champion before: "
            f"{_cell(decision['champion_version'])}, {decision['metric']} {_cell(decision['challenger_value'])} "
            f"vs {_cell(decision['champion_value'])}, margin {decision['margin']}).\n")


def summary_markdown(project_dir: str | Path, results: list[dict], run_id: str, experiment_id: str) -> str:
    """The pipeline summary: MLflow run, stage table, and the outputs of `evaluate` (`reports/eval/metrics.json`)
    and `register` (`reports/registry/registered.json`) when those stages succeeded in `results`."""
    project = Path(project_dir)
    done = {r["stage"] for r in results if r["status"] in ("ran", "skipped")}
    rows = "".join(f"| {r['stage']} | {r['status']} | {'–' if r['seconds'] is None else r['seconds']} |\n"
                   for r in results)
    text = (f"# morer1 pipeline\n\nMLflow run `{run_id}` (experiment `{experiment_id}`)\n\n"
            f"| stage | status | seconds |\n|---|---|---|\n{rows}")
    metrics_file = project / "reports" / "eval" / "metrics.json"
    if "evaluate" in done and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        head = " | ".join(title for _, title in METRIC_COLUMNS)
        rows = "".join(f"| {split} | " + " | ".join(_cell(metrics[split].get(key)) for key, _ in METRIC_COLUMNS)
                       + " |\n" for split in ("dev", "test") if split in metrics)
        text += f"\n## Evaluation\n\n| split | {head} |\n|---" + "|---" * len(METRIC_COLUMNS) + f"|\n{rows}"
    registered_file = project / "reports" / "registry" / "registered.json"
    if "register" in done and registered_file.is_file():
        registered = json.loads(registered_file.read_text(encoding="utf-8"))
        text += (f"\n## Registry\n\nRegistered `{registered['model_name']}` version {registered['version']} "
                 f"(alias `challenger`).\n\n" + promotion_markdown(registered["promotion"]))
    return text
