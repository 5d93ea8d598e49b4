"""The served model: a morer1 model as an MLflow pyfunc, its input checks and image decoding, and predictions
from a registered or local model (`morer1 predict`).

Pyfunc input, a DataFrame with one row per question (extra columns are ignored):

    image   str        the image file's bytes base64-encoded (line breaks allowed), or a data URI
                       (`data:image/png;base64,...`); PNG, JPEG, WebP, GIF or BMP. Never a file path: the
                       served model reads no file a client names (`morer1 predict` reads local files itself)
    title   str        the news title, at most `max_title_chars` characters
    entity  str        the target entity, as written in the title (the same bound); one not in the title is refused
    box     list[int]  the object box [x0, y0, x1, y1] in integer pixels of `image`, x1 and y1 exclusive
                       (as `object.box` of the ingested facts); it must lie inside the image

Inference params (declared in the model signature, so a REST client may send `"params": {...}`):

    samples        int    1 (default): one greedy completion per row. K > 1: K completions sampled at
                          `sample_temperature` from one `generate` call per batch (`num_return_sequences=K`, seeded,
                          so a request answers the same each time) and a majority vote over their labels
                          (`morer1.consistency`); at most `max_samples`
    abstain_below  float  0 (default): never abstain. T > 0: answer `none` when the confidence is below T

Output, a DataFrame with one row per input row:

    label       str or None  the label of the answer; None when the completion has no single valid label
    rationale   str or None  the text inside <think></think>, stripped; None when there is none
    completion  str          the raw generated text (with samples > 1, the first sample that voted for the label)
    confidence  float        the share of the samples that voted for the answer's label (greedy: 1.0 for a valid
                             answer, 0.0 for an invalid one); an abstained answer keeps the confidence of its vote

What one call may cost is bounded by ServeConfig (the pyfunc's `model_config`): at most `max_rows` rows and
`max_samples` samples per row (bad params are refused like a bad row, naming the param),
`max_image_bytes` bytes per decoded image and `max_image_pixels` pixels per image, read from the image header
before any pixel is decoded (decompression bombs are refused unread). Every row is checked before any
image is decoded; a bad row raises RefusedInputError naming the 0-based row: an MlflowException with
error code INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400 and the message
(any other exception becomes a 400 with a generic message and the server's stack trace), and a
BadInputError, exit code 2 of the CLI.

The predictor then crops the object from the image itself, writes the photo and the crop as PNG files to a
temporary folder and generates with `morer1.generation.generate_completions`: greedily, the decoding of
evaluation, or with `samples` > 1 by self-consistency as evaluate's self-consistency scoring (its temperature is
`sample_temperature` of the model_config). Serving needs `morer1` installed beside MLflow (`--env-manager local` in
the project's environment, with its `bin/` on PATH, since `mlflow models serve` runs `uvicorn`): the logged model
refers to this module, it does not carry a copy.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Iterable, Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from pydantic import Field, ValidationError

from morer1.errors import BadInputError, RegistryUnavailable
from morer1.files import write_jsonl
from morer1.params import StageConfig

if TYPE_CHECKING:
    from PIL import Image

INPUT_COLUMNS = ("image", "title", "entity", "box")
OUTPUT_EXAMPLE = pd.DataFrame([
    {"label": "none", "rationale": "Step 1: ...", "completion": "<think>Step 1: ...</think><answer>none</answer>",
     "confidence": 1.0},
    {"label": None, "rationale": None, "completion": "no answer", "confidence": 0.0},
])
# The inference params of the signature with their defaults (greedy, no abstention); bounded by ServeConfig.
PARAMS_EXAMPLE = {"samples": 1, "abstain_below": 0.0}
SAMPLING_SEED = 0  # seed of the served model's sampling: the same request gets the same answer
# The image formats the served model decodes; PIL would otherwise try every plugin it has (EPS runs Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Qwen2-VL's image processor refuses an image (or crop) more elongated than this: refused here, as a bad row.
MAX_ASPECT_RATIO = 200
PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: it warns above, refuses above twice that


class ServeConfig(StageConfig):
    """Generation of the served model and what one request may cost (its MLflow `model_config`)."""

    # a default (params.yaml's register.max_new_tokens) because `morer1 predict --model <trained folder>` wraps the
    # folder with no model_config (load_predictor); a registered model carries its own
    max_new_tokens: int = Field(160, ge=1, description="Longest completion the served model generates, in tokens.")
    batch_size: int = Field(4, ge=1, description="Rows generated together by the served model.")
    max_rows: int = Field(
        32, ge=1, description="Most rows one request to the served model may hold (`morer1 predict --jsonl` "
                              "sends a longer file in chunks of this size).")
    max_title_chars: int = Field(
        1000, ge=1, description="Longest title (and entity) the served model accepts, in characters.")
    max_image_bytes: int = Field(
        10_000_000, ge=1, description="Largest image the served model accepts, in bytes of the image file "
                                      "(after base64 decoding).")
    max_image_pixels: int = Field(
        25_000_000, ge=1, le=PIL_MAX_IMAGE_PIXELS,
        description="Largest image the served model accepts, in pixels (width x height), read from the image "
                    "header before decoding: refuses decompression bombs.")
    max_samples: int = Field(
        8, ge=1, description="Most sampled completions per row a request may ask for (the `samples` param); one "
                             "forward pass holds batch_size x samples sequences.")
    sample_temperature: float = Field(
        0.7, gt=0, description="Sampling temperature of the served model when a request asks for samples > 1.")


def serve_model_config(cfg: ServeConfig) -> dict:
    """The pyfunc `model_config` of a config holding the ServeConfig fields (e.g. RegisterConfig)."""
    return ServeConfig(**{name: getattr(cfg, name) for name in ServeConfig.model_fields}).model_dump()


class RefusedInputError(MlflowException, BadInputError):
    """Input the served model refuses: HTTP 400 (INVALID_PARAMETER_VALUE) from MLflow's scoring server, exit code
    2 from the CLI. The message names the row and is shown to the client."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class MorePredictor(mlflow.pyfunc.PythonModel):
    """Pyfunc of a morer1 model: artifacts `model` (a saved model and processor folder) and `labels` (labels.json)."""

    def load_context(self, context) -> None:
        labels = json.loads(Path(context.artifacts["labels"]).read_text(encoding="utf-8"))
        self.load(context.artifacts["model"], labels, context.model_config or {})

    def load(self, model_dir: str | Path, labels: list[str], model_config: dict) -> None:
        """Load the model folder; `model_config` may set the fields of ServeConfig."""
        from morer1.modeling import load_model_and_processor
        from morer1.prompt import model_prompt

        self.model, self.processor = load_model_and_processor(model_dir)
        self.prompt = model_prompt(model_dir)
        self.labels = tuple(labels)
        try:
            self.cfg = ServeConfig(**model_config)
        except ValidationError as exc:
            raise BadInputError(f"model_config {model_config}: {exc}") from None
        self.max_new_tokens, self.batch_size = self.cfg.max_new_tokens, self.cfg.batch_size

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Label, rationale and confidence for each row of the input DataFrame (see the module docstring)."""
        import tempfile

        from morer1.consistency import vote
        from morer1.generation import generate_completions
        from morer1.parsing import parse_completion

        samples, abstain_below = checked_params(params, self.cfg)
        rows = checked_rows(model_input, self.cfg)
        decoding = dict(num_return_sequences=samples, do_sample=True, temperature=self.cfg.sample_temperature,
                        seed=SAMPLING_SEED) if samples > 1 else {}
        with tempfile.TemporaryDirectory(prefix="morer1-predict-") as folder:
            facts = [write_fact(i, row, Path(folder), self.cfg) for i, row in enumerate(rows)]
            completions = generate_completions(
                self.model, self.processor, facts, folder, self.labels, max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size, progress=False, prompt=self.prompt, **decoding)
        votes = [vote(c, self.labels, abstain_below) for c in completions]
        thinks = [parse_completion(v.completion, self.labels).think for v in votes]
        return pd.DataFrame({
            "label": pd.Series([v.label for v in votes], dtype=object),
            "rationale": pd.Series([t.strip() if t is not None else None for t in thinks], dtype=object),
            "completion": pd.Series([v.completion for v in votes], dtype=object),
            "confidence": pd.Series([v.confidence for v in votes], dtype=float),
        })


def checked_params(params: dict | None, cfg: ServeConfig) -> tuple[int, float]:
    """(samples, abstain_below) of a request's params (PARAMS_EXAMPLE's defaults for missing ones);
    RefusedInputError for a value out of bounds."""
    params = {**PARAMS_EXAMPLE, **(params or {})}
    samples, abstain_below = params["samples"], params["abstain_below"]
    if not isinstance(samples, Integral) or isinstance(samples, bool) or not 1 <= samples <= cfg.max_samples:
        raise RefusedInputError(f"params: samples must be an integer from 1 to max_samples={cfg.max_samples}, "
                                f"got {samples!r}")
    if isinstance(abstain_below, bool) or not isinstance(abstain_below, (int, float)) or not abstain_below >= 0:
        raise RefusedInputError(f"params: abstain_below must be a number >= 0, got {abstain_below!r}")
    return int(samples), float(abstain_below)


def checked_rows(frame: pd.DataFrame, cfg: ServeConfig) -> list[dict]:
    """The input rows as dicts with `box` as four ints, every bound of `cfg` checked and every image's header
    read (nothing decoded yet); RefusedInputError naming the first bad row."""
    if not isinstance(frame, pd.DataFrame):
        raise RefusedInputError(f"input must be a table with columns {list(INPUT_COLUMNS)}, got {type(frame).__name__}")
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise RefusedInputError(f"input is missing column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    if len(frame) > cfg.max_rows:
        raise RefusedInputError(f"row {cfg.max_rows}: one request holds at most max_rows={cfg.max_rows} rows, "
                                f"got {len(frame)}")
    rows = []
    for i, record in enumerate(frame[list(INPUT_COLUMNS)].to_dict("records")):
        for key in ("image", "title", "entity"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise RefusedInputError(f"row {i}: {key} must be a non-empty string")
        for key in ("title", "entity"):
            if len(record[key]) > cfg.max_title_chars:
                raise RefusedInputError(f"row {i}: {key} has {len(record[key])} characters, more than "
                                        f"max_title_chars={cfg.max_title_chars}")
        if " ".join(record["entity"].split()) not in " ".join(record["title"].split()):  # spaces may differ
            raise RefusedInputError(f"row {i}: entity {shorten(record['entity'])} does not occur in the title "
                                    f"{shorten(record['title'])}: give the entity as it is written in the title "
                                    "(same spelling and case)")
        box = record["box"]
        values = list(box) if isinstance(box, Iterable) and not isinstance(box, (str, bytes, dict)) else []
        if len(values) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
            shown = repr(box) if len(repr(box)) <= 60 else repr(box)[:57] + "..."
            raise RefusedInputError(f"row {i}: box must be four integers [x0, y0, x1, y1], got {shown}")
        box = [int(v) for v in values]
        try:
            width, height = image_size(decode_image(record["image"], cfg), cfg)
            check_box(box, width, height)
        except RefusedInputError as exc:
            raise RefusedInputError(f"row {i}: {exc.message}") from None
        rows.append({**record, "box": box})
    return rows


def shorten(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit - 3] + "...")


def decode_image(value: str, cfg: ServeConfig) -> bytes:
    """The bytes of a base64-encoded image (a data URI allowed), at most `cfg.max_image_bytes`."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RefusedInputError(f"image data URI {shorten(header)} is not base64 (data:image/...;base64,...)")
    max_encoded = 4 * ((cfg.max_image_bytes + 2) // 3)
    too_big = RefusedInputError(f"image is larger than max_image_bytes={cfg.max_image_bytes} bytes")
    if len(text) > 2 * max_encoded:  # refused before any copy; line breaks are taken out below
        raise too_big
    text = "".join(text.split())
    if len(text) > max_encoded:
        raise too_big
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RefusedInputError(f"image {shorten(value)} is not base64-encoded image bytes or a data URI "
                                "(the served model reads no file paths: send the image's bytes)") from None
    if not data:
        raise RefusedInputError("image is empty")
    if len(data) > cfg.max_image_bytes:
        raise too_big
    return data


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy image of `data` (header read, pixels not yet), one of IMAGE_FORMATS."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RefusedInputError(f"image refused as a decompression bomb: {exc}") from None
    except Exception:  # UnidentifiedImageError, and whatever a plugin raises on a malformed header
        raise RefusedInputError(f"image bytes are not a {', '.join(IMAGE_FORMATS)} image") from None


def image_size(data: bytes, cfg: ServeConfig) -> tuple[int, int]:
    """(width, height) from the image's header; RefusedInputError when it has too many pixels or is too elongated."""
    with open_image(data) as image:
        width, height = image.size
    if width < 1 or height < 1:
        raise RefusedInputError(f"image is {width}x{height}, empty")
    if width * height > cfg.max_image_pixels:
        raise RefusedInputError(f"image is {width}x{height} = {width * height} pixels, more than "
                                f"max_image_pixels={cfg.max_image_pixels}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RefusedInputError(f"image is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1")
    return width, height


def check_box(box: list[int], width: int, height: int) -> None:
    """RefusedInputError unless `box` is a non-empty box inside a width x height image, no more elongated than
    MAX_ASPECT_RATIO (the crop is an image of the prompt)."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise RefusedInputError(f"box {box} is empty or leaves the {width}x{height} image")
    w, h = x1 - x0, y1 - y0
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise RefusedInputError(f"box {box} is {w}x{h}, more elongated than {MAX_ASPECT_RATIO}:1")


def write_fact(i: int, row: dict, folder: Path, cfg: ServeConfig) -> dict:
    """Write the photo and the object crop of a checked row as PNG files in `folder`; return its fact record."""
    try:
        with open_image(decode_image(row["image"], cfg)) as image:
            photo = image.convert("RGB")
    except RefusedInputError as exc:
        raise RefusedInputError(f"row {i}: {exc.message}") from None
    except Exception as exc:  # truncated or corrupt pixel data: a bad row, never a server error
        raise RefusedInputError(f"row {i}: image could not be decoded: {type(exc).__name__}: {exc}") from None
    x0, y0, x1, y1 = row["box"]
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


def load_predictor(model_uri: str | Path, *, labels_path: str | Path | None = None, model_config: dict | None = None):
    """An object with `.predict(DataFrame) -> DataFrame`, loaded once.

    `model_uri` is an MLflow model URI (`models:/morer1@champion`, `runs:/...`, a pyfunc folder with MLmodel), or a
    model folder saved by a trainer, wrapped directly with its labels: `labels_path`, else `labels.json` in the
    folder, else the MORE label set. `model_config` overrides fields of ServeConfig.
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
    if folder.exists():
        return mlflow.pyfunc.load_model(str(model_uri), model_config=model_config)
    if not str(model_uri).startswith(REGISTRY_SCHEMES) and "://" not in str(model_uri):
        raise BadInputError(f"model {model_uri}: no such folder, nor a model URI (models:/NAME@ALIAS, runs:/ID/PATH)")
    uri = registry_tracking_uri(str(model_uri))
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(str(model_uri), model_config=model_config)
    except MlflowException as exc:
        message = " ".join(str(exc.message).split())
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryUnavailable(f"{model_uri}: not found in the MLflow registry at {uri} ({message}); "
                                      f"{SET_REGISTRY}") from None
        if message.startswith("API request to"):  # the server does not answer (after MLflow's retries)
            raise RegistryUnavailable(f"{model_uri}: the MLflow registry at {uri} does not answer "
                                      f"({message[:300]}); {SET_REGISTRY}") from None
        raise


REGISTRY_SCHEMES = ("models:", "runs:")
SET_REGISTRY = ("set MLFLOW_TRACKING_URI to the tracking server or store that holds the model (e.g. "
                "MLFLOW_TRACKING_URI=http://127.0.0.1:5000, or sqlite:////path/to/project/.state/mlflow.db), "
                "or give a model folder with --model FOLDER")


def registry_tracking_uri(model_uri: str) -> str:
    """The tracking URI a registry or run URI is resolved against: `MLFLOW_TRACKING_URI`, else the project's local
    store (`.state/mlflow.db` under the working folder, or `MORER1_STATE_DIR`) when it exists. Outside a project,
    with neither, RegistryUnavailable, and nothing is created (no `.state/`, no empty store)."""
    import os

    from morer1 import tracking

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = tracking.state_dir() / "mlflow.db"
    if store.is_file():
        return f"sqlite:///{store}"
    raise RegistryUnavailable(f"{model_uri} needs an MLflow model registry: MLFLOW_TRACKING_URI is not set and tried "
                              f"the project store sqlite:///{store}, which does not exist (not in the project "
                              f"folder?); run from the project folder, or {SET_REGISTRY}")


def serving_config(predictor) -> ServeConfig:
    """The ServeConfig a loaded predictor (a MorePredictor or a pyfunc wrapping one) checks its input with."""
    inner = predictor.unwrap_python_model() if hasattr(predictor, "unwrap_python_model") else predictor
    return inner.cfg


def check_params_declared(predictor, params: dict | None) -> None:
    """BadInputError when `params` ask for more than greedy of a logged model whose signature declares no params
    (logged before self-consistency): MLflow would drop them with a warning and answer greedily."""
    metadata = getattr(predictor, "metadata", None)
    signature = getattr(metadata, "signature", None)
    if signature is not None and signature.params is None and {**PARAMS_EXAMPLE, **(params or {})} != PARAMS_EXAMPLE:
        raise BadInputError(f"this model's signature declares no inference params, so {params} would be ignored: "
                            "register the model again to use samples / abstain_below")


def predict(model_uri: str | Path, inputs: pd.DataFrame, *, labels_path: str | Path | None = None,
            model_config: dict | None = None, params: dict | None = None) -> pd.DataFrame:
    """Predictions of the model at `model_uri` for `inputs` (arguments as for `load_predictor`; `params` as the
    module docstring's); `image` holds encoded bytes, as over REST (`predict_one` and `predict_jsonl` read local
    files)."""
    predictor = load_predictor(model_uri, labels_path=labels_path, model_config=model_config)
    check_params_declared(predictor, params)
    return predictor.predict(inputs, params=params)


def allowed_folders(allow_dirs: Sequence[str | Path] | None, default: Path) -> list[Path]:
    """The folders local image files may lie in, resolved: `allow_dirs`, else `default`."""
    if not allow_dirs:
        return [default.resolve()]
    folders = [Path(folder).expanduser().resolve() for folder in allow_dirs]
    for given, folder in zip(allow_dirs, folders):
        if not folder.is_dir():
            raise BadInputError(f"allowed image folder {given}: not a folder")
    return folders


def local_image(value, base: Path, allowed: list[Path], max_bytes: int):
    """For `morer1 predict` only: an image file named by `value` (relative to `base`) as its bytes base64-encoded,
    when its real path (symlinks and `..` resolved) lies in one of the `allowed` folders; a value that names no
    file is returned unchanged (encoded bytes, checked by the predictor). BadInputError for a file outside the
    allowed folders, larger than `max_bytes`, or a value that is neither a file nor base64."""
    if not isinstance(value, str) or not value.strip() or value.startswith("data:"):
        return value
    try:
        path = (base / Path(value).expanduser()).resolve()
        is_file = path.is_file()
    except (OSError, ValueError):  # a long base64 string is no valid path
        is_file = False
    if not is_file:
        try:
            base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadInputError(f"image {shorten(value)}: no such file ({base / value}) and not base64 bytes") from None
        return value
    if not any(path.is_relative_to(folder) for folder in allowed):
        raise BadInputError(f"image {shorten(value)} is {path}, outside the allowed folder(s) "
                            f"{', '.join(map(str, allowed))}; allow its folder with --allow-dir")
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadInputError(f"image {path} is larger than max_image_bytes={max_bytes} bytes")
    return base64.b64encode(data).decode("ascii")


def predict_one(model_uri: str, image: str, title: str, entity: str, box: list[int], *,
                allow_dirs: Sequence[str | Path] | None = None, params: dict | None = None) -> dict:
    """`label`, `rationale`, `completion` and `confidence` for one image (a file path, relative to the working
    folder, or base64), title, entity and pixel box. An image file must lie in `allow_dirs` (default: its own
    folder). `params`: `samples` and `abstain_below` (module docstring)."""
    predictor = load_predictor(model_uri)
    check_params_declared(predictor, params)
    allowed = allowed_folders(allow_dirs, (Path.cwd() / Path(str(image)).expanduser()).parent)
    encoded = local_image(str(image), Path.cwd(), allowed, serving_config(predictor).max_image_bytes)
    frame = pd.DataFrame([{"image": encoded, "title": title, "entity": entity, "box": list(box)}])
    return predictor.predict(frame, params=params).iloc[0].to_dict()


ROW = re.compile(r"^row (\d+): ")


def predict_jsonl(model_uri: str, in_path: str | Path, out_path: str | Path, *,
                  allow_dirs: Sequence[str | Path] | None = None, params: dict | None = None) -> int:
    """Write each input line of `in_path` with its `label`, `rationale` and `confidence` to `out_path`; return the
    line count. `params`: `samples` and `abstain_below` (module docstring).

    Relative image paths are read relative to the folder of `in_path`; image files must lie in `allow_dirs`
    (default: the folder of `in_path`). The lines go to the model in chunks of its `max_rows`; an error names the
    line. The output appears only when complete.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    records, numbers = [], []
    with in_path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadInputError(f"{in_path}:{number}: not valid JSON: {exc.msg}") from None
                if not isinstance(records[-1], dict):
                    raise BadInputError(f"{in_path}:{number}: expected a JSON object")
                numbers.append(number)
    labels, rationales, confidences = [], [], []
    if records:
        predictor = load_predictor(model_uri)
        check_params_declared(predictor, params)
        cfg = serving_config(predictor)
        allowed = allowed_folders(allow_dirs, in_path.parent.resolve())
        columns = sorted({key for r in records for key in r})
        for start in range(0, len(records), cfg.max_rows):
            chunk = pd.DataFrame(records[start:start + cfg.max_rows], columns=columns)
            try:
                if "image" in chunk.columns:
                    chunk["image"] = [_named(i, local_image, value, in_path.parent, allowed,
                                             cfg.max_image_bytes) for i, value in enumerate(chunk["image"])]
                result = predictor.predict(chunk, params=params)
            except BadInputError as exc:  # "row k" of the chunk -> the line of the file
                message = getattr(exc, "message", str(exc))
                if match := ROW.match(message):
                    message = f"line {numbers[start + int(match[1])]}: {message[match.end():]}"
                raise BadInputError(f"{in_path}: {message}") from None
            labels += result["label"].tolist()
            rationales += result["rationale"].tolist()
            confidences += result["confidence"].tolist()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_path, ({**record, "label": labels[i], "rationale": rationales[i], "confidence": confidences[i]}
                           for i, record in enumerate(records)))
    return len(records)


def _named(row: int, func, *args):
    """`func(*args)`, its BadInputError prefixed with `row <row>: `."""
    try:
        return func(*args)
    except BadInputError as exc:
        raise BadInputError(f"row {row}: {exc}") from None
