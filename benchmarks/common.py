"""Shared plumbing of the benchmark suite: sizes (quick or full), the machine, result tables, JSON, MLflow.

Every benchmark measures and prints; none asserts a timing. Each headline figure is a ratio of two
measurements taken side by side in one run (against a bound, or one way against another), so that it holds
on a noisy shared machine where absolute seconds do not. A benchmark writes

- a markdown table on stdout,
- `reports/bench/<name>.json` (the figures, the sizes, the machine),
- one MLflow run in the experiment `morer1-bench` of the project's tracking store (`morer1.tracking.setup`).

Scratch data (demo datasets, a small copy of the project) goes to `<state dir>/bench/` (`.state/bench/`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
REPORTS = REPO / "reports" / "bench"
EXPERIMENT = "morer1-bench"

sys.path.insert(0, str(REPO / "src"))


def quick_default() -> bool:
    return os.environ.get("BENCH_QUICK", "").lower() not in ("", "0", "false", "no")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", default=quick_default(),
                   help="small sizes, to check that the benchmark works (also BENCH_QUICK=1)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    return p


def scratch(*parts: str) -> Path:
    """A folder under the project's state dir (`.state/bench/...`), created."""
    from morer1.tracking import state_dir

    path = state_dir().joinpath("bench", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def libraries_compiled() -> bool:
    """Whether the installed libraries carry compiled bytecode (`make install` compiles them). Without it every
    process compiles each module it imports, at each start: mlflow, pandas, torch and Great Expectations then take
    about twice as long to import on this machine."""
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    if spec is None or spec.origin is None:
        return False
    return Path(importlib.util.cache_from_source(spec.origin)).exists()


def machine() -> dict:
    """nproc, RAM, CPU model, Python, the thread settings, whether the libraries are compiled, the date."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "ram_gb": ram_gb, "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "libraries_compiled": libraries_compiled(),
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def env() -> dict:
    """The environment of `make`: the venv's bin first on PATH, offline hub, no analytics."""
    out = dict(os.environ)
    out["PATH"] = str(Path(sys.executable).parent) + os.pathsep + out.get("PATH", "")
    out.update(HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               TQDM_DISABLE="1")
    return out


def measure(cmd: list[str], cwd: str | Path | None = None, environ: dict | None = None,
            timeout: float | None = None) -> dict:
    """Run `cmd` under benchmarks/measure.py: wall seconds, peak RSS of its largest process and of its whole tree."""
    wrapped = [sys.executable, str(BENCH / "measure.py"), "--", *map(str, cmd)]
    proc = subprocess.run(wrapped, cwd=cwd, env=environ or env(), capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEASURE ")]
    if not lines:
        raise RuntimeError(f"{cmd}: no measurement\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("MEASURE "):])
    result["stdout"], result["stderr"] = proc.stdout, proc.stderr
    return result


def child_json(proc: subprocess.CompletedProcess, tag: str = "RESULT ") -> dict:
    """The last `RESULT {json}` line a child printed; RuntimeError with its output when there is none."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(tag)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(tag):])


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 significant figures."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            _flat(f"{prefix}.{i}", inner, out)


def report(name: str, title: str, markdown: str, result: dict, quick: bool, mlflow_on: bool = True,
           notes: list[str] = ()) -> Path:
    """Print the table, write `reports/bench/<name>.json`, log the MLflow run; return the JSON path."""
    if quick:
        notes = [*notes, "quick sizes: these figures only show that the benchmark works; the goals are judged at "
                         "full size (without BENCH_QUICK)"]
    payload = {"benchmark": name, "title": title, "quick": quick, "machine": machine(), **result,
               "notes": list(notes), "table": markdown}
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"\n### {title}{' (quick)' if quick else ''}\n\n{markdown}\n")
    for note in notes:
        print(f"- {note}")
    print(f"\n(JSON: {path.relative_to(REPO)})", flush=True)
    if mlflow_on:
        _log_mlflow(name, payload, path)
    return path


def _log_mlflow(name: str, payload: dict, path: Path) -> None:
    from morer1 import tracking

    mlflow = tracking.setup(EXPERIMENT)
    metrics: dict = {}
    _flat("", payload.get("figures", {}), metrics)
    with mlflow.start_run(run_name=f"bench-{name}"):
        mlflow.set_tags({"benchmark": name, "quick": str(payload["quick"]), "git_commit": tracking.git_commit(REPO)})
        mlflow.log_params({f"machine.{k}": v for k, v in payload["machine"].items()})
        mlflow.log_params({f"size.{k}": json.dumps(v) for k, v in payload.get("sizes", {}).items()})
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
        mlflow.log_artifact(str(path))


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
