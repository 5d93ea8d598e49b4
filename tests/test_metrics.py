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
from morer1.metrics import INVALID, baselines, compute_metrics, write_metrics_files

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
