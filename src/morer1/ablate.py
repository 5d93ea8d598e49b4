"""The ablation grid: SFT only vs SFT + GRPO (uniform sampling, each Progressive Sample-Mixing shape, reward sets)
over seeds, each cell a DVC experiment, in one comparison table.

The grid file (`ablation.yaml`, docs/ablation.md) names rows (params.yaml overlays: only the keys they change),
seeds and the keys a seed sets. A cell is a row at one seed, run as the DVC experiment `<grid>-<row>-s<seed>`
(`dvc exp run --temp -n NAME -S key=value ... evaluate`, `morer1.orchestrate.run_experiment`: `register` never
runs, the workspace and params.yaml are left as they are). Stages whose inputs another cell already ran are
restored from DVC's run cache, so SFT trains once per distinct SFT seed. A cell's experiment that already exists
on the current commit is read, not run again (`force` runs it again).

Every cell's numbers come from its experiment (`reports/eval/metrics.json`: both candidates, SFT and GRPO, scored
on dev and test; `models/grpo/grpo_summary.json`: the reward at the end) and from MLflow (the GRPO trainer's
`train_runtime` in the cell's grpo stage run: DVC's outputs hold no durations). "SFT only" is the SFT candidate
of the cells; a GRPO row's differences to it are taken per cell (the same cell scored both models): the paired
comparison `comparisons.grpo_vs_sft` of the cell's metrics.json (GRPO minus SFT on the same facts, with its pair
bootstrap interval and p-value). A row is `better` (`worse`) when every ok cell's paired dev-F1 interval lies above
(below) 0, else `inconclusive` (VERDICTS); the text under the table is generated from these numbers (`reading`).
A metrics.json written before paired comparisons existed still reads: its intervals are None, shown as `–`.

MLflow: one run `ablation-<grid>` (tag `morer1.grid`) holding the table, one nested run per cell (tags
`morer1.grid`, `morer1.cell`, `morer1.row`, `morer1.seed`, `dvc.experiment`; its numbers as metrics) and the cell's
stage runs nested under it, tagged the same way (`MORER1_RUN_TAGS`). `rebuild_from_mlflow` builds the table from
the cell runs alone.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from morer1.errors import BadInputError
from morer1.orchestrate import (
    StageFailed,
    hydra_value,
    leaves,
    load_profile,
    merge_params,
    pipeline_lock,
    run_experiment,
    stale_keys,
)

GRID_TAG, CELL_TAG, ROW_TAG, SEED_TAG = "morer1.grid", "morer1.cell", "morer1.row", "morer1.seed"
KIND_TAG = "morer1.kind"  # grid or cell
SFT_ONLY = "sft-only"
TARGET = "evaluate"  # the stage a cell runs to: `register` never runs in an ablation
# a candidate's numbers in reports/eval/metrics.json (`candidates.<model>.<key>`), in table order
METRICS = ("dev_f1", "dev_accuracy", "test_f1", "test_accuracy", "dev_invalid_rate", "test_invalid_rate")
DELTAS = ("dev_f1", "dev_accuracy", "test_f1", "test_accuracy")
# the candidates' `<key>_lo` / `<key>_hi` (their own pair-bootstrap intervals) read for these, where present
INTERVALS = DELTAS
COMPARISON = "grpo_vs_sft"  # metrics.json `comparisons.<this>.<split>`: GRPO minus SFT, paired on the same facts
# per cell from the comparison, for each of DELTAS (`<split>_<metric>`): `delta_<key>` (observed), `delta_<key>_lo`,
# `delta_<key>_hi` (its interval) and `p_<key>` (two-sided p-value); per split `wins_<split>` (facts only GRPO gets
# right), `losses_<split>` (only SFT), `n_<split>` (facts); once per cell `paired_confidence`, `paired_resamples`
PAIRED = tuple(f"{prefix}_{key}{suffix}" for key in DELTAS
               for prefix, suffix in (("delta", ""), ("delta", "_lo"), ("delta", "_hi"), ("p", "")))
COUNTS = tuple(f"{k}_{split}" for split in ("dev", "test") for k in ("wins", "losses", "n"))
PAIRED_META = ("paired_confidence", "paired_resamples")
VERDICTS = ("dev_f1", "test_f1")  # a row's verdict against SFT from these paired intervals; dev_f1 leads the text
GRPO_EXTRA = ("reward_last", "seconds")  # grpo_summary.json's reward at the end; the trainer's train_runtime
NAME = r"^[a-z0-9][a-z0-9_]*(-[a-z0-9_]+)*$"


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict = Field(description="params.yaml overlay of this row: only the keys it changes ({}: params.yaml)")
    seeds: list[int] | None = Field(None, min_length=1, description="this row's seeds (null: the grid's `seeds`)")


class Grid(BaseModel):
    """The grid file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME, description="grid name: experiments `<name>-<row>-s<seed>`, MLflow tag morer1.grid")
    profile: str | None = Field(None, description="profiles/<name>.yaml overlay under every cell (e.g. a cluster); "
                                                  "null: none")
    seeds: list[int] = Field(min_length=1, description="seeds of every row without its own `seeds`")
    seed_keys: list[str] = Field(min_length=1, description="dotted params.yaml keys a cell sets to its seed")
    rows: dict[str, Row] = Field(min_length=1, description="row name -> row; `sft-only` is derived, not a row")


@dataclass(frozen=True)
class Cell:
    name: str  # the DVC experiment
    row: str
    seed: int
    overrides: tuple[str, ...]  # `dvc exp run -S` overrides: profile, then row, then seed keys


def _nested(dotted: str, value) -> dict:
    out = value
    for key in reversed(dotted.split(".")):
        out = {key: out}
    return out


def load_grid(path: str | Path, project_dir: str | Path, profile: str | None = None) -> tuple[Grid, list[Cell]]:
    """The grid file and its cells, every cell checked before anything runs: each key a row or seed key sets
    exists in params.yaml and each cell's params validate against the stage configs (BadInputError naming the file,
    the row and the reason). `profile` replaces the grid's own."""
    from morer1.params import read_params, read_yaml_mapping, section_config

    path, project = Path(path), Path(project_dir)
    raw = read_yaml_mapping(path, "grid file", "a grid file is a mapping (name, seeds, seed_keys, rows)")
    try:
        grid = Grid(**raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInputError(f"{path}: {problems}") from exc
    if profile is not None:
        grid = grid.model_copy(update={"profile": profile})
    params = read_params(project / "params.yaml")
    base = load_profile(project, grid.profile) if grid.profile else {}
    stale = stale_keys(params, base)
    if stale:
        raise BadInputError(f"profile {grid.profile}: keys not in params.yaml: {', '.join(stale)}")
    bad_seed_keys = stale_keys(params, {k: v for key in grid.seed_keys for k, v in _nested(key, 0).items()})
    if bad_seed_keys:
        raise BadInputError(f"{path}: seed_keys not in params.yaml: {', '.join(bad_seed_keys)}")
    cells = []
    for row_name, row in grid.rows.items():
        where = f"{path}: row {row_name}"
        if not re.match(NAME, row_name) or row_name == SFT_ONLY:
            raise BadInputError(f"{where}: a row name is lower-case letters, digits, _ and - (not `{SFT_ONLY}`)")
        stale = stale_keys(params, row.params)
        if stale:
            raise BadInputError(f"{where}: keys not in params.yaml: {', '.join(stale)}")
        for seed in row.seeds or grid.seeds:
            overlay = merge_params(base, row.params)
            for key in grid.seed_keys:
                overlay = merge_params(overlay, _nested(key, seed))
            merged = merge_params(params, overlay)
            for section in overlay:
                try:
                    section_config(section)(**merged[section])
                except ValidationError as exc:
                    problems = "; ".join(f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                    raise BadInputError(f"{where}, seed {seed}: {problems}") from exc
            overrides = tuple(f"{'.'.join(keys)}={hydra_value(value, f'{where}: ' + '.'.join(keys))}"
                              for keys, value in leaves(overlay))
            cells.append(Cell(f"{grid.name}-{row_name}-s{seed}", row_name, seed, overrides))
    return grid, cells


# --- running and reading cells -------------------------------------------------------------------------------

def run_cell(project_dir: str, name: str, overrides: list[str], env: dict[str, str]) -> dict:
    """One cell: `dvc exp run --temp -n NAME -S ... evaluate`; {"experiment", "rev", "seconds"}; StageFailed."""
    return run_experiment(project_dir, name, overrides, [TARGET], env)


def existing_experiments(project_dir: str | Path) -> dict[str, str]:
    """DVC experiments on the current commit: name -> rev."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        return {name: rev for exps in repo.experiments.ls().values() for name, rev in exps}


def remove_experiments(project_dir: str | Path, names: list[str]) -> None:
    from dvc.repo import Repo

    if names:
        with Repo(str(project_dir)) as repo:
            repo.experiments.remove(exp_names=names)


def experiment_results(project_dir: str | Path, rev: str) -> dict:
    """A cell's numbers from its experiment: `sft_<metric>` and `grpo_<metric>` (the candidates of
    reports/eval/metrics.json) and `grpo_reward_last` (models/grpo/grpo_summary.json)."""
    import dvc.api

    metrics = json.loads(dvc.api.read("reports/eval/metrics.json", repo=str(project_dir), rev=rev))
    summary = json.loads(dvc.api.read("models/grpo/grpo_summary.json", repo=str(project_dir), rev=rev))
    missing = {"sft", "grpo"} - set(metrics.get("candidates", {}))
    if missing:
        raise BadInputError(f"reports/eval/metrics.json of {rev[:7]} has no candidate {', '.join(sorted(missing))}")
    out = {f"{model}_{key}": metrics["candidates"][model][key] for model in ("sft", "grpo") for key in METRICS}
    out.update({f"{model}_{key}{end}": metrics["candidates"][model].get(f"{key}{end}")
                for model in ("sft", "grpo") for key in INTERVALS for end in ("_lo", "_hi")})
    out.update(paired_results(metrics))
    out["grpo_reward_last"] = summary.get("reward_last")
    return out


def paired_results(metrics: dict) -> dict:
    """The cell's paired GRPO-minus-SFT numbers (PAIRED, COUNTS, PAIRED_META) from metrics.json's
    `comparisons.grpo_vs_sft`; each None where that metrics.json has none (written before paired comparisons)."""
    splits = ((metrics.get("comparisons") or {}).get(COMPARISON)) or {}
    out = dict.fromkeys((*PAIRED, *COUNTS, *PAIRED_META))
    for key in DELTAS:
        split, metric = key.split("_", 1)
        block = splits.get(split) or {}
        out.update({f"delta_{key}": block.get(f"delta_{metric}"), f"delta_{key}_lo": block.get(f"delta_{metric}_lo"),
                    f"delta_{key}_hi": block.get(f"delta_{metric}_hi"), f"p_{key}": block.get(f"p_value_{metric}")})
    for split in ("dev", "test"):
        block = splits.get(split) or {}
        out.update({f"{k}_{split}": block.get(k) for k in ("wins", "losses", "n")})
    first = splits.get("dev") or splits.get("test") or {}
    out.update(paired_confidence=first.get("confidence"), paired_resamples=first.get("resamples"))
    return out


def grpo_seconds(grid: str, cell: str) -> float | None:
    """`train_runtime` of the latest finished grpo stage run of the cell in MLflow; None when the stage never ran
    for it (restored from DVC's run cache)."""
    from morer1 import tracking

    runs = tracking.setup().search_runs(
        search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"], max_results=1,
        filter_string=f"tags.`morer1.stage` = 'grpo' and tags.`{GRID_TAG}` = '{grid}' and tags.`{CELL_TAG}` = '{cell}' "
                      "and attributes.status = 'FINISHED'")
    return runs[0].data.metrics.get("train_runtime") if runs else None


def failure_reason(exc: BaseException) -> str:
    """One line for the table: what failed and the last line of its log."""
    text = str(exc).strip().splitlines() or [type(exc).__name__]
    head, last = text[0].rstrip(":"), next((line.strip() for line in reversed(text[1:]) if line.strip()), "")
    return (f"{head}: {last}" if last else head)[:300]


# --- the table (pure) ----------------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _delta(cell: dict, key: str) -> float | None:
    """The cell's GRPO-minus-SFT difference of `key`: the paired comparison's, else (a metrics.json from before
    paired comparisons) the difference of the two candidates' numbers, which is the same number."""
    if cell.get(f"delta_{key}") is not None:
        return cell[f"delta_{key}"]
    grpo, sft = cell.get(f"grpo_{key}"), cell.get(f"sft_{key}")
    return None if grpo is None or sft is None else grpo - sft


def paired_side(cell: dict, key: str) -> int | None:
    """1 when the cell's paired interval of `key` lies above 0, -1 when below, 0 when it includes 0, None without
    an interval."""
    lo, hi = cell.get(f"delta_{key}_lo"), cell.get(f"delta_{key}_hi")
    if lo is None or hi is None:
        return None
    return 1 if lo > 0 else -1 if hi < 0 else 0


def verdict(sides: list[int | None]) -> str | None:
    """A row's verdict from its ok cells' `paired_side`s: `better` (every interval above 0), `worse` (every one
    below), `inconclusive` (one includes 0, or they disagree); None without ok cells or when one has no interval."""
    if not sides or any(side is None for side in sides):
        return None
    return "better" if all(s == 1 for s in sides) else "worse" if all(s == -1 for s in sides) else "inconclusive"


def build_table(cells: list[dict]) -> list[dict]:
    """Per row (SFT only first, then the grid's rows in order): mean and spread over its ok cells of each metric,
    GRPO's reward at the end and wall time, and the differences to SFT only (per cell: the paired GRPO-minus-SFT
    comparison); for each of VERDICTS, `verdict_<key>` (`verdict`), `paired_<key>_above` / `_below` (ok cells
    whose paired interval lies above / below 0) and `paired_<key>_cells` (ok cells with an interval); `failed` lists
    each failed cell with its reason."""
    ok = [c for c in cells if c["status"] != "failed"]
    sft_by_seed = {}
    for c in ok:
        sft_by_seed.setdefault(c["seed"], c)
    rows = [{"row": SFT_ONLY, "cells": len(sft_by_seed), "of": len({c["seed"] for c in cells}), "failed": []}]
    for key in METRICS:
        rows[0][f"{key}_mean"], rows[0][f"{key}_std"] = _stats([c[f"sft_{key}"] for c in sft_by_seed.values()])
    for key in VERDICTS:
        rows[0].update({f"verdict_{key}": None, f"paired_{key}_above": None, f"paired_{key}_below": None,
                        f"paired_{key}_cells": None})
    for name in dict.fromkeys(c["row"] for c in cells):
        mine = [c for c in cells if c["row"] == name]
        good = [c for c in mine if c["status"] != "failed"]
        row = {"row": name, "cells": len(good), "of": len(mine),
               "failed": [f"{c['cell']}: {c['reason']}" for c in mine if c["status"] == "failed"]}
        for key in (*METRICS, *GRPO_EXTRA):
            row[f"{key}_mean"], row[f"{key}_std"] = _stats([c[f"grpo_{key}"] for c in good])
        for key in DELTAS:
            row[f"delta_{key}_mean"], row[f"delta_{key}_std"] = _stats([_delta(c, key) for c in good])
        for key in VERDICTS:
            sides = [paired_side(c, key) for c in good]
            row.update({f"verdict_{key}": verdict(sides), f"paired_{key}_above": sides.count(1),
                        f"paired_{key}_below": sides.count(-1),
                        f"paired_{key}_cells": sum(side is not None for side in sides)})
        rows.append(row)
    return rows


def _fmt(mean, std, digits: int = 4, sign: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def _interval(delta, lo, hi, digits: int = 3) -> str:
    """`+0.012 [-0.020, +0.044]`; `–` without a paired comparison."""
    if delta is None:
        return "–"
    return f"{delta:+.{digits}f}" + (f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if lo is not None and hi is not None
                                     else "")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


COLUMNS = [("dev F1", "dev_f1", 4), ("dev acc", "dev_accuracy", 4), ("test F1", "test_f1", 4),
           ("test acc", "test_accuracy", 4), ("dev invalid", "dev_invalid_rate", 4),
           ("test invalid", "test_invalid_rate", 4), ("GRPO s", "seconds", 0), ("reward end", "reward_last", 3)]
LABELS = {"dev_f1": "dev F1", "dev_accuracy": "dev acc", "test_f1": "test F1", "test_accuracy": "test acc"}


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _sides(row: dict, key: str) -> str:
    """`above 0 in 1 and below 0 in 1` (the row's cells whose paired interval excludes 0), '' when none does."""
    return " and ".join(f"{side} 0 in {row[f'paired_{key}_{side}']}" for side in ("above", "below")
                        if row[f"paired_{key}_{side}"])


def reading(rows: list[dict], cells: list[dict]) -> str:
    """The text under the row table, generated from its numbers: which rows differ from SFT in every seed (VERDICTS),
    which are not marked and why, failed cells, and the SFT seed spread beside the largest mean Δ."""
    grpo_rows = [r for r in rows if r["row"] != SFT_ONLY]
    ok = [c for c in cells if c["status"] != "failed"]
    confidence = sorted({c["paired_confidence"] for c in ok if c.get("paired_confidence") is not None})
    resamples = sorted({int(c["paired_resamples"]) for c in ok if c.get("paired_resamples") is not None})
    how = ""
    if confidence:
        how = (f", with its {' / '.join(f'{100 * v:g} %' for v in confidence)} pair-bootstrap interval"
               + (f" ({' / '.join(map(str, resamples))} resamples)" if resamples else ""))
    lines = [f"Paired Δ: GRPO minus the SFT model of the same cell, on the same facts{how}. A row is `better` "
             "(`worse`) when the interval of every seed lies above (below) 0, `inconclusive` when it includes 0 in "
             "at least one seed or the seeds disagree, `–` when a cell has no paired interval. Generated from the "
             "numbers above:", ""]
    for key in VERDICTS:
        label = LABELS[key]
        judged = [r for r in grpo_rows if r[f"verdict_{key}"] is not None]
        marked = [r for r in judged if r[f"verdict_{key}"] != "inconclusive"]
        others = [r for r in judged if r[f"verdict_{key}"] == "inconclusive"]
        if not judged:
            line = "no row has a paired interval in every cell, so none is marked"
        else:
            if marked:
                of = (_plural(len(judged), "row", "rows") if len(judged) == len(grpo_rows) else
                      f"the {_plural(len(judged), 'row', 'rows')} with a paired interval in every cell")
                line = (f"{len(marked)} of {of} {'differs' if len(marked) == 1 else 'differ'} from SFT in every seed: "
                        + "; ".join(f"{r['row']} {r[f'verdict_{key}']} ({_plural(r['cells'], 'seed', 'seeds')}, "
                                    f"mean Δ {r[f'delta_{key}_mean']:+.4f})" for r in marked))
            else:
                line = ("no row " + ("" if len(judged) == len(grpo_rows) else "with a paired interval in every cell ")
                        + "differs from SFT in every seed")
            if others:
                line += ("; " + (f"{others[0]['row']}'s paired interval includes" if len(others) == 1 else
                                 "the others' paired intervals include" if marked else
                                 f"the paired intervals of all {len(others)} include") + " 0 in at least one seed")
                partly = [f"{r['row']}: {_sides(r, key)} of {r['cells']}" for r in others if _sides(r, key)]
                if partly:
                    line += f" ({'; '.join(partly)})"
        missing = [r for r in grpo_rows if r[f"verdict_{key}"] is None]
        if missing and judged:
            line += "; not marked: " + "; ".join(
                f"{r['row']} (every cell failed)" if not r["cells"] else
                f"{r['row']} ({r['cells'] - r[f'paired_{key}_cells']} of its "
                f"{_plural(r['cells'], 'ok cell', 'ok cells')} without a paired interval)"
                for r in missing)
        lines.append(f"- {label}: {line}.")
    failed = [c for c in cells if c["status"] == "failed"]
    if failed:
        lines.append(f"- {len(failed)} of {_plural(len(cells), 'cell', 'cells')} failed (the `failed` column); "
                     "a row's numbers are over its other cells.")
    sft = rows[0]
    moved = [r for r in grpo_rows if r.get("delta_dev_f1_mean") is not None]
    if sft.get("dev_f1_std") is not None and moved:
        top = max(moved, key=lambda r: abs(r["delta_dev_f1_mean"]))
        lines.append(f"- Seed spread: SFT dev F1 {sft['dev_f1_mean']:.4f} ± {sft['dev_f1_std']:.4f} over "
                     f"{sft['cells']} seeds (sample std); the largest row mean Δ dev F1 is "
                     f"{top['delta_dev_f1_mean']:+.4f} ({top['row']}).")
    return "\n".join(lines) + "\n"


def table_markdown(grid: str, rows: list[dict], cells: list[dict], note: str = "") -> str:
    """The row table (mean ± sample std over seeds; Δ = GRPO − SFT per cell, paired; the verdicts), the text that
    reads it (`reading`) and the cell table (each cell's paired Δ with its interval)."""
    head = ([t for t, _, _ in COLUMNS] + [f"Δ {t}" for t, k, _ in COLUMNS if k in DELTAS]
            + [f"vs SFT ({LABELS[k]})" for k in VERDICTS])
    text = f"# Ablation grid `{grid}`\n\n{note}" + f"| row | cells | {' | '.join(head)} | failed |\n"
    text += "|---" * (len(head) + 3) + "|\n"
    for r in rows:
        values = [_fmt(r.get(f"{k}_mean"), r.get(f"{k}_std"), d) for _, k, d in COLUMNS]
        deltas = [_fmt(r.get(f"delta_{k}_mean"), r.get(f"delta_{k}_std"), d, sign=True) for _, k, d in COLUMNS
                  if k in DELTAS]
        verdicts = [r.get(f"verdict_{k}") or "–" for k in VERDICTS]
        text += (f"| {r['row']} | {r['cells']}/{r['of']} | {' | '.join(values + deltas + verdicts)} | "
                 f"{_md('; '.join(r['failed'])) or '–'} |\n")
    text += "\n" + reading(rows, cells)
    text += ("\n## Cells\n\n| cell | status | SFT dev F1 | GRPO dev F1 | Δ dev F1 [interval] | p dev F1 | "
             "dev won/lost | SFT test F1 | GRPO test F1 | Δ test F1 [interval] | p test F1 | GRPO s | reward end | "
             "cell s | experiment | reason |\n" + "|---" * 16 + "|\n")
    for c in cells:
        parts = []
        for split in ("dev", "test"):
            key = f"{split}_f1"
            won, lost = c.get(f"wins_{split}"), c.get(f"losses_{split}")
            parts += [_fmt(c.get(f"sft_{key}"), None), _fmt(c.get(f"grpo_{key}"), None),
                      _interval(c.get(f"delta_{key}"), c.get(f"delta_{key}_lo"), c.get(f"delta_{key}_hi")),
                      _fmt(c.get(f"p_{key}"), None, 3)]
            if split == "dev":
                parts.append("–" if won is None or lost is None else f"{int(won)}/{int(lost)}")
        parts += [_fmt(c.get(k), None, d) for k, d in (("grpo_seconds", 0), ("grpo_reward_last", 3), ("seconds", 0))]
        rev = f"`{c['rev'][:7]}`" if c.get("rev") else "–"
        text += f"| {c['cell']} | {c['status']} | {' | '.join(parts)} | {rev} | {_md(c.get('reason') or '–')} |\n"
    return text


def _csv(path: Path, rows: list[dict]) -> None:
    import csv

    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({k: ("; ".join(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows)


def write_table(out_dir: str | Path, grid: str, cells: list[dict], note: str = "") -> dict:
    """table.md, table.csv (one line per row) and cells.csv (one per cell) into `out_dir`; {"rows", "markdown",
    "files"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_table(cells)
    markdown = table_markdown(grid, rows, cells, note)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    _csv(out / "table.csv", rows)
    _csv(out / "cells.csv", cells)
    return {"rows": rows, "markdown": markdown, "files": [out / n for n in ("table.md", "table.csv", "cells.csv")]}


# --- the grid run --------------------------------------------------------------------------------------------

def _empty_cell(cell: Cell) -> dict:
    return {"cell": cell.name, "row": cell.row, "seed": cell.seed, "status": "failed", "reason": None, "rev": None,
            "seconds": None, **{f"{m}_{k}": None for m in ("sft", "grpo") for k in METRICS},
            **{f"{m}_{k}{end}": None for m in ("sft", "grpo") for k in INTERVALS for end in ("_lo", "_hi")},
            **dict.fromkeys((*PAIRED, *COUNTS, *PAIRED_META)), **{f"grpo_{k}": None for k in GRPO_EXTRA}}


def _log_cell(mlflow, cell: Cell, result: dict) -> None:
    mlflow.set_tags({"dvc.experiment_rev": result["rev"] or "", "morer1.cell_status": result["status"],
                     **({"morer1.failure": result["reason"]} if result["reason"] else {})})
    mlflow.log_param("overrides", json.dumps(cell.overrides)[:6000])
    mlflow.log_metrics({k: float(v) for k, v in result.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"
                        and math.isfinite(v)})


def run(grid: Grid, cells: list[Cell], project_dir: str | Path, out_dir: str | Path, *, force: bool = False,
        read_only: bool = False, cell_runner: Callable[[str, str, list[str], dict], dict] = run_cell) -> dict:
    """Run each cell whose experiment is not on the current commit yet (every cell with `force`; none with
    `read_only`), read every cell's results, write the table into `out_dir/<grid>` and log it to MLflow;
    {"grid", "cells", "rows", "markdown", "files"}. A failed cell is a table line with its reason; the other cells
    go on. `cell_runner` runs one cell (the Prefect flow passes its task). Unless `read_only`, holds the pipeline
    lock throughout: PipelineLocked, before anything runs, when a pipeline run or another grid holds it."""
    project = Path(project_dir).resolve()
    # a pipeline run or another grid in this checkout would change the workspace the cells copy, or run a cell twice
    with nullcontext() if read_only else pipeline_lock(project, f"ablation run of grid '{grid.name}'"):
        return _run_grid(grid, cells, project, out_dir, force, read_only, cell_runner)


def _run_grid(grid: Grid, cells: list[Cell], project: Path, out_dir: str | Path, force: bool, read_only: bool,
              cell_runner: Callable[[str, str, list[str], dict], dict]) -> dict:
    """`run`'s body, under the pipeline lock unless `read_only`."""
    from morer1 import tracking

    existing = existing_experiments(project)
    if force and not read_only:
        remove_experiments(project, [c.name for c in cells if c.name in existing])
        existing = {}
    mlflow = tracking.setup()
    # every cell's stages log to this store, not to one in their temporary copy of the workspace
    env_base = {"MORER1_STATE_DIR": str(tracking.state_dir())}
    results = []
    grid_tags = {GRID_TAG: grid.name, KIND_TAG: "grid", "morer1.profile": grid.profile or ""}
    with mlflow.start_run(run_name=f"ablation-{grid.name}", tags=grid_tags) as grid_run:
        mlflow.log_dict(grid.model_dump(), "grid.json")
        for cell in cells:
            result = _empty_cell(cell)
            tags = {GRID_TAG: grid.name, CELL_TAG: cell.name, ROW_TAG: cell.row, SEED_TAG: str(cell.seed)}
            cell_run = mlflow.start_run(run_name=cell.name, nested=True,
                                        tags={**tags, KIND_TAG: "cell", "dvc.experiment": cell.name})
            try:
                if cell.name in existing:
                    result.update(status="reused", rev=existing[cell.name])
                elif read_only:
                    raise BadInputError(f"no DVC experiment {cell.name} on this commit")
                else:
                    print(f"ablation {grid.name}: running {cell.name} ({' '.join(cell.overrides)})", flush=True)
                    env = {**env_base, tracking.PARENT_RUN_ENV: cell_run.info.run_id,
                           tracking.RUN_TAGS_ENV: json.dumps(tags)}
                    done = cell_runner(str(project), cell.name, list(cell.overrides), env)
                    result.update(status="ran", rev=done["rev"], seconds=done["seconds"])
                result.update(experiment_results(project, result["rev"]))
                result["grpo_seconds"] = grpo_seconds(grid.name, cell.name)
            except Exception as exc:  # noqa: BLE001 - a failed cell is a line of the table, the others go on
                result.update(status="failed", reason=failure_reason(exc))
                mlflow.log_text(exc.log_tail if isinstance(exc, StageFailed) else str(exc), "failure.txt")
            finally:
                _log_cell(mlflow, cell, result)
                mlflow.end_run("FAILED" if result["status"] == "failed" else "FINISHED")
            print(f"ablation {grid.name}: {cell.name} {result['status']}"
                  + (f": {result['reason']}" if result["reason"] else ""), flush=True)
            results.append(result)
        note = (f"Project commit `{tracking.git_commit(project)}`, profile `{grid.profile or 'none'}`, seed keys "
                f"{', '.join(grid.seed_keys)}; mean ± sample standard deviation over the seeds; Δ: GRPO minus the "
                f"SFT candidate of the same cell, paired on the same facts. MLflow run `{grid_run.info.run_id}`.\n\n")
        table = write_table(Path(out_dir) / grid.name, grid.name, results, note)
        for path in table["files"]:
            mlflow.log_artifact(str(path), artifact_path="ablation")
        mlflow.log_metrics({f"{r['row']}.{k}": v for r in table["rows"] for k, v in r.items()
                            if k.endswith("_mean") and v is not None})
    return {"grid": grid.name, "cells": results, **table}


def rebuild_from_mlflow(grid: str, out_dir: str | Path) -> dict:
    """The table of `grid` from its MLflow cell runs alone (the latest run of each cell), written into
    `out_dir/<grid>`; {"grid", "cells", "rows", "markdown", "files"}."""
    from morer1 import tracking

    mlflow = tracking.setup()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{GRID_TAG}` = '{grid}' and tags.`{KIND_TAG}` = 'cell'")
    if not runs:
        raise BadInputError(f"no MLflow cell runs of grid {grid} in {tracking.tracking_uri()}")
    latest = {}
    for r in runs:
        latest.setdefault(r.data.tags[CELL_TAG], r)
    first = {}  # rows in the order their first cell started, cells by seed
    for r in latest.values():
        first[r.data.tags[ROW_TAG]] = min(first.get(r.data.tags[ROW_TAG], r.info.start_time), r.info.start_time)
    cells = []
    for r in sorted(latest.values(), key=lambda r: (first[r.data.tags[ROW_TAG]], int(r.data.tags[SEED_TAG]))):
        tags, metrics = r.data.tags, r.data.metrics
        cell = _empty_cell(Cell(tags[CELL_TAG], tags[ROW_TAG], int(tags[SEED_TAG]), ()))
        cell.update({k: metrics.get(k) for k in cell if k in metrics},
                    status=tags.get("morer1.cell_status", "failed"), reason=tags.get("morer1.failure"),
                    rev=tags.get("dvc.experiment_rev") or None)
        cells.append(cell)
    table = write_table(Path(out_dir) / grid, grid, cells, f"Rebuilt from MLflow ({tracking.tracking_uri()}).\n\n")
    return {"grid": grid, "cells": cells, **table}
