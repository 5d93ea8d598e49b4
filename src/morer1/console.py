"""What `make run` shows on the console, and what goes to its log file only (issue 24 §3).

Prefect logs a failing task three times over (the task's error with its traceback, the task's final state, the flow's
error with its traceback, the flow's final state), each with the whole exception message: a failed gate's message
came out four times with two ~55-line tracebacks. `quiet_console` keeps Prefect's console lines to one line each,
naming the exception's type instead of repeating its message and leaving the tracebacks out, and writes every record
in full, tracebacks included, to a log file; the flow's script prints the failure's message once, then where the
details are (`failure_lines`).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path

_STATE = re.compile(r"^(Finished in state \w+)\(.*\)$", re.S)  # Prefect's final-state line, with the state message


class ConsoleFormatter(logging.Formatter):
    """Wraps a console handler's formatter: each record in one line, no traceback; an exception is named by its type
    (its message is printed once by whoever handles it, the traceback is in the log file)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            for text in (repr(exc), str(exc)):
                if text:
                    message = message.replace(text, type(exc).__name__)
        message = _STATE.sub(r"\1", message)
        if exc is not None or record.levelno >= logging.ERROR:
            message = message.splitlines()[0] if message.strip() else message
        short = logging.makeLogRecord({**record.__dict__, "msg": message, "args": None, "exc_info": None,
                                       "exc_text": None, "stack_info": None})
        return self.inner.format(short)


def log_file(state_dir: str | Path, name: str = "pipeline") -> Path:
    """A new log file `<state_dir>/logs/<name>-<UTC time>.log` (its folder created)."""
    folder = Path(state_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.log"


def quiet_console(path: Path) -> Path:
    """Every console handler of the root logger and its children (Prefect's) shows one line per record, without
    tracebacks (`ConsoleFormatter`); a file handler on the root logger writes every record in full to `path`.
    Call after Prefect has configured logging (on import)."""
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and not isinstance(handler.formatter, ConsoleFormatter):
                handler.setFormatter(ConsoleFormatter(handler.formatter))
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(file)
    return path


def failure_lines(message: str, log: Path | None, mlflow_run: str | None = None) -> list[str]:
    """A failure as the console shows it: its message once, then where the details are."""
    where = [f"full log, tracebacks included: {log}"] if log else []
    if mlflow_run:
        where.append(f"MLflow run {mlflow_run} (failure.txt, tag morer1.failed_stage)")
    return [f"morer1 pipeline: {message}"] + ([f"details: {'; '.join(where)}"] if where else [])
