"""Self-consistency: the vote (pure), then with the tiny model: K samples of a fact from one generate call, votes and
confidences from the parsed samples, abstention, and the served model's `samples` / `abstain_below` params."""

import json
import math

import mlflow
import pandas as pd
import pytest
from PIL import Image

from configs import small_config
from morer1 import evaluate as ev
from morer1 import serve
from morer1.consistency import abstain, vote
from morer1.errors import BadInputError
from morer1.labels import DEFAULT_LABELS
from morer1.parsing import parse_completion
from morer1.prompt import prompt_text
from morer1.serve import MorePredictor, RefusedInputError
from morer1.tiny_model import TinyModelConfig, build_tiny_model

LABELS = list(DEFAULT_LABELS)
PARTNER, LOCATE = "/per/per/partner", "/org/loc/locate_at"


def answer(label: str) -> str:
    return f"<think>Step 1: {label}</think><answer>{label}</answer>"


# --- the vote ----------------------------------------------------------------------------------------------------

def test_majority_vote_confidence_and_winning_rationale():
    samples = [answer(PARTNER), "garbage", answer("none"), answer(PARTNER), answer(LOCATE)]
    v = vote(samples, LABELS)
    assert (v.label, v.voted, v.votes) == (PARTNER, PARTNER, {PARTNER: 2, "none": 1, LOCATE: 1})
    assert v.confidence == 2 / 5  # the invalid sample counts in K, casts no vote
    assert v.completion == samples[0] and not v.abstained


def test_tie_goes_to_the_label_voted_first():
    assert vote([answer(LOCATE), answer(PARTNER), answer(PARTNER), answer(LOCATE)], LABELS).label == LOCATE
    assert vote([answer(PARTNER), answer(LOCATE), answer(LOCATE), answer(PARTNER)], LABELS).label == PARTNER
    second = vote(["x", answer("none"), answer(PARTNER)], LABELS)
    assert second.label == "none" and second.completion == answer("none") and second.confidence == 1 / 3


def test_no_valid_sample_is_an_invalid_answer_that_abstention_turns_into_none():
    v = vote(["a", "b <answer>nope</answer>"], LABELS)
    assert (v.label, v.confidence, v.completion, v.votes) == (None, 0.0, "a", {})
    assert vote(["a", "b"], LABELS, abstain_below=0.01).label == "none"


def test_abstention_below_the_threshold():
    samples = [answer(PARTNER)] * 3 + [answer(LOCATE)] * 2
    assert vote(samples, LABELS, abstain_below=0.6).label == PARTNER  # 0.6 is not below 0.6
    v = vote(samples, LABELS, abstain_below=0.61)
    assert (v.label, v.voted, v.confidence, v.abstained) == ("none", PARTNER, 0.6, True)
    assert vote([answer(PARTNER)], LABELS, abstain_below=1.0).label == PARTNER
    assert vote([answer(PARTNER)], LABELS, abstain_below=1.01).label == "none"
    assert abstain("none", 0.1, 0.5) == "none" and abstain(None, 0.0, 0.0) is None
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="abstain_below"):
            vote([answer(PARTNER)], LABELS, abstain_below=bad)
    with pytest.raises(ValueError, match="at least one"):
        vote([], LABELS)


# --- with the tiny model -----------------------------------------------------------------------------------------

SCRIPT = [answer("none"), answer(PARTNER), answer(LOCATE), "no answer"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model and four dev facts with their photo and crop."""
    root = tmp_path_factory.mktemp("sc")
    facts_dir = root / "facts"
    (facts_dir / "images").mkdir(parents=True)
    (facts_dir / "crops").mkdir()
    Image.new("RGB", (96, 64), (20, 120, 200)).save(facts_dir / "images/a.jpg")
    facts = []
    for i, rel in enumerate(["none", PARTNER, LOCATE, "none"]):
        crop = f"crops/dev-{i}.png"
        Image.new("RGB", (20 + 10 * i, 30), (200, 40 * i, 0)).save(facts_dir / crop)
        facts.append({"id": f"dev-{i:06d}", "relation": rel, "image": "images/a.jpg", "text": f"Alice meets Bob {i}",
                      "tokens": ["Alice", "meets", "Bob", str(i)], "entity": {"name": "Bob", "start": 2, "end": 3},
                      "object": {"box": [0, 0, 20 + 10 * i, 30], "crop": crop, "name": "o"},
                      "pair_entities": 1, "pair_objects": 1})
    (facts_dir / "labels.json").write_text(json.dumps(LABELS))
    corpus = [prompt_text(f["text"], "Bob", LABELS) for f in facts] + SCRIPT * 5
    build_tiny_model(root / "model", corpus, small_config(TinyModelConfig, vocab_size=600))
    (root / "labels.json").write_text(json.dumps(LABELS))
    return {"root": root, "facts_dir": facts_dir, "facts": facts, "model": root / "model"}


@pytest.fixture
def spied(monkeypatch):
    """Spies on every `generate` call (its generation config, the sequences it returns) and on every decode.

    The tiny model has random weights, so its completions never parse. Each decoded completion is therefore replaced
    by a scripted answer picked by the completion's real text (SCRIPT[hash of text % 4]): what votes still depends on
    what the model sampled, and gives every vote outcome. `decoded` holds the strings the voting code received."""
    from transformers import GenerationMixin, ProcessorMixin

    calls, decoded = [], []
    generate, batch_decode = GenerationMixin.generate, ProcessorMixin.batch_decode

    def spy_generate(self, *args, **kwargs):
        sequences = generate(self, *args, **kwargs)
        config = kwargs["generation_config"]
        calls.append({"prompts": kwargs["input_ids"].shape[0], "sequences": sequences.shape[0],
                      "num_return_sequences": config.num_return_sequences, "do_sample": config.do_sample,
                      "temperature": config.temperature})
        return sequences

    def spy_decode(self, *args, **kwargs):
        texts = [SCRIPT[sum(map(ord, text)) % len(SCRIPT)] for text in batch_decode(self, *args, **kwargs)]
        decoded.extend(texts)
        return texts

    monkeypatch.setattr(GenerationMixin, "generate", spy_generate)
    monkeypatch.setattr(ProcessorMixin, "batch_decode", spy_decode)
    return calls, decoded


def test_k_samples_of_a_fact_come_from_one_generate_call_and_are_voted(tiny, spied):
    calls, decoded = spied
    cfg = small_config(ev.EvaluateConfig, max_new_tokens=6, batch_size=2, sc_samples=3, sc_temperature=1.5)
    rows = ev.vote_facts(tiny["model"], tiny["facts"], tiny["facts_dir"], LABELS, cfg)
    # two facts per call: two calls for four facts, each drawing K sequences per fact
    assert calls == [{"prompts": 2, "sequences": 6, "num_return_sequences": 3, "do_sample": True,
                      "temperature": 1.5}] * 2
    assert len(decoded) == 4 * 3
    for i, row in enumerate(rows):
        samples = decoded[3 * i:3 * i + 3]
        parsed = [parse_completion(s, LABELS).label for s in samples]
        counts = {lab: parsed.count(lab) for lab in parsed if lab is not None}
        assert row["votes"] == counts and row["id"] == tiny["facts"][i]["id"]
        assert row["confidence"] == (max(counts.values()) / 3 if counts else 0.0)
        assert row["predicted"] == (max(counts, key=counts.get) if counts else None)
        assert row["completion"] in samples
    assert {row["confidence"] for row in rows} - {0.0} and len({row["predicted"] for row in rows}) > 1
    assert ev.vote_facts(tiny["model"], tiny["facts"], tiny["facts_dir"], LABELS, cfg) == rows  # seeded


def frame(n: int) -> pd.DataFrame:
    from test_serve_inputs import GOOD

    return pd.DataFrame([GOOD] * n)


def test_served_model_samples_votes_and_abstains(tiny, spied):
    calls, decoded = spied
    predictor = MorePredictor()
    predictor.load(tiny["model"], LABELS, {"max_new_tokens": 6, "batch_size": 4, "max_samples": 4})

    greedy = predictor.predict(frame(3))  # no params: greedy exactly as before, one sequence per row
    assert calls[-1]["num_return_sequences"] == 1 and not calls[-1]["do_sample"] and len(decoded) == 3
    assert greedy["completion"].tolist() == decoded
    assert greedy["label"].tolist() == [parse_completion(c, LABELS).label for c in decoded]
    assert greedy["confidence"].tolist() == [1.0 if lab is not None else 0.0 for lab in greedy["label"]]

    calls.clear(), decoded.clear()
    sampled = predictor.predict(frame(3), params={"samples": 3})
    assert len(calls) == 1 and calls[0]["num_return_sequences"] == 3 and calls[0]["sequences"] == 9
    assert set(sampled["confidence"]) <= {0.0, 1 / 3, 2 / 3, 1.0} and len(set(sampled["confidence"])) > 1
    for i, row in sampled.iterrows():
        expected = vote(decoded[3 * i:3 * i + 3], LABELS)
        assert (row["label"], row["confidence"], row["completion"]) == (
            expected.label, expected.confidence, expected.completion)

    assert sampled["label"].tolist() != ["none"] * 3
    abstained = predictor.predict(frame(3), params={"samples": 3, "abstain_below": 1.01})
    assert abstained["label"].tolist() == ["none"] * 3
    assert abstained["confidence"].tolist() == sampled["confidence"].tolist()  # the same seeded samples

    for params, message in (({"samples": 5}, "samples must be an integer from 1 to max_samples=4"),
                            ({"samples": 0}, "samples must be"), ({"samples": 2.5}, "samples must be"),
                            ({"abstain_below": -1}, "abstain_below must be a number >= 0")):
        with pytest.raises(RefusedInputError, match=message):
            predictor.predict(frame(1), params=params)


def test_the_logged_model_declares_the_params_over_rest(tiny, spied):
    """log_predictor's signature declares samples / abstain_below: MLflow passes them to the model (it drops params
    a signature does not declare), and the scoring server refuses samples beyond max_samples with a 400."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from morer1 import tracking
    from morer1.registry import RegisterConfig, log_predictor

    tracking.setup()
    with mlflow.start_run():
        uri = log_predictor(tiny["model"], tiny["root"] / "labels.json",
                            small_config(RegisterConfig, max_new_tokens=6, batch_size=2, max_samples=3))
    model = mlflow.pyfunc.load_model(uri)
    assert {p.name: p.default for p in model.metadata.signature.params.params} == {"samples": 1, "abstain_below": 0.0}
    client = TestClient(scoring_server.init(model))
    records = frame(2).to_dict("records")
    reply = client.post("/invocations", json={"dataframe_records": records, "params": {"samples": 3}})
    assert reply.status_code == 200, reply.text
    confidences = [p["confidence"] for p in reply.json()["predictions"]]
    assert set(confidences) <= {0.0, 1 / 3, 2 / 3, 1.0}
    assert spied[0][-1]["num_return_sequences"] == 3 and spied[0][-1]["sequences"] == 6  # the params reached it
    reply = client.post("/invocations", json={"dataframe_records": records,
                                              "params": {"samples": 3, "abstain_below": 1.01}})
    assert [p["label"] for p in reply.json()["predictions"]] == ["none", "none"]
    refused = client.post("/invocations", json={"dataframe_records": records, "params": {"samples": 100}})
    assert refused.status_code == 400 and "max_samples=3" in refused.json()["message"]


def test_cli_predict_sends_samples_and_abstention(tiny, spied, tmp_path, capsys):
    from morer1.cli import main

    from test_serve_inputs import PHOTO

    PHOTO.save(tmp_path / "photo.png")
    question = ["predict", "--model", str(tiny["model"]), "--image", str(tmp_path / "photo.png"), "--title",
                "Angela Merkel speaks in Berlin", "--entity", "Berlin", "--box", "10", "8", "50", "40"]
    main(question + ["--samples", "3", "--abstain-below", "1.01"])
    out = capsys.readouterr().out
    assert "label: none\nconfidence: " in out and spied[0][-1]["num_return_sequences"] == 3
    with pytest.raises(SystemExit) as exit_:
        main(question + ["--samples", "9"])  # the folder's ServeConfig default max_samples is 8
    assert exit_.value.code == 2 and "max_samples=8" in capsys.readouterr().err


def test_a_model_without_declared_params_refuses_them():
    class Logged:
        metadata = type("M", (), {"signature": type("S", (), {"params": None})()})()

    serve.check_params_declared(Logged(), None)
    serve.check_params_declared(Logged(), {"samples": 1, "abstain_below": 0.0})
    with pytest.raises(BadInputError, match="declares no inference params"):
        serve.check_params_declared(Logged(), {"samples": 3})
