"""Registry: the pyfunc round trip, challenger/champion promotion, predict helpers, and a real `mlflow models serve`."""

import base64
import json
import os
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

from morer1 import registry
from morer1.errors import BadInputError
from morer1.labels import DEFAULT_LABELS
from morer1.predict import predict_jsonl, predict_one
from morer1.prompt import prompt_text
from morer1.registry import CHALLENGER, CHAMPION, RegisterConfig
from morer1.tiny_model import TinyModelConfig, build_tiny_model

CFG = RegisterConfig(max_new_tokens=6, batch_size=2)
CORPUS = [
    prompt_text("Angela Merkel speaks in Berlin", "Berlin", DEFAULT_LABELS),
    "<think>\nStep 1: A person on a stage.\nStep 6: She governs from Berlin.\n</think>\n"
    "<answer>/per/loc/place_of_governance</answer>",
] * 20
OUTPUT = ["label", "rationale", "completion"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, labels.json, photo path) of one tiny model built for the module."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_model(root / "model", CORPUS, TinyModelConfig(vocab_size=600))
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


@pytest.fixture(scope="module")
def registered(store, tiny):
    """Version 1 of `morer1`, logged and registered once for the module."""
    model_dir, labels, _ = tiny
    return registry.register_model(model_dir, labels, CFG, {"dev_f1": 0.5, "test_f1": 0.4}, {"purpose": "test"})


def rows(photo: Path) -> pd.DataFrame:
    """Three questions: a path, base64 bytes and a data URI."""
    encoded = base64.b64encode(photo.read_bytes()).decode("ascii")
    images = [str(photo), encoded, f"data:image/png;base64,{encoded}"]
    return pd.DataFrame([{"image": image, "title": "Angela Merkel speaks in Berlin", "entity": "Berlin",
                          "box": [10, 8, 50, 40]} for image in images])


def add_version(registered, name: str, dev_f1: float | None) -> str:
    """Register the module's logged model again under `name` (as challenger) with a given dev_f1 tag."""
    metrics = {} if dev_f1 is None else {"dev_f1": dev_f1}
    return str(registry.register_version(registered.source, RegisterConfig(model_name=name),
                                         metrics, {}).version)


def aliases(name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_register_tags_version_and_sets_challenger(registered):
    assert registered.aliases == [CHALLENGER]
    tags = registered.tags
    assert {"git_commit", "dvc_lock_sha256", "data_version"} <= set(tags)
    assert (tags["dev_f1"], tags["test_f1"], tags["purpose"]) == ("0.5", "0.4", "test")
    run = mlflow.get_run(registered.run_id)
    assert run.data.metrics == {"dev_f1": 0.5, "test_f1": 0.4} and run.data.tags["morer1.stage"] == "register"


def test_pyfunc_round_trip_matches_the_model_folder(registered, tiny):
    model = mlflow.pyfunc.load_model(f"models:/{CFG.model_name}@{CHALLENGER}")
    assert model.model_config == {"max_new_tokens": 6, "batch_size": 2}
    frame = rows(tiny[2])
    served = model.predict(frame)
    assert list(served.columns) == OUTPUT and len(served) == 3
    assert served["completion"].nunique() == 1  # one image three ways, greedy
    local = registry.predict(tiny[0], frame, labels_path=tiny[1], model_config={"max_new_tokens": 6})
    assert local["completion"].tolist() == served["completion"].tolist()


def test_register_refuses_metrics_without_the_compared_one(tiny):
    with pytest.raises(BadInputError, match="lack 'dev_f1'"):
        registry.register_model(tiny[0], tiny[1], CFG, {"test_f1": 0.4}, {})


@pytest.mark.parametrize(("row", "message"), [
    ({"box": [10, 8, 200, 40]}, r"row 0: box \[10, 8, 200, 40\] is empty or leaves the 96x64 image"),
    ({"box": [10, 8, 50]}, "row 0: box must be four integers"),
    ({"image": "no/such/file.png"}, "row 0: image 'no/such/file.png' is neither an image file nor base64"),
    ({"entity": " "}, "row 0: entity must be a non-empty string"),
])
def test_bad_rows_are_named(tiny, row, message):
    predictor = registry.MorePredictor()
    predictor.model = predictor.processor = None  # never reached: rows are checked before generation
    predictor.labels, predictor.max_new_tokens, predictor.batch_size = DEFAULT_LABELS, 4, 2
    frame = rows(tiny[2]).iloc[:1].assign(**{k: [v] for k, v in row.items()})
    with pytest.raises(BadInputError, match=message):
        predictor.predict(frame)


def test_first_challenger_becomes_champion_then_no_op(registered):
    name = "first"
    with pytest.raises(BadInputError, match="no 'challenger' version"):
        registry.promote(RegisterConfig(model_name=name))
    version = add_version(registered, name, 0.5)
    decision = registry.promote(RegisterConfig(model_name=name))
    assert (decision["decision"], decision["reason"]) == ("promoted", "no champion yet")
    assert aliases(name) == {CHALLENGER: version, CHAMPION: version}
    again = registry.promote(RegisterConfig(model_name=name))
    assert again["decision"] == "already_champion" and aliases(name)[CHAMPION] == version


@pytest.mark.parametrize(("champion", "challenger", "expected"), [
    (0.50, 0.60, "promoted"),  # better by more than the margin
    (0.50, 0.40, "kept"),  # worse
    (0.50, 0.503, "kept"),  # better, within the margin
    (0.50, None, "kept"),  # challenger without the metric
], ids=["better", "worse", "tie", "no-metric"])
def test_promotion_decision(registered, champion, challenger, expected):
    name = f"case-{str(challenger).replace('.', '_')}"
    old = add_version(registered, name, champion)
    registry.promote(RegisterConfig(model_name=name))
    new = add_version(registered, name, challenger)
    decision = registry.promote(RegisterConfig(model_name=name))
    assert decision["decision"] == expected
    assert aliases(name)[CHAMPION] == (new if expected == "promoted" else old)
    tags = MlflowClient().get_model_version(name, new).tags
    assert tags["promotion.decision"] == expected and tags["promotion.reason"] == decision["reason"]
    assert tags["promotion.champion_value"] == "0.5" and tags["promotion.champion_version"] == old
    assert tags["promotion.challenger_value"] == str(challenger) and tags["promotion.timestamp"]


def test_failed_promotion_keeps_the_champion(registered, monkeypatch):
    name = "failing"
    old = add_version(registered, name, 0.5)
    registry.promote(RegisterConfig(model_name=name))
    new = add_version(registered, name, 0.9)

    def broken(self, name, alias, version):
        raise RuntimeError("registry down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(RuntimeError, match="registry down"):
        registry.promote(RegisterConfig(model_name=name))
    assert aliases(name)[CHAMPION] == old
    assert "promotion.decision" not in MlflowClient().get_model_version(name, new).tags


def test_predict_one_and_jsonl(registered, tiny, tmp_path):
    uri = f"models:/{CFG.model_name}@{CHALLENGER}"
    answer = predict_one(uri, str(tiny[2]), "Angela Merkel speaks in Berlin", "Berlin", [10, 8, 50, 40])
    assert set(answer) == set(OUTPUT)
    (tmp_path / "photo.png").write_bytes(tiny[2].read_bytes())
    lines = [
        {"id": "a", "image": "photo.png", "title": "Merkel in Berlin", "entity": "Berlin", "box": [0, 0, 96, 64]},
        {"id": "b", "image": str(tiny[2]), "title": "Merkel in Berlin", "entity": "Merkel", "box": [1, 2, 3, 4]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert predict_jsonl(uri, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 2
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: o[k] for k in lines[0]} for o in out] == lines
    assert all(set(o) == set(lines[0]) | {"label", "rationale"} for o in out)


def test_champion_served_over_http(registered, tiny, tmp_path):
    decision = registry.promote(CFG)
    assert decision["decision"] in ("promoted", "already_champion") and aliases(CFG.model_name)[CHAMPION]
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
