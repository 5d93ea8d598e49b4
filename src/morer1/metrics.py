"""MORE metrics (DESIGN §1): accuracy, micro/macro P/R/F1 without `none`, per relation, confusion, by case.

Definitions, fixed here once for every stage that reports a number:

- A *prediction* is a label of the set, or None when the model's answer is invalid (unparsable,
  several labels, out of the set). A string that is not in the label set is treated as invalid too.
- `accuracy` = facts whose prediction equals the gold / all facts. `none` counts like any label;
  an invalid answer is always wrong.
- Micro `precision` = correct non-`none` predictions / non-`none` predictions;
  `recall` = correct non-`none` predictions / non-`none` gold facts; `f1` = their harmonic mean.
  This is the MORE evaluation (NJUNLP/MORE `modules/metrics.py`, `eval_result`): every answer that is
  not `none` is a positive prediction, so an invalid answer (None or an out-of-set string) **is** in
  the precision denominator, as a wrong positive, whatever its gold. When its gold is a relation it is
  also a miss for recall; when its gold is `none` it lowers precision only. `invalid_rate` and
  `n_invalid` are reported beside P/R/F1 to tell invalid answers from wrong relations.
- Per relation: P = correct / predicted *of that relation*, R = correct / gold of that relation. An
  invalid answer is not a prediction of any relation, so it lowers no relation's precision; when its
  gold is a relation it is a miss in that relation's recall. Invalid answers get their own row,
  label `invalid`, after the `none` row: support 0, predicted = n_invalid, correct 0, P = R = F1 = 0.
  Over the relation rows plus the `invalid` row, `predicted` sums to the micro precision denominator.
  (The confusion matrix likewise has an `invalid` column: gold -> invalid counts.)
- Macro P/R/F1: the unweighted mean, over the relations (non-`none` labels) that occur in the gold or
  in the predictions, of the per-relation P, R and F1 (macro F1 is the mean of the per-relation F1s,
  not the harmonic mean of macro P and macro R). Relations absent from both are left out, since they
  say nothing about the model; a relation predicted but never gold counts with recall 0, one gold but
  never predicted with precision 0. Neither the `none` row nor the `invalid` row enters the macro
  means. So invalid answers lower macro recall (as misses of their gold relation) and through it
  macro F1, but never macro precision: read macro P beside `invalid_rate`. (MORE itself reports only
  accuracy and micro P/R/F1; the macro figures are ours.)
- Every ratio with a zero denominator is 0 (never a division error, never NaN).
- `coverage_curve` (self-consistency, `morer1.consistency`): per abstention threshold T, answers whose vote share
  is below T become `none` and the micro figures above are computed; `coverage` = share of facts not abstained.
- Intervals (`bootstrap_intervals`, `paired_bootstrap`): facts of one image-title pair share the image and the
  title, so their errors are not independent; the bootstrap resamples *pairs* (a cluster bootstrap: each resample
  draws as many pairs as the split has, with replacement, and keeps all their facts) and recomputes the micro
  figures above on each. The interval is the percentile interval at `confidence` (0.95: the 2.5 % and 97.5 %
  quantiles), seeded. A paired comparison applies the same resampled pairs to both models' predictions of the same
  facts and reports the interval of the difference; its two-sided p-value is twice the smaller share of resampled
  differences on either side of 0, 2 (1 + min(#{Δ* <= 0}, #{Δ* >= 0})) / (1 + resamples), capped at 1: the
  percentile interval excludes 0 when p < 1 - confidence (up to one resample's worth), so the two agree.
- `by_case`: the MORE slices by the number of distinct entities (1 or N) and objects (1 or N) of the
  fact's image-title pair; only slices that hold at least one fact are reported. Each slice has the
  micro figures above (invalid answers in its precision denominator) and its own `invalid_rate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from morer1.files import write_text_atomic
from morer1.labels import NONE

INVALID = "invalid"  # confusion column (and CSV value) of an invalid answer
CASES = ("1ent_1obj", "1ent_Nobj", "Nent_1obj", "Nent_Nobj")
CURVE_KEYS = ("threshold", "coverage", "precision", "recall", "f1", "accuracy", "invalid_rate", "n")
SUMMARY_KEYS = ("accuracy", "precision", "recall", "f1", "macro_precision", "macro_recall", "macro_f1",
                "invalid_rate", "n")
INTERVAL_KEYS = ("accuracy", "precision", "recall", "f1")  # the figures that get a bootstrap interval


def _div(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _case(n_entities: int, n_objects: int) -> str:
    if n_entities < 1 or n_objects < 1:
        raise ValueError(f"pair counts must be >= 1, got entities={n_entities} objects={n_objects}")
    return f"{'1' if n_entities == 1 else 'N'}ent_{'1' if n_objects == 1 else 'N'}obj"


def _micro(golds: Sequence[str], preds: Sequence[str | None]) -> dict:
    """n, accuracy, micro P/R/F1 and invalid rate of already-cleaned lists (invalid = None)."""
    n = len(golds)
    correct_all = sum(g == p for g, p in zip(golds, preds))
    # The MORE rule: every answer that is not `none` is a positive prediction, an invalid one (None)
    # included, as a wrong positive; on a non-none gold it is also a miss in the recall denominator.
    predicted_pos = sum(p != NONE for p in preds)
    gold_pos = sum(g != NONE for g in golds)
    correct_pos = sum(g == p and g != NONE for g, p in zip(golds, preds))
    precision, recall = _div(correct_pos, predicted_pos), _div(correct_pos, gold_pos)
    invalid = sum(p is None for p in preds)
    return {"n": n, "accuracy": _div(correct_all, n), "precision": precision, "recall": recall,
            "f1": _f1(precision, recall), "invalid_rate": _div(invalid, n)}


def compute_metrics(golds: list[str], preds: list[str | None], labels, *, pair_entities=None,
                    pair_objects=None) -> dict:
    """All MORE metrics of one evaluation (definitions in the module docstring).

    `golds` are labels of `labels`; `preds` labels or None for an invalid answer (a string outside
    `labels` is counted as invalid). `pair_entities` / `pair_objects` (ints per fact, from the ingested
    records) add `by_case`. Returns a JSON-serialisable dict: accuracy, precision, recall, f1,
    macro_precision, macro_recall, macro_f1, invalid_rate, n_invalid, n, per_relation (rows for every
    relation of the set, then a `none` row and an `invalid` row for information only, never in the
    macro means), confusion (gold -> predicted -> count, with an `invalid` column), and by_case when
    pair counts are given. A label set that holds the name `invalid` itself is refused.
    """
    labels = list(dict.fromkeys(labels))
    label_set = set(labels)
    if INVALID in label_set:
        raise ValueError(f"the label set may not hold {INVALID!r}: it names invalid answers")
    golds, preds = list(golds), list(preds)
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    unknown = sorted({g for g in golds if g not in label_set}, key=str)
    if unknown:
        raise ValueError(f"gold labels not in the label set: {unknown[:5]}")
    # Out-of-set predictions are invalid answers (DESIGN §1): normalise them to None.
    preds = [p if p in label_set else None for p in preds]

    out = _micro(golds, preds)
    n_invalid = sum(p is None for p in preds)

    gold_count = Counter(golds)
    pred_count = Counter(p for p in preds if p is not None)
    correct_count = Counter(g for g, p in zip(golds, preds) if g == p)
    relations = [lab for lab in labels if lab != NONE]
    rows = []
    for lab in relations + ([NONE] if NONE in label_set else []):
        p = _div(correct_count[lab], pred_count[lab])
        r = _div(correct_count[lab], gold_count[lab])
        rows.append({"label": lab, "support": gold_count[lab], "predicted": pred_count[lab],
                     "correct": correct_count[lab], "precision": p, "recall": r, "f1": _f1(p, r)})

    # Macro over the relations seen in gold or prediction; the `none` and `invalid` rows never enter.
    seen = [row for row in rows if row["label"] != NONE and (row["support"] or row["predicted"])]
    macro = {f"macro_{k}": _div(sum(row[k] for row in seen), len(seen)) for k in ("precision", "recall", "f1")}
    # Invalid answers are wrong positives of no relation: their own row, where micro P's lost share shows.
    rows.append({"label": INVALID, "support": 0, "predicted": n_invalid, "correct": 0, "precision": 0.0,
                 "recall": 0.0, "f1": 0.0})

    confusion = {g: {c: 0 for c in labels + [INVALID]} for g in labels}
    for g, p in zip(golds, preds):
        confusion[g][INVALID if p is None else p] += 1

    out.update(macro)
    out.update({"n_invalid": n_invalid, "per_relation": rows, "confusion": confusion})
    out = {k: out[k] for k in (*SUMMARY_KEYS, "n_invalid", "per_relation", "confusion")}

    if (pair_entities is None) != (pair_objects is None):
        raise ValueError("give both pair_entities and pair_objects, or neither")
    if pair_entities is not None:
        pair_entities, pair_objects = list(pair_entities), list(pair_objects)
        if not len(pair_entities) == len(pair_objects) == len(golds):
            raise ValueError("pair_entities / pair_objects must have one value per fact")
        groups: dict[str, list[int]] = {}
        for i, (ne, no) in enumerate(zip(pair_entities, pair_objects)):
            groups.setdefault(_case(int(ne), int(no)), []).append(i)
        out["by_case"] = {case: _micro([golds[i] for i in groups[case]], [preds[i] for i in groups[case]])
                          for case in CASES if case in groups}
    return out


# --- uncertainty: the pair (cluster) bootstrap -------------------------------------------------------------------

def _fact_counts(golds: Sequence[str], preds: Sequence[str | None], label_set: set[str]):
    """Per fact: (correct, predicted positive, gold positive, correct positive) as a float array (n x 4), under the
    MORE rule (an out-of-set or None answer is an invalid one: a wrong positive)."""
    import numpy as np

    rows = []
    for g, p in zip(golds, preds, strict=True):
        p = p if p in label_set else None
        rows.append((g == p, p != NONE, g != NONE, g == p and g != NONE))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _figures(totals, n):
    """accuracy, precision, recall, f1 of count totals (... x 4) over `n` facts, 0 where a denominator is 0."""
    import numpy as np

    correct, predicted, gold, hit = (totals[..., i] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"accuracy": np.where(n > 0, correct / np.where(n > 0, n, 1), 0.0),
               "precision": np.where(predicted > 0, hit / np.where(predicted > 0, predicted, 1), 0.0),
               "recall": np.where(gold > 0, hit / np.where(gold > 0, gold, 1), 0.0),
               # harmonic mean of P and R = 2 hit / (predicted + gold), 0 when there is no hit
               "f1": np.where(hit > 0, 2 * hit / np.where(predicted + gold > 0, predicted + gold, 1), 0.0)}
    return out


def _pair_index(pairs: Sequence) -> tuple[list, list[int]]:
    """Distinct pair keys in order of first appearance, and each fact's index into them."""
    index: dict = {}
    positions = [index.setdefault(key, len(index)) for key in pairs]
    return list(index), positions


def _resampled_totals(counts_list, pairs: Sequence, resamples: int, seed: int, draw: int | None = None,
                      chunk: int = 500):
    """For each per-fact count array of `counts_list` (same facts), its totals on `resamples` pair-bootstrap
    resamples (resamples x 4), and the facts per resample; the same resampled pairs for every array (pairing).
    A resample draws `draw` pairs (default: as many as there are)."""
    import numpy as np

    keys, index = _pair_index(pairs)
    n_pairs = len(keys) if index else 0
    index = np.asarray(index, dtype=np.int64)
    per_pair = [np.zeros((n_pairs, 4)) for _ in counts_list]
    for arr, counts in zip(per_pair, counts_list):
        np.add.at(arr, index, counts)
    sizes = np.bincount(index, minlength=n_pairs).astype(np.float64)
    rng = np.random.default_rng(seed)
    totals = [np.zeros((resamples, 4)) for _ in counts_list]
    facts = np.zeros(resamples)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        if n_pairs == 0:
            continue
        weights = rng.multinomial(draw or n_pairs, np.full(n_pairs, 1.0 / n_pairs),
                                  size=stop - start).astype(np.float64)
        for out, arr in zip(totals, per_pair):
            out[start:stop] = weights @ arr
        facts[start:stop] = weights @ sizes
    return totals, facts, n_pairs


def _check_bootstrap(n: int, pairs: Sequence, resamples: int, confidence: float) -> None:
    if len(pairs) != n:
        raise ValueError(f"{n} facts but {len(pairs)} pair keys")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def bootstrap_intervals(golds: Sequence[str], preds: Sequence[str | None], pairs: Sequence, labels, *,
                        resamples: int, confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile intervals of accuracy and micro P/R/F1 (`INTERVAL_KEYS`) by the pair bootstrap.

    `pairs` holds one hashable key per fact naming its image-title pair; the resamples draw pairs, not facts
    (module docstring). Returns {key: [lo, hi]} for each key, plus `confidence`, `resamples` and `n_pairs`.
    """
    import numpy as np

    golds, preds, pairs = list(golds), list(preds), list(pairs)
    _check_bootstrap(len(golds), pairs, resamples, confidence)
    counts = _fact_counts(golds, preds, set(labels))
    (totals,), facts, n_pairs = _resampled_totals([counts], pairs, resamples, seed)
    figures = _figures(totals, facts)
    tail = (1 - confidence) / 2
    out: dict = {key: [float(v) for v in np.quantile(figures[key], [tail, 1 - tail])] for key in INTERVAL_KEYS}
    out.update(confidence=confidence, resamples=resamples, n_pairs=n_pairs)
    return out


def paired_bootstrap(golds: Sequence[str], preds_a: Sequence[str | None], preds_b: Sequence[str | None],
                     pairs: Sequence, labels, *, resamples: int, confidence: float = 0.95, seed: int = 0,
                     draw: int | None = None) -> dict:
    """Model A minus model B on the same facts, paired: for each of `INTERVAL_KEYS`, `delta_<k>` (observed),
    `delta_<k>_lo` / `delta_<k>_hi` (percentile interval of the difference over pair-bootstrap resamples that apply
    the same pairs to both models) and `p_value_<k>` (two-sided, module docstring). Also `n` facts, `n_pairs`,
    `wins` (facts only A gets right), `losses` (only B gets right), `confidence` and `resamples`.

    `preds_a[i]` and `preds_b[i]` must be the two models' answers to the fact of `golds[i]` (callers align them by
    fact id first). `draw` (default: the number of pairs) sets how many pairs a resample draws: the interval a split
    of `draw` pairs drawn like this one would give (benchmarks/bench_power.py)."""
    import numpy as np

    golds, preds_a, preds_b, pairs = list(golds), list(preds_a), list(preds_b), list(pairs)
    if not len(golds) == len(preds_a) == len(preds_b):
        raise ValueError(f"{len(golds)} golds, {len(preds_a)} and {len(preds_b)} predictions")
    _check_bootstrap(len(golds), pairs, resamples, confidence)
    label_set = set(labels)
    counts_a, counts_b = _fact_counts(golds, preds_a, label_set), _fact_counts(golds, preds_b, label_set)
    (totals_a, totals_b), facts, n_pairs = _resampled_totals([counts_a, counts_b], pairs, resamples, seed, draw)
    fig_a, fig_b = _figures(totals_a, facts), _figures(totals_b, facts)
    n = float(len(golds))
    obs_a, obs_b = _figures(counts_a.sum(axis=0), n), _figures(counts_b.sum(axis=0), n)
    tail = (1 - confidence) / 2
    out: dict = {"n": len(golds), "n_pairs": n_pairs, "wins": int(((counts_a[:, 0] == 1) & (counts_b[:, 0] == 0)).sum()),
                 "losses": int(((counts_a[:, 0] == 0) & (counts_b[:, 0] == 1)).sum()),
                 "confidence": confidence, "resamples": resamples}
    for key in INTERVAL_KEYS:
        observed = float(obs_a[key] - obs_b[key])
        deltas = fig_a[key] - fig_b[key]
        lo, hi = (float(v) for v in np.quantile(deltas, [tail, 1 - tail]))
        # twice the smaller tail beyond 0 (module docstring); 1 when the two models never differ
        tail_count = min(int((deltas <= 0).sum()), int((deltas >= 0).sum()))
        out.update({f"delta_{key}": observed, f"delta_{key}_lo": lo, f"delta_{key}_hi": hi,
                    f"p_value_{key}": min(1.0, 2 * (1 + tail_count) / (1 + resamples))})
    return out


def baselines(train_golds, eval_golds, labels, seed: int = 0, *, pairs: Sequence | None = None, resamples: int = 0,
              confidence: float = 0.95) -> dict:
    """Reference points for the eval numbers: `majority` and `random`, each a compute_metrics result.

    `majority` always answers the most frequent train label (ties: first in the label set); on MORE
    that is `none`, so its P = R = F1 = 0 and its accuracy is the `none` share. `random` draws each
    answer from the train label distribution with a seeded generator. Each result also carries the
    baseline's `label` (majority) or `distribution` (random), and with `pairs` (one pair key per eval fact) and
    `resamples` its `intervals` (bootstrap_intervals, seeded with `seed`).
    """
    import numpy as np

    labels = list(dict.fromkeys(labels))
    counts = Counter(train_golds)
    if not counts:
        raise ValueError("baselines need at least one train label")
    unknown = sorted(set(counts) - set(labels), key=str)
    if unknown:
        raise ValueError(f"train labels not in the label set: {unknown[:5]}")
    eval_golds = list(eval_golds)
    order = [lab for lab in labels if counts[lab]]
    top = max(order, key=lambda lab: (counts[lab], -order.index(lab)))
    majority = compute_metrics(eval_golds, [top] * len(eval_golds), labels)
    majority["label"] = top
    total = sum(counts.values())
    probs = [counts[lab] / total for lab in order]
    rng = np.random.default_rng(seed)
    drawn = [order[i] for i in rng.choice(len(order), size=len(eval_golds), p=probs)] if eval_golds else []
    rand = compute_metrics(eval_golds, drawn, labels)
    rand["distribution"] = dict(zip(order, probs))
    if pairs is not None and resamples:
        for result, answers in ((majority, [top] * len(eval_golds)), (rand, drawn)):
            result["intervals"] = bootstrap_intervals(eval_golds, answers, pairs, labels, resamples=resamples,
                                                      confidence=confidence, seed=seed)
    return {"majority": majority, "random": rand}


def coverage_curve(golds: Sequence[str], voted: Sequence[str | None], confidences: Sequence[float], labels,
                   thresholds: Sequence[float]) -> list[dict]:
    """The precision-recall-coverage curve of self-consistent answers over abstention thresholds.

    For each threshold T (ascending), an answer whose confidence is below T becomes `none`
    (`morer1.consistency.abstain`) and the micro figures of compute_metrics are computed on the result (MORE
    rule: invalid answers that stay are wrong positives). `coverage` = share of facts whose answer was not
    abstained (confidence >= T). One row per threshold, with CURVE_KEYS.
    """
    from morer1.consistency import abstain

    golds, voted, confidences = list(golds), list(voted), [float(c) for c in confidences]
    if not len(golds) == len(voted) == len(confidences):
        raise ValueError(f"{len(golds)} golds, {len(voted)} answers and {len(confidences)} confidences")
    if NONE not in set(labels):
        raise ValueError(f"abstention answers {NONE!r}, which the label set lacks")
    rows = []
    for t in sorted(set(float(t) for t in thresholds)):
        preds = [abstain(v, c, t) for v, c in zip(voted, confidences)]
        m = compute_metrics(golds, preds, labels)
        rows.append({"threshold": t, "coverage": _div(sum(c >= t for c in confidences), len(golds)),
                     **{k: m[k] for k in CURVE_KEYS[2:]}})
    return rows


def write_curve_csv(rows: list[dict], path) -> Path:
    """Write coverage_curve rows as a CSV file with a CURVE_KEYS header (also when there are none), atomically."""
    path = Path(path)
    write_text_atomic(path, _csv([list(CURVE_KEYS), *([row[k] for k in CURVE_KEYS] for row in rows)]))
    return path


# --- DVC files ------------------------------------------------------------------------------------

def _is_result(m: dict) -> bool:
    return isinstance(m, dict) and "accuracy" in m and "per_relation" in m


def _interval_bounds(m: dict, prefix: str, keys=INTERVAL_KEYS) -> dict:
    """`<prefix><key>_lo` / `_hi` of a result's `intervals` for `keys` (none when it has none)."""
    return {f"{prefix}{key}_{end}": bound for key in keys if key in (m.get("intervals") or {})
            for end, bound in zip(("lo", "hi"), m["intervals"][key])}


def flat_metrics(m: dict) -> dict:
    """The numbers of one compute_metrics result (with an optional `baselines` entry) as a flat dict."""
    flat = {k: m[k] for k in SUMMARY_KEYS if k in m}
    flat.update(_interval_bounds(m, ""))
    for case, s in (m.get("by_case") or {}).items():
        flat[f"by_case_{case}_f1"] = s["f1"]
        flat[f"by_case_{case}_n"] = s["n"]
    for name, b in (m.get("baselines") or {}).items():
        flat[f"baseline_{name}_f1"] = b["f1"]
        flat[f"baseline_{name}_accuracy"] = b["accuracy"]
        flat.update(_interval_bounds(b, f"baseline_{name}_", ("f1", "accuracy")))
    return {k: v for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _write_csvs(m: dict, out_dir: Path, prefix: str = "") -> None:
    keys = ("label", "precision", "recall", "f1", "support")
    write_text_atomic(out_dir / f"{prefix}per_relation.csv",
                      _csv([list(keys), *([row[k] for k in keys] for row in m["per_relation"])]))
    facts = [[gold, pred] for gold, cols in m["confusion"].items() for pred, n in cols.items() for _ in range(n)]
    write_text_atomic(out_dir / f"{prefix}confusion.csv", _csv([["actual", "predicted"], *facts]))  # one row per fact


def write_metrics_files(metrics: dict, out_dir, extra: dict | None = None) -> dict[str, Path]:
    """Write DVC metrics and plots files into `out_dir`, each atomically; return their paths by name.

    `metrics` is one compute_metrics result, optionally with a `baselines` entry (a baselines() result),
    or a dict split -> such results. Files: `metrics.json` (numbers only, flat; nested one level by
    split for a split dict), `per_relation.csv` (label,precision,recall,f1,support; every per_relation
    row, the `none` and `invalid` rows last) and `confusion.csv` (actual,predicted, one row per fact;
    invalid answers as `invalid`). For a split dict the CSVs are `<split>_per_relation.csv` and
    `<split>_confusion.csv`. `extra` entries (numbers, or dicts of numbers, nested) are added to `metrics.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_result(metrics):
        flat: dict = flat_metrics(metrics)
        _write_csvs(metrics, out_dir)
        names = ["per_relation", "confusion"]
    else:
        if not metrics or not all(_is_result(m) for m in metrics.values()):
            raise ValueError("expected a compute_metrics result or a dict split -> compute_metrics result")
        flat, names = {}, []
        for split, m in metrics.items():
            if not split or "/" in split or "\\" in split or split.startswith("."):
                raise ValueError(f"bad split name {split!r}")
            flat[split] = flat_metrics(m)
            _write_csvs(m, out_dir, f"{split}_")
            names += [f"{split}_per_relation", f"{split}_confusion"]
    write_text_atomic(out_dir / "metrics.json", json.dumps({**flat, **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return {"metrics": out_dir / "metrics.json", **{name: out_dir / f"{name}.csv" for name in names}}
