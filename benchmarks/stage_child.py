"""Run one `morer1` command in this process, timing its imports apart from its work.

    python benchmarks/stage_child.py ingest --source DIR --output DIR

Imports the modules the command loads (its stage module, mlflow, pandas, torch or Great Expectations) first, then
calls `morer1.cli.main(argv)`, and prints `RESULT {json}`: import seconds, work seconds, the peak RSS after the
imports and at the end (ru_maxrss, MB). The work's own memory is the difference.
"""

from __future__ import annotations

import json
import resource
import sys
import time


# what each command loads besides the CLI, mlflow and pandas (it would import them lazily during its work)
IMPORTS = {"ingest": ("morer1.ingest", "torch"), "validate-facts": ("morer1.validate", "great_expectations")}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import importlib

    start = time.perf_counter()
    for name in ("morer1.cli", "mlflow", "pandas", *IMPORTS.get(sys.argv[1], ())):
        importlib.import_module(name)
    import morer1.cli

    imported = time.perf_counter()
    floor = rss_mb()
    code = 0
    try:
        morer1.cli.main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code or 0
    done = time.perf_counter()
    print("RESULT " + json.dumps({"import_s": imported - start, "work_s": done - imported, "import_rss_mb": floor,
                                  "peak_rss_mb": rss_mb(), "exit": code}), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
