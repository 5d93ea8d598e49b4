"""MORE metrics against hand-computed values (DESIGN §1).

Precision follows the MORE evaluation (NJUNLP/MORE `eval_result`): every answer that is not `none`,
an invalid one included, is a positive prediction. The numbers below are written for that rule; each
invalid-answer case also states what the old rule (invalid answers left out of the precision
denominator) would give, so a return to it fails here.
"""

import csv
import json

import pytest

from morer1.labels import DEFAULT_LABELS, NONE
from morer1.metrics import (
    INVALID,
    baselines,
    bootstrap_intervals,
    compute_metrics,
    flat_metrics,
    paired_bootstrap,
    write_metrics_files,
)

A, B, C, D = "/per/per/partner", "/per/org/member_of", "/org/loc/locate_at", "/loc/loc/contain"
LABELS = [NONE, A, B, C, D]  # D never occurs: it gets a per-relation row but stays out of macro

# The hand table: (gold, predicted, pair_entities, pair_objects); None = invalid answer.
TABLE = [
    (A, A, 1, 1),        # 1 right relation
    (A, B, 1, 1),        # 2 wrong relation
    (A, None, 1, 2),     # 3 invalid on a relation: a wrong positive for precision and a miss for recall
    (B, B, 1, 2),        # 4 right relation
    (B, NONE, 2, 1),     # 5 missed relation
    (NONE, NONE, 2, 1),  # 6 right none: counts for accuracy only
    (NONE, A, 3, 2),     # 7 false relation
    (NONE, None, 2, 5),  # 8 invalid on none: a wrong positive for precision
    (C, C, 2, 2),        # 9 right relation
    (NONE, NONE, 4, 3),  # 10 right none
]
GOLDS = [t[0] for t in TABLE]
PREDS = [t[1] for t in TABLE]
ENTS = [t[2] for t in TABLE]
OBJS = [t[3] for t in TABLE]


def approx(x):
    return pytest.approx(x, abs=1e-12)


@pytest.fixture()
def m():
    return compute_metrics(GOLDS, PREDS, LABELS, pair_entities=ENTS, pair_objects=OBJS)


def test_micro_by_hand(m):
    # right: 1, 4, 6, 9, 10 -> accuracy 5/10
    assert m["n"] == 10
    assert m["accuracy"] == approx(0.5)
    # non-none predictions: 1 A, 2 B, 3 invalid, 4 B, 7 A, 8 invalid, 9 C = 7; right among them: 1, 4, 9 = 3
    assert m["precision"] == approx(3 / 7)  # the old rule (invalid left out) gave 3/5
    # gold non-none: 1, 2, 3, 4, 5, 9 = 6 (fact 3, invalid, is a miss)
    assert m["recall"] == approx(3 / 6)
    assert m["f1"] == approx(6 / 13)  # 2 * 3/7 * 1/2 / (3/7 + 1/2) = (3/7) / (13/14); old rule 6/11
    # invalid: 3 and 8
    assert m["invalid_rate"] == approx(0.2)
    assert m["n_invalid"] == 2


def test_macro_by_hand(m):
    # A: support 3 (1,2,3), predicted 2 (1,7), right 1 -> P 1/2, R 1/3, F1 2/5
    # B: support 2 (4,5),   predicted 2 (2,4), right 1 -> P 1/2, R 1/2, F1 1/2
    # C: support 1,         predicted 1,       right 1 -> P 1,   R 1,   F1 1
    # D: never gold nor predicted -> left out of the macro set
    # The invalid answers (3, 8) are predictions of no relation: they lower no relation's precision;
    # fact 3 is a miss in A's recall (1/3). Macro P is the same under the old and the MORE rule.
    assert m["macro_precision"] == approx((0.5 + 0.5 + 1) / 3)
    assert m["macro_recall"] == approx((1 / 3 + 0.5 + 1) / 3)
    assert m["macro_f1"] == approx((0.4 + 0.5 + 1) / 3)


def test_macro_counts_relations_only_predicted():
    # A is gold once and right; B is only predicted (wrongly, on a none): B has P 0, R 0 and enters macro.
    m = compute_metrics([A, NONE], [A, B], LABELS)
    assert m["macro_precision"] == approx((1 + 0) / 2)
    assert m["macro_recall"] == approx((1 + 0) / 2)
    assert m["macro_f1"] == approx(0.5)


def test_per_relation_rows(m):
    rows = {r["label"]: r for r in m["per_relation"]}
    # relations in set order, then none, then invalid
    assert [r["label"] for r in m["per_relation"]] == [A, B, C, D, NONE, INVALID]
    assert rows[A] == {"label": A, "support": 3, "predicted": 2, "correct": 1, "precision": approx(0.5),
                       "recall": approx(1 / 3), "f1": approx(0.4)}
    assert (rows[B]["support"], rows[B]["predicted"], rows[B]["correct"], rows[B]["f1"]) == (2, 2, 1, approx(0.5))
    assert (rows[C]["precision"], rows[C]["recall"], rows[C]["f1"]) == (1.0, 1.0, 1.0)
    assert rows[D] == {"label": D, "support": 0, "predicted": 0, "correct": 0, "precision": 0.0, "recall": 0.0,
                       "f1": 0.0}
    # none, for information: support 6,7,8,10; predicted 5,6,10; right 6,10
    assert (rows[NONE]["support"], rows[NONE]["predicted"], rows[NONE]["correct"]) == (4, 3, 2)
    assert rows[NONE]["precision"] == approx(2 / 3) and rows[NONE]["recall"] == approx(0.5)
    # invalid, for information: answers 3 and 8, right nowhere
    assert rows[INVALID] == {"label": INVALID, "support": 0, "predicted": 2, "correct": 0, "precision": 0.0,
                             "recall": 0.0, "f1": 0.0}
    # relation rows + the invalid row predict exactly the micro precision denominator (7), with 3 right
    relation_rows = [r for r in m["per_relation"] if r["label"] != NONE]
    assert sum(r["predicted"] for r in relation_rows) == 7 and sum(r["correct"] for r in relation_rows) == 3


def test_confusion_with_invalid_column(m):
    conf = m["confusion"]
    assert list(conf) == LABELS
    assert all(list(row) == LABELS + [INVALID] for row in conf.values())
    assert conf[A] == {NONE: 0, A: 1, B: 1, C: 0, D: 0, INVALID: 1}
    assert conf[B] == {NONE: 1, A: 0, B: 1, C: 0, D: 0, INVALID: 0}
    assert conf[C] == {NONE: 0, A: 0, B: 0, C: 1, D: 0, INVALID: 0}
    assert conf[NONE] == {NONE: 2, A: 1, B: 0, C: 0, D: 0, INVALID: 1}
    assert sum(sum(r.values()) for r in conf.values()) == 10


def test_by_case_slices_by_hand(m):
    bc = m["by_case"]
    assert list(bc) == ["1ent_1obj", "1ent_Nobj", "Nent_1obj", "Nent_Nobj"]
    # 1ent_1obj: facts 1, 2 -> (A,A) (A,B): acc 1/2, P 1/2, R 1/2, F1 1/2
    assert bc["1ent_1obj"] == {"n": 2, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                               "invalid_rate": 0.0}
    # 1ent_Nobj: facts 3, 4 -> (A,invalid) (B,B): acc 1/2, P 1/2 (old rule 1/1), R 1/2, F1 1/2, invalid 1/2
    assert bc["1ent_Nobj"] == {"n": 2, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                               "invalid_rate": 0.5}
    # Nent_1obj: facts 5, 6 -> (B,none) (none,none): acc 1/2, no non-none prediction -> P 0, R 0/1, F1 0
    assert bc["Nent_1obj"] == {"n": 2, "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                               "invalid_rate": 0.0}
    # Nent_Nobj: facts 7-10 -> (none,A) (none,invalid) (C,C) (none,none): acc 2/4,
    # P 1/3 (A, invalid, C predicted; C right; old rule 1/2), R 1/1, F1 2 * 1/3 / (4/3) = 1/2, invalid 1/4
    s = bc["Nent_Nobj"]
    assert (s["n"], s["accuracy"], s["recall"], s["invalid_rate"]) == (4, 0.5, 1.0, 0.25)
    assert s["precision"] == approx(1 / 3) and s["f1"] == approx(0.5)


def test_by_case_only_with_pair_counts_and_only_non_empty_slices():
    assert "by_case" not in compute_metrics(GOLDS, PREDS, LABELS)
    m = compute_metrics([A, NONE], [A, NONE], LABELS, pair_entities=[3, 3], pair_objects=[2, 4])
    assert list(m["by_case"]) == ["Nent_Nobj"]
    with pytest.raises(ValueError):
        compute_metrics(GOLDS, PREDS, LABELS, pair_entities=ENTS)
    with pytest.raises(ValueError):
        compute_metrics([A], [A], LABELS, pair_entities=[0], pair_objects=[1])
    with pytest.raises(ValueError):
        compute_metrics([A], [A], LABELS, pair_entities=[1, 1], pair_objects=[1, 1])


def test_right_none_counts_for_accuracy_but_not_precision_recall():
    m = compute_metrics([NONE, NONE, A], [NONE, NONE, NONE], LABELS)
    assert m["accuracy"] == approx(2 / 3)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    m = compute_metrics([NONE, A], [NONE, A], LABELS)
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0)


def test_invalid_answers():
    # gold A, A; answers A and invalid: accuracy 1/2, P 1/2 (the invalid answer is a wrong positive;
    # old rule 1/1), R 1/2, F1 1/2
    m = compute_metrics([A, A], [A, None], LABELS)
    assert m["accuracy"] == 0.5
    assert m["precision"] == 0.5
    assert m["recall"] == 0.5
    assert m["f1"] == 0.5
    assert m["invalid_rate"] == 0.5
    # an invalid answer on a none gold is wrong for accuracy and is a wrong positive for precision:
    # gold A, none; answers A, invalid: P 1/2 (old rule 1/1), R 1/1, F1 2/3
    m = compute_metrics([A, NONE], [A, None], LABELS)
    assert (m["accuracy"], m["precision"], m["recall"], m["invalid_rate"]) == (0.5, 0.5, 1.0, 0.5)
    assert m["f1"] == approx(2 / 3)
    # ... and with nothing right it leaves P = 0/1 and R = 0/0, both 0
    m = compute_metrics([NONE, NONE], [None, NONE], LABELS)
    assert (m["accuracy"], m["precision"], m["recall"], m["invalid_rate"]) == (0.5, 0.0, 0.0, 0.5)
    # an out-of-set string is an invalid answer
    m = compute_metrics([A, NONE], ["/per/per/nonsense", "NONE"], LABELS)
    assert m["invalid_rate"] == 1.0 and m["accuracy"] == 0.0
    assert m["confusion"][A][INVALID] == 1 and m["confusion"][NONE][INVALID] == 1


# A second hand table, on invalid answers only: out-of-set strings and None, on relation and on none golds.
INVALID_TABLE = [
    (A, A),                      # 1 right relation
    (A, "garbage"),              # 2 out-of-set string on a relation: invalid, a wrong positive and a miss
    (B, B),                      # 3 right relation
    (B, None),                   # 4 invalid on a relation: a wrong positive and a miss
    (NONE, "NONE"),              # 5 out-of-set (wrong case) on none: invalid, a wrong positive
    (NONE, None),                # 6 invalid on none: a wrong positive
    (NONE, NONE),                # 7 right none
    (NONE, NONE),                # 8 right none
    (NONE, A),                   # 9 false relation
    (C, NONE),                   # 10 missed relation
]


def test_invalid_answers_are_wrong_positives_by_hand():
    golds, preds = [t[0] for t in INVALID_TABLE], [t[1] for t in INVALID_TABLE]
    m = compute_metrics(golds, preds, LABELS)
    # 10 facts; right: 1, 3, 7, 8 -> accuracy 4/10; invalid: 2, 4, 5, 6 -> 4/10
    assert m["n"] == 10 and m["accuracy"] == approx(0.4)
    assert m["n_invalid"] == 4 and m["invalid_rate"] == approx(0.4)
    # positive predictions (not none): 1 A, 2 inv, 3 B, 4 inv, 5 inv, 6 inv, 9 A = 7; right: 1, 3 = 2
    # gold relations: 1, 2, 3, 4, 10 = 5
    # P = 2/7, R = 2/5, F1 = 2 * 2/7 * 2/5 / (2/7 + 2/5) = (8/35) / (24/35) = 1/3
    # (the old rule, invalid out of the denominator: P = 2/3 (1, 3, 9), F1 = 1/2)
    assert m["precision"] == approx(2 / 7)
    assert m["recall"] == approx(2 / 5)
    assert m["f1"] == approx(1 / 3)
    rows = {r["label"]: r for r in m["per_relation"]}
    # per relation, invalid answers lower no precision, only the recall of their gold relation:
    # A: support 2 (1, 2), predicted 2 (1, 9), right 1 -> P 1/2, R 1/2, F1 1/2
    # B: support 2 (3, 4), predicted 1 (3),    right 1 -> P 1,   R 1/2, F1 2/3
    # C: support 1 (10),   predicted 0,        right 0 -> P 0,   R 0,   F1 0
    # D: neither -> out of macro
    assert (rows[A]["support"], rows[A]["predicted"], rows[A]["correct"]) == (2, 2, 1)
    assert (rows[A]["precision"], rows[A]["recall"], rows[A]["f1"]) == (0.5, 0.5, 0.5)
    assert (rows[B]["support"], rows[B]["predicted"], rows[B]["correct"]) == (2, 1, 1)
    assert (rows[B]["precision"], rows[B]["recall"]) == (1.0, 0.5) and rows[B]["f1"] == approx(2 / 3)
    assert (rows[C]["support"], rows[C]["predicted"], rows[C]["precision"], rows[C]["recall"]) == (1, 0, 0.0, 0.0)
    # the invalid row: the 4 invalid answers, right nowhere; out of macro
    assert rows[INVALID] == {"label": INVALID, "support": 0, "predicted": 4, "correct": 0, "precision": 0.0,
                             "recall": 0.0, "f1": 0.0}
    # none row: support 5, 6, 7, 8, 9 = 5; predicted 7, 8, 10 = 3; right 7, 8 = 2
    assert (rows[NONE]["support"], rows[NONE]["predicted"], rows[NONE]["correct"]) == (5, 3, 2)
    # macro over A, B, C: P (1/2 + 1 + 0)/3 = 1/2, R (1/2 + 1/2 + 0)/3 = 1/3, F1 (1/2 + 2/3 + 0)/3 = 7/18
    assert m["macro_precision"] == approx(0.5)
    assert m["macro_recall"] == approx(1 / 3)
    assert m["macro_f1"] == approx(7 / 18)
    # confusion: the invalid column holds 2 and 4 (gold A, B) and 5, 6 (gold none)
    assert {g: row[INVALID] for g, row in m["confusion"].items()} == {NONE: 2, A: 1, B: 1, C: 0, D: 0}
    # by case (all in one slice): the same micro figures
    one = compute_metrics(golds, preds, LABELS, pair_entities=[1] * 10, pair_objects=[1] * 10)
    assert one["by_case"] == {"1ent_1obj": {"n": 10, "accuracy": approx(0.4), "precision": approx(2 / 7),
                                            "recall": approx(0.4), "f1": approx(1 / 3),
                                            "invalid_rate": approx(0.4)}}


def test_only_invalid_answers_give_precision_zero():
    # 3 facts, golds A, none, B; answers all invalid (None, out of set, wrong case):
    # P = 0/3, R = 0/2, F1 0, accuracy 0, invalid 3/3; no relation predicted, A and B seen -> macro P 0
    m = compute_metrics([A, NONE, B], [None, "/x/y/z", A.upper()], LABELS)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["invalid_rate"]) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == (0.0, 0.0, 0.0)
    assert m["per_relation"][-1]["predicted"] == 3


def test_label_set_may_not_hold_invalid():
    with pytest.raises(ValueError, match="invalid"):
        compute_metrics([A], [A], [NONE, A, INVALID])


def test_edge_cases_never_divide_by_zero():
    m = compute_metrics([NONE, NONE], [NONE, A], LABELS)  # no non-none gold
    assert (m["recall"], m["f1"]) == (0.0, 0.0)
    assert m["precision"] == 0.0
    assert m["macro_recall"] == 0.0
    m = compute_metrics([], [], LABELS, pair_entities=[], pair_objects=[])
    assert m["n"] == 0 and m["accuracy"] == 0.0 and m["invalid_rate"] == 0.0 and m["f1"] == 0.0
    assert m["macro_f1"] == 0.0 and m["by_case"] == {}
    m = compute_metrics([NONE], [None], LABELS)
    assert m["macro_precision"] == 0.0  # no relation seen at all
    json.dumps(m)  # serialisable, no NaN
    with pytest.raises(ValueError, match="golds"):
        compute_metrics([A], [], LABELS)
    with pytest.raises(ValueError, match="not in the label set"):
        compute_metrics(["/per/per/unknown"], [A], LABELS)


def test_default_label_set_has_twenty_relation_rows():
    m = compute_metrics([NONE], [NONE], DEFAULT_LABELS)
    assert len(m["per_relation"]) == 22 and [r["label"] for r in m["per_relation"][-2:]] == [NONE, INVALID]
    assert len(m["confusion"]) == 21 and len(m["confusion"][NONE]) == 22


def test_baselines():
    train = [NONE] * 6 + [A] * 3 + [B]
    evals = [NONE, NONE, NONE, A]
    b = baselines(train, evals, LABELS, seed=0)
    maj = b["majority"]
    assert maj["label"] == NONE
    assert (maj["precision"], maj["recall"], maj["f1"]) == (0.0, 0.0, 0.0)
    assert maj["accuracy"] == 0.75  # the none share of eval
    rnd = b["random"]
    assert rnd["distribution"] == {NONE: 0.6, A: 0.3, B: 0.1}
    assert rnd["n"] == 4 and 0.0 <= rnd["f1"] <= 1.0
    assert baselines(train, evals, LABELS, seed=0)["random"] == rnd  # seeded
    # the random draws follow the train distribution: a single-label train always draws that label
    only_a = baselines([A, A], [A, NONE], LABELS, seed=3)["random"]
    assert (only_a["precision"], only_a["recall"], only_a["accuracy"]) == (0.5, 1.0, 0.5)
    # ties go to the label that comes first in the set
    assert baselines([B, A], [A], LABELS)["majority"]["label"] == A
    with pytest.raises(ValueError):
        baselines([], [A], LABELS)


def _numbers_only(obj, depth=0):
    assert isinstance(obj, dict)
    for value in obj.values():
        if isinstance(value, dict):
            assert depth == 0, "metrics.json nests at most one level (by split)"
            _numbers_only(value, depth + 1)
        else:
            assert isinstance(value, (int, float)) and not isinstance(value, bool)


def test_write_metrics_files(tmp_path, m):
    m = dict(m, baselines=baselines([NONE, NONE, A], GOLDS, LABELS))
    paths = write_metrics_files(m, tmp_path / "eval")
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    _numbers_only(data)
    assert data["f1"] == approx(6 / 13) and data["precision"] == approx(3 / 7)
    assert data["n"] == 10 and data["invalid_rate"] == 0.2
    assert data["by_case_Nent_Nobj_f1"] == approx(0.5)
    assert data["baseline_majority_f1"] == 0.0 and data["baseline_majority_accuracy"] == 0.4
    assert "baseline_random_f1" in data and "per_relation" not in data
    with paths["per_relation"].open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["label", "precision", "recall", "f1", "support"]
    assert [r["label"] for r in rows] == [A, B, C, D, NONE, INVALID]
    assert float(rows[0]["f1"]) == approx(0.4) and rows[0]["support"] == "3"
    assert (float(rows[-1]["precision"]), float(rows[-1]["f1"]), rows[-1]["support"]) == (0.0, 0.0, "0")
    with paths["confusion"].open() as f:
        conf = list(csv.DictReader(f))
    assert list(conf[0]) == ["actual", "predicted"]
    assert len(conf) == 10  # one row per fact
    assert sorted((r["actual"], r["predicted"]) for r in conf) == sorted(
        (g, INVALID if p is None else p) for g, p in zip(GOLDS, PREDS))


def test_write_metrics_files_by_split(tmp_path, m):
    test_m = compute_metrics([A], [A], LABELS)
    paths = write_metrics_files({"dev": m, "test": test_m}, tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    _numbers_only(data)
    assert set(data) == {"dev", "test"} and data["test"]["f1"] == 1.0
    assert (tmp_path / "dev_per_relation.csv").is_file() and (tmp_path / "test_confusion.csv").is_file()
    assert set(paths) == {"metrics", "dev_per_relation", "dev_confusion", "test_per_relation", "test_confusion"}
    with pytest.raises(ValueError):
        write_metrics_files({"../x": test_m}, tmp_path)
    with pytest.raises(ValueError):
        write_metrics_files({"dev": {"f1": 1.0}}, tmp_path)


def test_write_metrics_files_adds_extra_entries_in_one_write(tmp_path, m):
    write_metrics_files({"dev": m}, tmp_path, extra={"candidates": {"sft": {"dev_f1": 0.5}}})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert set(data) == {"dev", "candidates"} and data["candidates"]["sft"]["dev_f1"] == 0.5
    assert not list(tmp_path.glob("*.tmp"))


# --- the precision-recall-coverage curve of self-consistency ---------------------------------------------------------

def test_coverage_curve_by_hand(tmp_path):
    from morer1.metrics import coverage_curve, write_curve_csv

    r1, r2 = "/per/per/partner", "/org/loc/locate_at"
    golds = [r1, r1, r2, NONE, NONE]
    voted = [r1, r2, r2, r1, None]  # right, wrong relation, right, wrong positive, invalid
    conf = [1.0, 0.4, 0.6, 0.2, 0.0]
    rows = coverage_curve(golds, voted, conf, DEFAULT_LABELS, [0.5, 0.0, 0.3, 1.0, 1.01, 0.5])
    assert [r["threshold"] for r in rows] == [0.0, 0.3, 0.5, 1.0, 1.01]  # sorted, once each
    t0, t3, t5, t10, t101 = rows
    # T=0: nothing abstains; the invalid answer is a wrong positive (MORE): P = 2 right of 5 non-none answers
    assert (t0["coverage"], t0["precision"], t0["recall"], t0["invalid_rate"]) == (1.0, approx(2 / 5), approx(2 / 3),
                                                                                 0.2)
    # T=0.3: the 0.2 and 0.0 answers become none (right for their none gold): P = 2/3, R = 2/3
    assert (t3["coverage"], t3["precision"], t3["recall"], t3["invalid_rate"]) == (0.6, approx(2 / 3), approx(2 / 3),
                                                                                 0.0)
    assert t3["accuracy"] == approx(4 / 5)
    # T=0.5: the wrong relation (0.4) abstains too: P = 1, R = 2/3
    assert (t5["coverage"], t5["precision"], t5["recall"]) == (0.4, 1.0, approx(2 / 3))
    assert (t10["coverage"], t10["precision"], t10["recall"]) == (0.2, 1.0, approx(1 / 3))
    assert (t101["coverage"], t101["precision"], t101["recall"], t101["f1"]) == (0.0, 0.0, 0.0, 0.0)
    path = write_curve_csv(rows, tmp_path / "curve.csv")
    read = list(csv.DictReader(path.open()))
    assert list(read[0]) == ["threshold", "coverage", "precision", "recall", "f1", "accuracy", "invalid_rate", "n"]
    assert [float(r["coverage"]) for r in read] == [1.0, 0.6, 0.4, 0.2, 0.0]
    assert write_curve_csv([], tmp_path / "empty.csv").read_text().split(",")[:2] == ["threshold", "coverage"]


def test_coverage_curve_refuses_mismatched_lists_and_a_set_without_none():
    from morer1.metrics import coverage_curve

    with pytest.raises(ValueError, match="2 golds, 1 answers and 2 confidences"):
        coverage_curve([NONE, NONE], [NONE], [1.0, 1.0], DEFAULT_LABELS, [0.0])
    with pytest.raises(ValueError, match="lacks"):
        coverage_curve(["/a/b/c"], ["/a/b/c"], [1.0], ["/a/b/c"], [0.0])


# --- the pair (cluster) bootstrap -------------------------------------------------------------------------------

def clustered(n_pairs: int, size: int, right_pairs: int, seed: int = 0):
    """`n_pairs` pairs of `size` relation facts each; the model is right on every fact of `right_pairs` of them and
    answers `none` on every fact of the others: errors perfectly correlated within a pair."""
    import random

    rng = random.Random(seed)
    right = set(rng.sample(range(n_pairs), right_pairs))
    golds, preds, pairs = [], [], []
    for p in range(n_pairs):
        for _ in range(size):
            golds.append(A)
            preds.append(A if p in right else NONE)
            pairs.append(f"images/{p}.jpg")
    return golds, preds, pairs


def test_one_pair_has_no_spread_whatever_its_facts():
    """Every resample draws the single pair with all its facts, so the interval is the point: a bootstrap that
    resampled facts would spread."""
    golds, preds = [A, A, B, NONE, NONE, A, B, NONE], [A, NONE, B, A, NONE, None, B, NONE]
    point = compute_metrics(golds, preds, LABELS)
    ci = bootstrap_intervals(golds, preds, ["one.jpg"] * len(golds), LABELS, resamples=200, seed=3)
    assert ci["n_pairs"] == 1 and ci["resamples"] == 200 and ci["confidence"] == 0.95
    for key in ("accuracy", "precision", "recall", "f1"):
        assert ci[key] == [approx(point[key])] * 2


def test_interval_width_follows_the_number_of_pairs_not_of_facts():
    """100 pairs of 10 facts, errors shared within a pair: the accuracy interval must be as wide as 100 independent
    draws give (±1.96 sqrt(p(1-p)/100) ~ ±0.098), not as narrow as 1000 facts would (~ ±0.031)."""
    golds, preds, pairs = clustered(100, 10, right_pairs=50)
    ci = bootstrap_intervals(golds, preds, pairs, LABELS, resamples=2000, seed=0)
    width = ci["accuracy"][1] - ci["accuracy"][0]
    assert 0.16 < width < 0.24, width  # 2 x 0.098 = 0.196; fact resampling would give ~0.062
    assert ci["accuracy"][0] < 0.5 < ci["accuracy"][1]
    # the same facts, each its own pair: much narrower
    facts_ci = bootstrap_intervals(golds, preds, range(len(golds)), LABELS, resamples=2000, seed=0)
    assert facts_ci["accuracy"][1] - facts_ci["accuracy"][0] < width / 2


def test_bootstrap_is_seeded():
    golds, preds, pairs = clustered(40, 3, right_pairs=25)
    a = bootstrap_intervals(golds, preds, pairs, LABELS, resamples=300, seed=7)
    assert a == bootstrap_intervals(golds, preds, pairs, LABELS, resamples=300, seed=7)
    assert a != bootstrap_intervals(golds, preds, pairs, LABELS, resamples=300, seed=8)


def test_interval_counts_invalid_answers_as_wrong_positives():
    """All answers invalid: precision 0 in every resample (MORE: each is a wrong positive), F1 0."""
    golds, _, pairs = clustered(10, 2, right_pairs=0)
    ci = bootstrap_intervals(golds, [None] * len(golds), pairs, LABELS, resamples=100)
    assert ci["precision"] == ci["f1"] == ci["recall"] == [0.0, 0.0] and ci["accuracy"] == [0.0, 0.0]


def test_paired_difference_of_identical_models_is_zero():
    golds, preds, pairs = clustered(30, 4, right_pairs=12)
    c = paired_bootstrap(golds, preds, list(preds), pairs, LABELS, resamples=500)
    for key in ("accuracy", "precision", "recall", "f1"):
        assert (c[f"delta_{key}"], c[f"delta_{key}_lo"], c[f"delta_{key}_hi"], c[f"p_value_{key}"]) == (0, 0, 0, 1)
    assert (c["wins"], c["losses"], c["n"], c["n_pairs"]) == (0, 0, 120, 30)


def test_pairing_separates_a_small_consistent_gain():
    """B is A plus 6 more right pairs out of 200 (A right on 100): alone, each model's interval is ~±0.07 wide and
    they overlap; paired, the same resampled pairs apply to both, the shared errors cancel and the Δ interval lies
    above 0. Losing the pairing (B's answers shuffled against the facts) makes the difference vanish."""
    import random

    golds, preds_a, pairs = clustered(200, 3, right_pairs=100, seed=1)
    wrong_pairs = sorted({pairs[i] for i, p in enumerate(preds_a) if p == NONE})[:6]
    preds_b = [A if pairs[i] in wrong_pairs else p for i, p in enumerate(preds_a)]
    c = paired_bootstrap(golds, preds_b, preds_a, pairs, LABELS, resamples=2000, seed=0)
    assert c["delta_accuracy"] == approx(18 / 600) and (c["wins"], c["losses"]) == (18, 0)
    assert 0 < c["delta_accuracy_lo"] < c["delta_accuracy"] < c["delta_accuracy_hi"]
    assert c["delta_f1_lo"] > 0 and c["p_value_f1"] < 0.01
    ci_a = bootstrap_intervals(golds, preds_a, pairs, LABELS, resamples=2000)
    ci_b = bootstrap_intervals(golds, preds_b, pairs, LABELS, resamples=2000)
    assert ci_b["accuracy"][0] < ci_a["accuracy"][1]  # unpaired, the intervals overlap
    shuffled = list(preds_b)
    random.Random(0).shuffle(shuffled)
    lost = paired_bootstrap(golds, shuffled, preds_a, pairs, LABELS, resamples=2000, seed=0)
    assert lost["delta_accuracy_lo"] < 0 < lost["delta_accuracy_hi"]


def test_paired_p_value_and_sign():
    golds, preds_a, pairs = clustered(50, 2, right_pairs=40, seed=2)
    preds_b = [NONE] * len(golds)  # right nowhere
    c = paired_bootstrap(golds, preds_b, preds_a, pairs, LABELS, resamples=999, seed=0)
    assert c["delta_f1"] < 0 and c["delta_f1_hi"] < 0 and c["p_value_f1"] == approx(2 / 1000)  # no Δ* >= 0
    assert (c["wins"], c["losses"]) == (0, 80)


def test_bootstrap_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="pair keys"):
        bootstrap_intervals([A, B], [A, B], ["x"], LABELS, resamples=10)
    with pytest.raises(ValueError, match="predictions"):
        paired_bootstrap([A, B], [A, B], [A], ["x", "y"], LABELS, resamples=10)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals([A], [A], ["x"], LABELS, resamples=10, confidence=1.0)


def test_baselines_get_intervals_and_flat_bounds(tmp_path):
    golds, preds, pairs = clustered(20, 3, right_pairs=10)
    b = baselines([NONE, NONE, A], golds, LABELS, seed=0, pairs=pairs, resamples=200)
    assert b["majority"]["intervals"]["f1"] == [0.0, 0.0]  # always none: F1 0 in every resample
    assert b["random"]["intervals"]["accuracy"][0] <= b["random"]["accuracy"] <= b["random"]["intervals"]["accuracy"][1]
    m = compute_metrics(golds, preds, LABELS)
    m["intervals"] = bootstrap_intervals(golds, preds, pairs, LABELS, resamples=200)
    m["baselines"] = b
    flat = flat_metrics(m)
    assert flat["f1_lo"] == m["intervals"]["f1"][0] and flat["accuracy_hi"] == m["intervals"]["accuracy"][1]
    assert flat["baseline_random_f1_lo"] == b["random"]["intervals"]["f1"][0]
    assert "baseline_random_recall_lo" not in flat  # baselines: F1 and accuracy only, as their point values


def test_drawing_more_pairs_narrows_the_paired_interval_by_their_square_root():
    """`draw`: a resample of 4x the pairs is a split 4x as large drawn like this one: half the width."""
    golds, preds_a, pairs = clustered(100, 3, right_pairs=50, seed=4)
    preds_b = [NONE if i % 7 == 0 else p for i, p in enumerate(preds_a)]
    own = paired_bootstrap(golds, preds_a, preds_b, pairs, LABELS, resamples=3000, seed=0)
    big = paired_bootstrap(golds, preds_a, preds_b, pairs, LABELS, resamples=3000, seed=0, draw=400)
    ratio = (big["delta_f1_hi"] - big["delta_f1_lo"]) / (own["delta_f1_hi"] - own["delta_f1_lo"])
    assert 0.4 < ratio < 0.6, ratio
    assert big["delta_f1"] == own["delta_f1"]  # the observed difference is the split's own
