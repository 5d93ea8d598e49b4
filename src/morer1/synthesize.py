"""Synthesize stage: six-step rationales from a teacher, filtered into the SFT set (chat messages + images)."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import read_jsonl, swap_in, write_jsonl, write_text_atomic
from morer1.labels import NONE, read_labels
from morer1.params import StageConfig
from morer1.parsing import parse_completion
from morer1.preflight import PromptBudget, check_prompts, load_processor
from morer1.prompt import PROMPT_FILE, PromptName, fact_images, prompt_messages, write_prompt_name
from morer1.teacher_openai import OpenAITeacherConfig
from morer1.teachers import DemoTeacher, TeacherRequest, TemplateTeacher

DEFAULT_LEAKAGE = ("gold label", "gold answer", "gold relation", "gold type", "given answer", "given label",
                   "correct answer is", "correct label is", "i was told", "i am told", "provided label",
                   "for your information", "as instructed", "the answer is given")


class SynthesisError(BadInputError):
    """Too few rationales survived in a split: the teacher failed or the filter is too strict (exit code 2).

    `report` is what was written to `<output>.failed-report.json`. A rerun pays only for the requests that got no
    completion.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def shortfall(split: str, s: dict, min_kept_fraction: float) -> str:
    """One line on a split that kept too little: its kept share and its top rejection reasons with counts."""
    top = Counter(s["rejected"]).most_common()
    reasons = ", ".join(f"{reason} {n}" for reason, n in top[:3]) + (f", {len(top) - 3} more" if len(top) > 3 else "")
    return (f"{split}: kept {s['kept']} of {s['requested']} rationales ({s['kept'] / s['requested']:.1%}), below "
            f"synthesize.min_kept_fraction={min_kept_fraction:g}; rejected: {reasons or 'none'}")


class SynthesizeConfig(StageConfig):
    """Parameters of the synthesize stage."""

    teacher: Literal["template", "demo", "openai"] = Field(
        ..., description="Who writes rationales: `template` (from annotations, no endpoint), `demo` (derived "
        "from the demo dataset's rule, demo data only) or `openai` (any OpenAI-compatible endpoint).")
    prompt: PromptName = Field(
        ..., description="Prompt template the SFT set (and so the trained model) uses: `full` (the MORE-R1 "
        "prompt, for real models) or `compact` (title and entity only, for a tiny model trained from scratch). "
        "The teacher always sees the full prompt.")
    splits: tuple[str, ...] = Field(("train", "dev"), description="Ingested splits to synthesize for.")
    max_facts: int | None = Field(None, ge=1, description="At most this many facts per split after balancing (None: all).")
    none_fraction: float | None = Field(
        ..., ge=0.0, le=1.0, description="Down-sample `none` facts to at most this share of a split (None: keep all).")
    seed: int = Field(0, description="Seed of the down-sampling.")
    leakage_phrases: tuple[str, ...] = Field(
        DEFAULT_LEAKAGE, description="A rationale containing one of these phrases (whole words, any case) is dropped as leaking the gold.")
    min_kept_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Fail when a split keeps less than this share of its requests (teacher down?).")
    openai: OpenAITeacherConfig = Field(default_factory=OpenAITeacherConfig,
                                        description="Endpoint settings of the `openai` teacher.")


def select_facts(facts: list[dict], cfg: SynthesizeConfig) -> list[dict]:
    """Facts to explain: `none` down-sampled to `none_fraction`, then at most `max_facts`, in source order."""
    rng = random.Random(cfg.seed)
    related = [f for f in facts if f["relation"] != NONE]
    nones = [f for f in facts if f["relation"] == NONE]
    if cfg.none_fraction is not None and cfg.none_fraction < 1.0:
        cap = int(len(related) * cfg.none_fraction / (1.0 - cfg.none_fraction))
        nones = rng.sample(nones, min(cap, len(nones)))
    chosen = related + nones
    if cfg.max_facts is not None and len(chosen) > cfg.max_facts:
        chosen = rng.sample(chosen, cfg.max_facts)
    order = {f["id"]: i for i, f in enumerate(facts)}
    return sorted(chosen, key=lambda f: order[f["id"]])


def rejection_reason(completion: str | None, gold: str, labels, leakage: tuple[str, ...]) -> str | None:
    """Why a rationale is unusable for SFT, or None when it is kept."""
    if completion is None:
        return "no_completion"
    parsed = parse_completion(completion, labels)
    if not parsed.well_formed:
        return "unparsable"
    if not parsed.steps_in_order:
        return "steps_not_six_in_order"
    if parsed.label != gold:
        return "answer_not_gold"
    if any(re.search(rf"\b{re.escape(phrase)}\b", completion, re.I) for phrase in leakage):
        return "leakage"
    return None


def make_teacher(cfg: SynthesizeConfig):
    if cfg.teacher == "template":
        return TemplateTeacher()
    if cfg.teacher == "demo":
        return DemoTeacher()
    from morer1.teacher_openai import OpenAITeacher

    return OpenAITeacher(cfg.openai)


def sft_example(request: TeacherRequest, completion: str, prompt: str) -> dict:
    """One SFT row: the student's prompt turns (template `prompt`) plus the teacher's rationale, the two image
    paths, the gold."""
    messages = prompt_messages(request.fact, request.labels, prompt) + [
        {"role": "assistant", "content": [{"type": "text", "text": completion}]}]
    return {"id": request.fact["id"], "messages": messages, "images": list(request.images),
            "relation": request.fact["relation"]}


def check_prompts_fit(facts_dir: Path, labels, cfg: SynthesizeConfig, budget: PromptBudget) -> None:
    """Preflight before the teacher is paid: the student prompts of the facts each split would send, with their two
    images, against the SFT stage's `max_length` (`morer1.preflight.check_prompts`, with the processor of `sft.model`
    and its pixel bounds; nothing checked while that folder is not there). PreflightError when SFT would drop more
    than `max_dropped_fraction` of a split (or all of it) whatever the rationales."""
    processor = load_processor(budget)
    if processor is None:
        return
    prompts = {}
    for split in cfg.splits:
        path = facts_dir / f"{split}.jsonl"
        if path.exists():  # a missing split is reported by the synthesis itself
            prompts[split] = [(f["id"], prompt_messages(f, labels, cfg.prompt), fact_images(f, facts_dir))
                              for f in select_facts(read_jsonl(path), cfg)]
    check_prompts(processor, prompts, budget)


def synthesize(facts_dir: str | Path, output: str | Path, cfg: SynthesizeConfig, teacher=None,
               budget: PromptBudget | None = None) -> dict:
    """Write `<split>.jsonl` SFT sets, `labels.json`, the prompt record and `report.json` (kept and rejected by
    reason) into `output`; return the report. With `budget` (the SFT stage's limits) the prompts are checked against
    them before the teacher is asked (`check_prompts_fit`).

    The folder is built beside `output` and swapped in when every split kept enough. When one kept too few,
    `output` (an earlier good set) stays as it was, the run's report is written to `<output>.failed-report.json`
    and SynthesisError follows. An existing `output` is replaced only if it holds nothing but an earlier SFT set."""
    facts_dir, output = Path(facts_dir), Path(output)
    if output.exists() and any(not _is_sft_file(p) for p in output.iterdir()):
        raise BadInputError(f"{output}: exists and is not an SFT set; refusing to overwrite it")
    labels = read_labels(facts_dir / "labels.json")
    if budget is not None:
        check_prompts_fit(facts_dir, labels, cfg, budget)
    teacher = teacher or make_teacher(cfg)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    failed = failed_report_path(output)
    try:
        report = _synthesize_into(staging, facts_dir, labels, cfg, teacher)
        short = [shortfall(split, s, cfg.min_kept_fraction) for split, s in report["splits"].items()
                 if s["requested"] and s["kept"] < cfg.min_kept_fraction * s["requested"]]
        if not short:
            swap_in(staging, output)
            failed.unlink(missing_ok=True)
            return report
        write_text_atomic(failed, json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    failures = report["teacher_stats"].get("failures") if isinstance(report["teacher_stats"], dict) else None
    why = f"; teacher failures: {', '.join(f'{r} {n}' for r, n in failures.items())}" if failures else ""
    if isinstance(teacher, DemoTeacher) and any(s["rejected"].get("no_completion") for s in report["splits"].values()):
        why += ("; the demo teacher only explains the synthetic demo data (morer1 demo-data, docs/demo_data.md) and "
                "gives no rationale for other facts: for real data set synthesize.teacher: template (rationales from "
                "the annotations, no endpoint) or openai (an OpenAI-compatible endpoint, docs/method.md)")
    raise SynthesisError(f"{'; '.join(short)}{why} (see {failed}; {output} is unchanged)", report)


def failed_report_path(output: Path) -> Path:
    """Where a run that kept too few rationales writes its report (the SFT set it would have replaced stays)."""
    return output.with_name(output.name + ".failed-report.json")


def _is_sft_file(path: Path) -> bool:
    """A file that `synthesize` writes."""
    return path.is_file() and (path.suffix == ".jsonl" or path.name in ("report.json", "labels.json", PROMPT_FILE))


def explain(facts: list[dict], facts_dir: Path, labels, cfg: SynthesizeConfig, teacher) -> tuple[list[dict], Counter]:
    """Ask `teacher` for a rationale of each fact (gold-conditioned, full prompt); the SFT rows of those that pass
    the filter (`rejection_reason`), in fact order, and the rejections counted by reason."""
    requests = [TeacherRequest(f, labels, prompt_messages(f, labels), tuple(fact_images(f, facts_dir)))
                for f in facts]
    completions = teacher.generate(requests)
    kept, reasons = [], Counter()
    for request, completion in zip(requests, completions, strict=True):
        reason = rejection_reason(completion, request.fact["relation"], labels, cfg.leakage_phrases)
        if reason:
            reasons[reason] += 1
        else:
            kept.append(sft_example(request, completion, cfg.prompt))
    return kept, reasons


def _synthesize_into(staging: Path, facts_dir: Path, labels, cfg: SynthesizeConfig, teacher) -> dict:
    """Write the SFT set into `staging`; return the report."""
    report: dict = {"teacher": cfg.teacher, "prompt": cfg.prompt, "splits": {}}
    write_prompt_name(staging, cfg.prompt)
    write_text_atomic(staging / "labels.json", json.dumps(list(labels)) + "\n")  # for SFT's dev scoring
    for split in cfg.splits:
        path = facts_dir / f"{split}.jsonl"
        if not path.exists():
            raise BadInputError(f"{path}: missing; synthesize.splits names a split that was not ingested")
        facts = select_facts(read_jsonl(path), cfg)
        kept, reasons = explain(facts, facts_dir, labels, cfg, teacher)
        write_jsonl(staging / f"{split}.jsonl", kept)
        report["splits"][split] = {"requested": len(facts), "kept": len(kept), "rejected": dict(reasons),
                                   "labels": dict(sorted(Counter(r["relation"] for r in kept).items()))}
    report["teacher_stats"] = getattr(teacher, "stats", {})
    write_text_atomic(staging / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def run(cfg: SynthesizeConfig, facts_dir: str | Path, output: str | Path, budget: PromptBudget | None = None) -> dict:
    """The synthesize stage: `synthesize` in an MLflow stage run (`budget`: the SFT stage's limits, checked before
    the teacher is paid); return the report.

    Logs the report (its numbers as metrics) and the first rationales of the first split as a table; a run
    that kept too few logs its report before it fails."""
    output = Path(output)
    with tracking.stage_run("synthesize", cfg):
        try:
            report = synthesize(facts_dir, output, cfg, budget=budget)
        except SynthesisError as exc:
            if exc.report is not None:
                tracking.log_summary(exc.report)  # not the rationales: those in `output` are the earlier set's
            raise
        _log(report, output)
    return report


def _log(report: dict, output: Path) -> None:
    """Log the report (numbers as metrics, the whole as `summary.json`) and the first split's first 20 rationales."""
    import mlflow

    tracking.log_summary(report)
    first = next(iter(report["splits"]), None)
    if first and (output / f"{first}.jsonl").exists():
        rows = read_jsonl(output / f"{first}.jsonl")[:20]
        mlflow.log_table({"id": [r["id"] for r in rows], "relation": [r["relation"] for r in rows],
                          "rationale": [r["messages"][-1]["content"][0]["text"] for r in rows]},
                         artifact_file="rationale_samples.json")
