"""Flywheel stage: the trained policy's blind spots back to the teacher, as an SFT supplement for the next `sft` run.

The policy (`flywheel.model`, the GRPO model) gets k rollouts per training fact, drawn and scored as the
difficulty stage does (`morer1.difficulty.rollout_pass_rates`, the `rollout` settings). The facts with pass rate 0
are its blind spots; at most `flywheel.max_facts` of them (a seeded sample) go to the synthesize teacher with its
gold-conditioned instruction (`morer1.synthesize.explain`: same teacher, prompt and filter as the SFT set). The
stage writes the round into its output folder; `accept` adds the round's usable rows, once, to the accepted
supplement folder, which the `sft` stage reads (a round records the supplement state it was made against).
DVC allows no cycle (sft -> grpo -> flywheel -> sft), so the supplement is not an output of this stage but a
folder versioned in Git that `sft` and `flywheel` depend on (docs/method.md).

Round folder (`run`): `report.json`, `pass_rates.jsonl` (one difficulty row per fact rolled out),
`sent.jsonl` (the blind spots sent: id, relation, pass rate, usable), `supplement/` (the usable rows as an SFT
set: `train.jsonl`, `labels.json`, the prompt record). Disabled: `report.json` only, no model is loaded.
Supplement folder (`accept`): `train.jsonl` (rows of every accepted round; a fact sent again keeps its latest
row), `labels.json`, the prompt record, `rounds.json` (per accepted round, its usable facts and their pass
rates when sent: the next flywheel run measures them again and records the change).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import Field

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import folder_sha256, read_jsonl, swap_in, write_jsonl, write_text_atomic
from morer1.params import StageConfig
from morer1.rollout import RolloutConfig, log_params
from morer1.synthesize import SynthesizeConfig

ROUNDS = "rounds.json"
SUPPLEMENT = "supplement"


class FlywheelConfig(StageConfig):
    """Parameters of the flywheel stage (how rollouts are drawn is the `rollout` section, who explains the blind
    spots is the `synthesize` section's teacher)."""

    enabled: bool = Field(False, description="Run the flywheel; false: the stage writes an empty round at once, "
                                             "no model is loaded.")
    model: str = Field("models/grpo", description="Policy folder whose blind spots are sought (the trained model).")
    max_facts: int = Field(64, ge=1, description="Most blind spots sent to the teacher per round (a seeded sample).")
    max_samples: int | None = Field(
        256, ge=1, description="Roll out a seeded random sample of this many training facts (None: all), plus the "
                               "last accepted round's facts.")
    batch_size: int = Field(16, ge=1, description="Facts per generation batch (each holds k sequences).")
    seed: int = Field(0, description="Seed of the fact sample, the rollouts and the cap's sample.")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable {what}: {exc}") from exc


def last_round(supplement_dir: Path) -> list[dict]:
    """The facts of the last accepted round (`{"id", "pass_rate"}`, the rate when sent); none without a round."""
    path = supplement_dir / ROUNDS
    rounds = _read_json(path, "rounds list") if path.is_file() else []
    if not isinstance(rounds, list):
        raise BadInputError(f"{path}: must be a JSON list of rounds")
    return rounds[-1]["facts"] if rounds else []


def previous_change(previous: list[dict], rates: dict[str, dict]) -> dict:
    """The last accepted round's facts measured again: their mean pass rate when sent and now, the change, how
    many the policy now solves at least once, and how many are no longer among the training facts."""
    now = [rates[f["id"]]["pass_rate"] for f in previous if f["id"] in rates]
    then = [f["pass_rate"] for f in previous if f["id"] in rates]
    if not now:
        return {"facts": 0, "missing": len(previous)}
    return {"facts": len(now), "missing": len(previous) - len(now), "pass_rate_then": sum(then) / len(then),
            "pass_rate_now": sum(now) / len(now), "pass_rate_change": (sum(now) - sum(then)) / len(now),
            "passing_now": sum(rate > 0 for rate in now)}


def run(cfg: FlywheelConfig, rollout: RolloutConfig, synth: SynthesizeConfig, facts_dir: str | Path,
        supplement_dir: str | Path, out_dir: str | Path, teacher=None) -> dict:
    """One flywheel round into `out_dir` (replaced as a whole): roll out `cfg.model` on a sample of
    `facts_dir/train.jsonl` and the facts of the last round accepted in `supplement_dir`, send at most
    `cfg.max_facts` facts of pass rate 0 to the teacher (`teacher`, default: `synth`'s), keep the rationales that
    pass the SFT filter; log the counts to the stage's MLflow run and return the report. Disabled: the report
    only (all counts 0, logged like any stage's, so every stage of a pipeline run has its nested run), no model
    loaded."""
    facts_dir, supplement_dir, out_dir = Path(facts_dir), Path(supplement_dir), Path(out_dir)
    report: dict = {"enabled": cfg.enabled, "facts": 0, "blind_spots": 0, "sent": 0, "usable": 0, "rejected": {},
                    "previous": {"facts": 0, "missing": 0}}
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tracking.stage_run("flywheel", cfg):
            if cfg.enabled:
                report.update(_round(cfg, rollout, synth, facts_dir, supplement_dir, staging, teacher))
            tracking.log_summary(report)
        write_text_atomic(staging / "report.json", json.dumps(report, indent=1) + "\n")
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _round(cfg: FlywheelConfig, rollout: RolloutConfig, synth: SynthesizeConfig, facts_dir: Path,
           supplement_dir: Path, staging: Path, teacher) -> dict:
    """Roll out, select, explain; write the round's files into `staging`; return its counts."""
    from morer1 import difficulty, synthesize
    from morer1.labels import read_labels
    from morer1.prompt import write_prompt_name

    policy = rollout.model_copy(update={"model": cfg.model})
    log_params(policy)
    path = facts_dir / "train.jsonl"
    if not path.is_file():
        raise BadInputError(f"{path}: no ingested training facts")
    facts = read_jsonl(path)
    previous = last_round(supplement_dir)
    wanted = {f["id"] for f in difficulty.select_facts(facts, cfg.max_samples, cfg.seed)} | {f["id"] for f in previous}
    chosen = [f for f in facts if f["id"] in wanted]
    labels = read_labels(facts_dir / "labels.json")
    rows = difficulty.rollout_pass_rates(policy, chosen, facts_dir, labels, cfg.batch_size, cfg.seed)
    blind = [fact for fact, row in zip(chosen, rows) if row["passes"] == 0]
    sent = difficulty.select_facts(blind, cfg.max_facts, cfg.seed)
    kept, reasons = synthesize.explain(sent, facts_dir, labels, synth, teacher or synthesize.make_teacher(synth))
    usable = {r["id"] for r in kept}
    rates = {r["id"]: r for r in rows}
    write_jsonl(staging / "pass_rates.jsonl", rows)
    write_jsonl(staging / "sent.jsonl", [{"id": f["id"], "relation": f["relation"],
                                          "pass_rate": rates[f["id"]]["pass_rate"], "usable": f["id"] in usable}
                                         for f in sent])
    (staging / SUPPLEMENT).mkdir()
    write_jsonl(staging / SUPPLEMENT / "train.jsonl", kept)
    write_text_atomic(staging / SUPPLEMENT / "labels.json", json.dumps(list(labels)) + "\n")
    write_prompt_name(staging / SUPPLEMENT, synth.prompt)
    return {"facts": len(rows), "blind_spots": len(blind), "sent": len(sent), "usable": len(kept),
            "rejected": dict(reasons), "previous": previous_change(previous, rates),
            "supplement_sha256": folder_sha256(supplement_dir)}


def accept(round_dir: str | Path, supplement_dir: str | Path) -> dict:
    """Add the usable rows of the round in `round_dir` to the supplement folder `supplement_dir` and record the
    round in its `rounds.json`. A round with no usable row, or made against another state of the supplement
    (accepted already, or another round was since), changes nothing. Return what was accepted."""
    round_dir, supplement_dir = Path(round_dir), Path(supplement_dir)
    report = _read_json(round_dir / "report.json", "flywheel report")
    current = report.get("supplement_sha256") == folder_sha256(supplement_dir)
    new_rows = read_jsonl(round_dir / SUPPLEMENT / "train.jsonl") if report["usable"] and current else []
    rounds = _read_json(supplement_dir / ROUNDS, "rounds list") if (supplement_dir / ROUNDS).is_file() else []
    old_rows = read_jsonl(supplement_dir / "train.jsonl") if (supplement_dir / "train.jsonl").is_file() else []
    summary = {"accepted": bool(new_rows), "rows_added": len(new_rows), "rounds": len(rounds),
               "stale": bool(report["usable"]) and not current}
    if not new_rows:
        summary["supplement_rows"] = len(old_rows)
        return summary
    from morer1.prompt import PROMPT_FILE, model_prompt

    if old_rows and model_prompt(supplement_dir) != model_prompt(round_dir / SUPPLEMENT):
        raise BadInputError(f"{round_dir / SUPPLEMENT}: prompt {model_prompt(round_dir / SUPPLEMENT)!r}, but the "
                            f"supplement in {supplement_dir} uses {model_prompt(supplement_dir)!r}")
    fresh = {r["id"] for r in new_rows}
    rows = [r for r in old_rows if r["id"] not in fresh] + new_rows
    sent = read_jsonl(round_dir / "sent.jsonl")
    rounds.append({"round": len(rounds) + 1, "facts": [
        {"id": f["id"], "relation": f["relation"], "pass_rate": f["pass_rate"]} for f in sent if f["usable"]]})
    staging = supplement_dir.with_name(supplement_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_jsonl(staging / "train.jsonl", rows)
        for name in ("labels.json", PROMPT_FILE):
            shutil.copyfile(round_dir / SUPPLEMENT / name, staging / name)
        write_text_atomic(staging / ROUNDS, json.dumps(rounds, indent=1) + "\n")
        swap_in(staging, supplement_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.update(rounds=len(rounds), supplement_rows=len(rows))
    return summary
