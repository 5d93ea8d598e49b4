"""The evaluate stage picks the model on dev only; every candidate is reported on test beside it."""

import json

from morer1 import evaluate as ev
from morer1.labels import DEFAULT_LABELS


def _fact(split, i, relation):
    return {"id": f"{split}-{i:06d}", "relation": relation, "pair_entities": 1 + i % 2, "pair_objects": 1 + i % 3,
            "image": "images/x.jpg", "object": {"box": [0, 0, 1, 1], "crop": "crops/x.png", "name": "o"},
            "text": "t", "tokens": ["t"], "entity": {"name": "t", "start": 0, "end": 1}}


def test_model_is_chosen_on_dev_and_every_candidate_is_reported_on_test(tmp_path, monkeypatch):
    facts = tmp_path / "facts"
    facts.mkdir()
    rels = ["none", "/per/per/partner", "/org/loc/locate_at", "none"]
    for split in ("train", "dev", "test"):
        (facts / f"{split}.jsonl").write_text("".join(json.dumps(_fact(split, i, r)) + "\n" for i, r in enumerate(rels)))
    (facts / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    calls = []

    def scripted(model, rows, facts_dir, labels, cfg):
        """`good` is right on dev and wrong on test; `bad` the reverse: test must not decide."""
        calls.append((model, rows[0]["id"].split("-")[0]))
        right = (model == "good") == rows[0]["id"].startswith("dev")
        return [{**r, "completion": "", "predicted": r["relation"] if right else None} for r in rows]

    monkeypatch.setattr(ev, "predict_facts", scripted)
    import morer1.report

    monkeypatch.setattr(morer1.report, "write_report", lambda *a, **k: tmp_path / "r.html")
    summary = ev.evaluate(facts, tmp_path / "out", ev.EvaluateConfig(models=("bad", "good")))
    assert summary["selection"]["chosen"] == "good"
    assert calls == [("bad", "dev"), ("good", "dev"), ("bad", "test"), ("good", "test")]
    assert summary["results"]["dev"]["f1"] == 1.0 and summary["results"]["test"]["f1"] == 0.0
    assert summary["selection"]["test"] == {"bad": 1.0, "good": 0.0}  # bad is better on test, still not chosen
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["candidates"]["good"]["dev_f1"] == 1.0 and metrics["candidates"]["good"]["test_f1"] == 0.0
    assert metrics["candidates"]["bad"]["test_f1"] == 1.0 and metrics["candidates"]["bad"]["dev_invalid_rate"] == 1.0
    assert metrics["dev"]["f1"] == 1.0 and metrics["test"]["invalid_rate"] == 1.0
    assert "baseline_majority_f1" in metrics["test"]
    assert (tmp_path / "out" / "test_confusion.csv").read_text().startswith("actual,predicted")


def test_sample_facts_is_seeded_and_keeps_order():
    facts = [{"id": i} for i in range(50)]
    a = ev.sample_facts(facts, 10, seed=1)
    assert a == ev.sample_facts(facts, 10, seed=1) and [f["id"] for f in a] == sorted(f["id"] for f in a)
    assert ev.sample_facts(facts, None, 0) == facts
