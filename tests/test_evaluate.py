"""The evaluate stage picks the model on dev only; every candidate is reported on test beside it; chosen.json holds
what register needs."""

import csv
import json

import mlflow
import pytest

from configs import small_config

from morer1.files import folder_sha256
from morer1 import evaluate as ev
from morer1.errors import BadInputError
from morer1.labels import DEFAULT_LABELS
from morer1.metrics import INTERVAL_KEYS, SUMMARY_KEYS


def _fact(split, i, relation):
    return {"id": f"{split}-{i:06d}", "relation": relation, "pair_entities": 1 + i % 2, "pair_objects": 1 + i % 3,
            "image": "images/x.jpg", "object": {"box": [0, 0, 1, 1], "crop": "crops/x.png", "name": "o"},
            "text": "t", "tokens": ["t"], "entity": {"name": "t", "start": 0, "end": 1}}


@pytest.fixture
def facts(tmp_path):
    facts = tmp_path / "facts"
    facts.mkdir()
    rels = ["none", "/per/per/partner", "/org/loc/locate_at", "none"]
    for split in ("train", "dev", "test"):
        lines = [json.dumps(_fact(split, i, r)) + "\n" for i, r in enumerate(rels)]
        (facts / f"{split}.jsonl").write_text("".join(lines))
    (facts / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    for name in ("images/x.jpg", "crops/x.png"):  # the photo and crop every fact names (fingerprinted, not decoded)
        (facts / name).parent.mkdir(exist_ok=True)
        (facts / name).write_bytes(b"pixels")
    return facts


def test_model_is_chosen_on_dev_and_every_candidate_is_reported_on_test(tmp_path, facts, monkeypatch):
    models = []
    for name in ("bad", "good"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text(name)
        models.append(str(tmp_path / name))
    calls = []

    def scripted(model, rows, facts_dir, labels, cfg):
        """`good` is right on dev and wrong on test; `bad` the reverse: test must not decide."""
        calls.append((model, rows[0]["id"].split("-")[0]))
        right = model.endswith("good") == rows[0]["id"].startswith("dev")
        return [{**r, "completion": "", "predicted": r["relation"] if right else None} for r in rows]

    def voted(model, rows, facts_dir, labels, cfg):
        """Self-consistency of the chosen model: right with confidence 1 on the first two facts, a wrong relation
        with confidence 0.4 on the third, no valid vote on the fourth (whose gold is none)."""
        calls.append((model, rows[0]["id"].split("-")[0], "sc"))
        answers = [(rows[0]["relation"], 1.0), (rows[1]["relation"], 1.0), ("/per/per/partner", 0.4), (None, 0.0)]
        return [{**r, "completion": "c", "predicted": p, "confidence": c, "votes": {}} for r, (p, c) in zip(rows, answers)]

    monkeypatch.setattr(ev, "predict_facts", scripted)
    monkeypatch.setattr(ev, "vote_facts", voted)
    out = tmp_path / "out"
    summary = ev.run(small_config(ev.EvaluateConfig), facts, models, out)
    assert summary["chosen"] == models[1]
    assert calls == [(models[0], "dev"), (models[1], "dev"), (models[0], "test"), (models[1], "test"),
                     (models[1], "dev", "sc"), (models[1], "test", "sc")]  # only the chosen model, after test
    assert summary["dev_f1"] == 1.0 and summary["test_f1"] == 0.0
    assert summary["candidates"]["bad"]["test_f1"] == 1.0  # bad is better on test, still not chosen
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["candidates"] == summary["candidates"]
    assert metrics["candidates"]["good"]["dev_f1"] == 1.0 and metrics["candidates"]["good"]["test_f1"] == 0.0
    assert metrics["candidates"]["bad"]["test_f1"] == 1.0 and metrics["candidates"]["bad"]["dev_invalid_rate"] == 1.0
    assert metrics["dev"]["f1"] == 1.0 and metrics["test"]["invalid_rate"] == 1.0
    assert "baseline_majority_f1" in metrics["test"]
    assert (out / "test_confusion.csv").read_text().startswith("actual,predicted")
    assert (out / "report" / "index.html").is_file() and not (out / "report.partial").exists()
    assert [json.loads(line)["id"] for line in (out / "predictions_dev.jsonl").read_text().splitlines()] == [
        f"dev-{i:06d}" for i in range(4)]

    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["model_dir"] == models[1] and chosen["model_sha256"] == folder_sha256(models[1])
    assert chosen["labels"] == list(DEFAULT_LABELS)
    # the evaluation the dev metrics came from, which register tags the version with and promotion compares
    assert chosen["dev_set"] == ev.dev_set(facts, None, 0).sha256
    assert chosen["dev_eval"] == {"max_facts": None, "seed": 0, "max_new_tokens": 256, "batch_size": 8}
    assert chosen["metrics"] == {**{f"{split}_{k}": metrics[split][k] for split in ("dev", "test") for k in SUMMARY_KEYS},
                                 **{f"{split}_{k}_{end}": metrics[split][f"{k}_{end}"] for split in ("dev", "test")
                                    for k in INTERVAL_KEYS for end in ("lo", "hi")}}
    assert chosen["dev_predictions"] == "predictions_dev.jsonl"
    # every candidate's answers, for paired analyses: bad is right on test only
    for name, split, right in (("bad", "test", True), ("bad", "dev", False), ("good", "dev", True)):
        lines = [json.loads(x) for x in (out / "candidates" / name / f"predictions_{split}.jsonl").read_text().splitlines()]
        assert [r["predicted"] == r["relation"] for r in lines] == [right] * 4
    assert not (out / "candidates.partial").exists()
    assert {"id", "image", "relation", "predicted"} <= set(json.loads((out / "predictions_dev.jsonl").open().readline()))

    # intervals beside every headline figure and the paired comparison of the two candidates
    assert metrics["dev"]["f1_lo"] <= metrics["dev"]["f1"] <= metrics["dev"]["f1_hi"]
    assert "baseline_majority_f1_lo" in metrics["test"] and "baseline_random_accuracy_hi" in metrics["dev"]
    assert metrics["candidates"]["bad"]["test_f1_lo"] <= 1.0 == metrics["candidates"]["bad"]["test_f1_hi"]
    paired = metrics["comparisons"]["good_vs_bad"]
    assert paired["dev"]["delta_f1"] == 1.0 and paired["test"]["delta_f1"] == -1.0  # good minus bad
    assert (paired["dev"]["wins"], paired["dev"]["losses"], paired["dev"]["n"], paired["dev"]["n_pairs"]) == (4, 0, 4, 1)

    # greedy beside self-consistency: on test greedy is all invalid; the votes give one right relation of three
    # non-none answers (a wrong relation, an invalid one) and one of two gold relations
    sc = json.loads((out / "self_consistency.json").read_text())
    assert (sc["samples"], sc["temperature"], sc["abstain_below"]) == (5, 0.7, 0.6)
    assert sc["test"]["greedy"]["f1"] == 0.0 and sc["test"]["greedy"]["invalid_rate"] == 1.0
    assert sc["test"]["self_consistency"]["precision"] == 1 / 3 and sc["test"]["self_consistency"]["recall"] == 0.5
    # abstaining below 0.6 turns the wrong relation and the invalid answer into none: precision 1, recall kept
    assert sc["test"]["abstain"]["precision"] == 1.0 and sc["test"]["abstain"]["recall"] == 0.5
    assert sc["test"]["abstain"]["coverage"] == 0.5
    assert sc["dev"]["abstain"]["accuracy"] == 0.75 and sc["dev"]["greedy"]["accuracy"] == 1.0
    curve = list(csv.DictReader((out / "pr_coverage.csv").open()))
    assert [float(r["threshold"]) for r in curve] == [i / 20 for i in range(21)]  # K=5: its shares are on the grid
    assert [float(r["coverage"]) for r in curve if float(r["threshold"]) in (0.0, 0.4, 0.45, 1.0)] == [1.0, .75, .5, .5]
    assert curve == [{k: str(v) for k, v in row.items()} for row in sc["test"]["curve"]]
    page = (out / "report" / "index.html").read_text()
    assert "<h2>Self-consistency</h2>" in page and page.count("<svg") == 2 and "abstain below 0.6000" in page
    assert "://" not in page.replace("xmlns='http://www.w3.org/2000/svg'", "")  # offline: nothing fetched

    [run] = mlflow.search_runs(experiment_names=["morer1"], output_format="list")
    assert run.data.metrics["sc.test.abstain_precision"] == 1.0 and run.data.metrics["sc.test.precision"] == 1 / 3
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"self_consistency.json", "pr_coverage.csv"} <= artifacts
    assert run.data.tags["morer1.stage"] == "evaluate" and run.data.tags["morer1.chosen_model"] == models[1]
    assert run.data.metrics["test_f1"] == 0.0 and run.data.metrics["candidates.bad.test_f1"] == 1.0
    assert run.data.metrics["test_f1_lo"] == metrics["test"]["f1_lo"] and "dev_accuracy_hi" in run.data.metrics
    assert run.data.metrics["comparisons.good_vs_bad.dev.delta_f1"] == 1.0
    assert "Paired comparisons" in page and "good_vs_bad" in page
    assert run.data.params["evaluate.selection_metric"] == "f1"


def test_self_consistency_off_writes_empty_outputs(tmp_path, facts, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.setattr(ev, "predict_facts", lambda model, rows, *a: [{**r, "completion": "", "predicted": "none"}
                                                                       for r in rows])
    monkeypatch.setattr(ev, "vote_facts", lambda *a: pytest.fail("sc_samples 0: no sampling"))
    summary = ev.run(small_config(ev.EvaluateConfig, sc_samples=0), facts, [str(tmp_path / "m")], tmp_path / "out")
    assert "sc" not in summary
    assert json.loads((tmp_path / "out" / "self_consistency.json").read_text()) == {"samples": 0}
    assert (tmp_path / "out" / "pr_coverage.csv").read_text().startswith("threshold,coverage,precision")
    assert "Self-consistency" not in (tmp_path / "out" / "report" / "index.html").read_text()


def test_candidates_need_distinct_folder_names(tmp_path, facts):
    with pytest.raises(BadInputError, match="distinct folder names"):
        ev.run(small_config(ev.EvaluateConfig), facts, [str(tmp_path / "a" / "sft"), str(tmp_path / "b" / "sft")], tmp_path / "out")


def test_folder_sha256_follows_names_and_contents(tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "w").write_text("x")
    first = folder_sha256(tmp_path / "m")
    (tmp_path / "m" / "sub" / "w").write_text("y")
    assert folder_sha256(tmp_path / "m") != first
    (tmp_path / "m" / "sub" / "w").write_text("x")
    assert folder_sha256(tmp_path / "m") == first
    (tmp_path / "m" / "sub" / "w").rename(tmp_path / "m" / "sub" / "v")
    assert folder_sha256(tmp_path / "m") != first


def test_sample_facts_is_seeded_and_keeps_order():
    facts = [{"id": i} for i in range(50)]
    a = ev.sample_facts(facts, 10, seed=1)
    assert a == ev.sample_facts(facts, 10, seed=1) and [f["id"] for f in a] == sorted(f["id"] for f in a)
    assert ev.sample_facts(facts, None, 0) == facts


def _rows(model_right: list[bool], n_pairs: int = 5):
    golds = ["/per/per/partner" if i % 3 else "none" for i in range(len(model_right))]
    return [{"id": f"dev-{i:06d}", "image": f"images/dev/{i % n_pairs}.jpg", "relation": g,
             "predicted": g if ok else "/org/loc/locate_at"} for i, (g, ok) in enumerate(zip(golds, model_right))]


def test_compare_pairs_rows_by_fact_id_not_by_position():
    """The same two models' rows in another order give the same comparison; a row list that holds other facts is
    refused, not silently paired."""
    cfg = small_config(ev.EvaluateConfig, bootstrap_resamples=300)
    a = _rows([True] * 30)
    b = _rows([i % 4 != 0 for i in range(30)])
    expected = ev.compare(a, b, DEFAULT_LABELS, cfg)
    assert (expected["wins"], expected["losses"]) == (8, 0) and expected["delta_accuracy"] == pytest.approx(8 / 30)
    assert ev.compare(a, list(reversed(b)), DEFAULT_LABELS, cfg) == expected
    with pytest.raises(BadInputError, match="same facts"):
        ev.compare(a, b[:-1] + [{**b[-1], "id": "dev-999999"}], DEFAULT_LABELS, cfg)
    with pytest.raises(BadInputError, match="gold"):
        ev.compare(a, b[:-1] + [{**b[-1], "relation": "none"}], DEFAULT_LABELS, cfg)


def test_self_consistency_on_a_sample_compares_greedy_on_the_same_facts(tmp_path, facts, monkeypatch):
    """sc_max_facts 2: two facts per split are voted on, and greedy's figures beside them are over those two."""
    (tmp_path / "m").mkdir()
    sampled = {}

    def greedy(model, rows, *a):  # right on the first two facts of each split only
        return [{**r, "completion": "", "predicted": r["relation"] if i < 2 else "/per/org/member_of"}
                for i, r in enumerate(rows)]

    def voted(model, rows, *a):
        sampled[rows[0]["id"].split("-")[0]] = [r["id"] for r in rows]
        return [{**r, "completion": "c", "predicted": r["relation"], "confidence": 1.0, "votes": {}} for r in rows]

    monkeypatch.setattr(ev, "predict_facts", greedy)
    monkeypatch.setattr(ev, "vote_facts", voted)
    cfg = small_config(ev.EvaluateConfig, sc_max_facts=2, seed=5)  # samples facts 2 and 3: greedy wrong on both
    ev.run(cfg, facts, [str(tmp_path / "m")], tmp_path / "out")
    sc = json.loads((tmp_path / "out" / "self_consistency.json").read_text())
    for split in ("dev", "test"):
        ids = [f"{split}-{i:06d}" for i in range(4)]
        assert sampled[split] == [f["id"] for f in ev.sample_facts([{"id": i} for i in ids], 2, cfg.seed)]
        assert sc[split]["self_consistency"]["n"] == sc[split]["greedy"]["n"] == 2
        assert sampled[split] == [f"{split}-000002", f"{split}-000003"]
        # over all four facts greedy's accuracy would be 0.5
        assert sc[split]["greedy"]["accuracy"] == 0.0 and sc[split]["self_consistency"]["accuracy"] == 1.0
