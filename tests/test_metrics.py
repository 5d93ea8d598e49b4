"""MORE metrics against hand-computed values (DESIGN §1)."""

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
    (A, None, 1, 2),     # 3 invalid on a relation: miss for recall, not in the precision denominator
    (B, B, 1, 2),        # 4 right relation
    (B, NONE, 2, 1),     # 5 missed relation
    (NONE, NONE, 2, 1),  # 6 right none: counts for accuracy only
    (NONE, A, 3, 2),     # 7 false relation
    (NONE, None, 2, 5),  # 8 invalid on none
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
    # non-none predictions (valid, not none): 1 A, 2 B, 4 B, 7 A, 9 C = 5; right among them: 1, 4, 9 = 3
    assert m["precision"] == approx(3 / 5)
    # gold non-none: 1, 2, 3, 4, 5, 9 = 6 (fact 3, invalid, is a miss)
    assert m["recall"] == approx(3 / 6)
    assert m["f1"] == approx(2 * 0.6 * 0.5 / 1.1)  # 6/11
    # invalid: 3 and 8
    assert m["invalid_rate"] == approx(0.2)
    assert m["n_invalid"] == 2


def test_macro_by_hand(m):
    # A: support 3 (1,2,3), predicted 2 (1,7), right 1 -> P 1/2, R 1/3, F1 2/5
    # B: support 2 (4,5),   predicted 2 (2,4), right 1 -> P 1/2, R 1/2, F1 1/2
    # C: support 1,         predicted 1,       right 1 -> P 1,   R 1,   F1 1
    # D: never gold nor predicted -> left out of the macro set
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
    assert [r["label"] for r in m["per_relation"]] == [A, B, C, D, NONE]  # relations in set order, then none
    assert rows[A] == {"label": A, "support": 3, "predicted": 2, "correct": 1, "precision": approx(0.5),
                       "recall": approx(1 / 3), "f1": approx(0.4)}
    assert (rows[B]["support"], rows[B]["predicted"], rows[B]["correct"], rows[B]["f1"]) == (2, 2, 1, approx(0.5))
    assert (rows[C]["precision"], rows[C]["recall"], rows[C]["f1"]) == (1.0, 1.0, 1.0)
    assert rows[D] == {"label": D, "support": 0, "predicted": 0, "correct": 0, "precision": 0.0, "recall": 0.0,
                       "f1": 0.0}
    # none, for information: support 6,7,8,10; predicted 5,6,10; right 6,10
    assert (rows[NONE]["support"], rows[NONE]["predicted"], rows[NONE]["correct"]) == (4, 3, 2)
    assert rows[NONE]["precision"] == approx(2 / 3) and rows[NONE]["recall"] == approx(0.5)


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
    # 1ent_Nobj: facts 3, 4 -> (A,invalid) (B,B): acc 1/2, P 1/1, R 1/2, F1 2/3, invalid 1/2
    s = bc["1ent_Nobj"]
    assert (s["n"], s["accuracy"], s["precision"], s["recall"], s["invalid_rate"]) == (2, 0.5, 1.0, 0.5, 0.5)
    assert s["f1"] == approx(2 / 3)
    # Nent_1obj: facts 5, 6 -> (B,none) (none,none): acc 1/2, no non-none prediction -> P 0, R 0/1, F1 0
    assert bc["Nent_1obj"] == {"n": 2, "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                               "invalid_rate": 0.0}
    # Nent_Nobj: facts 7-10 -> (none,A) (none,invalid) (C,C) (none,none): acc 2/4, P 1/2, R 1/1, F1 2/3
    s = bc["Nent_Nobj"]
    assert (s["n"], s["accuracy"], s["precision"], s["recall"]) == (4, 0.5, 0.5, 1.0)
    assert s["f1"] == approx(2 / 3)


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
    # gold A, A; answers A and invalid: accuracy 1/2, P 1/1 (invalid not a prediction), R 1/2
    m = compute_metrics([A, A], [A, None], LABELS)
    assert m["accuracy"] == 0.5
    assert m["precision"] == 1.0
    assert m["recall"] == 0.5
    assert m["invalid_rate"] == 0.5
    # an invalid answer on a none gold is wrong for accuracy and nowhere else
    m = compute_metrics([NONE, NONE], [None, NONE], LABELS)
    assert (m["accuracy"], m["precision"], m["recall"], m["invalid_rate"]) == (0.5, 0.0, 0.0, 0.5)
    # an out-of-set string is an invalid answer
    m = compute_metrics([A, NONE], ["/per/per/nonsense", "NONE"], LABELS)
    assert m["invalid_rate"] == 1.0 and m["accuracy"] == 0.0
    assert m["confusion"][A][INVALID] == 1 and m["confusion"][NONE][INVALID] == 1


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
    assert len(m["per_relation"]) == 21 and m["per_relation"][-1]["label"] == NONE
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
    assert data["f1"] == approx(6 / 11) and data["n"] == 10 and data["invalid_rate"] == 0.2
    assert data["by_case_Nent_Nobj_f1"] == approx(2 / 3)
    assert data["baseline_majority_f1"] == 0.0 and data["baseline_majority_accuracy"] == 0.4
    assert "baseline_random_f1" in data and "per_relation" not in data
    with paths["per_relation"].open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["label", "precision", "recall", "f1", "support"]
    assert [r["label"] for r in rows] == [A, B, C, D, NONE]
    assert float(rows[0]["f1"]) == approx(0.4) and rows[0]["support"] == "3"
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
