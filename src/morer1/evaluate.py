"""Evaluate stage: batched generation on dev and test, MORE metrics, baselines, the error-analysis report.

Each candidate model folder (e.g. the SFT and the GRPO checkpoints, given on the command line) is scored on dev;
the best on the dev metric is chosen. Every candidate is also scored on test, reported side by side in
`metrics.json` (`candidates`) so that what each stage bought is visible; test never chooses anything.
`chosen.json` holds what register needs: the chosen folder, its content hash, the label set and its metrics.

The chosen model is also scored by self-consistency (`evaluate.sc_samples` sampled completions per fact, majority
vote, `morer1.consistency`): `self_consistency.json` sets its metrics beside greedy's, with and without abstention
at `sc_abstain_below`, and `pr_coverage.csv` holds the test precision-recall-coverage curve over thresholds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from morer1.errors import BadInputError
from morer1.files import folder_sha256, read_jsonl, swap_in, write_jsonl, write_text_atomic
from morer1.params import StageConfig

CANDIDATE_KEYS = ("f1", "precision", "recall", "accuracy", "invalid_rate")
PREDICTION_KEYS = ("id", "image", "relation", "predicted", "completion")  # a line of predictions_<split>.jsonl


class EvaluateConfig(StageConfig):
    """Parameters of the evaluate stage."""

    selection_metric: str = Field("f1", description="Dev metric that chooses the model (ties: the later candidate).")
    max_facts: int | None = Field(None, ge=1, description="Score at most this many facts per split, seeded sample (None: all).")
    max_new_tokens: int = Field(..., ge=1, description="Longest completion generated per fact.")
    batch_size: int = Field(..., ge=1, description="Facts per generate call.")
    report_max_samples: int = Field(300, ge=1, description="Samples drawn in the error-analysis page (wrong ones first).")
    seed: int = Field(0, description="Seed of the fact sample, of the random baseline and of the sampling.")
    sc_samples: int = Field(
        5, ge=0, description="Self-consistency of the chosen model: completions sampled per fact and voted on "
                             "(0: off). One generate call per batch draws them (num_return_sequences).")
    sc_temperature: float = Field(0.7, gt=0, description="Sampling temperature of the self-consistency samples.")
    sc_max_facts: int | None = Field(
        400, ge=1, description="Self-consistency on at most this many of each split's scored facts, a seeded sample "
                               "(None: all); greedy is compared with it on the same facts. K samples cost K greedy "
                               "passes: this keeps the stage's time bounded as the splits grow.")
    sc_abstain_below: float = Field(
        0.6, ge=0, description="Abstention threshold whose self-consistency metrics are reported beside greedy: "
                               "answer none below this vote share (the curve covers every threshold).")
    bootstrap_resamples: int = Field(
        1000, ge=1, description="Pair-bootstrap resamples behind every interval and paired comparison (seeded by "
                                "`seed`); the interval bounds move by about 0.005 between seeds at 1000.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the intervals (0.95: 2.5 % and 97.5 % "
                                                            "quantiles of the resamples).")


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


def vote_facts(model_dir: str | Path, facts: list[dict], facts_dir: Path, labels, cfg: EvaluateConfig) -> list[dict]:
    """Self-consistency for `facts`: `cfg.sc_samples` completions per fact sampled at `cfg.sc_temperature`, the K of a
    fact from one generate call (`num_return_sequences`; `cfg.batch_size` facts per call, so batch_size x K sequences
    per forward pass), voted without abstention: each fact plus `predicted` (the voted label or None), `confidence`,
    `votes` and `completion` (the winner's)."""
    from morer1.consistency import vote
    from morer1.generation import generate_completions
    from morer1.modeling import load_model_and_processor
    from morer1.prompt import model_prompt

    k = cfg.sc_samples
    model, processor = load_model_and_processor(model_dir)
    model.eval()
    completions = generate_completions(
        model, processor, facts, facts_dir, labels, max_new_tokens=cfg.max_new_tokens, prompt=model_prompt(model_dir),
        batch_size=cfg.batch_size, num_return_sequences=k, do_sample=True, temperature=cfg.sc_temperature,
        seed=cfg.seed)
    votes = [vote(c, labels) for c in completions]
    return [{**f, "predicted": v.voted, "confidence": v.confidence, "votes": v.votes, "completion": v.completion}
            for f, v in zip(facts, votes, strict=True)]


def curve_thresholds(k: int) -> list[float]:
    """Abstention thresholds of the curve: every vote share j/k a fact can have, and steps of 0.05, in [0, 1]."""
    return sorted({j / k for j in range(k + 1)} | {i / 20 for i in range(21)})


def self_consistency(greedy: dict[str, list[dict]], voted: dict[str, list[dict]], labels, cfg: EvaluateConfig,
                     seconds: float) -> dict:
    """Greedy against self-consistency, per split: micro metrics of the greedy rows (those of the voted facts), of the
    votes, and of the votes with abstention at `cfg.sc_abstain_below` (with its coverage), and the
    precision-recall-coverage `curve`; `n` says how many facts each split's figures are over."""
    from morer1.consistency import abstain
    from morer1.metrics import compute_metrics, coverage_curve

    keys = ("accuracy", "precision", "recall", "f1", "macro_f1", "invalid_rate", "n")
    out: dict = {"samples": cfg.sc_samples, "temperature": cfg.sc_temperature,
                 "abstain_below": cfg.sc_abstain_below, "seconds": round(seconds, 1)}
    for split, rows in voted.items():
        golds = [r["relation"] for r in rows]
        kept = [abstain(r["predicted"], r["confidence"], cfg.sc_abstain_below) for r in rows]
        greedy_of = {r["id"]: r["predicted"] for r in greedy[split]}
        results = {"greedy": compute_metrics(golds, [greedy_of[r["id"]] for r in rows], labels),
                   "self_consistency": compute_metrics(golds, [r["predicted"] for r in rows], labels),
                   "abstain": compute_metrics(golds, kept, labels)}
        out[split] = {name: {k: m[k] for k in keys} for name, m in results.items()}
        covered = sum(r["confidence"] >= cfg.sc_abstain_below for r in rows)
        out[split]["abstain"]["coverage"] = covered / len(rows) if rows else 0.0
        out[split]["curve"] = coverage_curve(golds, [r["predicted"] for r in rows], [r["confidence"] for r in rows],
                                             labels, curve_thresholds(cfg.sc_samples))
    return out


def score(rows: list[dict], labels, train_golds: list[str], seed: int, resamples: int = 0,
          confidence: float = 0.95) -> dict:
    """compute_metrics with the MORE slices, and the majority and random baselines on the same facts; with
    `resamples`, each of them also carries `intervals` (metrics.bootstrap_intervals over the facts' pairs)."""
    from morer1.metrics import baselines, bootstrap_intervals, compute_metrics

    golds = [r["relation"] for r in rows]
    result = compute_metrics(golds, [r["predicted"] for r in rows], labels,
                             pair_entities=[r["pair_entities"] for r in rows],
                             pair_objects=[r["pair_objects"] for r in rows])
    pairs = [pair_key(r) for r in rows] if resamples else None
    result["baselines"] = baselines(train_golds, golds, labels, seed=seed, pairs=pairs, resamples=resamples,
                                    confidence=confidence)
    if resamples:
        result["intervals"] = bootstrap_intervals(golds, [r["predicted"] for r in rows], pairs, labels,
                                                  resamples=resamples, confidence=confidence, seed=seed)
    return result


def pair_key(fact: dict) -> str:
    """The image-title pair of a fact, the unit the bootstrap resamples: its photo (one photo per pair and split)."""
    return fact["image"]


def compare(rows_a: list[dict], rows_b: list[dict], labels, cfg: EvaluateConfig) -> dict:
    """Model A minus model B on the same facts (metrics.paired_bootstrap), their rows aligned by fact id.

    BadInputError when the two row lists do not hold the same facts with the same gold labels."""
    from morer1.metrics import paired_bootstrap

    by_id = {r["id"]: r for r in rows_b}
    if len(by_id) != len(rows_b) or len(rows_a) != len(rows_b) or set(by_id) != {r["id"] for r in rows_a}:
        raise BadInputError("a paired comparison needs both models' answers to the same facts (ids differ)")
    for r in rows_a:
        if by_id[r["id"]]["relation"] != r["relation"]:
            raise BadInputError(f"fact {r['id']!r} has gold {r['relation']!r} in one model's rows and "
                                f"{by_id[r['id']]['relation']!r} in the other's")
    return paired_bootstrap([r["relation"] for r in rows_a], [r["predicted"] for r in rows_a],
                            [by_id[r["id"]]["predicted"] for r in rows_a], [pair_key(r) for r in rows_a], labels,
                            resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=cfg.seed)


DEV_EVAL_KEYS = ("max_facts", "seed", "max_new_tokens", "batch_size")  # the settings a dev number depends on


@dataclass(frozen=True)
class DevSet:
    """The dev facts evaluate scores in an ingested folder, their label set and their fingerprint."""

    facts_dir: Path
    facts: list[dict]
    labels: tuple[str, ...]
    sha256: str


def dev_set(facts_dir: str | Path, max_facts: int | None, seed: int) -> DevSet:
    """The dev split of `facts_dir` as evaluate scores it (its seeded sample when `max_facts` is set), fingerprinted.

    The fingerprint is a sha256 over the label set, every scored fact's record and the path and bytes of every photo
    and crop they refer to: it changes when anything the dev metrics depend on changes, and only then (unlike
    `registry.data_version`, the DVC hash of the whole ingested folder, which is `none` outside DVC and blind to the sample).
    BadInputError when the split, the labels or a referenced file is missing.
    """
    from morer1.labels import read_labels
    from morer1.prompt import fact_images

    facts_dir = Path(facts_dir)
    if not (facts_dir / "dev.jsonl").is_file():
        raise BadInputError(f"{facts_dir / 'dev.jsonl'}: missing (the dev facts the dev metrics are computed on)")
    labels = read_labels(facts_dir / "labels.json")
    facts = sample_facts(read_jsonl(facts_dir / "dev.jsonl"), max_facts, seed)
    digest = hashlib.sha256(json.dumps(list(labels)).encode() + b"\n")
    files: set[str] = set()
    for fact in facts:
        digest.update(json.dumps(fact, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        try:
            files.update(Path(path).relative_to(facts_dir).as_posix() for path in fact_images(fact, facts_dir))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{facts_dir / 'dev.jsonl'}: fact {fact.get('id')!r} names no photo and crop "
                                f"inside the folder: {exc!r}") from None
    for name in sorted(files):
        path = facts_dir / name
        if not path.is_file():
            raise BadInputError(f"{path}: missing (a photo or crop of the dev facts)")
        digest.update(name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return DevSet(facts_dir, facts, labels, digest.hexdigest())


def dev_eval(cfg: EvaluateConfig) -> dict:
    """The evaluate settings a dev number depends on besides the facts (chosen.json `dev_eval`)."""
    return {key: getattr(cfg, key) for key in DEV_EVAL_KEYS}


def headline(result: dict, split: str, keys) -> dict:
    """`<split>_<key>` of a score() result for `keys`, with `<split>_<key>_lo` / `_hi` where it has an interval."""
    out = {}
    for key in keys:
        out[f"{split}_{key}"] = result[key]
        if key in (result.get("intervals") or {}):
            out[f"{split}_{key}_lo"], out[f"{split}_{key}_hi"] = result["intervals"][key]
    return out


def run(cfg: EvaluateConfig, facts_dir: str | Path, models: list[str], out_dir: str | Path) -> dict:
    """Score `models` on dev, choose one, score all on test; write metrics, plots, predictions, the report and
    `chosen.json` into `out_dir`; return the summary (the chosen model, its flat dev/test metrics, `candidates`)."""
    from morer1 import tracking
    from morer1.labels import read_labels
    from morer1.metrics import SUMMARY_KEYS, flat_metrics, write_curve_csv, write_metrics_files
    from morer1.report import write_report

    models = list(dict.fromkeys(str(m) for m in models))
    names = {m: Path(m).name for m in models}
    if not models or len(set(names.values())) < len(models):
        raise BadInputError(f"candidate models must be given, with distinct folder names: {models}")
    facts_dir, out_dir = Path(facts_dir), Path(out_dir)
    with tracking.stage_run("evaluate", cfg):
        labels = read_labels(facts_dir / "labels.json")
        train_golds = [f["relation"] for f in read_jsonl(facts_dir / "train.jsonl")]
        dev = dev_set(facts_dir, cfg.max_facts, cfg.seed)
        splits = {"dev": dev.facts, "test": sample_facts(read_jsonl(facts_dir / "test.jsonl"), cfg.max_facts, cfg.seed)}
        rows: dict[str, dict[str, list[dict]]] = {"dev": {}, "test": {}}
        results: dict[str, dict[str, dict]] = {m: {} for m in models}
        def scored(split: str, model: str) -> dict:
            rows[split][model] = predict_facts(model, splits[split], facts_dir, labels, cfg)
            return score(rows[split][model], labels, train_golds, cfg.seed, cfg.bootstrap_resamples, cfg.confidence)

        for model in models:
            results[model]["dev"] = scored("dev", model)
        chosen = max(reversed(models), key=lambda m: results[m]["dev"][cfg.selection_metric])
        # Every candidate is scored on test too, so each stage's gain is visible; the choice above used dev only.
        for model in models:
            results[model]["test"] = scored("test", model)
        # Each later candidate against each earlier one (e.g. grpo_vs_sft: GRPO minus SFT), paired on the same facts.
        comparisons = {f"{names[a]}_vs_{names[b]}": {split: compare(rows[split][a], rows[split][b], labels, cfg)
                                                      for split in ("dev", "test")}
                       for i, a in enumerate(models) for b in models[:i]}

        sc = None
        if cfg.sc_samples:
            started = time.perf_counter()
            voted = {split: vote_facts(chosen, sample_facts(splits[split], cfg.sc_max_facts, cfg.seed), facts_dir, labels,
                                       cfg) for split in ("dev", "test")}
            sc = self_consistency({split: rows[split][chosen] for split in voted}, voted, labels, cfg,
                                  time.perf_counter() - started)

        candidates = {names[m]: {key: value for split in ("dev", "test")
                                 for key, value in headline(results[m][split], split, CANDIDATE_KEYS).items()}
                      for m in models}
        out_dir.mkdir(parents=True, exist_ok=True)
        write_metrics_files(results[chosen], out_dir, extra={"candidates": candidates, "comparisons": comparisons})
        for split in ("dev", "test"):
            write_jsonl(out_dir / f"predictions_{split}.jsonl",
                        ({k: r[k] for k in PREDICTION_KEYS} for r in rows[split][chosen]))
        staging = out_dir / "candidates.partial"  # every candidate's answers, for paired analyses of one's own
        shutil.rmtree(staging, ignore_errors=True)
        for model in models:
            (staging / names[model]).mkdir(parents=True)
            for split in ("dev", "test"):
                write_jsonl(staging / names[model] / f"predictions_{split}.jsonl",
                            ({k: r[k] for k in PREDICTION_KEYS} for r in rows[split][model]))
        swap_in(staging, out_dir / "candidates")
        staging = out_dir / "report.partial"  # git-ignored, like every staging folder
        shutil.rmtree(staging, ignore_errors=True)
        write_report(rows["dev"][chosen], facts_dir, staging, title=f"morer1 error analysis: {chosen} on dev",
                     metrics=results[chosen]["dev"], max_samples=cfg.report_max_samples, self_consistency=sc,
                     comparisons=comparisons)
        swap_in(staging, out_dir / "report")
        write_text_atomic(out_dir / "chosen.json", json.dumps({
            "model_dir": chosen, "model_sha256": folder_sha256(chosen), "selection_metric": cfg.selection_metric,
            "labels": list(labels), "dev_set": dev.sha256, "dev_eval": dev_eval(cfg),
            "dev_predictions": "predictions_dev.jsonl",  # beside this file: what a paired promotion compares
            "metrics": {key: value for split in ("dev", "test")
                        for key, value in headline(results[chosen][split], split, SUMMARY_KEYS).items()},
        }, indent=1) + "\n")

        # Written also when disabled (samples 0, a curve without rows): they are outputs of the DVC stage.
        write_text_atomic(out_dir / "self_consistency.json", json.dumps(sc or {"samples": 0}, indent=1) + "\n")
        write_curve_csv(sc["test"]["curve"] if sc else [], out_dir / "pr_coverage.csv")

        summary = {"chosen": chosen, "selection_metric": cfg.selection_metric,
                   **{f"{split}_{k}": v for split in ("dev", "test")
                      for k, v in flat_metrics(results[chosen][split]).items()},
                   "candidates": candidates, "comparisons": comparisons}
        if sc is not None:  # MLflow metrics sc.seconds, sc.<split>.<f1|...>, sc.<split>.abstain_<f1|...|coverage>
            summary["sc"] = {"seconds": sc["seconds"], **{split: {
                **{k: sc[split]["self_consistency"][k] for k in ("f1", "precision", "recall", "accuracy")},
                **{f"abstain_{k}": sc[split]["abstain"][k] for k in ("f1", "precision", "recall", "coverage")},
            } for split in ("dev", "test")}}
        import mlflow

        mlflow.set_tag("morer1.chosen_model", chosen)
        tracking.log_summary(summary)
        for name in ("metrics.json", "chosen.json", "dev_per_relation.csv", "test_per_relation.csv",
                     "dev_confusion.csv", "test_confusion.csv", "predictions_dev.jsonl", "predictions_test.jsonl",
                     "self_consistency.json", "pr_coverage.csv"):
            mlflow.log_artifact(str(out_dir / name))
        mlflow.log_artifacts(str(out_dir / "report"), artifact_path="report")
        mlflow.log_artifacts(str(out_dir / "candidates"), artifact_path="candidates")
    return summary
