"""Error classes the CLI maps to exit codes that the orchestrator understands, and where it records them."""

import json
import os
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_TRANSIENT = 1  # any other failure: the orchestrator retries the stage
EXIT_FILE_ENV = "MORER1_EXIT_FILE"  # where the morer1 CLI records its exit code and reason (`record_exit`)


class BadInputError(Exception):
    """Bad data, params or arguments: retrying will not help (exit code 2)."""


class GateFailedError(Exception):
    """A data-validation gate failed: nothing downstream may run (exit code 3)."""


class TrackingServerLost(RuntimeError):
    """The MLflow tracking server stopped answering during a stage: a rerun may succeed (exit code 1, retried)."""


class RegistryUnavailable(RuntimeError):
    """A model URI (`models:/...`, `runs:/...`) needs the MLflow registry and there is none to ask (no
    MLFLOW_TRACKING_URI and no project store), it does not answer, or it does not hold the model. The message names
    the tracking URI tried and how to set another; exit code 1, one line."""


def record_exit(code: int, message: str) -> None:
    """For the morer1 CLI: record an exit code and its reason where the orchestrator reads it, when asked to."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path:
        tmp = Path(f"{path}.{os.getpid()}.tmp")  # several processes of one `accelerate launch` may write
        tmp.write_text(json.dumps({"exit_code": code, "message": message}), encoding="utf-8")
        os.replace(tmp, path)
