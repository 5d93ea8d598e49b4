"""Synthesize stage: six-step rationales from a teacher, filtered into the SFT set (chat messages + images)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from morer1.errors import BadInputError
from morer1.files import read_jsonl
from morer1.labels import NONE, read_labels
from morer1.params import StageConfig
from morer1.parsing import parse_completion
from morer1.prompt import PromptName, fact_images, prompt_messages, write_prompt_name
from morer1.teacher_openai import OpenAITeacherConfig
from morer1.teachers import DemoTeacher, TeacherRequest, TemplateTeacher

DEFAULT_LEAKAGE = ("gold label", "gold answer", "gold relation", "gold type", "given answer", "given label",
                   "correct answer is", "correct label is", "i was told", "i am told", "provided label",
                   "for your information", "as instructed", "the answer is given")


class SynthesisError(BadInputError):
    """Too few rationales survived in a split: the teacher failed or the filter is too strict (exit code 2).

    `report` is what was written to `report.json`. A rerun pays only for the requests that got no completion.
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
        "template", description="Who writes rationales: `template` (from annotations, no endpoint), `demo` (derived "
        "from the demo dataset's rule, demo data only) or `openai` (any OpenAI-compatible endpoint).")
    prompt: PromptName = Field(
        "full", description="Prompt template the SFT set (and so the trained model) uses: `full` (the MORE-R1 "
        "prompt, for real models) or `compact` (title and entity only, for a tiny model trained from scratch). "
        "The teacher always sees the full prompt.")
    splits: tuple[str, ...] = Field(("train", "dev"), description="Ingested splits to synthesize for.")
    max_facts: int | None = Field(None, ge=1, description="At most this many facts per split after balancing (None: all).")
    none_fraction: float | None = Field(
        0.4, ge=0.0, le=1.0, description="Down-sample `none` facts to at most this share of a split (None: keep all).")
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


def synthesize(facts_dir: str | Path, output: str | Path, cfg: SynthesizeConfig, teacher=None) -> dict:
    """Write `<split>.jsonl` SFT sets and `report.json` (kept and rejected by reason) into `output`."""
    facts_dir, output = Path(facts_dir), Path(output)
    labels = read_labels(facts_dir / "labels.json")
    teacher = teacher or make_teacher(cfg)
    output.mkdir(parents=True, exist_ok=True)
    report: dict = {"teacher": cfg.teacher, "prompt": cfg.prompt, "splits": {}}
    write_prompt_name(output, cfg.prompt)
    (output / "labels.json").write_text(json.dumps(list(labels)) + "\n", encoding="utf-8")  # for SFT's dev scoring
    for split in cfg.splits:
        path = facts_dir / f"{split}.jsonl"
        if not path.exists():
            raise BadInputError(f"{path}: missing; synthesize.splits names a split that was not ingested")
        facts = select_facts(read_jsonl(path), cfg)
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
        tmp = output / f"{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(output / f"{split}.jsonl")
        report["splits"][split] = {"requested": len(requests), "kept": len(kept), "rejected": dict(reasons),
                                   "labels": dict(sorted(Counter(r["relation"] for r in kept).items()))}
    report["teacher_stats"] = getattr(teacher, "stats", {})
    (output / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    short = [shortfall(split, s, cfg.min_kept_fraction) for split, s in report["splits"].items()
             if s["requested"] and s["kept"] < cfg.min_kept_fraction * s["requested"]]
    if short:
        failures = report["teacher_stats"].get("failures") if isinstance(report["teacher_stats"], dict) else None
        why = f"; teacher failures: {', '.join(f'{r} {n}' for r, n in failures.items())}" if failures else ""
        raise SynthesisError(f"{'; '.join(short)}{why} (see {output / 'report.json'})", report)
    return report


def log_to_mlflow(report: dict, output: str | Path) -> None:
    """Kept and rejected counts per split and reason, the report, and a sample of rationales as a table."""
    import mlflow

    output = Path(output)
    for split, s in report["splits"].items():
        mlflow.log_metrics({f"{split}_requested": s["requested"], f"{split}_kept": s["kept"]})
        mlflow.log_metrics({f"{split}_rejected_{reason}": n for reason, n in s["rejected"].items()})
    mlflow.log_artifact(str(output / "report.json"))
    first = next(iter(report["splits"]), None)
    if first and (output / f"{first}.jsonl").exists():
        rows = read_jsonl(output / f"{first}.jsonl")[:20]
        mlflow.log_table({"id": [r["id"] for r in rows], "relation": [r["relation"] for r in rows],
                          "rationale": [r["messages"][-1]["content"][0]["text"] for r in rows]},
                         artifact_file="rationale_samples.json")
