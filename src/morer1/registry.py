"""Register stage: the model evaluate chose, registered in MLflow as `challenger` of the candidates model, then
promoted to `champion` of the served model when it beats the champion on dev.

Two registered models: the pipeline registers every chosen model into `candidates_model_name` (alias `challenger`);
promotion copies the winning candidate version into `model_name` and moves `champion` there. On servers with
MLflow's basic-auth app, registering a version and moving an alias both need EDIT on the registered model, so only
two models let the pipeline's account register without being able to move `champion` (infra/servers/README.md).

Register reads only `chosen.json` written by evaluate: the model folder and its content hash, the label set it
was scored with, and the metrics the version is tagged with. Each registered version carries tags `git_commit`,
`dvc_lock_sha256`, `data_version`, `model_dir`, `model_sha256`, one tag per metric (e.g. `dev_f1`), and the identity
of the evaluation its dev metrics came from: `dev_set` (the fingerprint of the dev facts scored, see `dev_set`) and
`dev_eval` (the evaluate settings that scored them, as JSON), and `serve_config` (the logged pyfunc's
`model_config`, as JSON).

Registration and promotion survive being killed at any point and rerun: a candidate version with the same
`model_sha256`, `data_version`, `dev_set`, `dev_eval` and `serve_config` is reused (its tags set again), and so is a
copy of the challenger already in the served model; `champion` is moved in one registry call, never deleted.

`promote` compares like with like: the champion's metric tag only when the champion was scored on the same dev set
with the same settings as the challenger; otherwise it scores the champion's registered model on the challenger's
dev facts (evaluate's own `predict_facts` and `score`) or, when it cannot, refuses. The served model itself is
`morer1.serve`.
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
from typing import TYPE_CHECKING

import mlflow
from pydantic import Field, model_validator

from morer1.errors import BadInputError
from morer1.files import write_text_atomic
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
PROMOTION_TAG = "promotion"  # on a copy in the served model: the decision that made it champion, as JSON
SAME_DATA = "tag, same data"  # `champion_scored` when the champion's own tag is compared
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
    metric: str = Field(
        "dev_f1", min_length=1, description="Dev metric (a version tag) on which challenger and champion are compared.")
    margin: float = Field(
        0.005, ge=0, description="Promote only a challenger whose metric beats the champion's by more than this.")
    facts: str = Field(
        "data/ingested", min_length=1,
        description="Ingested facts folder evaluate scored (whose dev split evaluate fingerprinted as the version's dev "
                    "set in chosen.json): promotion re-scores the champion on it when the champion was scored on other "
                    "dev data, and refuses when it does not hold the challenger's dev set.")

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


def version_tags(metrics: dict, tags: dict) -> dict[str, str]:
    """The tags of a candidate version: code and data versions, one per metric, and `tags`."""
    from morer1 import tracking

    return {**tracking.version_tags(), "data_version": data_version(),
            **{name: repr(float(value)) for name, value in metrics.items()}, **{k: str(v) for k, v in tags.items()}}


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

    registered = mlflow.register_model(model_uri, cfg.candidates_model_name, tags=version_tags(metrics, tags))
    client = MlflowClient()
    client.set_registered_model_alias(cfg.candidates_model_name, CHALLENGER, registered.version)
    return client.get_model_version(cfg.candidates_model_name, registered.version)


def register_model(model_dir: str | Path, labels_path: str | Path, cfg: RegisterConfig, metrics: dict,
                   tags: dict) -> ModelVersion:
    """Log the model as a pyfunc in the active run, register it as a candidate, alias it `challenger`.

    `metrics` must hold `cfg.metric`; every metric becomes a run metric and a version tag. A candidate version with
    the same `identity` (a rerun after a kill, or of the same model on the same data) is reused: its tags are set to
    this registration's and it becomes `challenger`; nothing is logged or registered again.
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
    wanted = version_tags(metrics, {**tags, SERVE_TAG: json.dumps(serve_model_config(cfg), sort_keys=True)})
    existing = registered_as(client, cfg.candidates_model_name, wanted)
    if existing is None:
        return register_version(log_predictor(model_dir, labels_path, cfg), cfg, metrics,
                                {**tags, SERVE_TAG: wanted[SERVE_TAG]})
    for key, value in wanted.items():
        if existing.tags.get(key) != value:
            client.set_model_version_tag(cfg.candidates_model_name, existing.version, key, value)
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
    """The metric a version's tag records, or None when absent or not a number."""
    try:
        value = float(model_version.tags[metric])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def evaluation_of(model_version: ModelVersion) -> tuple[str, str] | None:
    """(`dev_set`, `dev_eval`) tags of a version, or None when it records no dev evaluation (registered before
    versions did)."""
    tags = model_version.tags
    return (tags[DEV_SET_TAG], tags[DEV_EVAL_TAG]) if DEV_SET_TAG in tags and DEV_EVAL_TAG in tags else None


def tag_unusable(cfg: RegisterConfig, champion: ModelVersion, challenger: ModelVersion) -> str | None:
    """Why the champion's own metric tag cannot be compared with the challenger's, or None when it can: both were
    scored in one evaluation (same dev set, same evaluate settings) and the champion's tag is a number."""
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
    if tag_metric(champion, cfg.metric) is None:
        return f"champion version {champion.version} has no numeric {cfg.metric!r} tag"
    return None


def registered_model_dir(name: str, version: str, dst: str | Path) -> Path:
    """Download version `version` of registered model `name` into `dst`; return the model folder of its pyfunc."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    artifacts = (Model.load(str(local)).flavors.get("python_function") or {}).get("artifacts") or {}
    if "model" not in artifacts:
        raise BadInputError(f"version {version} of {name!r} is not a morer1 pyfunc (it has no 'model' artifact)")
    return local / artifacts["model"]["path"]


def rescore(cfg: RegisterConfig, champion: ModelVersion, challenger: ModelVersion) -> tuple[float, DevSet]:
    """The champion's `cfg.metric` on the challenger's dev set, scored as evaluate scored the challenger.

    The dev facts are those of `cfg.facts`, which must fingerprint to the challenger's `dev_set`; the settings are
    the challenger's `dev_eval`; the model is the champion's registered one; generation and the MORE metrics are
    evaluate's own `predict_facts` and `score`. BadInputError saying why when any of it is missing or differs.
    """
    from morer1.evaluate import EvaluateConfig, dev_set, predict_facts, score
    from morer1.metrics import SUMMARY_KEYS

    split, _, key = cfg.metric.partition("_")
    if split != "dev" or key not in SUMMARY_KEYS:
        raise BadInputError(f"{cfg.metric!r} is not a dev metric evaluate computes (dev_<{'|'.join(SUMMARY_KEYS)}>)")
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
    # score() also computes evaluate's baselines from train labels; they are not compared: the dev golds stand in.
    return float(score(rows, dev.labels, [r["relation"] for r in rows], settings.seed)[key]), dev


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


def decision_base(cfg: RegisterConfig, challenger: ModelVersion, champion: ModelVersion | None) -> dict:
    """The fields of a promotion decision known before deciding."""
    return {
        "model_name": cfg.model_name, "candidates_model_name": cfg.candidates_model_name, "metric": cfg.metric,
        "margin": cfg.margin, "challenger_version": str(challenger.version),
        "champion_version": str(champion.version) if champion else None,
        "challenger_value": tag_metric(challenger, cfg.metric),
        "champion_value": None,  # the number compared: the champion's tag on the same data, else its re-score
        "champion_scored": None,  # how champion_value was obtained
        "champion_tag_value": tag_metric(champion, cfg.metric) if champion else None,
        "challenger_data_version": challenger.tags.get("data_version"),
        "champion_data_version": champion.tags.get("data_version") if champion else None,
        "challenger_dev_set": challenger.tags.get(DEV_SET_TAG),
        "champion_dev_set": champion.tags.get(DEV_SET_TAG) if champion else None,
        "served_version": str(champion.version) if champion else None,  # the version carrying `champion` after
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def tag_decision(client, cfg: RegisterConfig, challenger: ModelVersion, decision: dict) -> None:
    """Record `decision` as `promotion.*` tags on the challenger's candidate version."""
    for key in ("decision", "reason", "metric", "margin", "challenger_value", "champion_value", "champion_scored",
                "champion_tag_value", "champion_version", "served_version", "challenger_data_version",
                "champion_data_version", "challenger_dev_set", "champion_dev_set", "timestamp"):
        client.set_model_version_tag(cfg.candidates_model_name, challenger.version, f"promotion.{key}",
                                     str(decision[key]))


def promote(cfg: RegisterConfig) -> dict:
    """Make the `challenger` candidate `champion` of the served model if there is no champion or it wins by more
    than `cfg.margin`.

    A promotion rests on one evaluation: the champion's own metric tag is compared only when champion and challenger
    were scored on the same dev set with the same evaluate settings (`champion_scored`: "tag, same data"). Otherwise
    the champion's registered model is scored on the challenger's dev facts first (`rescore`; "re-scored on ..."),
    and when that is impossible (e.g. `cfg.facts` missing where promote runs, or not the challenger's dev set) the
    decision is "refused" with the reason and the champion stays. The decision, with both scores, both data
    versions and dev sets, is recorded as `promotion.*` tags on the challenger's candidate version (a re-score also
    as `rescored.<dev set>.<metric>` on the champion's version) and returned.

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
        recorded = json.loads(champion.tags.get(PROMOTION_TAG) or "{}")
        if recorded.get("challenger_version") == str(challenger.version) and challenger.tags.get(
                "promotion.timestamp") != recorded.get("timestamp"):  # killed between the alias move and the tags
            tag_decision(client, cfg, challenger, recorded)
            return recorded
        return {**decision, "decision": "already_champion",
                "reason": f"candidate version {challenger.version} is already champion (version {champion.version} "
                          f"of {cfg.model_name!r})"}
    new, rescored = decision["challenger_value"], None
    if champion is None:
        outcome, reason = "promoted", "no champion yet"
    elif new is None:
        outcome, reason = "kept", f"challenger has no numeric {cfg.metric!r} tag"
    else:
        why = tag_unusable(cfg, champion, challenger)
        if why is None:
            old, how = decision["champion_tag_value"], SAME_DATA
        else:
            try:
                old, rescored = rescore(cfg, champion, challenger)
                how = (f"re-scored on dev set {rescored.sha256[:12]} ({len(rescored.facts)} facts of "
                       f"{rescored.facts_dir}; data version {decision['challenger_data_version']})")
            except BadInputError as exc:
                old = how = None
                outcome, reason = "refused", (f"{why}; re-scoring the champion on the challenger's dev set is "
                                              f"impossible here ({exc}), and unlike {cfg.metric} numbers are not "
                                              "compared")
        decision.update(champion_value=old, champion_scored=how)
        if old is not None and new > old + cfg.margin:
            outcome, reason = "promoted", (f"{cfg.metric} {new:.4f} beats champion {old:.4f} ({how}) by more than "
                                           f"{cfg.margin}")
        elif old is not None:
            outcome, reason = "kept", (f"{cfg.metric} {new:.4f} does not beat champion {old:.4f} ({how}) by more "
                                       f"than {cfg.margin}")
    decision.update(decision=outcome, reason=reason)
    with writing(cfg.model_name):
        if rescored is not None:
            client.set_model_version_tag(cfg.model_name, champion.version, f"rescored.{rescored.sha256[:12]}."
                                         f"{cfg.metric}", repr(decision["champion_value"]))
        if outcome == "promoted":
            copy = copy_of(client, cfg, challenger) or client.copy_model_version(
                candidate_uri(cfg, challenger.version), cfg.model_name)
            decision["served_version"] = str(copy.version)
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


def run(cfg: RegisterConfig, chosen_path: str | Path, out_dir: str | Path) -> dict:
    """Register the model of evaluate's `chosen.json` as `challenger` of the candidates model (tagged with its metrics
    and the evaluation they came from), run the promotion gate when `cfg.promote`, write `out_dir/registered.json`;
    return it (candidates model name, version, model folder, the promotion decision)."""
    from morer1 import tracking
    from morer1.files import folder_sha256

    chosen = json.loads(Path(chosen_path).read_text(encoding="utf-8"))
    model_dir = chosen["model_dir"]
    if folder_sha256(model_dir) != chosen["model_sha256"]:
        raise BadInputError(f"{model_dir} changed since evaluate scored it ({chosen_path}); rerun evaluate")
    out_dir = Path(out_dir)
    with tracking.stage_run("register", cfg), tempfile.TemporaryDirectory(prefix="morer1-labels-") as tmp:
        labels_path = Path(tmp) / "labels.json"
        labels_path.write_text(json.dumps(chosen["labels"]) + "\n", encoding="utf-8")
        registered = register_model(model_dir, labels_path, cfg, chosen["metrics"],
                                    {"model_dir": model_dir, "model_sha256": chosen["model_sha256"],
                                     **dev_tags(chosen)})
        decision = promote(cfg) if cfg.promote else deferred(cfg)
        summary = {"model_name": cfg.candidates_model_name, "version": str(registered.version), "model_dir": model_dir,
                   "promotion": decision}
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "registered.json", json.dumps(summary, indent=1) + "\n")
        mlflow.set_tags({"morer1.registered_version": summary["version"], "morer1.promotion": decision["decision"]})
        tracking.log_summary(summary)
    return summary
