"""The evaluate stage picks the model on dev only; every candidate is reported on test beside it; chosen.json holds
what register needs."""

import json

import mlflow
import pytest

from configs import small_config

from morer1.files import folder_sha256
from morer1 import evaluate as ev
from morer1.errors import BadInputError
from morer1.labels import DEFAULT_LABELS
from morer1.metrics import SUMMARY_KEYS


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

    monkeypatch.setattr(ev, "predict_facts", scripted)
    out = tmp_path / "out"
    summary = ev.run(small_config(ev.EvaluateConfig), facts, models, out)
    assert summary["chosen"] == models[1]
    assert calls == [(models[0], "dev"), (models[1], "dev"), (models[0], "test"), (models[1], "test")]
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
    assert chosen["metrics"] == {f"{split}_{k}": metrics[split][k] for split in ("dev", "test") for k in SUMMARY_KEYS}

    [run] = mlflow.search_runs(experiment_names=["morer1"], output_format="list")
    assert run.data.tags["morer1.stage"] == "evaluate" and run.data.tags["morer1.chosen_model"] == models[1]
    assert run.data.metrics["test_f1"] == 0.0 and run.data.metrics["candidates.bad.test_f1"] == 1.0
    assert run.data.params["evaluate.selection_metric"] == "f1"


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
