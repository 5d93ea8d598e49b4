"""The served model trusts no input: over REST an image is encoded bytes, never a path the server would open; one
request's cost is bounded (rows, title length, image bytes, image pixels read from the header before decoding,
box sanity); every violation is an HTTP 400 naming the row, and the server keeps serving. File paths come only
from the local `morer1 predict`, and only from the folders the user allows.

Fast checks without a model or a server first; then a real `mlflow models serve` on 127.0.0.1 (marked e2e)."""

import base64
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from PIL import Image, ImageFile
from servers import free_port, listening, start_server, stop_group, wait_healthy

from configs import small_config
from morer1 import serve
from morer1.errors import BadInputError
from morer1.serve import MorePredictor, RefusedInputError, ServeConfig, checked_rows, local_image

TITLE, ENTITY = "Angela Merkel speaks in Berlin", "Berlin"


def png(width: int, height: int, bit_depth: int = 1) -> bytes:
    """A valid all-black grayscale PNG, written without decoding anything: a 20000x20000 1-bit one is ~50 KB on disk
    and 400 M pixels decoded (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row, packer = b"\0" * (1 + (width * bit_depth + 7) // 8), zlib.compressobj(9)
    idat = b"".join(packer.compress(row * min(1000, height - y)) for y in range(0, height, 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(image: Image.Image | bytes, fmt: str = "PNG") -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        image = buffer.getvalue()
    return base64.b64encode(image).decode("ascii")


PIL_OPEN = Image.open
PHOTO = Image.new("RGB", (96, 64), (200, 30, 30))
GOOD = {"image": encoded(PHOTO), "title": TITLE, "entity": ENTITY, "box": [10, 8, 50, 40]}
BOMB = png(20000, 20000)  # beyond PIL's own limit (2 x Image.MAX_IMAGE_PIXELS): PIL refuses at open
BIG = png(6000, 6000)  # 36 M pixels: under PIL's limit, over max_image_pixels


def hostile_rows(photo_path: Path) -> dict[str, tuple[dict, str]]:
    """name: (what replaces fields of row 1, the message naming row 1). Row 0 is always good."""
    truncated = base64.b64decode(GOOD["image"])[:-30]
    return {
        "server-file": ({"image": "/etc/passwd"}, "row 1: image '/etc/passwd' is not base64-encoded image bytes"),
        "traversal": ({"image": "../../../../../etc/passwd"}, "row 1: image '../../../../../etc/passwd' is not base64"),
        # a real image file on the server's disk: still not opened
        "existing-image-file": ({"image": str(photo_path)}, "row 1: image '.*' is not base64-encoded image bytes"),
        "garbage-base64": ({"image": "bm90IGFuIGltYWdlIGF0IGFsbA=="}, "row 1: image bytes are not a PNG, JPEG"),
        "not-base64-data-uri": ({"image": "data:image/png,abc"},
                                "row 1: image data URI 'data:image/png' is not base64"),
        "tiff": ({"image": encoded(PHOTO, "TIFF")}, "row 1: image bytes are not a PNG, JPEG, WEBP, GIF, BMP image"),
        "bomb": ({"image": encoded(BOMB)}, "row 1: image refused as a decompression bomb"),
        "too-many-pixels": ({"image": encoded(BIG)}, "row 1: image is 6000x6000 = 36000000 pixels, more than "
                                                     "max_image_pixels=25000000"),
        "elongated-image": ({"image": encoded(png(4000, 2))}, "row 1: image is 4000x2, more elongated than 200:1"),
        "truncated": ({"image": base64.b64encode(truncated).decode()}, "row 1: image could not be decoded"),
        "long-title": ({"title": "x" * 1001}, "row 1: title has 1001 characters, more than max_title_chars=1000"),
        "long-entity": ({"entity": "x" * 1001}, "row 1: entity has 1001 characters"),
        "empty-title": ({"title": " "}, "row 1: title must be a non-empty string"),
        "entity-not-in-title": ({"entity": "Paris"}, "row 1: entity 'Paris' does not occur in the title "
                                                    "'Angela Merkel speaks in Berlin'"),
        "box-outside": ({"box": [10, 8, 500, 40]}, r"row 1: box \[10, 8, 500, 40\] is empty or leaves the 96x64 image"),
        "box-negative": ({"box": [-5, 8, 50, 40]}, "row 1: box .* is empty or leaves"),
        "box-empty": ({"box": [10, 8, 10, 40]}, "row 1: box .* is empty or leaves"),
        "box-three": ({"box": [10, 8, 50]}, "row 1: box must be four integers"),
        "box-floats": ({"box": [1.5, 8, 50, 40]}, "row 1: box must be four integers"),
        "box-sliver": ({"image": encoded(png(400, 10)), "box": [0, 0, 400, 1]},
                       r"row 1: box \[0, 0, 400, 1\] is 400x1, more elongated than 200:1"),
    }


def predictor(**limits) -> MorePredictor:
    """A MorePredictor without a model: rows are checked (and images decoded) before generation is reached."""
    model = MorePredictor()
    model.model = model.processor = None
    model.labels, model.prompt = ("none",), None
    model.cfg = ServeConfig(max_new_tokens=4, **limits)
    model.max_new_tokens, model.batch_size = model.cfg.max_new_tokens, model.cfg.batch_size
    return model


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    PHOTO.save(path)
    return path


@pytest.mark.parametrize("name", list(hostile_rows(Path("/tmp/photo.png"))))
def test_hostile_row_is_refused_naming_it(name, photo_file, monkeypatch):
    change, message = hostile_rows(photo_file)[name]
    opened = []
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or PIL_OPEN(fp, *a, **k))
    with pytest.raises(RefusedInputError, match=message) as refused:
        predictor().predict(pd.DataFrame([GOOD, {**GOOD, **change}]))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE" and refused.value.get_http_status_code() == 400
    assert isinstance(refused.value, BadInputError)  # the CLI's exit code 2
    assert not [fp for fp in opened if not isinstance(fp, io.BytesIO)]  # PIL never got a path


def test_bombs_are_refused_from_the_header_without_decoding(monkeypatch):
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    for bomb in (BOMB, BIG):
        with pytest.raises(RefusedInputError, match="row 0: image (refused as a decompression bomb|is 6000x6000)"):
            checked_rows(pd.DataFrame([{**GOOD, "image": encoded(bomb)}]), ServeConfig(max_new_tokens=4))
    assert loads == [] and len(BOMB) < 100_000


def test_row_count_and_image_bytes_bounds():
    with pytest.raises(RefusedInputError, match="row 3: one request holds at most max_rows=3 rows, got 4"):
        predictor(max_rows=3).predict(pd.DataFrame([GOOD] * 4))
    noisy = Image.frombytes("L", (64, 64), os.urandom(64 * 64))
    with pytest.raises(RefusedInputError, match="row 0: image is larger than max_image_bytes=1000 bytes"):
        predictor(max_image_bytes=1000).predict(pd.DataFrame([{**GOOD, "image": encoded(noisy)}]))
    huge = "A" * 10**7  # refused by its length, before any decoding or copy
    with pytest.raises(RefusedInputError, match="row 0: image is larger than max_image_bytes=1000 bytes"):
        predictor(max_image_bytes=1000).predict(pd.DataFrame([{**GOOD, "image": huge}]))


def test_good_rows_pass_every_encoding(tmp_path):
    data = base64.b64decode(GOOD["image"])
    images = [GOOD["image"], f"data:image/png;base64,{GOOD['image']}", base64.encodebytes(data).decode(),
              encoded(PHOTO, "JPEG"), encoded(PHOTO, "WEBP"), encoded(PHOTO.convert("P"), "GIF"), encoded(PHOTO, "BMP")]
    cfg = ServeConfig(max_new_tokens=4)
    rows = checked_rows(pd.DataFrame([{**GOOD, "image": image} for image in images]), cfg)
    for i, row in enumerate(rows):
        fact = serve.write_fact(i, row, tmp_path, cfg)
        assert Image.open(tmp_path / fact["image"]).size == (96, 64)
        assert Image.open(tmp_path / fact["object"]["crop"]).size == (40, 32)


def test_limits_are_the_model_config():
    from morer1.registry import RegisterConfig

    config = serve.serve_model_config(small_config(RegisterConfig, max_rows=7, max_image_pixels=1000))
    assert set(config) == set(ServeConfig.model_fields)
    assert (config["max_rows"], config["max_image_pixels"]) == (7, 1000)
    with pytest.raises(Exception, match="max_image_pixels"):  # PIL refuses beyond its own limit anyway
        ServeConfig(max_new_tokens=4, max_image_pixels=10**9)


def test_a_trained_model_folder_loads_without_a_model_config(tmp_path, monkeypatch):
    """`morer1 predict --model models/grpo` wraps the folder itself: no model_config, so ServeConfig's defaults."""
    import morer1.modeling
    import morer1.prompt

    monkeypatch.setattr(morer1.modeling, "load_model_and_processor", lambda folder: (None, None))
    monkeypatch.setattr(morer1.prompt, "model_prompt", lambda folder: "full")
    (tmp_path / "config.json").write_text("{}")
    loaded = serve.load_predictor(tmp_path)
    assert serve.serving_config(loaded) == ServeConfig() and loaded.max_new_tokens == ServeConfig().max_new_tokens


class CheckOnly(mlflow.pyfunc.PythonModel):
    """A pyfunc that only checks its rows (as MorePredictor does first), or fails as a bug would."""

    def predict(self, context, model_input, params=None):
        if (model_input["title"] == "bug").any():
            raise KeyError("a bug")
        rows = checked_rows(model_input, ServeConfig(max_new_tokens=4))
        return pd.DataFrame({"label": ["none"] * len(rows)})


def test_refusal_is_an_http_400_naming_the_row_in_mlflows_scoring_server(tmp_path):
    """MLflow's scoring app in process: an MlflowException from predict keeps its error code (400) and message;
    any other exception is a 400 with a generic message and the server's stack trace."""
    from fastapi.testclient import TestClient
    from mlflow.models import infer_signature
    from mlflow.pyfunc import scoring_server

    example = serve.input_example()
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=CheckOnly(), pip_requirements=[],
                             signature=infer_signature(example, pd.DataFrame({"label": ["none"]})))
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "model"))))

    def invoke(records):
        return client.post("/invocations", json={"dataframe_records": records})

    refused = invoke([GOOD, {**GOOD, "image": "/etc/passwd"}])
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "row 1: image '/etc/passwd' is not base64" in refused.json()["message"]
    assert "stack_trace" not in refused.json()
    bug = invoke([{**GOOD, "title": "bug"}])
    assert bug.status_code == 400 and "unexpected error" in bug.json()["message"]
    assert "KeyError" in bug.json()["stack_trace"]
    assert invoke([GOOD]).json() == {"predictions": [{"label": "none"}]}


# --- local files: `morer1 predict` only, and only under the allowed folders -----------------------------------


@pytest.fixture
def folders(tmp_path):
    """allowed/ with photo.png, a symlink inside to it and one to outside/secret.png; outside/ with secret.png."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    PHOTO.save(allowed / "photo.png")
    PHOTO.save(outside / "secret.png")
    (allowed / "inside-link.png").symlink_to(allowed / "photo.png")
    (allowed / "outside-link.png").symlink_to(outside / "secret.png")
    return allowed, outside


def test_local_image_reads_only_allowed_files(folders):
    allowed, outside = folders
    ok = [allowed.resolve()]
    photo = base64.b64encode((allowed / "photo.png").read_bytes()).decode()
    assert local_image("photo.png", allowed, ok, 10**6) == photo
    assert local_image("inside-link.png", allowed, ok, 10**6) == photo
    assert local_image(str(allowed / "sub" / ".." / "photo.png"), allowed, ok, 10**6) == photo
    for value in ("../outside/secret.png", str(outside / "secret.png"), "outside-link.png"):
        with pytest.raises(BadInputError, match=f"is {outside.resolve() / 'secret.png'}, outside the allowed"):
            local_image(value, allowed, ok, 10**6)
    with pytest.raises(BadInputError, match="larger than max_image_bytes=10 bytes"):
        local_image("photo.png", allowed, ok, 10)
    with pytest.raises(BadInputError, match=r"image 'nope.png': no such file"):
        local_image("nope.png", allowed, ok, 10**6)
    for passed in (GOOD["image"], f"data:image/png;base64,{GOOD['image']}"):  # encoded bytes pass unchanged
        assert local_image(passed, allowed, ok, 10**6) == passed
    with pytest.raises(BadInputError, match="not a folder"):
        serve.allowed_folders([allowed / "missing"], allowed)


class Checker:
    """In place of a loaded model for `predict_one`/`predict_jsonl`: the real checks, a fixed answer."""

    def __init__(self, **limits):
        self.cfg, self.batches, self.params = ServeConfig(max_new_tokens=4, **limits), [], []

    def predict(self, frame: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = checked_rows(frame, self.cfg)
        self.batches.append(frame)
        self.params.append(params)
        return pd.DataFrame({"label": ["none"] * len(rows), "rationale": ["why"] * len(rows),
                             "completion": ["c"] * len(rows), "confidence": [0.5] * len(rows)})


def test_jsonl_goes_in_chunks_of_max_rows_and_names_the_line(folders, monkeypatch, tmp_path):
    allowed, outside = folders
    checker = Checker(max_rows=2)
    monkeypatch.setattr(serve, "load_predictor", lambda uri: checker)
    line = {"title": TITLE, "entity": ENTITY, "box": [10, 8, 50, 40]}
    lines = [{**line, "image": "photo.png"}] * 4 + [{**line, "image": GOOD["image"]}]
    (allowed / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert serve.predict_jsonl("m", allowed / "in.jsonl", tmp_path / "out.jsonl") == 5
    assert [len(b) for b in checker.batches] == [2, 2, 1]
    assert [json.loads(x)["label"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["none"] * 5
    assert [json.loads(x)["confidence"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [0.5] * 5
    assert serve.predict_jsonl("m", allowed / "in.jsonl", tmp_path / "out.jsonl", params={"samples": 3}) == 5
    assert checker.params[-3:] == [{"samples": 3}] * 3  # every chunk gets the params

    bad = [{**line, "image": "photo.png"}] * 2 + [{**line, "image": "photo.png", "title": "x" * 1001}]
    (allowed / "bad.jsonl").write_text("\n" + "".join(json.dumps(x) + "\n" for x in bad))  # a blank first line
    with pytest.raises(BadInputError, match=r"bad.jsonl: line 4: title has 1001 characters"):
        serve.predict_jsonl("m", allowed / "bad.jsonl", tmp_path / "bad-out.jsonl")
    (allowed / "far.jsonl").write_text(json.dumps({**line, "image": str(outside / "secret.png")}) + "\n")
    with pytest.raises(BadInputError, match="far.jsonl: line 1: image .* outside the allowed folder"):
        serve.predict_jsonl("m", allowed / "far.jsonl", tmp_path / "far-out.jsonl")
    assert serve.predict_jsonl("m", allowed / "far.jsonl", tmp_path / "far-out.jsonl", allow_dirs=[outside]) == 1
    assert not (tmp_path / "bad-out.jsonl").exists()


def test_cli_predict_allows_only_the_given_folders(folders, monkeypatch, capsys):
    from morer1.cli import main

    allowed, outside = folders
    question = ["predict", "--model", "m", "--title", TITLE, "--entity", ENTITY, "--box", "10", "8", "50", "40"]
    checker = Checker()
    monkeypatch.setattr(serve, "load_predictor", lambda uri: checker)
    main(question + ["--image", str(allowed / "photo.png")])
    assert "label: none\nconfidence: 0.50\nrationale: why" in capsys.readouterr().out
    assert checker.params == [{"samples": 1, "abstain_below": 0.0}]  # greedy unless asked
    for image, extra in ((allowed / "outside-link.png", []), (outside / "secret.png", ["--allow-dir", str(allowed)])):
        with pytest.raises(SystemExit) as exit_:
            main(question + ["--image", str(image)] + extra)
        assert exit_.value.code == 2 and "outside the allowed folder" in capsys.readouterr().err
    main(question + ["--image", str(allowed / "outside-link.png"), "--allow-dir", str(outside)])
    assert "label: none" in capsys.readouterr().out


def test_cli_predict_outside_a_project_names_the_tracking_uri_and_creates_nothing(tmp_path, monkeypatch, capsys):
    """No MLFLOW_TRACKING_URI and no project store: one line naming the store tried and how to set one, exit code 1,
    and no `.state/` (nor an empty store) left behind."""
    from morer1.cli import main

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "photo.png").write_bytes(base64.b64decode(GOOD["image"]))
    monkeypatch.chdir(outside)
    monkeypatch.delenv("MORER1_STATE_DIR")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--image", "photo.png", "--title", TITLE, "--entity", ENTITY, "--box", "10", "8", "50", "40"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("morer1 predict: error: models:/morer1@champion needs an MLflow model registry")
    assert f"sqlite:///{outside / '.state' / 'mlflow.db'}" in err
    assert "MLFLOW_TRACKING_URI" in err and "--model FOLDER" in err
    assert sorted(p.name for p in outside.iterdir()) == ["photo.png"]  # no .state/


def test_cli_predict_against_a_store_without_the_model_says_so(tmp_path, monkeypatch, capsys):
    from morer1.cli import main

    store = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["predict", "--image", "x.png", "--title", TITLE, "--entity", ENTITY, "--box", "1", "2", "3", "4"])
    finally:
        mlflow.set_tracking_uri(None)
    err = capsys.readouterr().err  # after MLflow's own log lines (it creates the store it was pointed at): one line
    assert exit_.value.code == 1 and "Traceback" not in err and err.endswith("\n"), err
    err = err.splitlines()[-1]
    assert f"models:/morer1@champion: not found in the MLflow registry at {store}" in err and "--model FOLDER" in err


# --- a real served model ------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"


def documented_request() -> str:
    """The shell lines of the Serving example in docs/evaluation.md after `mlflow models serve`: they write
    request.json from photo.jpg and send it with curl."""
    block = DOCS.read_text(encoding="utf-8").split("\n## Serving\n", 1)[1].split("\n\n", 1)[0]
    lines = [line[4:] for line in block.splitlines() if line.startswith("    ")]
    assert lines[0].startswith("mlflow models serve") and "curl" in lines[-1], block
    return "\n".join(lines[1:])


def test_documented_request_goes_through_a_file():
    script = documented_request()
    assert "-d @request.json" in script and "> request.json" in script and "$(base64" not in script




@pytest.mark.e2e
def test_served_model_refuses_hostile_rows_and_keeps_serving(photo_file, tmp_path, monkeypatch):
    from morer1.labels import DEFAULT_LABELS
    from morer1.prompt import prompt_text
    from morer1.registry import RegisterConfig, log_predictor
    from morer1.tiny_model import TinyModelConfig, build_tiny_model

    corpus = [prompt_text(TITLE, ENTITY, DEFAULT_LABELS), "<think>Step 1.</think><answer>none</answer>"] * 20
    build_tiny_model(tmp_path / "model", corpus, small_config(TinyModelConfig, vocab_size=600))
    (tmp_path / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    try:
        experiment = mlflow.create_experiment("serve-inputs", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            uri = log_predictor(tmp_path / "model", tmp_path / "labels.json",
                                small_config(RegisterConfig, max_new_tokens=4, batch_size=2))
    finally:
        mlflow.set_tracking_uri(None)

    port, bin_dir = free_port(), Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # `mlflow models serve` runs `uvicorn` by name
    server = start_server([str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--host", "127.0.0.1", "--port",
                           str(port), "--env-manager", "local", "--workers", "1"], tmp_path / "serve.log", env)
    url = f"http://127.0.0.1:{port}"

    def invoke(records: list[dict], **params) -> httpx.Response:
        body = {"dataframe_records": records, **({"params": params} if params else {})}
        return httpx.post(f"{url}/invocations", json=body, timeout=60)

    def answers_a_good_row() -> None:
        reply = invoke([GOOD])
        assert reply.status_code == 200, reply.text
        [prediction] = reply.json()["predictions"]
        assert set(prediction) == {"label", "rationale", "completion", "confidence"}
        assert isinstance(prediction["completion"], str)

    try:
        wait_healthy(f"{url}/ping", server, tmp_path / "serve.log")
        answers_a_good_row()
        # the documented curl request, with a photo far over the 128 KB a command-line argument may hold
        noise = random.Random(0).randbytes(1200 * 900 * 3)
        Image.frombytes("RGB", (1200, 900), noise).save(tmp_path / "photo.jpg", "JPEG", quality=95)
        assert (tmp_path / "photo.jpg").stat().st_size > 1_000_000
        sent = subprocess.run(["bash", "-c", documented_request().replace("127.0.0.1:5001", url.split("//")[1])],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert (tmp_path / "request.json").stat().st_size > 1_300_000
        reply = json.loads(sent.stdout)
        assert "predictions" in reply, sent.stdout[-2000:]
        [prediction] = reply["predictions"]
        assert set(prediction) == {"label", "rationale", "completion", "confidence"}
        sampled = invoke([GOOD, GOOD], samples=3, abstain_below=1.01)  # self-consistency, then abstention
        assert sampled.status_code == 200, sampled.text
        assert [p["label"] for p in sampled.json()["predictions"]] == ["none", "none"]
        assert {p["confidence"] for p in sampled.json()["predictions"]} <= {0.0, 1 / 3, 2 / 3, 1.0}
        too_many = invoke([GOOD], samples=9)
        assert too_many.status_code == 400 and "max_samples=8" in too_many.json()["message"]
        hostile = {name: ([GOOD, {**GOOD, **change}], message) for name, (change, message)
                   in hostile_rows(photo_file).items() if name != "box-floats"}  # floats: MLflow's schema refuses
        hostile["too-many-rows"] = ([GOOD] * 33, "row 32: one request holds at most max_rows=32 rows, got 33")
        for name, (records, message) in hostile.items():
            reply = invoke(records)
            assert reply.status_code == 400, f"{name}: {reply.status_code} {reply.text[:500]}"
            body = reply.json()
            assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body, name
            assert re.search(message, body["message"]), f"{name}: {body['message'][-300:]}"
            answers_a_good_row()
        reply = invoke([GOOD, {**GOOD, "box": "1,2,3,4"}])  # refused by MLflow's schema enforcement itself
        assert reply.status_code == 400
        answers_a_good_row()
        assert server.poll() is None
    finally:
        stop_group(server)
    deadline = time.monotonic() + 10  # the socket may outlive the group by a moment
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening(port)
