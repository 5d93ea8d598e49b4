"""The model as an MLflow pyfunc, its registration as `challenger`, and promotion to `champion`.

Pyfunc input, a DataFrame with one row per question (extra columns are ignored):

    image   str        path of an image file, or the image file's bytes base64-encoded (a
                       `data:image/...;base64,` prefix is allowed); a string naming an existing file is a path
    title   str        the news title
    entity  str        the target entity, as written in the title
    box     list[int]  the object box [x0, y0, x1, y1] in integer pixels of `image`, x1 and y1 exclusive
                       (as `object.box` of the ingested facts); it must lie inside the image

Output, a DataFrame with one row per input row:

    label       str or None  the label of the answer; None when the completion has no single valid label
    rationale   str or None  the text inside <think></think>, stripped; None when there is none
    completion  str          the raw generated text

The predictor checks every row, crops the object from the image itself, writes the photo and the crop as
PNG files to a temporary folder and generates greedily with `morer1.generation.generate_completions`, the
decoding of evaluation. Bad input raises BadInputError naming the 0-based row (HTTP 400 when served).
Serving needs `morer1` installed beside MLflow (`--env-manager local` in the project's environment, with its
`bin/` on PATH, since `mlflow models serve` runs `uvicorn`): the logged model refers to this module, it does
not carry a copy.

Registry: each registered version carries tags `git_commit`, `dvc_lock_sha256`, `data_version` and one tag
per metric given (e.g. `dev_f1`). `promote` moves the `champion` alias, never deletes it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from contextlib import nullcontext
from datetime import datetime, timezone
from importlib.metadata import version
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow.pyfunc
import pandas as pd
from pydantic import Field

from morer1.errors import BadInputError
from morer1.params import StageConfig

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from PIL import Image

CHALLENGER = "challenger"
CHAMPION = "champion"
INPUT_COLUMNS = ("image", "title", "entity", "box")
DATA_PATH = "data/ingested"  # the DVC output whose hash is a version's `data_version`
# What the logged model needs besides morer1 itself; given explicitly, so MLflow never loads the model to infer it.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "transformers", "tokenizers", "pillow", "pandas", "pydantic",
                "pyyaml")


class RegisterConfig(StageConfig):
    """Parameters of the register and promote steps, and of the served model's generation."""

    model_name: str = Field("morer1", min_length=1, description="Registered model name in the MLflow registry.")
    metric: str = Field(
        "dev_f1", min_length=1, description="Dev metric (a version tag) on which challenger and champion are compared.")
    margin: float = Field(
        0.005, ge=0, description="Promote only a challenger whose metric beats the champion's by more than this.")
    max_new_tokens: int = Field(256, ge=1, description="Longest completion the served model generates, in tokens.")
    batch_size: int = Field(4, ge=1, description="Rows generated together by the served model.")


class MorePredictor(mlflow.pyfunc.PythonModel):
    """Pyfunc of a morer1 model: artifacts `model` (a saved model and processor folder) and `labels` (labels.json)."""

    def load_context(self, context) -> None:
        labels = json.loads(Path(context.artifacts["labels"]).read_text(encoding="utf-8"))
        self.load(context.artifacts["model"], labels, context.model_config or {})

    def load(self, model_dir: str | Path, labels: list[str], model_config: dict) -> None:
        """Load the model folder; `model_config` may set `max_new_tokens` and `batch_size`."""
        from morer1.modeling import load_model_and_processor
        from morer1.prompt import model_prompt

        self.model, self.processor = load_model_and_processor(model_dir)
        self.prompt = model_prompt(model_dir)
        self.labels = tuple(labels)
        self.max_new_tokens = int(model_config.get("max_new_tokens", RegisterConfig().max_new_tokens))
        self.batch_size = int(model_config.get("batch_size", RegisterConfig().batch_size))

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Label and rationale for each row of the input DataFrame (see the module docstring)."""
        from morer1.generation import generate_completions
        from morer1.parsing import parse_completion

        rows = checked_rows(model_input)
        with tempfile.TemporaryDirectory(prefix="morer1-predict-") as folder:
            facts = [write_fact(i, row, Path(folder)) for i, row in enumerate(rows)]
            completions = [c[0] for c in generate_completions(
                self.model, self.processor, facts, folder, self.labels, max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size, progress=False, prompt=self.prompt)]
        parsed = [parse_completion(c, self.labels) for c in completions]
        return pd.DataFrame({
            "label": pd.Series([p.label for p in parsed], dtype=object),
            "rationale": pd.Series([p.think.strip() if p.think is not None else None for p in parsed], dtype=object),
            "completion": pd.Series(completions, dtype=object),
        })


def checked_rows(frame: pd.DataFrame) -> list[dict]:
    """The input rows as dicts with `box` as four ints; BadInputError naming the first bad row."""
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise BadInputError(f"input is missing column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    rows = []
    for i, record in enumerate(frame[list(INPUT_COLUMNS)].to_dict("records")):
        for key in ("image", "title", "entity"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise BadInputError(f"row {i}: {key} must be a non-empty string")
        box = record["box"]
        values = list(box) if isinstance(box, Iterable) and not isinstance(box, str) else []
        if len(values) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
            raise BadInputError(f"row {i}: box must be four integers [x0, y0, x1, y1], got {box!r}")
        rows.append({**record, "box": [int(v) for v in values]})
    return rows


def open_image(value: str) -> Image.Image:
    """An image from a file path or from base64-encoded bytes (optionally a data URI), as RGB."""
    from PIL import Image

    source = value if os.path.isfile(value) else None
    if source is None:
        try:
            source = io.BytesIO(base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value,
                                                 validate=True))
        except (binascii.Error, ValueError):
            pass
    if source is not None:
        try:
            with Image.open(source) as image:
                return image.convert("RGB")
        except OSError:  # PIL's UnidentifiedImageError included
            pass
    shown = value if len(value) <= 60 else value[:57] + "..."
    raise BadInputError(f"image {shown!r} is neither an image file nor base64-encoded image bytes")


def write_fact(i: int, row: dict, folder: Path) -> dict:
    """Write the photo and the object crop of a checked row as PNG files in `folder`; return its fact record."""
    try:
        photo = open_image(row["image"])
    except BadInputError as exc:
        raise BadInputError(f"row {i}: {exc}") from None
    x0, y0, x1, y1 = row["box"]
    if not (0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height):
        raise BadInputError(f"row {i}: box {row['box']} is empty or leaves the {photo.width}x{photo.height} image")
    photo.save(folder / f"{i}.png")
    photo.crop((x0, y0, x1, y1)).save(folder / f"{i}-crop.png")
    return {"text": row["title"], "entity": {"name": row["entity"]}, "image": f"{i}.png",
            "object": {"crop": f"{i}-crop.png"}}


def input_example() -> pd.DataFrame:
    """One self-contained input row (a base64 PNG), from which the model signature is inferred."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 140, 160)).save(buffer, format="PNG")
    return pd.DataFrame([{"image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                          "title": "Angela Merkel speaks in Berlin", "entity": "Berlin", "box": [8, 4, 40, 44]}])


def log_predictor(model_dir: str | Path, labels_path: str | Path, cfg: RegisterConfig) -> str:
    """Log the pyfunc of a model folder and its labels.json in the active run; return the logged model's URI."""
    from mlflow.models import infer_signature

    example = input_example()
    output = pd.DataFrame([
        {"label": "none", "rationale": "Step 1: ...", "completion": "<think>Step 1: ...</think><answer>none</answer>"},
        {"label": None, "rationale": None, "completion": "no answer"},
    ])
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=MorePredictor(),
        artifacts={"model": str(model_dir), "labels": str(labels_path)},
        model_config={"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        signature=infer_signature(example, output),
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
            if out.get("path") == DATA_PATH:
                return str(out.get("md5") or out.get("hash") or "none")
    return "none"


def register_version(model_uri: str, cfg: RegisterConfig, metrics: dict, tags: dict) -> ModelVersion:
    """Register `model_uri` under `cfg.model_name` with version, data and metric tags; alias it `challenger`."""
    from mlflow import MlflowClient

    from morer1 import tracking

    version_tags = {**tracking.version_tags(), "data_version": data_version(),
                    **{name: repr(float(value)) for name, value in metrics.items()},
                    **{k: str(v) for k, v in tags.items()}}
    registered = mlflow.register_model(model_uri, cfg.model_name, tags=version_tags)
    client = MlflowClient()
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, registered.version)
    return client.get_model_version(cfg.model_name, registered.version)


def register_model(model_dir: str | Path, labels_path: str | Path, cfg: RegisterConfig, metrics: dict,
                   tags: dict) -> ModelVersion:
    """Log the model as a pyfunc (in the active run, else a `register` run), register it, alias it `challenger`.

    `metrics` must hold `cfg.metric`; every metric becomes a run metric and a version tag.
    """
    from morer1 import tracking

    if cfg.metric not in metrics:
        raise BadInputError(f"metrics {sorted(metrics)} lack {cfg.metric!r}, the metric promotion compares")
    bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise BadInputError(f"metrics must be finite numbers: {bad}")
    for path in (Path(model_dir) / "config.json", Path(labels_path)):
        if not path.is_file():
            raise BadInputError(f"{path}: missing")
    mlflow_ = tracking.setup()
    run = nullcontext() if mlflow_.active_run() else tracking.stage_run("register", cfg)
    with run:
        mlflow_.log_metrics({k: float(v) for k, v in metrics.items()})
        model_uri = log_predictor(model_dir, labels_path, cfg)
    return register_version(model_uri, cfg, metrics, tags)


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


def promote(cfg: RegisterConfig) -> dict:
    """Move `champion` to the `challenger` version if there is no champion or it wins by more than `cfg.margin`.

    The decision is recorded as `promotion.*` tags on the challenger version and returned. The alias is
    moved in one registry call before the tags are written, so the model never lacks its champion.
    """
    from mlflow import MlflowClient

    from morer1 import tracking

    tracking.setup()
    client = MlflowClient()
    challenger = version_by_alias(client, cfg.model_name, CHALLENGER)
    if challenger is None:
        raise BadInputError(f"model {cfg.model_name!r} has no '{CHALLENGER}' version; register one first")
    champion = version_by_alias(client, cfg.model_name, CHAMPION)
    decision = {
        "model_name": cfg.model_name, "metric": cfg.metric, "margin": cfg.margin,
        "challenger_version": str(challenger.version), "champion_version": str(champion.version) if champion else None,
        "challenger_value": tag_metric(challenger, cfg.metric),
        "champion_value": tag_metric(champion, cfg.metric) if champion else None,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    new, old = decision["challenger_value"], decision["champion_value"]
    if decision["champion_version"] == decision["challenger_version"]:
        return {**decision, "decision": "already_champion",
                "reason": f"version {challenger.version} is already champion"}
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif new is None:
        promoted, reason = False, f"challenger has no numeric {cfg.metric!r} tag"
    elif old is None:
        promoted, reason = False, (f"champion version {champion.version} has no numeric {cfg.metric!r} tag; "
                                   "move the alias by hand")
    elif new > old + cfg.margin:
        promoted, reason = True, f"{cfg.metric} {new:.4f} beats champion {old:.4f} by more than {cfg.margin}"
    else:
        promoted, reason = False, f"{cfg.metric} {new:.4f} does not beat champion {old:.4f} by more than {cfg.margin}"
    if promoted:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, challenger.version)
    decision.update(decision="promoted" if promoted else "kept", reason=reason)
    for key in ("decision", "reason", "metric", "margin", "challenger_value", "champion_value", "champion_version",
                "timestamp"):
        client.set_model_version_tag(cfg.model_name, challenger.version, f"promotion.{key}", str(decision[key]))
    return decision


def load_predictor(model_uri: str | Path, *, labels_path: str | Path | None = None, model_config: dict | None = None):
    """An object with `.predict(DataFrame) -> DataFrame`, loaded once.

    `model_uri` is an MLflow model URI (`models:/morer1@champion`, `runs:/...`, a pyfunc folder with MLmodel), or a
    model folder saved by a trainer, wrapped directly with its labels: `labels_path`, else `labels.json` in the
    folder, else the MORE label set. `model_config` overrides `max_new_tokens` / `batch_size`.
    """
    folder = Path(model_uri)
    if (folder / "config.json").is_file() and not (folder / "MLmodel").is_file():
        from morer1.labels import DEFAULT_LABELS

        labels_file = Path(labels_path) if labels_path else folder / "labels.json"
        if labels_path and not labels_file.is_file():
            raise BadInputError(f"{labels_file}: missing")
        labels = json.loads(labels_file.read_text(encoding="utf-8")) if labels_file.is_file() else list(DEFAULT_LABELS)
        predictor = MorePredictor()
        predictor.load(folder, labels, model_config or {})
        return predictor
    if not folder.exists():  # a registry or run URI: resolve it against the project's tracking store
        from morer1 import tracking

        tracking.setup()
    return mlflow.pyfunc.load_model(str(model_uri), model_config=model_config)


def predict(model_uri: str | Path, inputs: pd.DataFrame, *, labels_path: str | Path | None = None,
            model_config: dict | None = None) -> pd.DataFrame:
    """Predictions of the model at `model_uri` for `inputs` (arguments as for `load_predictor`)."""
    return load_predictor(model_uri, labels_path=labels_path, model_config=model_config).predict(inputs)
