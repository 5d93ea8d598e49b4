"""Benchmark 5, the pipeline: fresh `dvc repro` of a new copy of the project (git + DVC repo as
tests/test_pipeline_e2e.py builds it, its own state folder), wall time and peak RSS; then the no-op rerun
(`dvc repro` again: nothing changed, no stage runs), wall time. Figure: the no-op rerun as a share of the fresh run.

Full size is the embedded default (params.yaml as it is: what `make run` trains, ~11 min on an idle 2-core
machine); quick is the end-to-end test's plumbing sizes (every stage runs, learns nothing). Peak RSS: of the
largest single process of the run (kernel ru_maxrss) and of the whole process tree (dvc plus the stage it runs;
psutil, sampled).
"""

from __future__ import annotations

import sys

from common import measure, parser, report, scratch, table
from project import SMALL, make_project, project_env


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    overrides = SMALL if args.quick else {}
    project = make_project(scratch() / ("pipeline-quick" if args.quick else "pipeline"), overrides)
    environ = project_env(project)
    dvc = [sys.executable, "-m", "dvc", "repro"]
    fresh = measure(dvc, cwd=project, environ=environ)
    if fresh["returncode"]:
        raise SystemExit(f"dvc repro failed:\n{fresh['stdout'][-3000:]}\n{fresh['stderr'][-3000:]}")
    noop = measure(dvc, cwd=project, environ=environ)
    if noop["returncode"]:
        raise SystemExit(f"no-op dvc repro failed:\n{noop['stdout'][-3000:]}\n{noop['stderr'][-3000:]}")
    stages = fresh["stdout"].count("Running stage")
    reran = noop["stdout"].count("Running stage")
    share = noop["seconds"] / fresh["seconds"]
    md = table(["run", "stages run", "wall s", "peak RSS, largest process MB", "peak RSS, process tree MB", "CPU s"],
               [["fresh `dvc repro`", stages, fresh["seconds"], fresh["max_process_rss_mb"], fresh["tree_rss_mb"],
                 fresh["cpu_seconds"]],
                ["no-op rerun", reran, noop["seconds"], noop["max_process_rss_mb"], noop["tree_rss_mb"],
                 noop["cpu_seconds"]]])
    notes = [f"no-op rerun = {share:.1%} of the fresh run; it ran {reran} stages",
             f"params: {'the end-to-end test plumbing sizes (SMALL)' if args.quick else 'params.yaml, the embedded default'}",
             f"project copy: {project}"]
    figures = {"fresh_s": fresh["seconds"], "fresh_max_process_rss_mb": fresh["max_process_rss_mb"],
               "fresh_tree_rss_mb": fresh["tree_rss_mb"], "noop_s": noop["seconds"], "noop_share": share,
               "stages": stages, "noop_stages": reran}
    report("pipeline", "Pipeline: fresh dvc repro and the no-op rerun", md,
           {"sizes": {"overrides": overrides}, "figures": figures}, args.quick, not args.no_mlflow, notes)


if __name__ == "__main__":
    main()
