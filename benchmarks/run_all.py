"""The benchmark suite (`make bench`): the five benchmarks of issue 12, each in its own process, in turn.

    python benchmarks/run_all.py [--quick] [--only teacher generation ...]

Each prints its markdown table and writes `reports/bench/<name>[-quick].json` and an MLflow run (experiment
`morer1-bench`); at the end the tables are gathered into `reports/bench/summary[-quick].md`. A benchmark that
fails is reported and the others still run; the exit code is then 1. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import BENCH, REPORTS, env, machine, quick_default

BENCHMARKS = {"teacher": "bench_teacher.py", "generation": "bench_generation.py", "ingest": "bench_ingest.py",
              "training": "bench_training.py", "pipeline": "bench_pipeline.py"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", default=quick_default(), help="small sizes (also BENCH_QUICK=1)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args()
    names = args.only or list(BENCHMARKS)
    failed = []
    for name in names:
        cmd = [sys.executable, str(BENCH / BENCHMARKS[name])]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-mlflow"] if args.no_mlflow else []
        print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, env=env()).returncode
        print(f"== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - start:.0f} s",
              flush=True)
        if code:
            failed.append(name)
    m = machine()
    suffix = "-quick" if args.quick else ""
    parts = [f"# Benchmarks{' (quick sizes)' if args.quick else ''}\n",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GB RAM, Python {m['python']}, "
             f"OMP_NUM_THREADS={m['omp_num_threads']}, libraries compiled to bytecode: "
             f"{'yes' if m['libraries_compiled'] else 'NO (every import compiles from source)'}; {m['date_utc']}.\n"]
    for name in BENCHMARKS:
        path = REPORTS / f"{name}{suffix}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        parts.append(f"## {data['title']} ({data['machine']['date_utc']})\n\n{data['table']}\n")
        parts += [f"- {note}" for note in data.get("notes", [])]
        parts.append("")
    summary = REPORTS / f"summary{suffix}.md"
    summary.write_text("\n".join(parts) + "\n")
    print(f"\nsummary: {summary}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
