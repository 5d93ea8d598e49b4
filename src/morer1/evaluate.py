"""Evaluate stage: batched generation on dev and test, MORE metrics, baselines, the error-analysis report.

Each candidate model (e.g. the SFT and the GRPO checkpoints) is scored on dev; the best on the dev metric
is chosen. Every candidate is also scored on test, reported side by side in `metrics.json` (`candidates`)
so that what each stage bought is visible; test never chooses anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from morer1.files import read_jsonl
from morer1.params import StageConfig


class EvaluateConfig(StageConfig):
    """Parameters of the evaluate stage."""

    models: tuple[str, ...] = Field(("models/sft", "models/grpo"), description="Candidate model folders, scored on dev.")
    selection_metric: str = Field("f1", description="Dev metric that chooses the model (ties: the later candidate).")
    max_facts: int | None = Field(None, ge=1, description="Score at most this many facts per split, seeded sample (None: all).")
    max_new_tokens: int = Field(256, ge=1, description="Longest completion generated per fact.")
    batch_size: int = Field(8, ge=1, description="Facts per generate call.")
    report_max_samples: int = Field(300, ge=1, description="Samples drawn in the error-analysis page (wrong ones first).")
    seed: int = Field(0, description="Seed of the fact sample and of the random baseline.")


def sample_facts(facts: list[dict], max_facts: int | None, seed: int) -> list[dict]:
    """At most `max_facts` facts, a seeded sample kept in file order."""
    import random

    if max_facts is None or len(facts) <= max_facts:
        return facts
    keep = set(random.Random(seed).sample(range(len(facts)), max_facts))
    return [f for i, f in enumerate(facts) if i in keep]


def predict_facts(model_dir: str | Path, facts: list[dict], facts_dir: Path, labels, cfg: EvaluateConfig) -> list[dict]:
    """Greedy completions for `facts`, parsed: each fact plus `predicted` (label or None) and `completion`."""
    from morer1.generation import generate_completions
    from morer1.modeling import load_model_and_processor
    from morer1.parsing import parse_completion
    from morer1.prompt import model_prompt

    model, processor = load_model_and_processor(model_dir)
    model.eval()
    completions = generate_completions(model, processor, facts, facts_dir, labels, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, prompt=model_prompt(model_dir))
    return [{**f, "completion": c[0], "predicted": parse_completion(c[0], labels).label}
            for f, c in zip(facts, completions, strict=True)]


def score(rows: list[dict], labels, train_golds: list[str], seed: int) -> dict:
    """compute_metrics with the MORE slices, and the majority and random baselines on the same facts."""
    from morer1.metrics import baselines, compute_metrics

    golds = [r["relation"] for r in rows]
    result = compute_metrics(golds, [r["predicted"] for r in rows], labels,
                             pair_entities=[r["pair_entities"] for r in rows],
                             pair_objects=[r["pair_objects"] for r in rows])
    result["baselines"] = baselines(train_golds, golds, labels, seed=seed)
    return result


def write_predictions(rows: list[dict], path: Path) -> None:
    keep = ("id", "relation", "predicted", "completion")
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in keep}, ensure_ascii=False) + "\n")


CANDIDATE_KEYS = ("f1", "precision", "recall", "accuracy", "invalid_rate")


def add_candidates(metrics_path: Path, results: dict) -> None:
    """Add `candidates.<model folder name>.<split>_<metric>` to metrics.json: each stage's model side by side."""
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["candidates"] = {Path(model).name: {f"{split}_{k}": r[k] for split, r in splits.items()
                                                for k in CANDIDATE_KEYS}
                             for model, splits in results.items()}
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def evaluate(facts_dir: str | Path, out_dir: str | Path, cfg: EvaluateConfig) -> dict:
    """Score the candidates on dev, the chosen one on test; write metrics, plots, predictions and the report."""
    from morer1.labels import read_labels
    from morer1.metrics import write_metrics_files
    from morer1.report import write_report

    facts_dir, out_dir = Path(facts_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = read_labels(facts_dir / "labels.json")
    train_golds = [f["relation"] for f in read_jsonl(facts_dir / "train.jsonl")]
    dev = sample_facts(read_jsonl(facts_dir / "dev.jsonl"), cfg.max_facts, cfg.seed)
    test = sample_facts(read_jsonl(facts_dir / "test.jsonl"), cfg.max_facts, cfg.seed)

    candidates, dev_rows = {}, {}
    for model in cfg.models:
        dev_rows[model] = predict_facts(model, dev, facts_dir, labels, cfg)
        candidates[model] = score(dev_rows[model], labels, train_golds, cfg.seed)
    chosen = max(reversed(cfg.models), key=lambda m: candidates[m][cfg.selection_metric])
    # Every candidate is scored on test too, so each stage's gain is visible; the choice above used dev only.
    test_rows, tested = {}, {}
    for model in cfg.models:
        test_rows[model] = predict_facts(model, test, facts_dir, labels, cfg)
        tested[model] = score(test_rows[model], labels, train_golds, cfg.seed)
    results = {"dev": candidates[chosen], "test": tested[chosen]}

    write_metrics_files(results, out_dir)
    add_candidates(out_dir / "metrics.json", {m: {"dev": candidates[m], "test": tested[m]} for m in cfg.models})
    write_predictions(dev_rows[chosen], out_dir / "predictions_dev.jsonl")
    write_predictions(test_rows[chosen], out_dir / "predictions_test.jsonl")
    selection = {"chosen": chosen, "selection_metric": cfg.selection_metric,
                 "dev": {m: candidates[m][cfg.selection_metric] for m in cfg.models},
                 "test": {m: tested[m][cfg.selection_metric] for m in cfg.models}}
    (out_dir / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
    write_report(dev_rows[chosen], facts_dir, out_dir / "report", title=f"morer1 error analysis: {chosen} on dev",
                 metrics=candidates[chosen], max_samples=cfg.report_max_samples)
    return {"selection": selection, "results": results}


def log_to_mlflow(summary: dict, out_dir: str | Path) -> None:
    """Dev and test metrics (prefixed), the selection, the metric files and the report."""
    import mlflow

    from morer1.metrics import flat_metrics

    out_dir = Path(out_dir)
    for split, result in summary["results"].items():
        mlflow.log_metrics({f"{split}_{k}": v for k, v in flat_metrics(result).items()})
    for split in ("dev", "test"):
        for model, value in summary["selection"][split].items():
            mlflow.log_metric(f"candidate_{split}_{summary['selection']['selection_metric']}_{Path(model).name}", value)
    mlflow.set_tag("morer1.chosen_model", summary["selection"]["chosen"])
    for name in ("metrics.json", "selection.json", "dev_per_relation.csv", "test_per_relation.csv",
                 "dev_confusion.csv", "test_confusion.csv", "predictions_dev.jsonl", "predictions_test.jsonl"):
        mlflow.log_artifact(str(out_dir / name))
    mlflow.log_artifacts(str(out_dir / "report"), artifact_path="report")
