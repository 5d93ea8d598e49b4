"""Difficulty stage: the pass rate of each training fact over k rollouts of the policy GRPO starts from, and its pool.

Each fact gets k = `rollout.num_generations` sampled rollouts of `rollout.model`, drawn as GRPO draws them
(`morer1.rollout`). A rollout passes when GRPO's accuracy reward pays it 1 (gold normalised, valid tags required
when `rollout.rewards.accuracy_requires_format`). The pass rate p sorts the facts into three pools: *solved*
(p = 1: every group reward is equal, GRPO learns nothing), *learnable* (0 < p < 1) and *hard* (p = 0: little
signal until the policy improves). The curriculum stage orders the GRPO stream from these pools.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import read_jsonl, write_jsonl, write_text_atomic
from morer1.params import StageConfig
from morer1.rewards import RewardsConfig, make_accuracy_reward
from morer1.rollout import PLAIN_SAMPLING, RolloutConfig, log_params

POOLS = ("learnable", "hard", "solved")
HISTOGRAM_BINS = 10


class DifficultyConfig(StageConfig):
    """Which training facts get rollouts, and in what batches (how they are drawn is the `rollout` section)."""

    batch_size: int = Field(..., ge=1, description="Facts per generation batch (each holds k sequences).")
    max_samples: int | None = Field(
        ..., ge=1, description="Estimate on a seeded random sample of this many facts (None: all of the split).")
    seed: int = Field(0, description="Seed of the fact sample and of the rollouts.")


def pool_of(passes: int, rollouts: int) -> str:
    """`solved` when every rollout passed, `hard` when none did, else `learnable`."""
    if passes >= rollouts:
        return "solved"
    return "hard" if passes == 0 else "learnable"


def score_rollouts(facts: Sequence[dict], completions: Sequence[Sequence[str]], labels: Sequence[str],
                   rewards: RewardsConfig) -> list[dict]:
    """Difficulty rows `{"id", "relation", "passes", "rollouts", "pass_rate"}` from each fact's completions; a
    completion passes when the accuracy reward of `rewards` pays it."""
    if len(facts) != len(completions):
        raise ValueError(f"{len(facts)} facts but {len(completions)} lists of completions")
    accuracy = make_accuracy_reward(rewards, labels)
    rows = []
    for fact, texts in zip(facts, completions):
        if not texts:
            raise ValueError(f"{fact['id']}: no completions")
        passes = sum(score == 1.0 for score in accuracy(texts, [fact["relation"]] * len(texts)))
        rows.append({"id": fact["id"], "relation": fact["relation"], "passes": passes,
                     "rollouts": len(texts), "pass_rate": passes / len(texts)})
    return rows


def select_facts(facts: list[dict], max_samples: int | None, seed: int) -> list[dict]:
    """All facts, or a seeded random sample of `max_samples` of them kept in file order."""
    if max_samples is None or max_samples >= len(facts):
        return list(facts)
    keep = set(random.Random(seed).sample(range(len(facts)), max_samples))
    return [fact for i, fact in enumerate(facts) if i in keep]


def pass_rate_histogram(rates: Sequence[float], bins: int = HISTOGRAM_BINS) -> list[dict]:
    """Counts of pass rates in `bins` equal bins over [0, 1]: [lo, hi), the last one [lo, 1] inclusive."""
    counts = [0] * bins
    for rate in rates:
        counts[min(int(rate * bins), bins - 1)] += 1
    return [{"lo": i / bins, "hi": (i + 1) / bins, "count": c} for i, c in enumerate(counts)]


def difficulty_summary(rows: Sequence[dict]) -> dict:
    """Pool counts (solved, learnable, hard), mean pass rate, 10-bin histogram, pools per relation."""
    pools = Counter(pool_of(r["passes"], r["rollouts"]) for r in rows)
    by_relation: dict[str, Counter] = {}
    for r in rows:
        by_relation.setdefault(r["relation"], Counter())[pool_of(r["passes"], r["rollouts"])] += 1
    return {
        "facts": len(rows),
        "rollouts": sorted({r["rollouts"] for r in rows}),
        "solved": pools["solved"],
        "learnable": pools["learnable"],
        "hard": pools["hard"],
        "mean_pass_rate": sum(r["pass_rate"] for r in rows) / len(rows) if rows else None,
        "histogram": pass_rate_histogram([r["pass_rate"] for r in rows]),
        "by_relation": {rel: {p: c[p] for p in POOLS} for rel, c in sorted(by_relation.items())},
    }


def rollout_pass_rates(rollout: RolloutConfig, facts: list[dict], facts_dir: Path, labels: Sequence[str],
                       batch_size: int, seed: int) -> list[dict]:
    """Difficulty rows of `facts` (`score_rollouts`): k = `rollout.num_generations` rollouts of `rollout.model` per
    fact, drawn as GRPO draws them, in batches of `batch_size` facts from `seed`."""
    from morer1 import generation
    from morer1.modeling import load_model_and_processor
    from morer1.prompt import model_prompt

    model, processor = load_model_and_processor(rollout.model)
    completions = generation.generate_completions(
        model, processor, facts, facts_dir, labels, prompt=model_prompt(rollout.model),
        num_return_sequences=rollout.num_generations, do_sample=True, temperature=rollout.temperature,
        max_new_tokens=rollout.max_completion_length, batch_size=batch_size, seed=seed, **PLAIN_SAMPLING)
    return score_rollouts(facts, completions, labels, rollout.rewards)


def run(cfg: DifficultyConfig, rollout: RolloutConfig, facts_dir: str | Path, out_dir: str | Path) -> dict:
    """Rollouts of `rollout.model` on the facts of `facts_dir/train.jsonl` (a seeded sample of `cfg.max_samples`),
    scored by the accuracy reward; write `difficulty.jsonl` (one row per fact, in file order) and
    `difficulty_summary.json` into `out_dir`, log them to the stage's MLflow run, return the summary."""
    import mlflow

    from morer1.labels import read_labels

    facts_dir, out_dir = Path(facts_dir), Path(out_dir)
    with tracking.stage_run("difficulty", cfg):
        log_params(rollout)
        path = facts_dir / "train.jsonl"
        if not path.is_file():
            raise BadInputError(f"{path}: no ingested training facts")
        facts = select_facts(read_jsonl(path), cfg.max_samples, cfg.seed)
        if not facts:
            raise BadInputError(f"{path}: no facts")
        labels = read_labels(facts_dir / "labels.json")
        rows = rollout_pass_rates(rollout, facts, facts_dir, labels, cfg.batch_size, cfg.seed)
        summary = difficulty_summary(rows)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(out_dir / "difficulty.jsonl", rows)
        write_text_atomic(out_dir / "difficulty_summary.json", json.dumps(summary, indent=1) + "\n")
        tracking.log_summary(summary)
        for i, bin_ in enumerate(summary["histogram"]):
            mlflow.log_metric("pass_rate_histogram", bin_["count"], step=i)
    return summary
