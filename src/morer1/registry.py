"""Register stage: the model evaluate chose, registered in MLflow as `challenger` of the candidates model, then
promoted to `champion` of the served model when it beats the champion on dev with confidence.

Two registered models: the pipeline registers every chosen model into `candidates_model_name` (alias `challenger`);
promotion copies the winning candidate version into `model_name` and moves `champion` there. On servers with
MLflow's basic-auth app, registering a version and moving an alias both need EDIT on the registered model, so only
two models let the pipeline's account register without being able to move `champion` (infra/servers/README.md).

Register reads only `chosen.json` written by evaluate and the file it names: the model folder and its content hash,
the label set it was scored with, the metrics the version is tagged with, and `dev_predictions` (evaluate's
predictions_dev.jsonl: the model's answer to each dev fact), logged in the version's run as `PREDICTIONS_ARTIFACT`.
Each registered version carries the few tags a reader filters by: `git_commit`, `data_version`, `model_dir`,
`model_sha256`, the headline metrics (`HEADLINE_TAGS`: `dev_f1` with its interval `dev_f1_lo`/`dev_f1_hi`, `test_f1`;
and `register.metric` with its interval), the identity of the evaluation its dev metrics came from: `dev_set` (the
fingerprint of the dev facts scored, see `dev_set`) and `dev_eval` (the evaluate settings that scored them, as JSON),
`serve_config` (the logged pyfunc's `model_config`, as JSON), and once promotion has run `promotion.decision`,
`promotion.reason` and the whole decision as JSON tag `promotion`. The rest of its lineage (every metric, the
baselines, `dvc.lock`'s hash, the training settings) is `LINEAGE_ARTIFACT` in the version's run, which also holds the
model card (`CARD_ARTIFACT`; the logged model holds it as `README.md`, so a download of the model carries it).
Versions registered before carry one tag per metric, `dvc_lock_sha256` and `promotion.<field>` tags; promotion still
reads them.

Registration and promotion survive being killed at any point and rerun: a candidate version with the same
`model_sha256`, `data_version`, `dev_set`, `dev_eval` and `serve_config` is reused (its tags and predictions set
again), and so is a copy of the challenger already in the served model; `champion` is moved in one registry call,
never deleted.

`promote` compares the two models' answers to the same dev facts: the challenger's logged predictions, paired by fact
id with the champion's own when the champion was scored on the same dev set with the same settings, else with the
champion's registered model's answers to the challenger's dev facts (evaluate's own `predict_facts`), or, when it can
do neither, refuses. The challenger wins when the lower bound of the paired pair-bootstrap interval of the
difference in `metric` (`metrics.paired_bootstrap`: the same resampled image-title pairs for both models) is above
`min_delta`: better with `confidence`, not by a point estimate. The served model itself is `morer1.serve`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import mlflow
from pydantic import Field, model_validator

from morer1.errors import BadInputError
from morer1.files import read_jsonl, write_text_atomic
# MorePredictor is also looked up here by versions registered before it moved to morer1.serve (their pickle names
# morer1.registry.MorePredictor).
from morer1.serve import OUTPUT_EXAMPLE, PARAMS_EXAMPLE, MorePredictor, ServeConfig, input_example, serve_model_config

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from morer1.evaluate import DevSet

CHALLENGER = "challenger"
CHAMPION = "champion"
DATA_PATH = "data/ingested"  # the DVC output whose hash is a version's `data_version`
DEV_SET_TAG = "dev_set"  # fingerprint of the dev facts a version's dev metrics were computed on (`dev_set`)
DEV_EVAL_TAG = "dev_eval"  # JSON of the evaluate settings that computed them
SERVE_TAG = "serve_config"  # JSON of the logged pyfunc's model_config (the served model's generation and limits)
IDENTITY_TAGS = ("model_sha256", "data_version", DEV_SET_TAG, DEV_EVAL_TAG, SERVE_TAG)  # one registration
PROMOTION_TAG = "promotion"  # the decision as JSON: on a candidate the latest, on a copy the one that made it champion
DECISION_TAGS = ("decision", "reason")  # also as `promotion.<field>` tags on a candidate: readable, filterable
# metric tags of a version (with register.metric and its interval); every metric is a metric of its run
HEADLINE_TAGS = ("dev_f1", "dev_f1_lo", "dev_f1_hi", "test_f1")
RETIRED_TAGS = ("dvc_lock_sha256",)  # tags of versions registered before, now in LINEAGE_ARTIFACT
LINEAGE_ARTIFACT = "lineage.json"  # in a version's run: hashes, every metric, baselines, training settings
CARD_ARTIFACT = "MODEL_CARD.md"  # in a version's run (and `README.md` in its logged model): the model card
PREDICTIONS_ARTIFACT = "evaluation/dev_predictions.jsonl"  # in a version's run: its answer to each dev fact
PREDICTION_KEYS = ("id", "image", "relation", "predicted")  # what pairing reads of each row of it
SAME_DATA = "own predictions, same dev set"  # `champion_scored` when the champion's logged predictions are paired
# What the logged model needs besides morer1 itself; given explicitly, so MLflow never loads the model to infer it.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "transformers", "tokenizers", "pillow", "pandas", "pydantic",
                "pyyaml")


class RegisterConfig(ServeConfig):
    """Parameters of the register and promote steps, and of the served model's generation."""

    model_name: str = Field(
        "morer1", min_length=1,
        description="Served registered model: promotion copies the winning candidate into it and moves its `champion` "
                    "alias.")
    candidates_model_name: str = Field(
        "morer1-candidates", min_length=1,
        description="Registered model the register stage registers every chosen model into, with alias `challenger` "
                    "(the pipeline's account needs EDIT on it only, not on `model_name`).")
    promote: bool = Field(
        True, description="Run the promotion gate in the register stage. false where the pipeline's MLflow account may "
                          "not write to `model_name` (team servers with auth): the promotion flow, run with the "
                          "promoter's account, decides.")
    metric: Literal["dev_accuracy", "dev_precision", "dev_recall", "dev_f1"] = Field(
        "dev_f1", description="Dev figure (dev_accuracy, dev_precision, dev_recall or dev_f1) whose paired difference "
                              "(challenger minus champion, on the same dev facts) decides promotion.")
    min_delta: float = Field(
        0.0, ge=-1, lt=1,
        description="Promote only when the lower bound of the paired-bootstrap interval of the metric's difference is "
                    "above this (0: better with `confidence`).")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Confidence of that interval (0.95: from the 2.5 % to the 97.5 % quantile).")
    bootstrap_resamples: int = Field(
        2000, ge=1, description="Resamples of the paired bootstrap (each draws the dev set's image-title pairs with "
                                "replacement and keeps all their facts).")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resamples.")
    min_pairs: int = Field(
        30, ge=1, description="Keep the champion when the compared dev facts span fewer image-title pairs than this: "
                              "a bootstrap over a handful of pairs (one pair: an interval of zero width) says nothing.")
    facts: str = Field(
        "data/ingested", min_length=1,
        description="Ingested facts folder evaluate scored (whose dev split evaluate fingerprinted as the version's dev "
                    "set in chosen.json): promotion re-scores the champion on it when the champion was scored on other "
                    "dev data (or logged no dev predictions), and refuses when it does not hold the challenger's dev "
                    "set.")

    @model_validator(mode="after")
    def _two_models(self) -> RegisterConfig:
        if self.candidates_model_name == self.model_name:
            raise ValueError(f"candidates_model_name must differ from model_name ({self.model_name!r}): whoever may "
                             "register versions of a model may also move its aliases")
        return self


def log_predictor(model_dir: str | Path, labels_path: str | Path, cfg: RegisterConfig) -> str:
    """Log the pyfunc of a model folder and its labels.json in the active run; return the logged model's URI."""
    from mlflow.models import infer_signature

    example = input_example()
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=MorePredictor(),
        artifacts={"model": str(model_dir), "labels": str(labels_path)},
        model_config=serve_model_config(cfg),
        signature=infer_signature(example, OUTPUT_EXAMPLE, params=PARAMS_EXAMPLE),  # declares samples, abstain_below
        input_example=example,
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
    )
    return info.model_uri


def data_version(cwd: str | Path = ".") -> str:
    """DVC hash of `data/ingested` recorded in dvc.lock, or `none`."""
    import yaml

    lock = Path(cwd) / "dvc.lock"
    if not lock.exists():
        return "none"
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == DATA_PATH:  # DVC 3 writes `hash: md5` (the algorithm) beside `md5: <value>`
                return str(out.get(out.get("hash") or "md5") or "none")
    return "none"


def dev_tags(chosen: dict) -> dict[str, str]:
    """Version tags naming the evaluation a version's dev metrics came from (evaluate's chosen.json): `dev_set` and
    `dev_eval`."""
    return {DEV_SET_TAG: chosen["dev_set"], DEV_EVAL_TAG: json.dumps(chosen["dev_eval"], sort_keys=True)}


def version_tags(metrics: dict, tags: dict, metric: str = "dev_f1") -> dict[str, str]:
    """The tags of a candidate version: code and data versions, the headline metrics of `metrics` (`HEADLINE_TAGS`,
    and `metric`, the one promotion compares, with its interval), and `tags`."""
    from morer1 import tracking

    keep = {*HEADLINE_TAGS, metric, f"{metric}_lo", f"{metric}_hi"}
    return {"git_commit": tracking.git_commit(), "data_version": data_version(),
            **{name: repr(float(value)) for name, value in metrics.items() if name in keep},
            **{k: str(v) for k, v in tags.items()}}


def identity(tags: dict[str, str]) -> tuple[str, ...] | None:
    """What makes two registrations one: the model's content hash, its data version, the evaluation its metrics
    came from and the served model's settings (`IDENTITY_TAGS`); None when a tag is missing (never reused)."""
    return tuple(tags[key] for key in IDENTITY_TAGS) if all(key in tags for key in IDENTITY_TAGS) else None


def registered_as(client, name: str, tags: dict[str, str]) -> ModelVersion | None:
    """The oldest version of `name` with the identity of `tags`, or None."""
    key = identity(tags)
    if key is None:
        return None
    found = [v for v in client.search_model_versions(f"name = '{name}' and tags.model_sha256 = '{key[0]}'")
             if identity(v.tags) == key]
    return min(found, key=lambda v: int(v.version)) if found else None


def register_version(model_uri: str, cfg: RegisterConfig, metrics: dict, tags: dict) -> ModelVersion:
    """Register `model_uri` under `cfg.candidates_model_name` with version, data and metric tags; alias it
    `challenger`."""
    from mlflow import MlflowClient

    registered = mlflow.register_model(model_uri, cfg.candidates_model_name,
                                       tags=version_tags(metrics, tags, cfg.metric))
    client = MlflowClient()
    client.set_registered_model_alias(cfg.candidates_model_name, CHALLENGER, registered.version)
    return client.get_model_version(cfg.candidates_model_name, registered.version)


def check_predictions(rows: list[dict], where: str, labels=None) -> list[dict]:
    """`rows` when they are dev predictions as evaluate writes them: at least one, each with `PREDICTION_KEYS`, fact
    ids distinct, and (given `labels`) each gold a label and each answer a label or None (invalid); else BadInputError
    naming `where` and the row."""
    if not rows:
        raise BadInputError(f"{where}: no predictions")
    seen = set()
    for number, row in enumerate(rows, 1):
        missing = [key for key in PREDICTION_KEYS if key not in row]
        if missing:
            raise BadInputError(f"{where}: row {number} lacks {missing}")
        if row["id"] in seen:
            raise BadInputError(f"{where}: row {number}: fact id {row['id']!r} again")
        seen.add(row["id"])
        if labels is not None and (row["relation"] not in labels or not (row["predicted"] is None
                                                                          or row["predicted"] in labels)):
            raise BadInputError(f"{where}: row {number}: relation {row['relation']!r} or predicted "
                                f"{row['predicted']!r} is not a label of the set")
    return rows


def read_predictions(path: str | Path, where: str, labels=None) -> list[dict]:
    """The dev predictions of a JSON-lines file, checked (`check_predictions`); BadInputError when unreadable."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as exc:  # json's JSONDecodeError is a ValueError
        raise BadInputError(f"{where}: {exc}") from None
    return check_predictions(rows, where, labels)


def register_model(model_dir: str | Path, labels_path: str | Path, predictions: str | Path, cfg: RegisterConfig,
                   metrics: dict, tags: dict) -> ModelVersion:
    """Log the dev predictions file and the model as a pyfunc in the active run, register it as a candidate, alias it
    `challenger`.

    `metrics` must hold `cfg.metric`; every metric becomes a run metric, the headline ones also version tags
    (`version_tags`). `predictions` (evaluate's
    predictions_dev.jsonl, checked by the caller) is logged as `PREDICTIONS_ARTIFACT`, before the model, so every
    version's run holds it. A candidate version with the same `identity` (a rerun after a kill, or of the same model
    on the same data) is reused: its tags and its run's predictions are set to this registration's (the metric and
    retired tags of a version registered before are removed) and it becomes `challenger`; nothing else is logged or
    registered again.
    """
    from mlflow import MlflowClient

    if cfg.metric not in metrics:
        raise BadInputError(f"metrics {sorted(metrics)} lack {cfg.metric!r}, the metric promotion compares")
    bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise BadInputError(f"metrics must be finite numbers: {bad}")
    for path in (Path(model_dir) / "config.json", Path(labels_path)):
        if not path.is_file():
            raise BadInputError(f"{path}: missing")
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    client = MlflowClient()
    wanted = version_tags(metrics, {**tags, SERVE_TAG: json.dumps(serve_model_config(cfg), sort_keys=True)},
                          cfg.metric)
    existing = registered_as(client, cfg.candidates_model_name, wanted)
    text = Path(predictions).read_text(encoding="utf-8")
    if existing is None:
        mlflow.log_text(text, PREDICTIONS_ARTIFACT)
        return register_version(log_predictor(model_dir, labels_path, cfg), cfg, metrics,
                                {**tags, SERVE_TAG: wanted[SERVE_TAG]})
    client.log_text(existing.run_id, text, PREDICTIONS_ARTIFACT)
    for key, value in wanted.items():
        if existing.tags.get(key) != value:
            client.set_model_version_tag(cfg.candidates_model_name, existing.version, key, value)
    for key in existing.tags:
        if key not in wanted and (key in metrics or key in RETIRED_TAGS):
            client.delete_model_version_tag(cfg.candidates_model_name, existing.version, key)
    client.set_registered_model_alias(cfg.candidates_model_name, CHALLENGER, existing.version)
    mlflow.set_tag("morer1.reused_version", str(existing.version))
    return client.get_model_version(cfg.candidates_model_name, existing.version)


def version_by_alias(client, name: str, alias: str) -> ModelVersion | None:
    """The version carrying `alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        number = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return client.get_model_version(name, str(number)) if number is not None else None


def tag_metric(model_version: ModelVersion, metric: str) -> float | None:
    """The metric a version records: its tag (a headline metric, or any metric of a version registered before
    versions carried only those), else its run's metric; None when neither holds a finite number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        value = float(model_version.tags[metric])
    except (KeyError, ValueError):
        value = None
        if model_version.run_id:
            try:
                value = MlflowClient().get_run(model_version.run_id).data.metrics.get(metric)
            except MlflowException:  # the run was deleted
                value = None
    return value if value is not None and math.isfinite(value) else None


def recorded_decision(model_version: ModelVersion) -> dict:
    """The promotion decision a version records as JSON tag `promotion` ({} when none or unreadable)."""
    try:
        recorded = json.loads(model_version.tags.get(PROMOTION_TAG) or "{}")
    except ValueError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def decided_at(candidate: ModelVersion) -> str | None:
    """The timestamp of the latest decision recorded on a candidate version: its `promotion` tag's, or the
    `promotion.timestamp` tag of a version decided before decisions were one JSON tag."""
    return recorded_decision(candidate).get("timestamp") or candidate.tags.get("promotion.timestamp")


def evaluation_of(model_version: ModelVersion) -> tuple[str, str] | None:
    """(`dev_set`, `dev_eval`) tags of a version, or None when it records no dev evaluation (registered before
    versions did)."""
    tags = model_version.tags
    return (tags[DEV_SET_TAG], tags[DEV_EVAL_TAG]) if DEV_SET_TAG in tags and DEV_EVAL_TAG in tags else None


def other_evaluation(champion: ModelVersion, challenger: ModelVersion) -> str | None:
    """Why the champion's own dev predictions are not answers to the challenger's dev facts, or None when they are:
    both were scored in one evaluation (same dev set, same evaluate settings)."""
    mine, theirs = evaluation_of(challenger), evaluation_of(champion)
    if theirs is None:
        return f"champion version {champion.version} records no dev set (tags {DEV_SET_TAG!r}, {DEV_EVAL_TAG!r})"
    if mine is None:
        return f"challenger version {challenger.version} records no dev set (tags {DEV_SET_TAG!r}, {DEV_EVAL_TAG!r})"
    if mine[0] != theirs[0]:
        return (f"champion version {champion.version} was scored on dev set {theirs[0][:12]} (data version "
                f"{champion.tags.get('data_version', 'none')}), the challenger on {mine[0][:12]} (data version "
                f"{challenger.tags.get('data_version', 'none')})")
    if mine[1] != theirs[1]:
        return (f"champion version {champion.version} was scored with evaluate settings {theirs[1]}, the challenger "
                f"with {mine[1]}")
    return None


def registered_model_dir(name: str, version: str, dst: str | Path) -> Path:
    """Download version `version` of registered model `name` into `dst`; return the model folder of its pyfunc."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    artifacts = (Model.load(str(local)).flavors.get("python_function") or {}).get("artifacts") or {}
    if "model" not in artifacts:
        raise BadInputError(f"version {version} of {name!r} is not a morer1 pyfunc (it has no 'model' artifact)")
    return local / artifacts["model"]["path"]


def rescore(cfg: RegisterConfig, champion: ModelVersion, challenger: ModelVersion) -> tuple[list[dict], DevSet]:
    """The champion's answers to the challenger's dev facts, generated as evaluate generated the challenger's, and
    that dev set.

    The dev facts are those of `cfg.facts`, which must fingerprint to the challenger's `dev_set`; the settings are
    the challenger's `dev_eval`; the model is the champion's registered one; generation is evaluate's own
    `predict_facts` (each row a dev fact with `predicted` and `completion`). BadInputError saying why when any of it
    is missing or differs.
    """
    from morer1.evaluate import EvaluateConfig, dev_set, predict_facts

    recorded = evaluation_of(challenger)
    if recorded is None:
        raise BadInputError(f"challenger version {challenger.version} records no dev set "
                            f"(tags {DEV_SET_TAG!r}, {DEV_EVAL_TAG!r})")
    try:
        settings = EvaluateConfig(**json.loads(recorded[1]))
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise BadInputError(f"challenger version {challenger.version}: tag {DEV_EVAL_TAG!r} {recorded[1]!r}: "
                            f"{exc}") from None
    dev = dev_set(cfg.facts, settings.max_facts, settings.seed)
    if dev.sha256 != recorded[0]:
        raise BadInputError(f"{cfg.facts} holds dev set {dev.sha256[:12]}, not the challenger's {recorded[0][:12]}")
    with tempfile.TemporaryDirectory(prefix="morer1-champion-") as tmp:
        rows = predict_facts(registered_model_dir(cfg.model_name, champion.version, tmp), dev.facts, dev.facts_dir,
                             dev.labels, settings)
    return rows, dev


def logged_predictions(version: ModelVersion, dst: str | Path) -> list[dict] | None:
    """The dev predictions logged with `version` (`PREDICTIONS_ARTIFACT` of its run; a copy in the served model keeps
    the run), downloaded into `dst` and checked; None when its run holds none."""
    from mlflow import MlflowClient

    folder = PREDICTIONS_ARTIFACT.rpartition("/")[0]
    if not version.run_id or PREDICTIONS_ARTIFACT not in {
            info.path for info in MlflowClient().list_artifacts(version.run_id, folder)}:
        return None
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=PREDICTIONS_ARTIFACT,
                                               dst_path=str(dst))
    return read_predictions(path, f"{PREDICTIONS_ARTIFACT} of run {version.run_id}")


def paired(challenger_rows: list[dict], champion_rows: list[dict]) -> list[tuple[dict, dict]]:
    """The challenger's and the champion's row of each dev fact, paired by fact id in the challenger's order;
    BadInputError when the two hold other fact ids, or another gold relation for one id."""
    theirs = {row["id"]: row for row in champion_rows}
    mine = {row["id"] for row in challenger_rows}
    if mine != set(theirs):
        only_mine, only_theirs = sorted(mine - set(theirs), key=str), sorted(set(theirs) - mine, key=str)
        raise BadInputError(f"they answer other facts: {len(only_mine)} fact ids only the challenger's "
                            f"{only_mine[:3]}, {len(only_theirs)} only the champion's {only_theirs[:3]}")
    differ = [row["id"] for row in challenger_rows if row["relation"] != theirs[row["id"]]["relation"]]
    if differ:
        raise BadInputError(f"{len(differ)} facts have another gold relation in the two, e.g. {differ[:3]}")
    return [(row, theirs[row["id"]]) for row in challenger_rows]


def compare(cfg: RegisterConfig, rows: list[tuple[dict, dict]]) -> dict:
    """Challenger minus champion on paired rows (`paired`): both point values of `cfg.metric` and the paired
    pair-bootstrap interval of their difference (`metrics.paired_bootstrap`, pairs keyed by each fact's photo), as
    decision fields."""
    from morer1.metrics import compute_metrics, paired_bootstrap

    key = cfg.metric.partition("_")[2]
    golds = [mine["relation"] for mine, _ in rows]
    new, old = [mine["predicted"] for mine, _ in rows], [theirs["predicted"] for _, theirs in rows]
    labels = sorted({*golds, *(p for p in new + old if p is not None)})  # every answer is a label (checked) or None
    stats = paired_bootstrap(golds, new, old, [mine["image"] for mine, _ in rows], labels,
                             resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=cfg.bootstrap_seed)
    return {"challenger_value": compute_metrics(golds, new, labels)[key],
            "champion_value": compute_metrics(golds, old, labels)[key],
            "delta": stats[f"delta_{key}"], "delta_lo": stats[f"delta_{key}_lo"], "delta_hi": stats[f"delta_{key}_hi"],
            "p_value": stats[f"p_value_{key}"], "n_facts": stats["n"], "n_pairs": stats["n_pairs"],
            "wins": stats["wins"], "losses": stats["losses"]}


def candidate_uri(cfg: RegisterConfig, version: str) -> str:
    """The registry URI of version `version` of the candidates model (the source of its copy in the served model)."""
    return f"models:/{cfg.candidates_model_name}/{version}"


def copy_of(client, cfg: RegisterConfig, candidate: ModelVersion) -> ModelVersion | None:
    """The oldest version of the served model copied from `candidate`, or None."""
    uri = candidate_uri(cfg, candidate.version)
    found = [v for v in client.search_model_versions(f"name = '{cfg.model_name}' and source_path = '{uri}'")
             if v.source == uri]
    return min(found, key=lambda v: int(v.version)) if found else None


@contextmanager
def writing(name: str):
    """Writes to registered model `name`: an account without EDIT on it gets a BadInputError saying whose it is."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        denied = exc if exc.error_code == "PERMISSION_DENIED" else exc.__cause__  # copy_model_version wraps it
        if not (isinstance(denied, MlflowException) and denied.error_code == "PERMISSION_DENIED"):
            raise
        account = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(no MLFLOW_TRACKING_USERNAME)"
        raise BadInputError(
            f"MLflow account {account} may not write to registered model {name!r} ({denied.message}): promotion needs "
            "the promoter's account (infra/servers/README.md); where the pipeline's account runs the register stage, "
            "set register.promote: false and promote with flows/promote.py") from None


def rule(cfg: RegisterConfig) -> str:
    """The promotion rule of `cfg` in words."""
    return (f"promote when the {cfg.confidence * 100:g} % paired-bootstrap lower bound of Δ{cfg.metric} > "
            f"{cfg.min_delta} ({cfg.bootstrap_resamples} resamples of image-title pairs, seed {cfg.bootstrap_seed}) "
            f"over at least {cfg.min_pairs} pairs")


def decision_base(cfg: RegisterConfig, challenger: ModelVersion, champion: ModelVersion | None) -> dict:
    """The fields of a promotion decision known before deciding; the comparison's are None until made."""
    return {
        "model_name": cfg.model_name, "candidates_model_name": cfg.candidates_model_name, "metric": cfg.metric,
        "rule": rule(cfg), "min_delta": cfg.min_delta, "confidence": cfg.confidence,
        "challenger_version": str(challenger.version), "champion_version": str(champion.version) if champion else None,
        "challenger_value": None, "champion_value": None,  # both models' `metric` on the paired dev facts
        "delta": None, "delta_lo": None, "delta_hi": None,  # challenger minus champion, its interval at `confidence`
        "p_value": None, "n_facts": None, "n_pairs": None,  # two-sided; facts and image-title pairs compared
        "wins": None, "losses": None,  # facts only the challenger, only the champion answers right
        "champion_scored": None,  # where the champion's answers came from
        "champion_tag_value": tag_metric(champion, cfg.metric) if champion else None,
        "challenger_data_version": challenger.tags.get("data_version"),
        "champion_data_version": champion.tags.get("data_version") if champion else None,
        "challenger_dev_set": challenger.tags.get(DEV_SET_TAG),
        "champion_dev_set": champion.tags.get(DEV_SET_TAG) if champion else None,
        "served_version": str(champion.version) if champion else None,  # the version carrying `champion` after
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def decision_line(decision: dict) -> str:
    """A promotion decision in one line: the decision, the difference with its interval, facts and pairs, p, reason."""
    if decision.get("delta") is None:
        return f"{decision['decision']}: {decision['reason']}"
    return (f"{decision['decision']}: Δ{decision['metric']} {decision['delta']:+.4f} [{decision['delta_lo']:+.4f}, "
            f"{decision['delta_hi']:+.4f}] ({decision['confidence'] * 100:g} %), {decision['n_facts']} facts, "
            f"{decision['n_pairs']} pairs, p={decision['p_value']:.2g}; {decision['reason']}")


def tag_decision(client, cfg: RegisterConfig, challenger: ModelVersion, decision: dict) -> None:
    """Record `decision` on the challenger's candidate version: `promotion.decision` and `promotion.reason`, then the
    whole decision as JSON tag `promotion` (last: a rerun that finds its timestamp missing writes them again). The
    `promotion.<field>` tags of an earlier decision recorded field by field are removed."""
    name, version = cfg.candidates_model_name, challenger.version
    for key in DECISION_TAGS:
        client.set_model_version_tag(name, version, f"promotion.{key}", str(decision[key]))
    for key in challenger.tags:
        if key.startswith("promotion.") and key.partition(".")[2] not in DECISION_TAGS:
            client.delete_model_version_tag(name, version, key)
    client.set_model_version_tag(name, version, PROMOTION_TAG, json.dumps(decision))


def judge(cfg: RegisterConfig, champion: ModelVersion, challenger: ModelVersion, decision: dict,
          tmp: Path) -> tuple[str, str, DevSet | None]:
    """Compare the challenger with the champion on the same dev facts, filling `decision`'s comparison fields; return
    the outcome, its reason and the dev set the champion was re-scored on (None when it was not)."""
    mine = logged_predictions(challenger, tmp / "challenger")
    if mine is None:
        return "refused", (f"challenger version {challenger.version} has no dev predictions ({PREDICTIONS_ARTIFACT} "
                           f"of its run {challenger.run_id}): its answers cannot be paired with the champion's"), None
    why, theirs, rescored = other_evaluation(champion, challenger), None, None
    if why is None:
        try:
            theirs = logged_predictions(champion, tmp / "champion")
        except BadInputError as exc:
            why = f"champion version {champion.version}: {exc}"
        if why is None and theirs is None:
            why = (f"champion version {champion.version} has no dev predictions ({PREDICTIONS_ARTIFACT} of its run "
                   f"{champion.run_id})")
    if why is None:
        how = SAME_DATA
    else:
        try:
            theirs, rescored = rescore(cfg, champion, challenger)
        except BadInputError as exc:
            return "refused", (f"{why}; re-scoring the champion on the challenger's dev set is impossible here "
                               f"({exc}): without both models' answers to the same facts nothing is compared"), None
        how = (f"re-scored on dev set {rescored.sha256[:12]} ({len(rescored.facts)} facts of {rescored.facts_dir}; "
               f"data version {decision['challenger_data_version']})")
    decision["champion_scored"] = how
    try:
        decision.update(compare(cfg, paired(mine, theirs)))
    except BadInputError as exc:
        return "refused", f"the challenger's dev predictions and the champion's ({how}) cannot be paired: {exc}", None
    better = decision["delta_lo"] > cfg.min_delta
    enough = decision["n_pairs"] >= cfg.min_pairs
    verdict = (f"lower bound {'' if better else 'not '}above {cfg.min_delta}" if enough else
               f"{decision['n_pairs']} image-title pairs are fewer than register.min_pairs ({cfg.min_pairs})")
    return ("promoted" if better and enough else "kept"), (
        f"{cfg.metric} {decision['delta']:+.4f} [{decision['delta_lo']:+.4f}, {decision['delta_hi']:+.4f}] over "
        f"champion ({how}): {verdict} (n={decision['n_facts']} facts, {decision['n_pairs']} pairs, "
        f"p={decision['p_value']:.2g})"), rescored


def promote(cfg: RegisterConfig) -> dict:
    """Make the `challenger` candidate `champion` of the served model if there is no champion or it beats the
    champion with confidence: the lower bound of the paired-bootstrap interval (`cfg.confidence`) of challenger minus
    champion in `cfg.metric`, on the same dev facts, is above `cfg.min_delta`.

    Both models' answers to each dev fact are compared (`judge`): the challenger's logged predictions
    (`PREDICTIONS_ARTIFACT`; without them the decision is "refused"), paired by fact id with the champion's own when
    champion and challenger were scored on the same dev set with the same evaluate settings and the champion has
    them (`champion_scored`: "own predictions, same dev set"); otherwise with the champion's registered model's
    answers to the challenger's dev facts (`rescore`; "re-scored on ..."). When that is impossible (e.g. `cfg.facts`
    missing where promote runs, or not the challenger's dev set), or the two answer other facts, the decision is
    "refused" with the reason and the champion stays. A promotion that finds the challenger no better within the
    interval is "kept". The decision, with both point values, the difference, its interval and p-value, both data
    versions and dev sets, is recorded on the challenger's candidate version (`tag_decision`: JSON tag `promotion`,
    with `promotion.decision` and `promotion.reason`; a re-score also as
    `rescored.<dev set>.<metric>` on the champion's version) and returned.

    Every write to the served model comes before the move: the re-score tag, the copy of the candidate version
    (`copy_model_version`, keeping its tags, run and logged model; a copy made by an interrupted promotion is
    reused) and the decision as JSON tag `promotion` on the copy; then `champion` moves in one registry call, then
    the candidate's tags are written. Killed at any point,
    the served model keeps a champion (the old one until the move), and a rerun finishes the same promotion: when
    the copy already holds `champion` but the candidate lacks its tags, they are written from the copy's record.
    """
    from mlflow import MlflowClient

    from morer1 import tracking

    tracking.setup()
    client = MlflowClient()
    challenger = version_by_alias(client, cfg.candidates_model_name, CHALLENGER)
    if challenger is None:
        raise BadInputError(f"model {cfg.candidates_model_name!r} has no '{CHALLENGER}' version; register one first")
    champion = version_by_alias(client, cfg.model_name, CHAMPION)
    decision = decision_base(cfg, challenger, champion)
    if champion is not None and champion.source == candidate_uri(cfg, challenger.version):
        recorded = recorded_decision(champion)
        if recorded.get("challenger_version") == str(challenger.version) and decided_at(
                challenger) != recorded.get("timestamp"):  # killed between the alias move and the tags
            tag_decision(client, cfg, challenger, recorded)
            return recorded
        if recorded.get("challenger_version") == str(challenger.version) and PROMOTION_TAG not in challenger.tags:
            tag_decision(client, cfg, challenger, recorded)  # decided before decisions were one JSON tag: as now
        return {**decision, "decision": "already_champion",
                "reason": f"candidate version {challenger.version} is already champion (version {champion.version} "
                          f"of {cfg.model_name!r})"}
    rescored = None
    if champion is None:
        outcome, reason = "promoted", "no champion yet"
    else:
        with tempfile.TemporaryDirectory(prefix="morer1-predictions-") as tmp:
            outcome, reason, rescored = judge(cfg, champion, challenger, decision, Path(tmp))
    decision.update(decision=outcome, reason=reason)
    with writing(cfg.model_name):
        if rescored is not None:
            client.set_model_version_tag(cfg.model_name, champion.version, f"rescored.{rescored.sha256[:12]}."
                                         f"{cfg.metric}", repr(decision["champion_value"]))
        if outcome == "promoted":
            copy = copy_of(client, cfg, challenger) or client.copy_model_version(
                candidate_uri(cfg, challenger.version), cfg.model_name)
            decision["served_version"] = str(copy.version)
            for key in copy.tags:  # the copy took the candidate's tags, an earlier decision's among them
                if key.startswith("promotion."):
                    client.delete_model_version_tag(cfg.model_name, copy.version, key)
            client.set_model_version_tag(cfg.model_name, copy.version, PROMOTION_TAG, json.dumps(decision))
            client.set_registered_model_alias(cfg.model_name, CHAMPION, copy.version)  # the one move
    tag_decision(client, cfg, challenger, decision)
    return decision


def deferred(cfg: RegisterConfig) -> dict:
    """The decision of a register stage that does not promote (`cfg.promote` false)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    challenger = version_by_alias(client, cfg.candidates_model_name, CHALLENGER)
    return {**decision_base(cfg, challenger, version_by_alias(client, cfg.model_name, CHAMPION)),
            "decision": "deferred", "reason": "register.promote is false: the promotion flow decides"}


def log_card(registered: ModelVersion, chosen: dict, metrics_path: Path, decision: dict, tmp: Path,
             params_path: str | Path = "params.yaml") -> str:
    """Write the version's lineage and model card (`morer1.model_card`) into its run (`LINEAGE_ARTIFACT`,
    `CARD_ARTIFACT`) and the card as `README.md` into its logged model; return the card. The settings are those of
    `params_path` (the run's params.yaml; none when it is missing), the baselines those of evaluate's metrics.json
    beside chosen.json. Logged again by a rerun (a reused version): the files are replaced, nothing is added."""
    from mlflow import MlflowClient

    from morer1 import model_card, tracking
    from morer1.params import read_params
    from morer1.prompt import TEMPLATES, model_prompt, template

    params = read_params(params_path) if Path(params_path).is_file() else {}
    evaluated = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    info = model_card.lineage(chosen, registered.tags, tracking.dvc_lock_hash(), params, evaluated,
                              {"name": registered.name, "version": str(registered.version),
                               "run_id": registered.run_id})
    info["demo"] = model_card.is_demo(params)
    prompt = model_prompt(chosen["model_dir"])
    confidence = float((params.get("evaluate") or {}).get("confidence", 0.95))
    card = model_card.render(info, decision, prompt, template(prompt), TEMPLATES[prompt][1], confidence,
                             model_card.parameter_count(chosen["model_dir"]))
    client = MlflowClient()
    client.log_dict(registered.run_id, info, LINEAGE_ARTIFACT)
    client.log_text(registered.run_id, card, CARD_ARTIFACT)
    # the version's logged model (MLflow 3: the version's source `models:/m-...`; its model_id is not always set)
    source = registered.source or ""
    model_id = getattr(registered, "model_id", None) or (source[len("models:/"):] if source.startswith(
        "models:/m-") else None)
    if model_id:  # its download (models:/<name>/<version>, models:/morer1@champion) carries the card
        readme = tmp / "README.md"
        readme.write_text(card, encoding="utf-8")
        client.log_model_artifact(model_id, str(readme))
    return card


def run(cfg: RegisterConfig, chosen_path: str | Path, out_dir: str | Path) -> dict:
    """Register the model of evaluate's `chosen.json` as `challenger` of the candidates model (tagged with its metrics
    and the evaluation they came from, with its dev predictions), run the promotion gate when `cfg.promote`, log the
    version's lineage and model card (`log_card`), write `out_dir/MODEL_CARD.md` and `out_dir/registered.json`; return
    the latter (candidates model name, version, model folder, the promotion decision).

    BadInputError before anything is logged when the model folder changed since evaluate, or chosen.json names no
    dev predictions (an older evaluate's) or they are missing or malformed."""
    from morer1 import tracking
    from morer1.files import folder_sha256

    chosen = json.loads(Path(chosen_path).read_text(encoding="utf-8"))
    model_dir = chosen["model_dir"]
    if folder_sha256(model_dir) != chosen["model_sha256"]:
        raise BadInputError(f"{model_dir} changed since evaluate scored it ({chosen_path}); rerun evaluate")
    if "dev_predictions" not in chosen:
        raise BadInputError(f"{chosen_path} names no dev_predictions (it predates them): rerun evaluate, whose "
                            "answers to each dev fact promotion compares")
    predictions = Path(chosen_path).parent / chosen["dev_predictions"]
    read_predictions(predictions, str(predictions), chosen["labels"])
    out_dir = Path(out_dir)
    with tracking.stage_run("register", cfg), tempfile.TemporaryDirectory(prefix="morer1-labels-") as tmp:
        labels_path = Path(tmp) / "labels.json"
        labels_path.write_text(json.dumps(chosen["labels"]) + "\n", encoding="utf-8")
        registered = register_model(model_dir, labels_path, predictions, cfg, chosen["metrics"],
                                    {"model_dir": model_dir, "model_sha256": chosen["model_sha256"],
                                     **dev_tags(chosen)})
        decision = promote(cfg) if cfg.promote else deferred(cfg)
        summary = {"model_name": cfg.candidates_model_name, "version": str(registered.version), "model_dir": model_dir,
                   "promotion": decision}
        out_dir.mkdir(parents=True, exist_ok=True)
        card = log_card(registered, chosen, Path(chosen_path).parent / "metrics.json", decision, Path(tmp))
        write_text_atomic(out_dir / CARD_ARTIFACT, card)
        write_text_atomic(out_dir / "registered.json", json.dumps(summary, indent=1) + "\n")
        mlflow.set_tags({"morer1.registered_version": summary["version"], "morer1.promotion": decision["decision"]})
        tracking.log_summary(summary)
    return summary
