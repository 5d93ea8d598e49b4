"""Serve the pipeline flow on a cron schedule and the promotion flow on demand, from this machine.

    python flows/serve.py [--cron "0 2 * * *"]

Runs until stopped; needs a Prefect server (`PREFECT_API_URL`). The deployments are those of prefect.yaml,
`morer1-pipeline/nightly`, `morer1-promote/manual` and `morer1-flywheel/flywheel` (weekly; it does nothing while
`flywheel.enabled` is false), without a work pool: this process runs the flows.
"""

from __future__ import annotations

import argparse

from pipeline import pipeline  # first: it sets the state and Prefect home defaults
from flywheel import flywheel
from prefect import serve
from promote import promote

NIGHTLY = "0 2 * * *"
WEEKLY = "0 6 * * 0"  # Sundays, after the nightly run


def deployments(cron: str = NIGHTLY) -> list:
    """The pipeline deployment on `cron`, the unscheduled promotion deployment and the weekly flywheel."""
    return [pipeline.to_deployment("nightly", cron=cron, concurrency_limit=1,
                                   description="Nightly retrain; DVC skips every stage whose data, params and code "
                                               "did not change, so an unchanged night does nothing."),
            promote.to_deployment("manual", description="Move `champion` to the challenger if it wins on dev."),
            flywheel.to_deployment("flywheel", cron=WEEKLY, concurrency_limit=1,
                                   description="Weekly data flywheel: blind spots back to the teacher, usable "
                                               "rationales into data/sft_supplement for the next SFT.")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=NIGHTLY, help=f"cron schedule of the pipeline (default: {NIGHTLY!r}, UTC)")
    serve(*deployments(parser.parse_args().cron))
