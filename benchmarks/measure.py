"""Run a command; print `MEASURE {json}`: wall seconds, exit code, peak RSS of its largest process, peak RSS of its tree.

    python benchmarks/measure.py -- dvc repro

`max_process_rss_mb` is getrusage(RUSAGE_CHILDREN).ru_maxrss of this wrapper, which runs nothing else: the peak
resident set of the largest single process of the tree (exact, from the kernel). `tree_rss_mb` is the largest sum
of the RSS of the command and all its descendants seen by psutil, sampled every 0.1 s (absent without psutil;
it can miss a peak shorter than the interval). The command's own output passes through.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    tree_peak = [0]
    stop = threading.Event()

    def sample():
        try:
            import psutil
        except ImportError:
            tree_peak[0] = None
            return
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            tree_peak[0] = max(tree_peak[0], total)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"seconds": wall, "returncode": code, "max_process_rss_mb": usage.ru_maxrss / 1024,
           "tree_rss_mb": None if tree_peak[0] is None else tree_peak[0] / 1024 ** 2,
           "cpu_seconds": usage.ru_utime + usage.ru_stime}
    sys.stdout.flush()
    print("MEASURE " + json.dumps(out), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
