"""The tracking store as a reader of the MLflow UI meets it: a model-training experiment, one source name per stage."""

import sys

import mlflow
from mlflow import MlflowClient

from morer1 import tracking


def test_the_experiment_is_a_model_training_one_new_or_existing():
    """MLflow 3's UI opens an experiment without a kind in its GenAI view: setup tags a new experiment, and one made
    before (or by someone else) once, and leaves a kind someone chose alone."""
    tracking.setup()
    assert mlflow.get_experiment_by_name("morer1").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = mlflow.create_experiment("made-before")  # as `morer1` in a store written by an earlier version
    chosen = mlflow.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.setup("made-before")
    tracking.setup("chosen")
    client = MlflowClient()
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_every_stage_run_has_one_source_name_whatever_started_it(monkeypatch):
    """`morer1 <stage>` for a run started by the `morer1` script and for one under `accelerate launch`
    (`python -m morer1`, whose script MLflow would name `__main__.py`)."""
    names = {}
    for stage, script in (("ingest", "/venv/bin/morer1"), ("sft", "/checkout/src/morer1/__main__.py")):
        monkeypatch.setattr(sys, "argv", [script, stage])
        with tracking.stage_run(stage) as run:
            pass
        names[stage] = MlflowClient().get_run(run.info.run_id).data.tags[tracking.SOURCE_TAG]
    assert names == {"ingest": "morer1 ingest", "sft": "morer1 sft"}
