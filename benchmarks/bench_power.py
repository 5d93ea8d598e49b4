"""How large a difference the eval splits can show: the paired ΔF1 interval of two candidates, at the splits' sizes
and at other sizes (the real MORE dev and test), from the pair bootstrap.

    .venv/bin/python benchmarks/bench_power.py [--eval reports/eval] [--facts data/ingested] [--no-mlflow]

Reads the per-candidate predictions evaluate wrote (`reports/eval/candidates/<name>/predictions_<split>.jsonl`) and,
for the first of metrics.json's comparisons (`a_vs_b`: GRPO minus SFT on the demo) and each split, computes:

- the half-width of one model's F1 interval (a's, unpaired) and of the paired ΔF1 interval, at the split's own
  number of pairs and at `--dev-size` / `--test-size` facts (default 1,742 and 3,036: the MORE splits), where each
  resample draws as many pairs as give that many facts at the split's facts per pair (an m-out-of-n pair bootstrap:
  a split of that size drawn like this one, with these two models);
- the smallest ΔF1 such a split shows: the paired half-width is the difference whose interval just excludes 0
  (found half the time); (z_0.975 + z_0.8) / z_0.975 times it is found 80 % of the time.

The figures hold for two models that disagree as often as these two do; models that disagree more need larger
splits. Run it after a `make run` (or any evaluate with two candidates).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import REPO, report, table

Z_975, Z_80 = 1.959964, 0.841621


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", default=str(REPO / "reports" / "eval"), help="evaluate's output folder")
    p.add_argument("--facts", default=str(REPO / "data" / "ingested"), help="ingested folder (its labels.json)")
    p.add_argument("--dev-size", type=int, default=1742, help="dev size in facts to project to (MORE's)")
    p.add_argument("--test-size", type=int, default=3036, help="test size in facts to project to (MORE's)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="accepted for run_all; same sizes")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args()

    from morer1.labels import read_labels
    from morer1.metrics import bootstrap_intervals, paired_bootstrap

    labels = read_labels(Path(args.facts) / "labels.json")
    folder = Path(args.eval) / "candidates"
    chosen = json.loads((Path(args.eval) / "chosen.json").read_text())
    metrics = json.loads((Path(args.eval) / "metrics.json").read_text())
    if not metrics.get("comparisons"):
        raise SystemExit(f"{args.eval}/metrics.json: no comparisons (fewer than two candidates, or written before them)")
    a_name, b_name = next(iter(metrics["comparisons"])).split("_vs_")
    rows, figures = [], {}
    for split in ("dev", "test"):
        a = {r["id"]: r for r in read(folder / a_name / f"predictions_{split}.jsonl")}
        b = read(folder / b_name / f"predictions_{split}.jsonl")
        golds, pairs = [r["relation"] for r in b], [r["image"] for r in b]
        preds_a, preds_b = [a[r["id"]]["predicted"] for r in b], [r["predicted"] for r in b]
        n_pairs = len(set(pairs))
        per_pair = len(b) / n_pairs
        one = bootstrap_intervals(golds, preds_a, pairs, labels, resamples=args.resamples)
        for facts in (len(b), args.dev_size if split == "dev" else args.test_size):
            draw = n_pairs if facts == len(b) else max(1, round(facts / per_pair))
            c = paired_bootstrap(golds, preds_a, preds_b, pairs, labels, resamples=args.resamples, draw=draw)
            # one model's half-width shrinks with the square root of the pairs drawn
            single = (one["f1"][1] - one["f1"][0]) / 2 * (n_pairs / draw) ** 0.5
            paired = (c["delta_f1_hi"] - c["delta_f1_lo"]) / 2
            mde_80 = paired * (Z_975 + Z_80) / Z_975
            figures[f"{split}_{facts}"] = {"facts": facts, "pairs": draw, "f1_half_width": single,
                                           "delta_half_width": paired, "mde_80": mde_80}
            rows.append([split + ("" if facts == len(b) else " (projected)"), facts, draw, single, paired, mde_80])
        figures[f"{split}_observed"] = {"delta_f1": c["delta_f1"], "wins": c["wins"], "losses": c["losses"],
                                        "n": len(b), "pairs": n_pairs}
    md = table(["split", "facts", "pairs", "± one model's F1", "± paired ΔF1", "ΔF1 found 80 % of the time"], rows)
    notes = [f"{a_name} minus {b_name} on the demo's splits; {figures['dev_observed']['wins']} / "
             f"{figures['dev_observed']['losses']} dev facts only {a_name} / only {b_name} gets right; "
             f"{args.resamples} pair-bootstrap resamples; chosen model {chosen['model_dir']}",
             "projected rows: splits of that many facts drawn like this one (same facts per pair, same "
             "disagreement between the two models)"]
    report("power", "How large a ΔF1 the eval splits can show (paired pair bootstrap)", md,
           {"sizes": {"resamples": args.resamples, "projected_facts": [args.dev_size, args.test_size]},
            "figures": figures},
           args.quick, not args.no_mlflow, notes)


if __name__ == "__main__":
    main()
