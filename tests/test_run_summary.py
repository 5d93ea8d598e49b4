"""The closing summary of a pipeline run (issue 24 §3), from a finished project's outputs: one line per stage with
what its outputs say, the candidates' F1 with their intervals, the promotion decision; a no-op run says "nothing
changed" with the headline figures; the console keeps Prefect's lines to one line each."""

import json
import logging
from pathlib import Path

import pytest

from morer1.console import ConsoleFormatter, failure_lines
from morer1.orchestrate import StageFailed, champion_metrics, run_summary, stage_facts, summary_markdown

STAGES = ("demo_data", "ingest", "validate_facts", "synthesize", "validate_sft", "tiny_model", "sft", "difficulty",
          "curriculum", "grpo", "evaluate", "register", "flywheel")
CHOSEN_METRICS = {"dev_f1": 0.6724, "dev_f1_lo": 0.6341, "dev_f1_hi": 0.7172, "test_f1": 0.6667, "test_f1_lo": 0.6269,
                  "test_f1_hi": 0.7025, "dev_accuracy": 0.777, "test_accuracy": 0.754, "dev_n": 1224}


def _write(root: Path, path: str, data: dict) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(json.dumps(data))


@pytest.fixture
def finished(tmp_path):
    """A finished project's outputs, small: the summaries and reports each stage writes (shapes as in the demo)."""
    _write(tmp_path, "data/ingested/summary.json", {"facts": {"train": 14738, "dev": 1224, "test": 1086},
                                                   "rejects": 3, "reject_fraction": 0.00018})
    gate = {"success": True, "summary": {"expectations": 41, "failed": 0}, "failures": []}
    _write(tmp_path, "data/validation/facts/report.json", gate)
    _write(tmp_path, "data/validation/sft/report.json", {**gate, "summary": {"expectations": 12, "failed": 0}})
    _write(tmp_path, "data/sft/report.json", {"teacher": "demo", "prompt": "compact", "splits": {
        "train": {"requested": 11944, "kept": 11940, "rejected": {"unparsable": 4}},
        "dev": {"requested": 890, "kept": 890, "rejected": {}}}})
    _write(tmp_path, "models/sft/sft_summary.json", {
        "train_samples": 11940, "dropped_overlong": 0, "steps": 2000, "first_logged_loss": 5.3477,
        "last_logged_loss": 0.0177, "dev_sample_f1": 0.7, "longest_rationale_tokens": 131})
    _write(tmp_path, "data/difficulty/difficulty_summary.json", {"facts": 256, "solved": 145, "learnable": 94,
                                                                 "hard": 17, "mean_pass_rate": 0.78})
    _write(tmp_path, "data/curriculum/plan.json", {"mode": "progressive", "total": 112, "warnings": []})
    _write(tmp_path, "models/grpo/grpo_summary.json", {"steps": 56, "reward_first": 1.8, "reward_last": 1.4625})
    candidate = {"dev_f1": 0.6724, "dev_f1_lo": 0.6341, "dev_f1_hi": 0.7172, "test_f1": 0.6667, "test_f1_lo": 0.6269,
                 "test_f1_hi": 0.7025}
    _write(tmp_path, "reports/eval/metrics.json", {
        "dev": {"f1": 0.6724, "f1_lo": 0.6341, "f1_hi": 0.7172}, "test": {"f1": 0.6667},
        "candidates": {"sft": candidate, "grpo": {**candidate, "dev_f1": 0.6496, "dev_f1_lo": 0.6096,
                                                  "dev_f1_hi": 0.6928}},
        "comparisons": {"grpo_vs_sft": {"dev": {"delta_f1": -0.0229, "delta_f1_lo": -0.0472, "delta_f1_hi": -0.0013}}}})
    _write(tmp_path, "reports/eval/chosen.json", {"model_dir": "models/sft", "metrics": CHOSEN_METRICS})
    _write(tmp_path, "reports/registry/registered.json", {"model_name": "morer1-candidates", "version": "1", "promotion": {
        "model_name": "morer1", "candidates_model_name": "morer1-candidates", "metric": "dev_f1",
        "rule": "promote when the 95 % paired-bootstrap lower bound of Δdev_f1 > 0.0", "challenger_version": "1",
        "champion_version": None, "challenger_value": None, "champion_value": None, "delta": None,
        "served_version": "1", "decision": "promoted", "reason": "no champion yet"}})
    _write(tmp_path, "data/flywheel/report.json", {"enabled": False})
    return tmp_path


def test_a_run_prints_one_line_per_stage_with_what_its_outputs_say(finished):
    results = [{"stage": s, "status": "ran", "seconds": 12.0} for s in STAGES]
    lines = run_summary(finished, results, champion_metrics(finished))
    text = "\n".join(lines)
    assert lines[0] == "morer1 pipeline: 13 stages ran, 0 up to date"
    stage_lines = {line.split()[0]: line for line in lines[1:] if line[:2] == "  " and line[2] != " "
                   and line.split()[0] in STAGES}
    assert set(stage_lines) == set(STAGES)  # every stage has its line
    assert "17048 facts kept (train 14738, dev 1224, test 1086), 3 rejected (0.02%)" in stage_lines["ingest"]
    assert "41/41 expectations passed" in stage_lines["validate_facts"]
    assert "rationales kept train 11940/11944, dev 890/890 (demo teacher, compact prompt), 4 rejected" in text
    assert "2000 steps, loss 5.348 → 0.018" in stage_lines["sft"] and "longest rationale 131 tokens" in text
    assert "56 steps, reward 1.800 → 1.462" in stage_lines["grpo"]
    assert "256 facts: 145 solved, 94 learnable, 17 hard" in stage_lines["difficulty"]
    # each candidate's dev and test F1 with its interval, the paired difference, the decision with its reason
    assert "chosen models/sft; sft: dev F1 0.672 [0.634, 0.717], test F1 0.667 [0.627, 0.703]" in stage_lines["evaluate"]
    assert "grpo: dev F1 0.650 [0.610, 0.693], test F1 0.667 [0.627, 0.703]" in text
    assert "grpo − sft: dev ΔF1 -0.023 [-0.047, -0.001]" in text
    assert ("morer1-candidates version 1 (challenger); promoted: no champion yet; champion: morer1 version 1"
            in stage_lines["register"])
    assert "off (flywheel.enabled)" in stage_lines["flywheel"]
    assert lines[-1] == "  champion morer1 version 1: dev F1 0.672 [0.634, 0.717], test F1 0.667 [0.627, 0.703]"
    print(text)  # what `make run` ends with (pytest -s shows it)


def test_a_run_where_nothing_changed_says_so_with_the_headline(finished):
    results = [{"stage": s, "status": "skipped", "seconds": None} for s in STAGES]
    champion = champion_metrics(finished)
    assert champion == {"model_name": "morer1", "version": "1",
                        "metrics": {k: v for k, v in CHOSEN_METRICS.items() if k != "dev_n"}}
    lines = run_summary(finished, results, champion)
    assert lines == ["morer1 pipeline: nothing changed: all 13 stages are up to date",
                     "  champion morer1 version 1: dev F1 0.672 [0.634, 0.717], test F1 0.667 [0.627, 0.703]",
                     "  last promotion decision on morer1-candidates version 1: promoted: no champion yet"]
    markdown = summary_markdown(finished, results, "abc123", "1", champion=champion)
    assert "**Nothing changed**" in markdown and "Champion `morer1` version 1: dev F1 0.672 [0.634, 0.717]" in markdown
    assert "| sft | skipped | – | 2000 steps, loss 5.348 → 0.018" in markdown  # the same facts, in the stage table
    assert "sft: dev F1 0.672 [0.634, 0.717]" in markdown


def test_a_failed_stage_has_no_facts_and_missing_outputs_give_none(finished, tmp_path_factory):
    results = [{"stage": "ingest", "status": "ran", "seconds": 3.0},
               {"stage": "validate_facts", "status": "failed", "seconds": None}]
    lines = run_summary(finished, results)
    assert lines[0] == "morer1 pipeline: 1 stages ran, 0 up to date, validate_facts failed"
    assert lines[2].split() == ["validate_facts", "failed"]
    empty = tmp_path_factory.mktemp("empty")
    assert stage_facts(empty, "sft") == [] and champion_metrics(empty) is None
    kept = json.loads((finished / "reports/registry/registered.json").read_text())
    kept["promotion"].update(decision="kept", served_version="7")  # the champion is another version: the registry's
    (finished / "reports/registry/registered.json").write_text(json.dumps(kept))
    assert champion_metrics(finished) is None  # no registry here to ask


def test_the_console_shows_prefect_failures_in_one_line_and_the_message_once():
    message = "2 of 41 expectations failed:\nnone share 0.73 above 0.1\nData Docs: data/validation/facts/x.html"
    exc = StageFailed("validate_facts", 3, message)
    formatter = ConsoleFormatter(logging.Formatter("%(levelname)s | %(message)s"))

    def shown(msg, *args, exc_info=None):
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, msg, args, exc_info)
        return formatter.format(record)

    try:
        raise exc
    except StageFailed:
        import sys

        info = sys.exc_info()
    console = [shown("Task run failed with exception: %r - Retries are exhausted", exc, exc_info=info),
               shown(f"Finished in state Failed('Task run encountered an exception StageFailed: {exc}')"),
               shown("Encountered exception during execution: %r", exc, exc_info=info)]
    assert console == ["ERROR | Task run failed with exception: StageFailed - Retries are exhausted",
                       "ERROR | Finished in state Failed", "ERROR | Encountered exception during execution: StageFailed"]
    out = "\n".join(console + failure_lines(str(exc), Path("/s/logs/pipeline-1.log"), "run1"))
    assert out.count("none share 0.73 above 0.1") == 1 and "Traceback" not in out
    assert out.endswith("details: full log, tracebacks included: /s/logs/pipeline-1.log; MLflow run run1 (failure.txt, "
                        "tag morer1.failed_stage)")
