"""Prefect flow: one round of the data flywheel (docs/method.md, "Data flywheel"), then its acceptance.

    python flows/flywheel.py [--project-dir DIR] [--no-accept]

Runs the DVC stage `flywheel` (`dvc repro --single-item flywheel`: nothing when its inputs did not change since
the last round), gates the round's rows with the SFT suite (`validate_sft`'s expectations) and adds them to
`data/sft_supplement` (`morer1 flywheel-accept`), which the next `sft` run trains on. A disabled flywheel
(`flywheel.enabled: false`) or a round with no usable row changes nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from morer1.orchestrate import repro_stage, set_env_defaults

PROJECT = Path(__file__).resolve().parent.parent
set_env_defaults(PROJECT)

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from morer1 import flywheel as fw
from morer1 import tracking, validate
from morer1.params import load_section

ROUND, SUPPLEMENT = "data/flywheel", "data/sft_supplement"


@flow(name="morer1-flywheel")
def flywheel(project_dir: str = str(PROJECT), accept: bool = True) -> dict:
    """Run the `flywheel` stage of `project_dir`; when `accept`, gate and accept its round; post artifact `flywheel`."""
    logger = get_run_logger()
    tracking.setup()
    stage = repro_stage(project_dir, "flywheel")
    root = Path(project_dir)
    report = json.loads((root / ROUND / "report.json").read_text(encoding="utf-8"))
    accepted = {"accepted": False}
    if accept and report["usable"]:
        cfg = load_section("validate", validate.ValidateConfig, root / "params.yaml")
        with tempfile.TemporaryDirectory(prefix="morer1-flywheel-gate-") as gate:
            validate.run_sft(cfg, root / ROUND / fw.SUPPLEMENT, Path(gate) / "out")
        accepted = fw.accept(root / ROUND, root / SUPPLEMENT)
    logger.info("flywheel stage %s; round %s; accepted %s", stage.status, report, accepted)
    lines = [f"- stage: {stage.status}", f"- enabled: {report['enabled']}",
             f"- facts rolled out: {report['facts']}, blind spots: {report['blind_spots']}, sent: {report['sent']}, "
             f"usable: {report['usable']}",
             f"- last round's facts: {json.dumps(report['previous'])}",
             f"- accepted: {json.dumps(accepted)}"]
    create_markdown_artifact(key="flywheel", markdown="# morer1 flywheel\n\n" + "\n".join(lines),
                             description="Blind spots found, sent, usable; rows accepted into the SFT supplement")
    return {"stage": stage.status, "round": report, "accepted": accepted}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=str(PROJECT))
    parser.add_argument("--no-accept", action="store_true", help="run the stage only; leave the supplement as it is")
    args = parser.parse_args()
    flywheel(args.project_dir, not args.no_accept)
