"""Curriculum stage: the Progressive Sample-Mixing stream of GRPO prompts, from the difficulty pools.

The pools come from the difficulty stage (`morer1.difficulty`: learnable, hard, solved by pass rate).

**Stream** (`build_stream`). The GRPO training order, in `phases` consecutive phases of `phase_size`
samples. By default `phase_size` = ceil((learnable + hard) / phases): the stream is about one pass over the
informative samples, and solved samples come on top at their down-sampled share (sizing phases on all
samples instead would, when most samples are solved, leave slots that only solved samples can fill and
undo the down-sampling). In progressive mode, phase i (of n) gives hard samples the share

    h_i = hard_start + (hard_end - hard_start) * s(t_i),   t_i = i / (n - 1)   (t = 1 when n = 1)

with the shape s:

    linear  s(t) = t
    cosine  s(t) = (1 - cos(pi * t)) / 2      slow start and slow finish, steepest mid-way
    step    s(t) = 0 if t < 0.5 else 1        learnable-only mix for the first half, hard_end after

Planned counts per phase (N = phase_size, Python's round, half to even):
hard = round(h_i * N), solved = min(round(solved_fraction * N), N - hard), learnable = N - hard - solved.
Each pool is shuffled once (seeded) and drawn from in order, without replacement within a phase; a pool
used up is reshuffled and drawn again (it cycles across phases, the samples drawn in the current phase
going last so a phase never repeats a sample while the pool has others). When a pool has fewer samples
than the phase asks for (or none), the shortfall is filled from learnable, then hard, then solved, and
the plan records the actual counts and the shortfall: nothing is silently rebalanced. Only when the
phase is larger than all pools together do samples repeat within a phase (recorded as `repeats`).
The samples of a phase are shuffled together, so every batch sees the phase's mixture.

Uniform mode (the ablation) draws the same number of samples from all facts in a seeded random order,
cycling over the whole set; there is no phase structure, and `phase` is only the position bucket
(position // phase_size) so that per-phase logs of both modes line up.

The stream order is the training order: the GRPO stage must not reshuffle it (`shuffle_dataset=False`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from morer1 import tracking
from morer1.difficulty import POOLS, pool_of
from morer1.errors import BadInputError
from morer1.files import read_jsonl, write_jsonl, write_text_atomic
from morer1.params import StageConfig

log = logging.getLogger(__name__)

FILL_ORDER = ("learnable", "hard", "solved")  # who fills a pool's shortfall, in this order


class CurriculumConfig(StageConfig):
    """The RL sample stream: Progressive Sample-Mixing of learnable and hard samples, or uniform (ablation)."""

    mode: Literal["progressive", "uniform"] = Field(
        "progressive", description="progressive: phased mix with a growing hard share; uniform: seeded random order (ablation).")
    phases: int = Field(4, ge=1, description="Consecutive phases of the stream.")
    hard_start: float = Field(0.0, ge=0, le=1, description="Share of hard samples (pass rate 0) in the first phase.")
    hard_end: float = Field(0.5, ge=0, le=1, description="Share of hard samples in the last phase.")
    shape: Literal["linear", "cosine", "step"] = Field(
        "linear", description="Hard share h(t)=start+(end-start)*s(t), t=i/(phases-1): linear t; cosine (1-cos(pi t))/2; step 0 if t<0.5 else 1.")
    solved_fraction: float = Field(
        0.05, ge=0, le=1, description="Share of each phase given to always-solved samples (pass rate 1), down-sampled.")
    phase_size: int | None = Field(
        None, ge=1, description="Samples per phase (None: ceil((learnable + hard) / phases); all samples if both are empty).")
    seed: int = Field(0, description="Seed of the pool shuffles and of the order within each phase.")

    @model_validator(mode="after")
    def _check_shares(self) -> CurriculumConfig:
        if max(self.hard_start, self.hard_end) + self.solved_fraction > 1:
            raise ValueError("hard_start + solved_fraction and hard_end + solved_fraction must be <= 1")
        return self


def shape_value(shape: str, t: float) -> float:
    """s(t) of the schedule shape, for t in [0, 1]."""
    if shape == "linear":
        return t
    if shape == "cosine":
        return (1 - math.cos(math.pi * t)) / 2
    if shape == "step":
        return 0.0 if t < 0.5 else 1.0
    raise ValueError(f"unknown schedule shape {shape!r}")


def hard_share(cfg: CurriculumConfig, phase: int) -> float:
    """Planned share of hard samples in `phase` (0-based)."""
    t = phase / (cfg.phases - 1) if cfg.phases > 1 else 1.0
    return cfg.hard_start + (cfg.hard_end - cfg.hard_start) * shape_value(cfg.shape, t)


def planned_counts(cfg: CurriculumConfig, phase: int, phase_size: int) -> dict[str, int]:
    """Planned samples per pool in `phase`: hard and solved rounded from their shares, learnable the rest."""
    hard = round(hard_share(cfg, phase) * phase_size)
    solved = min(round(cfg.solved_fraction * phase_size), phase_size - hard)
    return {"learnable": phase_size - hard - solved, "hard": hard, "solved": solved}


class _Drawer:
    """Draws ids of one pool in a seeded shuffled order, reshuffling when used up (cycling)."""

    def __init__(self, ids: list[str], rng: random.Random):
        self.ids, self.rng = list(ids), rng
        self.order: list[str] = []
        self.cycles = 0
        self.in_phase: set[str] = set()

    def new_phase(self) -> None:
        self.in_phase = set()

    def available(self) -> int:
        """Distinct ids this pool can still give in the current phase."""
        return len(self.ids) - len(self.in_phase)

    def draw(self, n: int, *, allow_repeat: bool = False) -> list[str]:
        out = []
        for _ in range(n):
            if not self.order:
                fresh = [i for i in self.ids if i not in self.in_phase]
                used = [i for i in self.ids if i in self.in_phase]
                self.rng.shuffle(fresh)
                self.rng.shuffle(used)
                self.order = list(reversed(fresh + used))  # pop() from the end
                self.cycles += 1
            item = self.order.pop()
            if item in self.in_phase and not allow_repeat:
                raise AssertionError("drew a sample twice in one phase")  # guarded by available()
            self.in_phase.add(item)
            out.append(item)
        return out


def _pools(rows: Sequence[dict]) -> dict[str, list[str]]:
    if not rows:
        raise BadInputError("no difficulty rows: the curriculum needs at least one sample")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise BadInputError(f"difficulty rows repeat the id {dup!r}")
    pools: dict[str, list[str]] = {p: [] for p in POOLS}
    for r in rows:
        pools[pool_of(r["passes"], r["rollouts"])].append(r["id"])
    return pools


def build_stream(difficulty_rows: Sequence[dict], cfg: CurriculumConfig) -> tuple[list[dict], dict]:
    """The ordered RL stream `[{"id", "phase", "pool"}]` and its plan (see the module docstring)."""
    pools = _pools(difficulty_rows)
    informative = len(pools["learnable"]) + len(pools["hard"])
    phase_size = cfg.phase_size or math.ceil((informative or len(difficulty_rows)) / cfg.phases)
    rng = random.Random(cfg.seed)
    plan = {
        "mode": cfg.mode,
        "config": cfg.model_dump(),
        "phase_size": phase_size,
        "total": phase_size * cfg.phases,
        "pool_sizes": {p: len(pools[p]) for p in POOLS},
        "phases": [],
        "warnings": [],
    }
    if cfg.mode == "uniform":
        stream = _uniform(pools, difficulty_rows, cfg, phase_size, rng, plan)
    else:
        stream = _progressive(pools, cfg, phase_size, rng, plan)
    for warning in plan["warnings"]:
        log.warning("curriculum: %s", warning)
    return stream, plan


def _progressive(pools, cfg, phase_size, rng, plan) -> list[dict]:
    drawers = {p: _Drawer(pools[p], random.Random(rng.random())) for p in POOLS}
    stream: list[dict] = []
    for phase in range(cfg.phases):
        for drawer in drawers.values():
            drawer.new_phase()
        planned = planned_counts(cfg, phase, phase_size)
        drawn: dict[str, list[str]] = {p: [] for p in POOLS}
        for p in POOLS:
            drawn[p] += drawers[p].draw(min(planned[p], drawers[p].available()))
        missing = phase_size - sum(len(v) for v in drawn.values())
        for p in FILL_ORDER:  # shortfall of any pool, filled from the others without repeats
            take = min(missing, drawers[p].available())
            drawn[p] += drawers[p].draw(take)
            missing -= take
        repeats = missing
        while missing > 0:  # the phase is larger than all pools together: repeat, in fill order
            for p in FILL_ORDER:
                take = min(missing, len(pools[p]))
                drawn[p] += drawers[p].draw(take, allow_repeat=True)
                missing -= take
        actual = {p: len(drawn[p]) for p in POOLS}
        shortfall = {p: planned[p] - actual[p] for p in POOLS if actual[p] < planned[p]}
        if shortfall:
            plan["warnings"].append(
                f"phase {phase}: pools short of the plan {shortfall} (pool sizes {plan['pool_sizes']}); "
                f"filled from {FILL_ORDER}: actual {actual}")
        if repeats:
            plan["warnings"].append(f"phase {phase}: {repeats} samples repeat within the phase "
                                    f"(phase_size {phase_size} > {sum(plan['pool_sizes'].values())} samples)")
        items = [{"id": i, "phase": phase, "pool": p} for p in POOLS for i in drawn[p]]
        rng.shuffle(items)
        start = len(stream)
        stream += items
        plan["phases"].append({
            "phase": phase,
            "start": start,
            "end": len(stream),
            "hard_share": hard_share(cfg, phase),
            "solved_share": cfg.solved_fraction,  # the scheduled shares; planned_fractions are after rounding
            "planned": planned,
            "planned_fractions": {p: planned[p] / phase_size for p in POOLS},
            "actual": actual,
            "actual_fractions": {p: actual[p] / phase_size for p in POOLS},
            "shortfall": shortfall,
            "repeats": repeats,
        })
    plan["pool_cycles"] = {p: drawers[p].cycles for p in POOLS}
    return stream


def _uniform(pools, rows, cfg, phase_size, rng, plan) -> list[dict]:
    pool_by_id = {i: p for p in POOLS for i in pools[p]}
    drawer = _Drawer([r["id"] for r in rows], random.Random(rng.random()))
    total = phase_size * cfg.phases
    stream = [{"id": i, "phase": pos // phase_size, "pool": pool_by_id[i]}
              for pos, i in enumerate(drawer.draw(total, allow_repeat=True))]
    n = len(rows)
    for phase in range(cfg.phases):
        part = stream[phase * phase_size:(phase + 1) * phase_size]
        actual = Counter(item["pool"] for item in part)
        plan["phases"].append({
            "phase": phase,
            "start": phase * phase_size,
            "end": (phase + 1) * phase_size,
            "planned_fractions": {p: len(pools[p]) / n for p in POOLS},  # in expectation: the pool shares
            "actual": {p: actual[p] for p in POOLS},
            "actual_fractions": {p: actual[p] / phase_size for p in POOLS},
        })
    plan["pool_cycles"] = {"all": drawer.cycles}
    return stream


def run(cfg: CurriculumConfig, difficulty_dir: str | Path, out_dir: str | Path) -> dict:
    """The stream of the pools in `difficulty_dir/difficulty.jsonl`: write `stream.jsonl` (one item per line, in
    training order) and `plan.json` into `out_dir`, log the planned and actual share of each pool per phase (metric
    step = phase) and the plan to the stage's MLflow run, return the summary."""
    import mlflow

    out_dir = Path(out_dir)
    with tracking.stage_run("curriculum", cfg):
        stream, plan = build_stream(read_jsonl(Path(difficulty_dir) / "difficulty.jsonl"), cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(out_dir / "stream.jsonl", stream)
        write_text_atomic(out_dir / "plan.json", json.dumps(plan, indent=1) + "\n")
        summary = {"mode": cfg.mode, "prompts": len(stream), "phase_size": plan["phase_size"],
                   "pool_sizes": plan["pool_sizes"], "pool_cycles": plan["pool_cycles"], "warnings": plan["warnings"]}
        tracking.log_summary(summary)
        for phase in plan["phases"]:
            for pool in POOLS:
                mlflow.log_metric(f"planned_share_{pool}", phase["planned_fractions"][pool], step=phase["phase"])
                mlflow.log_metric(f"actual_share_{pool}", phase["actual_fractions"][pool], step=phase["phase"])
        mlflow.log_artifact(str(out_dir / "plan.json"))
    return summary
