"""Serve the pipeline flow on a cron schedule and the promotion flow on demand, from this machine.

    python flows/serve.py [--cron "0 2 * * *"]

Runs until stopped; needs a Prefect server (`PREFECT_API_URL`). The deployments are those of prefect.yaml,
`morer1-pipeline/nightly` and `morer1-promote/manual`, without a work pool: this process runs the flows.
"""

from __future__ import annotations

import argparse

from pipeline import pipeline  # first: it sets the state and Prefect home defaults
from prefect import serve
from promote import promote

NIGHTLY = "0 2 * * *"


def deployments(cron: str = NIGHTLY) -> list:
    """The pipeline deployment on `cron` and the unscheduled promotion deployment."""
    return [pipeline.to_deployment("nightly", cron=cron, concurrency_limit=1,
                                   description="Nightly retrain; DVC skips every stage whose data, params and code "
                                               "did not change, so an unchanged night does nothing."),
            promote.to_deployment("manual", description="Move `champion` to the challenger if it wins on dev.")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=NIGHTLY, help=f"cron schedule of the pipeline (default: {NIGHTLY!r}, UTC)")
    serve(*deployments(parser.parse_args().cron))
