"""Register and serve: the register stage from chosen.json, the pyfunc round trip, challenger/champion promotion,
predict helpers, and a real `mlflow models serve`."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from servers import free_port, listening, stop_group

from configs import small_config
from morer1 import evaluate, registry, serve
from morer1.errors import BadInputError
from morer1.evaluate import EvaluateConfig
from morer1.files import folder_sha256
from morer1.labels import DEFAULT_LABELS, NONE
from morer1.metrics import compute_metrics
from morer1.prompt import prompt_text
from morer1.registry import CHALLENGER, CHAMPION, RegisterConfig
from morer1.serve import predict_jsonl, predict_one
from morer1.tiny_model import TinyModelConfig, build_tiny_model

CFG = small_config(RegisterConfig, max_new_tokens=6, batch_size=2)
EVAL = small_config(EvaluateConfig, max_new_tokens=8, batch_size=2)  # how the tests' challengers were "evaluated"
CORPUS = [
    prompt_text("Angela Merkel speaks in Berlin", "Berlin", DEFAULT_LABELS),
    "<think>\nStep 1: A person on a stage.\nStep 6: She governs from Berlin.\n</think>\n"
    "<answer>/per/loc/place_of_governance</answer>",
] * 20
OUTPUT = ["label", "rationale", "completion", "confidence"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, labels.json, photo path) of one tiny model built for the module."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_model(root / "model", CORPUS, small_config(TinyModelConfig, vocab_size=600))
    (root / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    Image.new("RGB", (96, 64), (200, 30, 30)).save(root / "photo.png")
    return root / "model", root / "labels.json", root / "photo.png"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking URI whose `morer1` experiment keeps its artifacts in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("morer1", artifact_location=(root / "artifacts").as_uri())
        yield uri
        mlflow.set_tracking_uri(None)  # later modules must not inherit this store


@pytest.fixture(autouse=True)
def _tracking(store, monkeypatch):
    """Every test of the module tracks into the module's store (conftest unsets the URI per test)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MORER1_EXPERIMENT", raising=False)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def chosen_json(folder: Path, model_dir: Path, metrics: dict, dev: evaluate.DevSet,
                predictions: list[dict] | None = None) -> Path:
    """A chosen.json as evaluate writes it, for `model_dir` scored on `dev` with EVAL, beside its
    predictions_dev.jsonl: `predictions`, or by default each dev fact answered with its gold relation."""
    rows = predictions if predictions is not None else [{**f, "predicted": f["relation"], "completion": ""}
                                                        for f in dev.facts]
    keep = ("id", "image", "relation", "predicted", "completion")
    (folder / "predictions_dev.jsonl").write_text(jsonl([{k: r[k] for k in keep} for r in rows]))
    path = folder / "chosen.json"
    path.write_text(json.dumps({"model_dir": str(model_dir), "model_sha256": folder_sha256(model_dir),
                                "selection_metric": "f1", "labels": list(DEFAULT_LABELS), "dev_set": dev.sha256,
                                "dev_eval": evaluate.dev_eval(EVAL), "metrics": metrics,
                                "dev_predictions": "predictions_dev.jsonl"}))
    return path


def write_dev(root: Path, relations: list[str], shade: int) -> Path:
    """An ingested folder with only what promotion reads: labels.json and a dev split over one photo, with crops."""
    (root / "images").mkdir(parents=True)
    (root / "crops").mkdir()
    Image.new("RGB", (96, 64), (shade, 30, 30)).save(root / "images" / "a.jpg")
    facts = []
    for i, relation in enumerate(relations):
        Image.new("RGB", (20 + i, 20), (shade, 10 * i, 0)).save(root / "crops" / f"dev-{i}.png")
        facts.append({"id": f"dev-{i:06d}", "split": "dev", "image": "images/a.jpg", "width": 96, "height": 64,
                      "text": "Angela Merkel speaks in Berlin", "tokens": [],
                      "entity": {"name": "Berlin", "start": 4, "end": 5},
                      "object": {"name": "o", "box": [0, 0, 20 + i, 20], "crop": f"crops/dev-{i}.png"},
                      "relation": relation, "pair_entities": 1 + i % 2, "pair_objects": 1})
    (root / "dev.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    (root / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two data versions: v1 (last month's dev set) and v2 (this month's, other facts), as (folder, DevSet)."""
    root = tmp_path_factory.mktemp("data")
    v1 = write_dev(root / "v1", ["/per/loc/place_of_governance", "none", "/org/loc/locate_at"], 200)
    v2 = write_dev(root / "v2", ["none", "/per/loc/place_of_governance", "none", "/per/per/partner"], 90)
    return {name: (folder, evaluate.dev_set(folder, EVAL.max_facts, EVAL.seed)) for name, folder in
            (("v1", v1), ("v2", v2))}


@pytest.fixture(scope="module")
def registered(store, tiny, data, tmp_path_factory):
    """Version 1 of `morer1`, registered once for the module by the register stage on data v1 (and so promoted)."""
    root = tmp_path_factory.mktemp("register")
    summary = registry.run(CFG.model_copy(update={"facts": str(data["v1"][0])}),
                           chosen_json(root, tiny[0], {"dev_f1": 0.5, "test_f1": 0.4}, data["v1"][1]), root / "out")
    assert json.loads((root / "out" / "registered.json").read_text()) == summary
    return MlflowClient().get_model_version(CFG.candidates_model_name, summary["version"])


def rows(photo: Path) -> pd.DataFrame:
    """Three questions: base64 bytes, a data URI and base64 in lines of 76 (a served model reads no paths)."""
    encoded = base64.b64encode(photo.read_bytes()).decode("ascii")
    images = [encoded, f"data:image/png;base64,{encoded}", base64.encodebytes(photo.read_bytes()).decode("ascii")]
    return pd.DataFrame([{"image": image, "title": "Angela Merkel speaks in Berlin", "entity": "Berlin",
                          "box": [10, 8, 50, 40]} for image in images])


def named(name: str, **values) -> RegisterConfig:
    """The tests' RegisterConfig for served model `name`, whose candidates model is `<name>-candidates` (min_pairs 10
    unless given: the small dev set below spans 20 pairs)."""
    return small_config(RegisterConfig, model_name=name, candidates_model_name=f"{name}-candidates",
                        **{"min_pairs": 10, **values})


def add_version(registered, name: str, predictions: list[dict] | None, dev: evaluate.DevSet | None) -> str:
    """Register the module's logged model again under `name` (as challenger), from a run of its own holding
    `predictions` as its dev predictions (None: none, as versions registered before them; else its dev_f1 tag is
    theirs), scored on `dev` with EVAL (None: no dev set recorded, as versions registered before they were)."""
    client, candidates = MlflowClient(), f"{name}-candidates"
    metrics = {} if predictions is None else {"dev_f1": compute_metrics(
        [r["relation"] for r in predictions], [r["predicted"] for r in predictions], DEFAULT_LABELS)["f1"]}
    tags = registry.dev_tags({"dev_set": dev.sha256, "dev_eval": evaluate.dev_eval(EVAL)}) if dev else {}
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("morer1").experiment_id) as run:
        if predictions is not None:
            mlflow.log_text(jsonl(predictions), registry.PREDICTIONS_ARTIFACT)
    if not client.search_registered_models(f"name = '{candidates}'"):
        client.create_registered_model(candidates)
    version = client.create_model_version(candidates, registered.source, run_id=run.info.run_id,
                                          tags=registry.version_tags(metrics, tags)).version
    client.set_registered_model_alias(candidates, CHALLENGER, version)
    return str(version)


RELATIONS = [label for label in DEFAULT_LABELS if label != NONE]


def dev_facts(n: int, per_pair: int) -> list[dict]:
    """`n` synthetic dev facts (what pairing reads of them), `per_pair` to an image-title pair (one photo each)."""
    return [{"id": f"dev-{i:06d}", "image": f"images/{i // per_pair}.jpg", "relation": RELATIONS[i % len(RELATIONS)]}
            for i in range(n)]


def answers(facts: list[dict], right) -> list[dict]:
    """Predictions of `facts`: the gold where `right(i)`, else another relation or None (invalid). Every gold and
    every answer is a positive, so F1 is the share of facts right."""
    return [{**f, "completion": "", "predicted": f["relation"] if right(i) else
             None if i % 2 else RELATIONS[(i + 1) % len(RELATIONS)]} for i, f in enumerate(facts)]


def champion_right(i: int) -> bool:
    return i % 10 < 7  # F1 0.7


SMALL = dev_facts(100, 5)  # 20 pairs
LARGE = dev_facts(4000, 5)  # 800 pairs


def served(name: str):
    """The version of served model `name` that carries `champion`."""
    return MlflowClient().get_model_version_by_alias(name, CHAMPION)


def aliases(name: str) -> dict[str, str]:
    """`challenger` of `<name>-candidates` and, for `champion` of `name`, the candidate version it is a copy of."""
    client = MlflowClient()
    found = {alias: str(v) for alias, v in client.get_registered_model(f"{name}-candidates").aliases.items()}
    champion = registry.version_by_alias(client, name, CHAMPION)
    if champion is not None:
        source = champion.source
        assert source.startswith(f"models:/{name}-candidates/"), source
        found[CHAMPION] = source.rsplit("/", 1)[1]
    return found


def candidate(name: str, version: str):
    return MlflowClient().get_model_version(f"{name}-candidates", version)


def test_register_tags_version_and_promotes_the_first(registered, tiny, data):
    """The candidate is `challenger` of morer1-candidates; its copy in morer1, with the same tags and logged model,
    is `champion` and records the decision that made it so."""
    assert registered.aliases == [CHALLENGER] and registered.name == CFG.candidates_model_name == "morer1-candidates"
    copy = served(CFG.model_name)
    assert copy.source == f"models:/{CFG.candidates_model_name}/{registered.version}"
    assert (copy.run_id, copy.model_id) == (registered.run_id, registered.model_id)
    assert {k: v for k, v in copy.tags.items() if not k.startswith("promotion")} == {
        k: v for k, v in registered.tags.items() if not k.startswith("promotion")}
    recorded = json.loads(copy.tags["promotion"])
    assert (recorded["decision"], recorded["challenger_version"], recorded["served_version"]) == (
        "promoted", str(registered.version), str(copy.version))
    assert json.loads(registered.tags["promotion"])["served_version"] == str(copy.version)
    tags = registered.tags
    # the few tags a reader filters by; the rest of the lineage is lineage.json in the version's run
    assert set(tags) == {"git_commit", "data_version", "model_dir", "model_sha256", "dev_set", "dev_eval",
                         "serve_config", "dev_f1", "test_f1", "promotion", "promotion.decision", "promotion.reason"}
    assert tags["dev_set"] == data["v1"][1].sha256 and json.loads(tags["dev_eval"]) == {
        "max_facts": None, "seed": 0, "max_new_tokens": 8, "batch_size": 2}
    assert (tags["dev_f1"], tags["test_f1"]) == ("0.5", "0.4") and tags["promotion.decision"] == "promoted"
    assert (tags["model_dir"], tags["model_sha256"]) == (str(tiny[0]), folder_sha256(tiny[0]))
    run = mlflow.get_run(registered.run_id)
    assert (run.data.metrics["dev_f1"], run.data.metrics["test_f1"]) == (0.5, 0.4)
    logged = mlflow.artifacts.load_text(f"runs:/{copy.run_id}/{registry.PREDICTIONS_ARTIFACT}")  # found from the copy
    assert [json.loads(line)["id"] for line in logged.splitlines()] == [f["id"] for f in data["v1"][1].facts]
    assert run.data.tags["morer1.stage"] == "register" and run.data.tags["morer1.promotion"] == "promoted"
    assert run.data.params["register.model_name"] == CFG.model_name
    assert run.data.params["register.candidates_model_name"] == CFG.candidates_model_name


def test_rerun_of_register_reuses_the_version(registered, tiny, data, tmp_path):
    """The same chosen.json registered again (a rerun after a kill, or `dvc repro -f`): no new version, no new copy,
    the tags set again, champion kept."""
    client = MlflowClient()
    before = [v.version for v in client.search_model_versions(f"name = '{CFG.candidates_model_name}'")]
    copies = [v.version for v in client.search_model_versions(f"name = '{CFG.model_name}'")]
    summary = registry.run(CFG.model_copy(update={"facts": str(data["v1"][0])}),
                           chosen_json(tmp_path, tiny[0], {"dev_f1": 0.5, "test_f1": 0.45}, data["v1"][1]),
                           tmp_path / "out")
    assert summary["version"] == str(registered.version) and summary["promotion"]["decision"] == "already_champion"
    assert [v.version for v in client.search_model_versions(f"name = '{CFG.candidates_model_name}'")] == before
    assert [v.version for v in client.search_model_versions(f"name = '{CFG.model_name}'")] == copies
    assert client.get_model_version(CFG.candidates_model_name, registered.version).tags["test_f1"] == "0.45"
    assert mlflow.get_run(summary_run(summary)).data.tags["morer1.reused_version"] == str(registered.version)
    client.set_model_version_tag(CFG.candidates_model_name, registered.version, "test_f1", "0.4")  # as the fixture


def test_other_served_settings_are_another_registration(tiny, data, tmp_path):
    """The pyfunc's model_config is part of the logged model: the same model, data and evaluation registered with
    other serve settings is a new version, not the old one with its old settings."""
    chosen = chosen_json(tmp_path, tiny[0], {"dev_f1": 0.5}, data["v1"][1])
    first = registry.run(named("serve-settings", facts=str(data["v1"][0])), chosen, tmp_path / "a")
    second = registry.run(named("serve-settings", facts=str(data["v1"][0]), max_new_tokens=7), chosen, tmp_path / "b")
    assert first["version"] != second["version"]
    loaded = mlflow.pyfunc.load_model(f"models:/serve-settings-candidates/{second['version']}")
    assert loaded.model_config["max_new_tokens"] == 7
    assert json.loads(candidate("serve-settings", second["version"]).tags["serve_config"])["max_new_tokens"] == 7


def summary_run(summary: dict) -> str:
    """The id of the latest register stage run (the one that wrote `summary`)."""
    runs = mlflow.search_runs(experiment_names=["morer1"], filter_string="tags.`morer1.stage` = 'register'",
                              order_by=["start_time DESC"], max_results=1, output_format="list")
    assert runs[0].data.tags["morer1.registered_version"] == summary["version"]
    return runs[0].info.run_id


def test_register_without_promotion_defers(registered, tiny, data, tmp_path):
    """register.promote false (team servers: the pipeline's account may not move champion): only a candidate."""
    name = "deferred"
    summary = registry.run(named(name, promote=False, facts=str(data["v1"][0])),
                           chosen_json(tmp_path, tiny[0], {"dev_f1": 0.5}, data["v1"][1]), tmp_path / "out")
    assert summary["model_name"] == f"{name}-candidates" and summary["promotion"]["decision"] == "deferred"
    assert aliases(name) == {CHALLENGER: summary["version"]}
    decision = registry.promote(named(name, facts=str(data["v1"][0])))
    assert decision["decision"] == "promoted" and aliases(name) == {CHALLENGER: summary["version"],
                                                                     CHAMPION: summary["version"]}


FULL_METRICS = {"dev_f1": 0.5, "dev_f1_lo": 0.4, "dev_f1_hi": 0.6, "dev_accuracy": 0.7, "dev_accuracy_lo": 0.65,
                "dev_accuracy_hi": 0.75, "dev_n": 3, "test_f1": 0.45, "test_f1_lo": 0.35, "test_f1_hi": 0.55,
                "test_n": 3}


def demo_project(root: Path, source: str = "data/demo") -> Path:
    """A project folder as the register stage sees it: params.yaml (the demo's `ingest.source`, the tiny base model
    unless `source` says otherwise) and a dvc.lock naming the data version."""
    root.mkdir(parents=True, exist_ok=True)
    demo = source == "data/demo"
    params = {"ingest": {"source": source}, "tiny_model": {"hidden_size": 128},
              "sft": {"model": "models/tiny" if demo else "Qwen/Qwen2.5-VL-3B-Instruct", "learning_rate": 0.002,
                      "lora": {"enabled": False, "r": 16}},
              "evaluate": {"confidence": 0.95}}
    (root / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    (root / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {"ingest": {"outs": [
        {"path": "data/ingested", "hash": "md5", "md5": "feedc0de0123.dir"}]}}}))
    return root


def test_each_version_has_a_model_card_and_its_lineage(tiny, data, tmp_path, monkeypatch):
    """The register stage writes the version's model card: reports/registry/MODEL_CARD.md, MODEL_CARD.md in the
    version's run and README.md in its logged model (a download of the champion carries it), naming the data
    version, the metrics with their intervals beside the baselines, the decision and the prompt; a demo's card says
    it is a toy task. The rest of the lineage is lineage.json in the run, not version tags."""
    monkeypatch.chdir(demo_project(tmp_path / "project"))
    (tmp_path / "eval").mkdir()
    chosen = chosen_json(tmp_path / "eval", tiny[0], FULL_METRICS, data["v1"][1])
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({
        "dev": {"baseline_majority_f1": 0.0, "baseline_majority_f1_lo": 0.0, "baseline_majority_f1_hi": 0.0,
                "baseline_random_f1": 0.1, "baseline_random_f1_lo": 0.05, "baseline_random_f1_hi": 0.15},
        "test": {"baseline_random_f1": 0.12}}))
    summary = registry.run(named("card", facts=str(data["v1"][0])), chosen, tmp_path / "out")
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    version = candidate("card", summary["version"])
    assert set(version.tags) == {"git_commit", "data_version", "model_dir", "model_sha256", "dev_set", "dev_eval",
                                 "serve_config", "dev_f1", "dev_f1_lo", "dev_f1_hi", "test_f1", "promotion",
                                 "promotion.decision", "promotion.reason"}
    assert version.tags["data_version"] == "feedc0de0123.dir" and "feedc0de0123.dir" in card
    assert "| micro F1 (MORE protocol, without none) | 0.500 [0.400, 0.600] | 0.450 [0.350, 0.550] |" in card
    assert "0.100 [0.050, 0.150] / 0.120" in card  # the random baseline, dev with its interval, and test
    assert "| accuracy (none included) | 0.700 [0.650, 0.750] |" in card and "95 % pair-bootstrap" in card
    assert "**A toy task.**" in card and "- toy-task" in card and "**promoted** — no champion yet" in card
    assert "Template `full`" in card and "{marked_title}" in card and "| learning_rate | `0.002` |" in card
    assert card.startswith("---\nlibrary_name: transformers\n")
    run_card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/{registry.CARD_ARTIFACT}")
    assert run_card == card
    lineage = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{registry.LINEAGE_ARTIFACT}")
    assert lineage["metrics"] == FULL_METRICS and lineage["dvc_lock_sha256"] == folder_sha256_of(
        tmp_path / "project" / "dvc.lock") and lineage["settings"]["sft"]["learning_rate"] == 0.002
    assert lineage["baselines"]["test"] == {"baseline_random_f1": 0.12}
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/card/{served('card').version}",
                                                          dst_path=str(tmp_path / "download")))
    assert (downloaded / "README.md").read_text() == card and (downloaded / "MLmodel").is_file()


def folder_sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_card_of_real_data_is_no_toy_and_names_its_base_model():
    """Real data and a Hub base model: intended use, not "toy task"; the base model in the front matter; a GRPO
    model's card holds the settings of the stages that made it."""
    from morer1 import model_card

    params = {"ingest": {"source": "/data/MORE"}, "sft": {"model": "Qwen/Qwen2.5-VL-7B-Instruct"},
              "rollout": {"num_generations": 8}, "curriculum": {"mode": "progressive"}, "grpo": {"beta": 0.04}}
    chosen = {"model_dir": "models/grpo", "model_sha256": "ab", "dev_set": "cd", "dev_eval": {"seed": 0},
              "metrics": {"dev_f1": 0.61, "test_f1": 0.6}, "labels": list(DEFAULT_LABELS)}
    info = model_card.lineage(chosen, {"git_commit": "c0ffee", "data_version": "d1.dir"}, "none", params, None,
                              {"name": "morer1-candidates", "version": "7", "run_id": "r"})
    assert not model_card.is_demo(params) and list(info["settings"]) == ["ingest", "sft", "rollout", "curriculum",
                                                                         "grpo"]
    card = model_card.render(info, None, "full", "{title}", "system", 0.9)
    assert "toy" not in card.lower() and "base_model: Qwen/Qwen2.5-VL-7B-Instruct" in card
    assert "## Intended use and limits" in card and "90 % pair-bootstrap" in card and "SFT then GRPO" in card
    assert "| micro F1 (MORE protocol, without none) | 0.610 | 0.600 |" in card and "`d1.dir`" in card


def test_versions_tagged_before_the_json_decision_still_promote(registered, data, monkeypatch):
    """A champion registered with a tag per metric and a challenger decided before with `promotion.<field>` tags (as
    versions registered before the JSON `promotion` tag): promotion reads them, and the stale field tags go."""
    name = "old-tags"
    client = MlflowClient()
    old = add_version(registered, name, answers(SMALL, champion_right), data["v1"][1])
    client.set_model_version_tag(f"{name}-candidates", old, "dev_accuracy", "0.7")  # one tag per metric, then
    registry.promote(named(name))  # its copy, the champion, takes its tags
    new = add_version(registered, name, answers(SMALL, lambda i: True), data["v1"][1])
    for key, value in (("promotion.decision", "kept"), ("promotion.delta_lo", "-0.1"), ("promotion.timestamp", "t0")):
        client.set_model_version_tag(f"{name}-candidates", new, key, value)
    monkeypatch.setattr(evaluate, "predict_facts", lambda *a: pytest.fail("same data: nothing to re-score"))
    decision = registry.promote(named(name, metric="dev_accuracy"))
    assert decision["champion_tag_value"] == 0.7 and decision["decision"] == "promoted"
    tags = candidate(name, new).tags
    assert {k for k in tags if k.startswith("promotion")} == {"promotion", "promotion.decision", "promotion.reason"}
    assert json.loads(tags["promotion"])["decision"] == tags["promotion.decision"] == "promoted"
    assert not any(k.startswith("promotion.") for k in served(name).tags)  # the copy records its decision as JSON


def test_candidates_and_served_model_must_differ():
    with pytest.raises(ValueError, match="candidates_model_name must differ"):
        small_config(RegisterConfig, model_name="m", candidates_model_name="m")


def test_register_refuses_a_model_changed_since_evaluate(tiny, data, tmp_path):
    (tmp_path / "model").mkdir()
    for path in tiny[0].iterdir():
        (tmp_path / "model" / path.name).write_bytes(path.read_bytes())
    chosen = chosen_json(tmp_path, tmp_path / "model", {"dev_f1": 0.5}, data["v1"][1])
    (tmp_path / "model" / "config.json").write_text((tiny[0] / "config.json").read_text() + " ")
    with pytest.raises(BadInputError, match="changed since evaluate scored it"):
        registry.run(small_config(RegisterConfig, model_name="changed"), chosen, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_versions_registered_before_the_move_still_load():
    """Their pickle names morer1.registry.MorePredictor."""
    assert registry.MorePredictor is serve.MorePredictor


def test_pyfunc_round_trip_matches_the_model_folder(registered, tiny):
    model = mlflow.pyfunc.load_model(f"models:/{CFG.candidates_model_name}@{CHALLENGER}")
    assert model.model_config == serve.ServeConfig(max_new_tokens=6, batch_size=2).model_dump()
    frame = rows(tiny[2])
    served = model.predict(frame)
    assert list(served.columns) == OUTPUT and len(served) == 3
    assert served["completion"].nunique() == 1  # one image three ways, greedy
    local = serve.predict(tiny[0], frame, labels_path=tiny[1], model_config={"max_new_tokens": 6})
    assert local["completion"].tolist() == served["completion"].tolist()


@pytest.mark.parametrize(("change", "message"), [
    ("no-key", "names no dev_predictions .* rerun evaluate"),
    ("missing", r"predictions_dev.jsonl: \[Errno 2\]"),
    ("no-image", r"predictions_dev.jsonl: row 1 lacks \['image'\]"),
    ("not-a-label", "row 2: relation 'none' or predicted 'married' is not a label of the set"),
    ("repeated", "row 3: fact id 'dev-000000' again"),
])
def test_register_refuses_chosen_json_without_good_predictions(tiny, data, tmp_path, change, message):
    """Predictions are checked before anything is logged: promotion could never compare a version without them."""
    rows = [{**f, "predicted": f["relation"], "completion": ""} for f in data["v1"][1].facts]
    chosen = chosen_json(tmp_path, tiny[0], {"dev_f1": 0.5}, data["v1"][1], rows)
    if change == "no-key":
        chosen.write_text(json.dumps({k: v for k, v in json.loads(chosen.read_text()).items()
                                      if k != "dev_predictions"}))
    elif change == "missing":
        (tmp_path / "predictions_dev.jsonl").unlink()
    else:
        edited = {"no-image": [{k: v for k, v in rows[0].items() if k != "image"}, *rows[1:]],
                  "not-a-label": [rows[0], {**rows[1], "predicted": "married"}, *rows[2:]],
                  "repeated": [*rows[:2], rows[0]]}[change]
        (tmp_path / "predictions_dev.jsonl").write_text(jsonl(edited))
    with pytest.raises(BadInputError, match=message):
        registry.run(named("bad-predictions", facts=str(data["v1"][0])), chosen, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_register_refuses_metrics_without_the_compared_one(tiny, data, tmp_path):
    with pytest.raises(BadInputError, match="lack 'dev_f1'"):
        registry.run(CFG.model_copy(update={"facts": str(data["v1"][0])}),
                     chosen_json(tmp_path, tiny[0], {"test_f1": 0.4}, data["v1"][1]), tmp_path / "out")


def test_dev_set_fingerprint_follows_what_the_dev_metrics_depend_on(data, tmp_path):
    folder, dev = data["v1"]
    assert dev.sha256 == evaluate.dev_set(folder, None, 0).sha256 and len(dev.facts) == 3
    assert dev.sha256 != data["v2"][1].sha256
    assert evaluate.dev_set(folder, 2, 0).sha256 != dev.sha256  # evaluate's seeded sample: other facts scored
    copy = tmp_path / "v1"
    shutil.copytree(folder, copy)
    assert evaluate.dev_set(copy, None, 0).sha256 == dev.sha256  # content, not place
    Image.new("RGB", (21, 20), (1, 2, 3)).save(copy / "crops" / "dev-1.png")  # one crop redrawn
    assert evaluate.dev_set(copy, None, 0).sha256 != dev.sha256
    (copy / "crops" / "dev-1.png").unlink()
    with pytest.raises(BadInputError, match="dev-1.png: missing"):
        evaluate.dev_set(copy, None, 0)


@pytest.mark.parametrize(("row", "message"), [
    ({"box": [10, 8, 200, 40]}, r"row 0: box \[10, 8, 200, 40\] is empty or leaves the 96x64 image"),
    ({"box": [10, 8, 50]}, "row 0: box must be four integers"),
    ({"image": "no/such/file.png"}, "row 0: image 'no/such/file.png' is not base64-encoded image bytes"),
    ({"entity": " "}, "row 0: entity must be a non-empty string"),
])
def test_bad_rows_are_named(tiny, row, message):
    predictor = serve.MorePredictor()
    predictor.model = predictor.processor = None  # never reached: rows are checked before generation
    predictor.labels, predictor.max_new_tokens, predictor.batch_size = DEFAULT_LABELS, 4, 2
    predictor.cfg = serve.ServeConfig(max_new_tokens=4, batch_size=2)
    frame = rows(tiny[2]).iloc[:1].assign(**{k: [v] for k, v in row.items()})
    with pytest.raises(BadInputError, match=message):
        predictor.predict(frame)


def test_first_challenger_becomes_champion_then_no_op(registered):
    name = "first"
    with pytest.raises(BadInputError, match="no 'challenger' version"):
        registry.promote(named(name))
    version = add_version(registered, name, None, None)  # no predictions: nothing to compare them with either
    decision = registry.promote(named(name))
    assert (decision["decision"], decision["reason"]) == ("promoted", "no champion yet")
    assert decision["delta"] is None and decision["rule"] == registry.rule(named(name))
    assert aliases(name) == {CHALLENGER: version, CHAMPION: version}
    again = registry.promote(named(name))
    assert again["decision"] == "already_champion" and aliases(name)[CHAMPION] == version


def duel(registered, data, name: str, old: list[dict], new: list[dict], monkeypatch, **cfg) -> tuple[dict, str, str]:
    """A champion answering `old`, then a challenger answering `new`, both scored on dev set v1 with EVAL: the
    promotion decision (nothing re-scored: their own predictions are paired) and both candidate versions."""
    champion = add_version(registered, name, old, data["v1"][1])
    registry.promote(named(name))
    challenger = add_version(registered, name, new, data["v1"][1])
    monkeypatch.setattr(evaluate, "predict_facts", lambda *a: pytest.fail("same data: nothing to re-score"))
    return registry.promote(named(name, facts="no/such/folder", **cfg)), champion, challenger


def test_a_small_gain_on_a_small_dev_set_is_kept(registered, data, monkeypatch):
    """+0.01 F1 on 100 facts (8 facts won, 7 lost): above the champion as a point, not above 0 at 95 %."""
    name = "small-gain"
    new_right = lambda i: (champion_right(i) and i not in {0, 11, 22, 33, 44, 55, 66}) or i in {
        7, 18, 29, 37, 48, 59, 77, 88}
    decision, old, new = duel(registered, data, name, answers(SMALL, champion_right), answers(SMALL, new_right),
                              monkeypatch)
    assert decision["challenger_value"] == pytest.approx(0.71) and decision["champion_value"] == pytest.approx(0.7)
    assert decision["delta"] == pytest.approx(0.01) and decision["delta_lo"] < 0 < decision["delta_hi"]
    assert (decision["n_facts"], decision["n_pairs"], decision["wins"], decision["losses"]) == (100, 20, 8, 7)
    assert decision["decision"] == "kept" and aliases(name)[CHAMPION] == old
    assert decision["champion_scored"] == "own predictions, same dev set"
    assert decision["reason"] == (
        f"dev_f1 +0.0100 [{decision['delta_lo']:+.4f}, {decision['delta_hi']:+.4f}] over champion (own predictions, "
        f"same dev set): lower bound not above 0.0 (n=100 facts, 20 pairs, p={decision['p_value']:.2g})")
    assert decision["p_value"] > 0.5 and (decision["confidence"], decision["min_delta"]) == (0.95, 0.0)
    assert decision["rule"] == ("promote when the 95 % paired-bootstrap lower bound of Δdev_f1 > 0.0 (2000 resamples "
                                "of image-title pairs, seed 0) over at least 10 pairs")
    tags = candidate(name, new).tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.reason"] == decision["reason"]
    recorded = json.loads(tags["promotion"])
    assert recorded == decision and (recorded["delta_lo"], recorded["n_pairs"]) == (decision["delta_lo"], 20)
    assert recorded["champion_tag_value"] == 0.7 and recorded["champion_version"] == str(served(name).version)
    line = registry.decision_line(decision)
    assert line.startswith(f"kept: Δdev_f1 +0.0100 [{decision['delta_lo']:+.4f}, ") and "\n" not in line
    assert "(95 %), 100 facts, 20 pairs, p=" in line and line.endswith(decision["reason"])


def test_a_large_gain_on_a_large_dev_set_is_promoted(registered, data, monkeypatch):
    """+0.05 F1 on 4000 facts in 800 pairs (300 won, 100 lost): above 0 at 95 %."""
    name = "large-gain"
    new_right = lambda i: (champion_right(i) and i % 40 != 0) or i % 40 in (7, 18, 29)
    decision, _, new = duel(registered, data, name, answers(LARGE, champion_right), answers(LARGE, new_right),
                            monkeypatch)
    assert decision["delta"] == pytest.approx(0.05) and 0 < decision["delta_lo"] < 0.05 < decision["delta_hi"]
    assert (decision["n_facts"], decision["n_pairs"], decision["wins"], decision["losses"]) == (4000, 800, 300, 100)
    assert decision["p_value"] < 0.01
    assert decision["decision"] == "promoted" and aliases(name) == {CHALLENGER: new, CHAMPION: new}
    assert decision["reason"].startswith(f"dev_f1 +0.0500 [{decision['delta_lo']:+.4f}, ")
    assert decision["reason"].endswith(f"lower bound above 0.0 (n=4000 facts, 800 pairs, p={decision['p_value']:.2g})")
    assert json.loads(served(name).tags["promotion"]) == {**decision, "served_version": str(served(name).version)}


def test_a_gain_over_too_few_pairs_is_kept(registered, data, monkeypatch):
    """+0.3 F1 on the 20 pairs of the small dev set is clear at 95 %, but 20 pairs are fewer than min_pairs 30: kept,
    saying so; with min_pairs 20 the same answers are promoted."""
    name = "few-pairs"
    decision, old, _ = duel(registered, data, name, answers(SMALL, lambda i: i % 10 < 6), answers(SMALL, lambda i: True),
                            monkeypatch, min_pairs=30)
    assert decision["delta"] == pytest.approx(0.4) and decision["delta_lo"] > 0 and decision["n_pairs"] == 20
    assert decision["decision"] == "kept" and aliases(name)[CHAMPION] == old
    assert "20 image-title pairs are fewer than register.min_pairs (30)" in decision["reason"]
    decision = registry.promote(named(name, facts="no/such/folder", min_pairs=20))
    assert decision["decision"] == "promoted" and "lower bound above 0.0" in decision["reason"]


@pytest.mark.parametrize("case", ["identical", "worse"])
def test_no_better_challenger_is_kept(registered, data, case, monkeypatch):
    name = f"no-better-{case}"
    new_right = champion_right if case == "identical" else lambda i: i % 10 < 6
    decision, old, _ = duel(registered, data, name, answers(SMALL, champion_right), answers(SMALL, new_right),
                            monkeypatch)
    assert decision["decision"] == "kept" and aliases(name)[CHAMPION] == old
    if case == "identical":
        assert (decision["delta"], decision["delta_lo"], decision["delta_hi"], decision["p_value"]) == (0, 0, 0, 1)
        assert (decision["wins"], decision["losses"]) == (0, 0)
        assert "+0.0000 [+0.0000, +0.0000]" in decision["reason"]
    else:
        assert decision["delta"] == pytest.approx(-0.1) and decision["delta_hi"] < 0


@pytest.mark.parametrize("case", ["other-ids", "other-golds"])
def test_predictions_of_other_facts_are_refused(registered, data, case, monkeypatch):
    """Same dev set and settings recorded, yet the two files answer other facts: nothing is compared."""
    name = f"unpaired-{case}"
    new = answers(SMALL, lambda i: True)
    if case == "other-ids":
        new[3] = {**new[3], "id": "dev-elsewhere"}
    else:
        new[3] = {**new[3], "relation": RELATIONS[5], "predicted": RELATIONS[5]}
    decision, old, _ = duel(registered, data, name, answers(SMALL, champion_right), new, monkeypatch)
    assert decision["decision"] == "refused" and aliases(name)[CHAMPION] == old
    assert decision["delta"] is None and decision["champion_scored"] == "own predictions, same dev set"
    assert decision["reason"].startswith("the challenger's dev predictions and the champion's (own predictions, same "
                                         "dev set) cannot be paired: ")
    assert decision["reason"].endswith(
        "they answer other facts: 1 fact ids only the challenger's ['dev-elsewhere'], 1 only the champion's "
        "['dev-000003']" if case == "other-ids" else
        "1 facts have another gold relation in the two, e.g. ['dev-000003']")


def test_challenger_without_predictions_is_refused(registered, data, monkeypatch):
    name = "no-predictions"
    old = add_version(registered, name, answers(SMALL, champion_right), data["v1"][1])
    registry.promote(named(name))
    new = add_version(registered, name, None, data["v1"][1])
    monkeypatch.setattr(evaluate, "predict_facts", lambda *a: pytest.fail("nothing to pair a re-score with"))
    decision = registry.promote(named(name))
    assert decision["decision"] == "refused" and aliases(name)[CHAMPION] == old
    run_id = candidate(name, new).run_id
    assert decision["reason"] == (f"challenger version {new} has no dev predictions (evaluation/dev_predictions.jsonl "
                                  f"of its run {run_id}): its answers cannot be paired with the champion's")


def test_failed_promotion_keeps_the_champion(registered, data, monkeypatch):
    name = "failing"
    old = add_version(registered, name, answers(SMALL, lambda i: i % 10 < 3), data["v1"][1])
    registry.promote(named(name))
    new = add_version(registered, name, answers(SMALL, lambda i: True), data["v1"][1])

    def broken(self, name, alias, version):
        raise RuntimeError("registry down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(RuntimeError, match="registry down"):
        registry.promote(named(name))
    assert aliases(name)[CHAMPION] == old
    assert "promotion.decision" not in candidate(name, new).tags and "promotion" not in candidate(name, new).tags
    copies = MlflowClient().search_model_versions(f"name = '{name}'")
    assert len(copies) == 2  # the old champion's copy and the challenger's, made before the failed move

    monkeypatch.undo()
    decision = registry.promote(named(name))  # the rerun reuses the copy
    assert decision["decision"] == "promoted" and aliases(name)[CHAMPION] == new
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 2
    assert json.loads(candidate(name, new).tags["promotion"])["served_version"] == str(served(name).version)


def direct_f1(model_dir: Path, folder: Path) -> float:
    """The dev F1 of `model_dir` on the dev facts of `folder`, evaluated as the evaluate stage does with EVAL."""
    dev = evaluate.dev_set(folder, EVAL.max_facts, EVAL.seed)
    scored = evaluate.predict_facts(model_dir, dev.facts, folder, dev.labels, EVAL)
    return evaluate.score(scored, dev.labels, [f["relation"] for f in dev.facts], EVAL.seed)["f1"]


def test_champion_of_other_data_is_rescored_on_the_challengers_dev_set(registered, tiny, data, tmp_path,
                                                                       monkeypatch):
    """Champion scored 1.0 on v1's dev set, challenger on v2's: the champion's registered model's answers to v2's dev
    facts are what the challenger's predictions are paired with."""
    name, (v2, dev2) = "drift", data["v2"]
    champion = add_version(registered, name, answers(data["v1"][1].facts, lambda i: True), data["v1"][1])
    registry.promote(named(name))
    champion_copy = served(name).version
    expected = direct_f1(tiny[0], v2)
    # the challenger: another model folder (a copy of the tiny model with one more file), on data v2
    shutil.copytree(tiny[0], tmp_path / "challenger")
    (tmp_path / "challenger" / "NOTE").write_text("challenger")
    calls, original = [], evaluate.predict_facts

    def spy(model_dir, facts, facts_dir, labels, cfg):
        calls.append((folder_sha256(model_dir), [f["id"] for f in facts], Path(facts_dir), cfg))
        return original(model_dir, facts, facts_dir, labels, cfg)

    monkeypatch.setattr(evaluate, "predict_facts", spy)
    summary = registry.run(named(name, facts=str(v2), min_pairs=1),  # v2's 4 facts share one photo
                           chosen_json(tmp_path, tmp_path / "challenger", {"dev_f1": 0.3, "dev_n": 4}, dev2),
                           tmp_path / "out")
    decision, new = summary["promotion"], summary["version"]
    # one evaluation: the champion's registered model (not the challenger's folder) on v2's dev facts, with EVAL
    assert calls == [(folder_sha256(tiny[0]), [f["id"] for f in dev2.facts], v2, EVAL)]
    assert decision["champion_value"] == expected < 1 and decision["champion_tag_value"] == 1.0
    assert decision["challenger_value"] == 1.0  # chosen.json's predictions: every fact right
    assert decision["champion_scored"] == (f"re-scored on dev set {dev2.sha256[:12]} (4 facts of {v2}; data version "
                                           f"{decision['challenger_data_version']})")
    assert (decision["challenger_dev_set"], decision["champion_dev_set"]) == (dev2.sha256, data["v1"][1].sha256)
    assert decision["challenger_data_version"] and decision["champion_data_version"]
    # the four facts share one photo: one pair, so every resample holds them all and the interval is the point
    assert (decision["n_facts"], decision["n_pairs"]) == (4, 1)
    assert decision["delta"] == decision["delta_lo"] == decision["delta_hi"] == pytest.approx(1 - expected)
    assert decision["decision"] == "promoted" and decision["reason"] == (
        f"dev_f1 {1 - expected:+.4f} [{1 - expected:+.4f}, {1 - expected:+.4f}] over champion "
        f"({decision['champion_scored']}): lower bound above 0.0 (n=4 facts, 1 pairs, p={decision['p_value']:.2g})")
    assert aliases(name) == {CHALLENGER: new, CHAMPION: new}
    assert json.loads((tmp_path / "out" / "registered.json").read_text())["promotion"] == decision
    recorded = json.loads(candidate(name, new).tags["promotion"])
    assert recorded["champion_value"] == expected and recorded["champion_tag_value"] == 1.0
    assert recorded["champion_scored"] == decision["champion_scored"]
    assert (recorded["challenger_dev_set"], recorded["champion_dev_set"]) == (dev2.sha256, data["v1"][1].sha256)
    assert champion != new and MlflowClient().get_model_version(name, champion_copy).tags[
        f"rescored.{dev2.sha256[:12]}.dev_f1"] == repr(expected)


@pytest.mark.parametrize("case", ["facts-missing", "other-facts", "challenger-records-none",
                                  "champion-without-predictions"])
def test_promotion_refuses_what_it_cannot_score_on_one_dev_set(registered, data, tmp_path, case, monkeypatch):
    """`morer1 promote` where the challenger's dev facts are not (a machine without the data, or another data
    version), for a challenger that records no dev set, or for a champion of the same dev set without its
    predictions (a re-score is then needed): refused with the reason; the champion stays."""
    name = f"refuse-{case}"
    old = add_version(registered, name, None if case == "champion-without-predictions" else answers(
        data["v1"][1].facts, lambda i: True), data["v1"][1])
    registry.promote(named(name))
    dev = {"challenger-records-none": None, "champion-without-predictions": data["v1"][1]}.get(case, data["v2"][1])
    new = add_version(registered, name, answers((dev or data["v2"][1]).facts, lambda i: True), dev)
    facts = {"facts-missing": tmp_path / "absent", "other-facts": data["v1"][0],
             "challenger-records-none": data["v2"][0], "champion-without-predictions": tmp_path / "absent"}[case]
    monkeypatch.setattr(evaluate, "predict_facts", lambda *a: pytest.fail("no evaluation may run"))
    decision = registry.promote(named(name, facts=str(facts)))
    assert decision["decision"] == "refused" and aliases(name)[CHAMPION] == old
    assert decision["champion_value"] is None and decision["champion_scored"] is None
    assert decision["challenger_value"] is None and decision["delta"] is None
    assert decision["champion_tag_value"] == (None if case == "champion-without-predictions" else 1.0)
    why = {"facts-missing": f"{facts / 'dev.jsonl'}: missing",
           "other-facts": f"{facts} holds dev set {data['v1'][1].sha256[:12]}, not the challenger's "
                          f"{data['v2'][1].sha256[:12]}",
           "challenger-records-none": f"challenger version {new} records no dev set",
           "champion-without-predictions": f"champion version {served(name).version} has no dev predictions"}[case]
    assert why in decision["reason"] and decision["reason"].endswith(
        "without both models' answers to the same facts nothing is compared")
    tags = candidate(name, new).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.reason"] == decision["reason"]


def test_predict_one_and_jsonl(registered, tiny, tmp_path):
    uri = f"models:/{CFG.candidates_model_name}@{CHALLENGER}"
    answer = predict_one(uri, str(tiny[2]), "Angela Merkel speaks in Berlin", "Berlin", [10, 8, 50, 40])
    assert set(answer) == set(OUTPUT)
    (tmp_path / "photo.png").write_bytes(tiny[2].read_bytes())
    lines = [
        {"id": "a", "image": "photo.png", "title": "Merkel in Berlin", "entity": "Berlin", "box": [0, 0, 96, 64]},
        {"id": "b", "image": str(tiny[2]), "title": "Merkel in Berlin", "entity": "Merkel", "box": [1, 2, 3, 4]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert predict_jsonl(uri, tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                         allow_dirs=[tmp_path, tiny[2].parent]) == 2  # line b's photo lies outside tmp_path
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: o[k] for k in lines[0]} for o in out] == lines
    assert all(set(o) == set(lines[0]) | {"label", "rationale", "confidence"} for o in out)


def test_champion_served_over_http(registered, tiny, tmp_path):
    assert registry.promote(CFG)["decision"] == "already_champion" and aliases(CFG.model_name)[CHAMPION]
    port, bin_dir = free_port(), Path(sys.executable).parent
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(  # its own process group: the uvicorn worker is stopped with it
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{CFG.model_name}@{CHAMPION}",
         "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local", "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # `mlflow models serve` runs `uvicorn` by name: the venv's bin/ must be on PATH
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"server exited:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping after 120 s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        records = rows(tiny[2]).iloc[1:].to_dict("records")  # base64 and data URI: nothing local to the server
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"dataframe_records": records}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            predictions = json.loads(reply.read())["predictions"]
        assert len(predictions) == 2 and all(set(p) == set(OUTPUT) for p in predictions)
    finally:
        stop_group(server)
        log.close()
    deadline = time.monotonic() + 10
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(port)
