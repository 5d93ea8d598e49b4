"""The ingest stage on hand-made MORE-layout folders: boxes, every reject reason, unsafe .pth files; the streaming
reader writes what the reader that held every fact wrote, reads plain lines without `ast.literal_eval`, decodes
each photo once and holds no fact in memory."""

import ast
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from more_layout import fact, read_jsonl, write_more
from PIL import Image

from morer1.ingest import (
    IngestConfig,
    IngestError,
    NotSure,
    RejectFractionExceeded,
    fast_literal,
    ingest,
    pixel_box,
    report_rejects,
    run,
)

CFG = IngestConfig(max_reject_fraction=1.0, box_tolerance=0.02)
IMAGES = {"train": {"a.jpg": (200, 100)}, "valid": {"b.jpg": (50, 40)}, "test": {"c.jpg": (64, 64)}}


def _normalised(x0, y0, x1, y1, w, h, as_str):
    vals = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
    return tuple(f"{v:.6f}" for v in vals) if as_str else vals


@pytest.mark.parametrize("as_str", [True, False])
def test_boxes_from_strings_and_numbers_are_exact_pixels(tmp_path, as_str):
    boxes = [(0, 0, 200, 100), (13, 7, 58, 91), (101, 33, 199, 34)]
    lines = {"train": [fact("a.jpg", _normalised(*b, 200, 100, as_str)) for b in boxes],
             "valid": [fact("b.jpg", _normalised(3, 5, 47, 39, 50, 40, as_str))],
             "test": [fact("c.jpg", _normalised(1, 2, 3, 4, 64, 64, as_str))]}
    ingest(write_more(tmp_path / "src", lines, IMAGES), tmp_path / "out", CFG)
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["object"]["box"] for r in train] == [list(b) for b in boxes]
    assert read_jsonl(tmp_path / "out" / "dev.jsonl")[0]["object"]["box"] == [3, 5, 47, 39]
    assert read_jsonl(tmp_path / "out" / "test.jsonl")[0]["object"]["box"] == [1, 2, 3, 4]


def test_docs_give_the_fact_ids_as_ingest_writes_them(tmp_path):
    """docs/data.md's `id` row shows ids as they are: `<split>-` and the source line zero-padded to 6 digits."""
    lines = {"train": [fact("a.jpg", (0.5, 0.5, 0.5, 0.5))],
             "valid": [fact("b.jpg", (0.5, 0.5, 0.4, 0.5)) for _ in range(42)],
             "test": [fact("c.jpg", (0.5, 0.5, 1, 1))]}
    ingest(write_more(tmp_path / "src", lines, IMAGES), tmp_path / "out", CFG)
    first_train = read_jsonl(tmp_path / "out" / "train.jsonl")[0]
    dev_42 = read_jsonl(tmp_path / "out" / "dev.jsonl")[41]
    assert (first_train["id"], dev_42["id"], dev_42["source"]) == ("train-000001", "dev-000042", "txt/valid.txt:42")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text(encoding="utf-8")
    [row] = [line for line in doc.splitlines() if line.startswith("| `id` |")]
    assert "`train-000001` is line 1 of `txt/train.txt`" in row and "`dev-000042` line 42 of `txt/valid.txt`" in row
    assert "`<split>-<line>`" not in row


def test_record_shape_crops_images_and_valid_becomes_dev(tmp_path):
    lines = {"train": [fact("a.jpg", (0.5, 0.5, 0.5, 0.5), "/per/loc/place_of_residence", entity=(3, 4),
                            text="Alice Smith visits Paris today")],
             "valid": [fact("b.jpg", (0.5, 0.5, 0.4, 0.5))], "test": [fact("c.jpg", (0.5, 0.5, 1, 1))]}
    src = write_more(tmp_path / "src", lines, IMAGES,
                     object_dicts={"train": {"a.jpg": {"woman": [0.5, 0.5, 0.5, 0.5], "flag": [0.1, 0.1, 0.1, 0.1]}}})
    (src / "caption_dict.json").write_text(json.dumps({"a.jpg": {"woman": "a smiling woman"}}))
    summary = ingest(src, tmp_path / "out", CFG)
    out = tmp_path / "out"
    assert summary["facts"] == {"train": 1, "dev": 1, "test": 1} and summary["rejects"] == 0
    rec = read_jsonl(out / "train.jsonl")[0]
    assert rec["id"] == "train-000001" and rec["split"] == "train" and rec["source"] == "txt/train.txt:1"
    assert (rec["width"], rec["height"]) == (200, 100)
    assert rec["entity"] == {"name": "Paris", "start": 3, "end": 4}
    assert rec["object"]["box"] == [50, 25, 150, 75] and rec["object"]["caption"] == "a smiling woman"
    assert (rec["object_type"], rec["entity_type"]) == ("per", "loc")
    assert rec["pair_entities"] == 1 and rec["pair_objects"] == 2  # the .pth lists a second object
    assert (out / rec["image"]).is_file()
    from PIL import Image

    with Image.open(out / rec["object"]["crop"]) as crop:
        assert crop.size == (100, 50)
    dev = read_jsonl(out / "dev.jsonl")[0]
    assert dev["split"] == "dev" and dev["object_type"] is None and dev["entity_type"] is None
    assert (out / dev["image"]).is_file() and dev["image"].startswith("images/dev/")
    assert json.loads((out / "labels.json").read_text())[0] == "none"


def test_each_bad_record_is_rejected_with_file_line_and_reason_and_good_ones_kept(tmp_path):
    good = fact("a.jpg", (0.5, 0.5, 0.2, 0.2))
    src_lines = [
        repr(good),                                                # 1 kept
        "this is not a dict literal",                              # 2
        repr(fact("../../secret.jpg", (0.5, 0.5, 0.2, 0.2))),      # 3
        repr(fact("a.jpg", (0.9, 0.5, 0.5, 0.2))),                 # 4 box leaves the image by 15%
        repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2), "/per/per/enemy")),  # 5
        repr(good)[:-7],                                           # 6 truncated
        repr(fact("broken.jpg", (0.5, 0.5, 0.2, 0.2))),            # 7 unreadable image
        repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2), entity=(3, 9))),  # 8 span beyond tokens
        "__import__('os').system('touch pwned')",                  # 9 code, never run
        repr(fact("a.jpg", (0.505, 0.5, 1.0, 1.0))),               # 10 within tolerance: clipped, kept
        repr(fact("missing.jpg", (0.5, 0.5, 0.2, 0.2))),           # 11
    ]
    src = write_more(tmp_path / "src", {"train": src_lines}, IMAGES)
    (src / "img_org" / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    summary = ingest(src, tmp_path / "out", CFG)
    rejects = {r["line"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    kinds = {line: r["kind"] for line, r in rejects.items()}
    assert kinds == {2: "not_a_literal", 3: "image_path", 4: "box_outside_image", 5: "label_not_in_set",
                     6: "truncated_line", 7: "image_unreadable", 8: "bad_entity_span", 9: "not_a_literal",
                     11: "image_missing"}
    assert all(r["file"] == str(src / "txt" / "train.txt") for r in rejects.values())
    assert "'/per/per/enemy' is not in rel2id.json" in rejects[5]["reason"]
    # the photo named by its name, never by where the project lives (Pillow's own message holds the absolute path)
    assert "broken.jpg" in rejects[7]["reason"] and str(tmp_path) not in rejects[7]["reason"]
    kept = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["source"] for r in kept] == ["txt/train.txt:1", "txt/train.txt:10"]
    assert kept[1]["object"]["box"] == [1, 0, 200, 100]  # x1 = 201 clipped to the width
    assert summary["reject_reasons"]["not_a_literal"] == 2
    assert not (tmp_path / "pwned").exists()


def _with(record: dict, **fields) -> dict:
    return {**record, **fields}


def test_fields_of_the_wrong_type_are_rejected_not_coerced_and_never_crash_the_stage(tmp_path):
    good = fact("a.jpg", (0.5, 0.5, 0.2, 0.2))
    hostile = {
        2: _with(good, h={"name": ["Alice"], "pos": [False, True]}),   # bool is an int subclass
        3: _with(good, h={"name": ["Alice"], "pos": [0.0, 1.0]}),
        4: _with(good, t={"name": "woman", "pos": (0.5, 0.5, True, True)}),  # would be the whole image
        5: _with(good, t={"name": "woman", "pos": (0.5, False, 0.2, 0.2)}),
        6: _with(good, t={"name": "woman", "pos": (1e308, 0.5, 0.2, 0.2)}),  # finite, but not in pixels
        7: _with(good, t={"name": "woman", "pos": (10**400, 0.5, 0.2, 0.2)}),  # too large for a float
        8: _with(good, img_id=["a.jpg"]),                                # unhashable
        9: _with(good, h={"name": [1, 2], "pos": [0, 1]}),
        10: _with(good, t={"name": ["woman"], "pos": (0.5, 0.5, 0.2, 0.2)}),
        11: _with(good, text=["Alice", "Smith"]),
        12: "{[1]: 2}",                                                  # literal_eval raises TypeError
    }
    kinds = {2: "bad_entity_span", 3: "bad_entity_span", 4: "bad_box", 5: "bad_box", 6: "bad_box", 7: "bad_box",
             8: "image_path", 9: "bad_entity_name", 10: "bad_object_name", 11: "bad_text", 12: "not_a_literal"}
    whole_image = _with(good, t={"name": "woman", "pos": ("0.5", "0.5", "1", "1")})
    lines = [good] + [hostile[n] for n in sorted(hostile)] + [whole_image]
    src = write_more(tmp_path / "src", {"train": lines}, IMAGES)
    summary = ingest(src, tmp_path / "out", CFG)
    rejects = {r["line"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert {line: r["kind"] for line, r in rejects.items()} == kinds
    assert "boolean" in rejects[4]["reason"] and "[False, True]" in rejects[2]["reason"]
    kept = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["source"] for r in kept] == ["txt/train.txt:1", "txt/train.txt:13"]
    assert kept[1]["object"]["box"] == [0, 0, 200, 100]  # numeric strings are still numbers
    assert all(type(v) is int for r in kept for v in (r["entity"]["start"], r["entity"]["end"], *r["object"]["box"]))
    assert summary["facts"]["train"] == 2 and summary["rejects"] == len(kinds)


_INGEST_IN_A_PROCESS = """
import sys
from morer1.ingest import IngestConfig, ingest
ingest(sys.argv[1], sys.argv[2], IngestConfig(max_reject_fraction=1.0))
"""


def test_reject_reasons_are_the_same_on_every_run_of_the_same_input(tmp_path):
    good = fact("a.jpg", (0.5, 0.5, 0.2, 0.2))
    words = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}  # a set's order follows the hash seed
    hostile = [
        repr(good),
        "__import__('os').system('touch pwned')",                # literal_eval names the node object
        "{'token': ['x'], 'h': {'pos': [0, 1]}, 't': object(), 'relation': 'none', 'img_id': 'a.jpg'}",
        "lambda: 0",
        repr(_with(good, h={"name": ["Alice"], "pos": words})),
        repr(_with(good, img_id=words)),
        repr(_with(good, relation=words)),
        repr(_with(good, t={"name": "woman", "pos": [words, 1, 2, 3]})),
        repr(_with(good, t={"name": "woman", "pos": tuple(range(10**4))})),  # long: quoted in part only
        repr(fact("broken.jpg", (0.5, 0.5, 0.2, 0.2))),
        "{[1]: 2}",
    ]
    src = write_more(tmp_path / "src", {"train": hostile}, IMAGES)
    (src / "img_org" / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}"
        subprocess.run([sys.executable, "-c", _INGEST_IN_A_PROCESS, str(src), str(out)], check=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        runs.append((out / "rejects.jsonl").read_bytes())
    assert runs[0] == runs[1]
    rejects = [json.loads(line) for line in runs[0].decode().splitlines()]
    assert len(rejects) == len(hostile) - 1
    for r in rejects:
        assert not re.search(r"0x[0-9a-f]{6,}", r["reason"], re.IGNORECASE), r
        assert len(r["reason"]) < 400, r
    assert "a Call expression is not allowed" in rejects[0]["reason"]
    assert "{'alpha', 'beta', 'delta', 'epsilon', 'gamma', 'zeta'}" in rejects[3]["reason"]
    assert not (tmp_path / "pwned").exists()


def test_caption_file_of_the_wrong_shape_is_a_clear_error(tmp_path):
    src = write_more(tmp_path / "src", {"train": [fact("a.jpg", (0.5, 0.5, 0.2, 0.2))]}, IMAGES)
    (src / "caption_dict.json").write_text(json.dumps({"a.jpg": "a smiling woman"}))
    with pytest.raises(IngestError, match=r"caption_dict.json: entry 'a.jpg': expected a JSON object"):
        ingest(src, tmp_path / "out", CFG)


def test_a_line_that_is_not_utf8_is_rejected_and_the_rest_of_the_file_kept(tmp_path):
    good = repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2))).encode()
    bad = repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2), tokens=["Café", "b", "c"])).encode().replace(
        "é".encode(), b"\xe9")  # Latin-1, not UTF-8
    src = write_more(tmp_path / "src", {}, IMAGES)
    (src / "txt" / "train.txt").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + bad + b"\n" + good + b"\n")
    ingest(src, tmp_path / "out", CFG)
    kept = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["source"] for r in kept] == ["txt/train.txt:1", "txt/train.txt:3"]  # a leading BOM is fine
    assert not any("\ufffd" in tok for r in kept for tok in r["tokens"])
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["kind"] == "not_utf8" and reject["line"] == 2
    assert reject["reason"].startswith("not UTF-8: byte 0xe9 at byte ")
    assert "Caf\\xe9" in reject["excerpt"]  # the excerpt shows the byte, not a replacement character
    printed = io.StringIO()
    report_rejects(tmp_path / "out", stream=printed)
    assert printed.getvalue().startswith(f"{src / 'txt' / 'train.txt'}:2: not UTF-8: byte 0xe9")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_too_many_rejects_fails_keeps_the_previous_output_and_reports_this_runs_rejects(tmp_path):
    good = repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2)))
    src = write_more(tmp_path / "src", {"train": [good, good, "[1, 2"]}, IMAGES)
    out = tmp_path / "out"
    ingest(src, out, IngestConfig(max_reject_fraction=0.4))
    before = _snapshot(out)
    (src / "txt" / "train.txt").write_text(f"{good}\n{{'token': ['x'\n")
    with pytest.raises(RejectFractionExceeded, match=r"1 of 2 lines rejected \(50.0%\), more than "
                                                     r"ingest.max_reject_fraction=40.0%; .*out was left as it was; "
                                                     r"every rejected line is in .*out.rejects.jsonl$"):
        ingest(src, out, IngestConfig(max_reject_fraction=0.4))
    assert _snapshot(out) == before
    assert not (tmp_path / "out.partial").exists()
    assert [r["kind"] for r in read_jsonl(tmp_path / "out.rejects.jsonl")] == ["truncated_line"]
    printed = io.StringIO()
    report_rejects(out, stream=printed)  # this run's rejects, not the ones of the kept output
    assert printed.getvalue() == f"{src / 'txt' / 'train.txt'}:2: truncated line: the record is cut off\n"
    ingest(src, out, CFG)  # a run that succeeds replaces the output and clears the failed run's file
    assert not (tmp_path / "out.rejects.jsonl").exists()
    assert read_jsonl(out / "rejects.jsonl")[0]["kind"] == "truncated_line"


class _RunsCode:
    """Pickles to a call of os.system: a .pth that is not plain data."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_code_running_pth_is_refused_without_side_effects(tmp_path):
    marker = tmp_path / "pwned"
    src = write_more(tmp_path / "src", {"train": [fact("a.jpg", (0.5, 0.5, 0.2, 0.2))]}, IMAGES)
    torch.save({"a.jpg": {"woman": _RunsCode(marker)}}, src / "ent_train_dict.pth")
    with pytest.raises(IngestError) as refused:
        ingest(src, tmp_path / "out", CFG)
    message = str(refused.value)
    assert message.startswith(f"{src / 'ent_train_dict.pth'}: refused: not plain data: it refers to ")
    assert "system" in message and "never loaded" in message
    assert "weights_only" not in message and "False" not in message  # torch's advice to load it unsafely
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    torch.load(src / "ent_train_dict.pth", weights_only=False)  # control: the payload is live when unpickled
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04cut off zip"])
def test_unreadable_pth_is_refused_with_a_short_reason(tmp_path, content):
    src = write_more(tmp_path / "src", {"train": [fact("a.jpg", (0.5, 0.5, 0.2, 0.2))]}, IMAGES)
    (src / "ent_valid_dict.pth").write_bytes(content)
    with pytest.raises(IngestError, match=r"ent_valid_dict.pth: refused: not a readable plain-data torch file "
                                          r"\(.+\); the file is never loaded\.$") as refused:
        ingest(src, tmp_path / "out", CFG)
    assert "weights_only" not in str(refused.value) and len(str(refused.value)) < 400


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("code", [False, True], ids=["plain data", "code"])
def test_bare_pickle_pth_is_refused_saying_what_it_is(tmp_path, protocol, code):
    """A .pth written with pickle.dump instead of torch.save is refused in the documented words (torch's own refusal
    read "Unsupported operand 149" or "Invalid magic number"): it is a bare pickle, or refers to code."""
    import pickle

    marker = tmp_path / "pwned"
    src = write_more(tmp_path / "src", {"train": [fact("a.jpg", (0.5, 0.5, 0.2, 0.2))]}, IMAGES)
    objects = {"a.jpg": {"woman": _RunsCode(marker) if code else [0.5, 0.5, 0.2, 0.2]}}
    (src / "ent_train_dict.pth").write_bytes(pickle.dumps(objects, protocol=protocol))
    with pytest.raises(IngestError) as refused:
        ingest(src, tmp_path / "out", CFG)
    message = str(refused.value)
    head = f"{src / 'ent_train_dict.pth'}: refused: "
    if code:
        assert message.startswith(head + "not plain data: it refers to ") and "system" in message
    else:
        assert message.startswith(head + f"a bare pickle stream (pickle protocol {protocol}, as pickle.dump writes "
                                          "it), not a torch file; the file is never loaded.")
        assert "torch.save(" in message
    assert "never loaded" in message and "operand" not in message and "magic number" not in message
    assert "weights_only" not in message and not marker.exists() and not (tmp_path / "out").exists()


def _break_rel2id(src):
    (src / "rel2id.json").write_text("{not json")


def _unsafe_pth(src):
    torch.save({"b.jpg": {"woman": _RunsCode(src / "pwned")}}, src / "ent_valid_dict.pth")  # after train is written


def _no_lines(src):
    for split in ("train", "valid", "test"):
        (src / "txt" / f"{split}.txt").write_text("\n")


def _crash(src):
    import morer1.ingest

    morer1.ingest._add_pair_counts = None  # an unexpected error midway: TypeError, 'NoneType' is not callable


@pytest.mark.parametrize("breaks, error, reads_train", [
    (_break_rel2id, r"rel2id.json:1: not valid JSON", False),
    (_unsafe_pth, r"ent_valid_dict.pth: refused: not plain data", True),
    (_no_lines, r"no fact lines found", False),
    (_crash, r"not callable", True),
], ids=["bad rel2id", "unsafe pth", "no lines", "crash"])
def test_previous_output_survives_a_failed_run_and_nothing_half_written_is_left(
        tmp_path, monkeypatch, breaks, error, reads_train):
    import morer1.ingest

    monkeypatch.setattr(morer1.ingest, "_add_pair_counts", morer1.ingest._add_pair_counts)  # undone after
    good = fact("a.jpg", (0.5, 0.5, 0.2, 0.2))
    src = write_more(tmp_path / "src", {"train": [good, "oops"], "valid": [fact("b.jpg", (0.5, 0.5, 0.2, 0.2))]},
                     IMAGES)
    out = tmp_path / "data" / "out"
    ingest(src, out, CFG)
    before = _snapshot(out)
    (src / "txt" / "train.txt").write_text(f"{good!r}\n{good!r}\noops\n")  # the failed run rejects line 3
    breaks(src)
    with pytest.raises(Exception, match=error):
        ingest(src, out, CFG)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "out.rejects.jsonl"]  # no out.partial, no out.old
    assert not (src / "pwned").exists()
    printed = io.StringIO()
    report_rejects(out, stream=printed)  # this run's rejects (if it got to read lines), not the kept output's
    assert ("train.txt:3: not a Python literal" in printed.getvalue()) == reads_train
    assert "train.txt:2:" not in printed.getvalue()


def test_pixel_box_rejects_non_numbers():
    from morer1.ingest import Reject

    with pytest.raises(Reject, match="non-numeric"):
        pixel_box(("a", "0.1", "0.1", "0.1"), 10, 10, 0.0)
    assert pixel_box(("0.5", "0.5", "1", "1"), 10, 10, 0.0) == [0, 0, 10, 10]


def test_cli_reports_rejects_as_file_line_reason(tmp_path):
    lines = {"train": [repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2))), "[1, 2"]}
    src = write_more(tmp_path / "src", lines, IMAGES)
    proc = subprocess.run([sys.executable, "-m", "morer1", "ingest", "--source", str(src), "--output",
                           str(tmp_path / "out"), "--max-reject-fraction", "0.9"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "src/txt/train.txt:2: not a Python literal" in proc.stderr  # the source inside cwd: named relative to it
    proc = subprocess.run([sys.executable, "-m", "morer1", "ingest", "--source", str(src), "--output",
                           str(tmp_path / "out"), "--max-reject-fraction", "0.1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "more than ingest.max_reject_fraction=10.0%" in proc.stderr


def test_standalone_ingest_logs_nowhere_unless_asked(tmp_path, monkeypatch, capsys):
    """`morer1 ingest` on its own (checking a release) leaves no MLflow run and no `.state/`; with --track, with
    MLFLOW_TRACKING_URI set, or as a DVC stage (DVC_STAGE set by `dvc repro`) it logs its stage run."""
    import mlflow
    from mlflow import MlflowClient

    from morer1 import tracking
    from morer1.cli import main

    src = write_more(tmp_path / "src", {"train": [fact("a.jpg", (0.5, 0.5, 0.2, 0.2))]}, IMAGES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    state = tracking.state_dir()
    argv = ["ingest", "--source", str(src), "--max-reject-fraction", "1"]
    main([*argv, "--output", "alone"])
    assert "(not logged to MLflow: --track or MLFLOW_TRACKING_URI logs a stand-alone run)" in capsys.readouterr().out
    assert not state.exists() and (tmp_path / "alone" / "train.jsonl").is_file()

    def ingest_runs() -> int:
        mlflow.set_tracking_uri(f"sqlite:///{state / 'mlflow.db'}")
        try:
            return len(MlflowClient().search_runs(
                [e.experiment_id for e in MlflowClient().search_experiments()],
                filter_string="tags.`morer1.stage` = 'ingest'"))
        finally:
            mlflow.set_tracking_uri(None)

    main([*argv, "--output", "tracked", "--track"])
    assert "not logged" not in capsys.readouterr().out and ingest_runs() == 1
    monkeypatch.setenv("DVC_STAGE", "ingest")
    main([*argv, "--output", "staged"])
    assert "not logged" not in capsys.readouterr().out and ingest_runs() == 2
    monkeypatch.delenv("DVC_STAGE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
    main([*argv, "--output", "uri"])
    assert "not logged" not in capsys.readouterr().out and ingest_runs() == 3


def test_outputs_are_the_same_bytes_wherever_the_project_lives(tmp_path, monkeypatch):
    """The source is recorded relative to the working directory (the project) when inside it, as given otherwise."""
    lines = {"train": [repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2))), "[1, 2"]}
    outputs = []
    for project, source in ((tmp_path / "one", "src"), (tmp_path / "two" / "deeper", None)):
        src = write_more(project / "src", lines, IMAGES)
        monkeypatch.chdir(project)
        summary = ingest(source or src, "out", CFG)  # relative, and absolute inside the project
        assert summary["source"] == "src"
        assert read_jsonl(project / "out" / "rejects.jsonl")[0]["file"] == "src/txt/train.txt"
        outputs.append(_snapshot(project / "out"))
    assert outputs[0] == outputs[1]
    elsewhere = write_more(tmp_path / "elsewhere", lines, IMAGES)
    assert ingest(elsewhere, "out2", CFG)["source"] == str(elsewhere)  # outside the project: as given


def test_stage_logs_summary_rejects_and_splits_and_a_failed_run_its_rejects(tmp_path):
    from morer1 import tracking

    good = repr(fact("a.jpg", (0.5, 0.5, 0.2, 0.2)))
    src = write_more(tmp_path / "src", {"train": [good, good, "[1, 2"]}, IMAGES)
    summary = run(IngestConfig(source=str(src), max_reject_fraction=0.5), tmp_path / "out")
    assert summary["facts"]["train"] == 2 and summary["rejects"] == 1
    with pytest.raises(RejectFractionExceeded):
        run(IngestConfig(source=str(src), max_reject_fraction=0.1), tmp_path / "out")
    mlflow = tracking.setup()
    failed, ok = mlflow.search_runs(output_format="list", order_by=["attributes.start_time DESC"])
    assert (ok.info.status, failed.info.status) == ("FINISHED", "FAILED")
    assert ok.data.metrics["facts.train"] == 2 and ok.data.metrics["reject_reasons.not_a_literal"] == 1
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(ok.info.run_id)} == {"summary.json", "rejects.jsonl"}
    assert {i.dataset.name for i in client.get_run(ok.info.run_id).inputs.dataset_inputs} == {
        "facts-train", "facts-dev", "facts-test"}
    assert {a.path for a in client.list_artifacts(failed.info.run_id)} == {"out.rejects.jsonl"}



def noise_photo(path: Path, size: tuple[int, int], seed: int, palette: bool = False) -> None:
    """A photo of seeded noise saved losslessly (PNG): each crop has its own pixels, the same on every machine."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    (img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16) if palette else img).save(path, format="PNG")


def mixed_source(root: Path) -> Path:
    """A MORE-layout folder with what real producers write (tuples, numbers as strings, quotes, parentheses and
    True/None inside titles, escapes) and what they get wrong, the facts of each photo far apart."""
    labels = ["none", "/per/per/partner", "/per/loc/place_of_birth", "/org/loc/locate_at"]
    titles = [["Alice", "Smith", "visits", "Paris", "(France)", "today"],
              ["Bob", "'s", "band", "plays", "in", "Rome"],
              ["True", "story", ":", "None", "of", "us", "{", "}"],
              ["Café", "Ölberg", "says", '"hi"', "to", "Zoë"]]
    train = []
    for n in range(48):
        pos = (round(0.3 + 0.05 * (n % 5), 3), 0.5, 0.4, round(0.3 + 0.1 * (n % 3), 2))
        record = fact(f"p{n % 6}.png", pos if n % 2 else tuple(f"{v:.6f}" for v in pos), labels[n % 4],
                      entity=(n % 3, n % 3 + 1 + n % 2), tokens=titles[n % 4])
        record["t"]["name"] = f"object {n % 4}"
        if n % 5 == 0:
            record["text"] = " ".join(titles[n % 4])
        train.append(record)
    random.Random(7).shuffle(train)  # the facts of one photo far apart: pair counts must still see all of them
    good = train[0]
    hostile = [
        "not a dict at all",
        repr(good)[:-9],                                                       # truncated
        repr({**good, "relation": "/per/per/enemy"}),                          # label not in the set
        repr({**good, "img_id": "../secret.png"}),                             # leaves img_org/train/
        repr({**good, "img_id": "missing.png"}),
        repr({**good, "img_id": "broken.png"}),                                # not an image
        repr({**good, "token": tuple(good["token"])}),                         # tokens must be a list
        repr({**good, "t": {"name": "object 9", "pos": (0.5, 0.5, True, 0.2)}}),
        repr({**good, "t": {"name": "object 9", "pos": (1.9, 0.5, 0.5, 0.2)}}),  # box outside the photo
        repr({**good, "h": {"name": ["x"], "pos": {0, 1}}}),                   # a set
        "{'token': ['a'], 'h': {'pos': [0, 1]}, 't': {'pos': (.5, .5, .1, .1)}, 'relation': true, 'img_id': 'p0.png'}",
        repr({**good, "text": 3}),
        "__import__('os').system('true')",
    ]
    escaped = [{**train[3], "text": "tab\there \\ and a quote ' \""}, {**train[4], "token": ["it's", '"quoted"', "x"]}]
    lines = [r if isinstance(r, str) else repr(r) for r in train[:10] + hostile[:7] + train[10:30] + escaped
             + hostile[7:] + train[30:]]
    valid = [repr(fact("v0.png", (0.5, 0.5, 0.5, 0.5), labels[i % 4], entity=(i % 4, i % 4 + 1))) for i in range(5)]
    test = [repr(fact("t0.png", (0.4, 0.6, 0.3, 0.5), "none", entity=(0, 2))) for _ in range(4)]
    src = write_more(root, {"train": lines, "valid": valid, "test": test})
    photos = {"train": {f"p{i}.png": ((24 + 5 * i, 18 + 3 * i), i) for i in range(6)},
              "valid": {"v0.png": ((20, 16), 10)}, "test": {"t0.png": ((17, 23), 11)}}
    for split, files in photos.items():
        for img_id, (size, seed) in files.items():
            noise_photo(src / "img_org" / split / img_id, size, seed, palette=seed == 2)
    whole = (src / "img_org" / "train" / "p5.png").read_bytes()
    (src / "img_org" / "train" / "broken.png").write_bytes(whole[: len(whole) // 2])  # cut off: no pixels
    (src / "caption_dict.json").write_text(json.dumps({"p1.png": {"object 1": "a red thing"}, "v0.png": {}}))
    torch.save({"p0.png": {"object 0": [0.5, 0.5, 0.2, 0.2], "flag": [0.1, 0.1, 0.1, 0.1]}}, src / "ent_train_dict.pth")
    return src


def output_digest(out: Path) -> str:
    """sha256 over every output file: JSON as its bytes, a PNG as its size, mode and pixels (whatever zlib wrote)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        digest.update(path.relative_to(out).as_posix().encode() + b"\0")
        if path.suffix == ".png":
            with Image.open(path) as img:
                digest.update(f"{img.size} {img.mode}".encode() + img.tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


# `output_digest` of `mixed_source` ingested by the ingest stage as it was before it streamed (it held every fact of
# a split, and parsed every line with ast.literal_eval); the streaming stage must write exactly the same
MIXED_DIGEST = "3e984a1d6b0ab3afcc7fbeecad82ec1b71be5409316098663ed0d8627a0f3932"


@pytest.mark.parametrize("workers", [0, 3])
def test_streaming_ingest_writes_what_the_ingest_that_held_every_fact_wrote(tmp_path, monkeypatch, workers):
    monkeypatch.chdir(tmp_path)
    src = mixed_source(Path("src"))
    parsed_slowly = []
    literal_eval = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda text: parsed_slowly.append(text) or literal_eval(text))
    summary = ingest("src", "out", IngestConfig(max_reject_fraction=1.0, workers=workers))
    assert output_digest(Path("out")) == MIXED_DIGEST
    assert summary["facts"] == {"train": 50, "dev": 5, "test": 4} and summary["rejects"] == 13
    lines = (src / "txt" / "train.txt").read_text(encoding="utf-8").splitlines()
    for reject in read_jsonl(Path("out/rejects.jsonl")):  # each names its file and line, whichever parser read it
        assert reject["file"] == "src/txt/train.txt" and reject["excerpt"] == lines[reject["line"] - 1][:200]
    # only the lines that are no plain literal (not a dict, a call, cut off, a set, a JSON `true`) or have an escape
    # (the tab) took the slow path; the 62 others were read by fast_literal
    slow = [line for line in lines if line.startswith(("not a dict", "__import__")) or not line.endswith("}")
            or "{0, 1}" in line or "'relation': true" in line or "\\" in line]
    assert len(slow) == 6 and parsed_slowly == slow


@pytest.mark.parametrize("text", [
    "{'a': 1}", "{}", "[]", "()", "(1)", "((1, 2))", "[(1)]", "('a', ['b', ('c',)])", "{'k': ()}", "(1,)", "[1,]",
    "{'a': [1, (2, 3.5, -4e3, '0.5')], 'b': None, 'c': True}", "[0.1, 1E5, 2e-3, 00.5, 0.0e0, 1E+5, 1., .5]",
    "012", "00", "-0", "-0.0", "1e400", "1j", "1_0", "+1", "- 1", "'a' 'b'", "'it\\'s'", '"it\'s"', "'\\x41'",
    "{[1]: 2}", "{'a': 1, 'a': 2}", "{1: 2, True: 3}", "{1, 2}", "set()", "b'x'", "...", "True1", "[1 2]",
    "true", "[null]", "NaN", "[Infinity]", "{'a': 'say \"hi\"'}", "{\"it's\": \"x\"}", "['a\tb']", "'\x00'",
    "['(', ')', 'True', 'None']", "{'a':\r1}", "\t[1,\f2]", "9" * 5000, "[" * 150 + "]" * 150, "", "x",
])
def test_fast_literal_gives_what_literal_eval_gives_or_declines(text):
    try:
        expected = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        expected = NotSure
    try:
        got = fast_literal(text)
    except NotSure:
        return  # declined: the caller asks ast.literal_eval, which gives the value or the error of before
    assert expected is not NotSure and repr(got) == repr(expected) and type(got) is type(expected)


def _photo_grouped_source(root: Path, n_facts: int, per_photo: int) -> Path:
    """`n_facts` train facts, the facts of each photo next to each other (as MORE and the demo write them)."""
    photos = max(1, n_facts // per_photo)
    lines = [fact(f"p{i * photos // n_facts}.png", (0.5, 0.5, 0.5, 0.5), "none", entity=(i % 4, i % 4 + 1),
                  text=f"Alice Smith visits Paris today ({i})") for i in range(n_facts)]
    src = write_more(root, {"train": lines})
    for i in range(photos):
        noise_photo(src / "img_org" / "train" / f"p{i}.png", (12, 10), i)
    return src


def test_each_photo_is_decoded_once_for_the_facts_that_follow_it(tmp_path, monkeypatch):
    src = _photo_grouped_source(tmp_path / "src", 60, per_photo=6)
    opened = []
    image_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a: opened.append(Path(path).name) or image_open(path, *a))
    assert ingest(src, tmp_path / "out", CFG)["facts"]["train"] == 60
    assert sorted(opened) == sorted(f"p{i}.png" for i in range(10))


def _traced_peak(src: Path, out: Path) -> int:
    """Python heap peak of one ingest, its files written by the reading thread: the writer threads' queue (at most
    2 batches each, whatever the corpus) fills or not with the scheduling, which a 2-core CI machine varies."""
    tracemalloc.start()
    try:
        ingest(src, out, CFG.model_copy(update={"workers": 0}))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Python heap peak of a run (tracemalloc, not timing): 4x the facts of a few photos cost no more memory; 4x
    the facts spread over 4x the photos cost only the per-photo pair counts (~1 KB a photo), far below holding the
    facts (~3 KB a fact before the stage streamed)."""
    sizes = (300, 1200)
    few = [_traced_peak(_photo_grouped_source(tmp_path / f"few{n}", n, per_photo=n // 4), tmp_path / f"o{n}")
           for n in sizes]
    assert few[1] < 1.3 * few[0], few
    spread = [_traced_peak(_photo_grouped_source(tmp_path / f"spread{n}", n, per_photo=6), tmp_path / f"s{n}")
              for n in sizes]
    assert (spread[1] - spread[0]) / (sizes[1] - sizes[0]) < 800, spread  # bytes per added fact


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory) -> Path:
    """A small demo dataset (~400 facts; each object box shared by the facts of its title's entities)."""
    from configs import small_config

    from morer1.demo_data import DemoDataConfig, generate_demo

    src = tmp_path_factory.mktemp("demo") / "more"
    generate_demo(src, small_config(DemoDataConfig, train_pairs=60))
    return src


def test_writer_threads_write_the_bytes_the_reading_thread_writes(tmp_path, monkeypatch, demo_source):
    """The crops and photos are written by `ingest.workers` threads, not by the thread that reads the lines, and
    every output file is the same bytes for 0, 1 and 3 workers; each crop is the file `Image.save` wrote for it
    before the writers (one save per fact), each photo the source's bytes."""
    import threading

    import morer1.ingest
    from morer1.files import folder_sha256

    ran = []  # (thread that ran a batch of writes, files in the batch)
    write_files = morer1.ingest._write_files
    monkeypatch.setattr(morer1.ingest, "_write_files",
                        lambda jobs: ran.append((threading.current_thread().name, len(jobs))) or write_files(jobs))
    digests = {}
    for workers in (0, 1, 3):
        ran.clear()
        out = tmp_path / f"w{workers}"
        summary = ingest(demo_source, out, IngestConfig(max_reject_fraction=1.0, workers=workers))
        digests[workers] = folder_sha256(out)
        files = sum(1 for p in (out / "crops").rglob("*") if p.is_file())
        files += sum(1 for p in (out / "images").rglob("*") if p.is_file())
        assert files > sum(summary["facts"].values()) > 300 and sum(n for _, n in ran) == files and len(ran) > 4
        threads = {name for name, _ in ran}
        if workers:
            assert threading.current_thread().name not in threads and all(
                name.startswith("ingest-writer") for name in threads), threads
        else:
            assert threads == {threading.current_thread().name}
    assert digests[0] == digests[1] == digests[3]
    out, reference = tmp_path / "w3", tmp_path / "reference.png"
    for split, split_file in (("train", "train"), ("dev", "valid"), ("test", "test")):
        for rec in read_jsonl(out / f"{split}.jsonl"):
            source = demo_source / "img_org" / split_file / rec["img_id"]
            with Image.open(source) as photo:
                photo.convert("RGB").crop(rec["object"]["box"]).save(reference)
            assert (out / rec["object"]["crop"]).read_bytes() == reference.read_bytes(), rec["id"]
            assert (out / rec["image"]).read_bytes() == source.read_bytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_write_names_the_line_and_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch, workers):
    import morer1.ingest

    src = _photo_grouped_source(tmp_path / "src", 200, per_photo=6)
    write_bytes = morer1.ingest._write_bytes

    def disk_full_at_line_150(path, data):
        if path.endswith("/train-000150.png"):
            raise OSError(28, "No space left on device")
        write_bytes(path, data)

    monkeypatch.setattr(morer1.ingest, "_write_bytes", disk_full_at_line_150)
    with pytest.raises(OSError, match="No space left on device") as failed:
        ingest(src, tmp_path / "out", IngestConfig(max_reject_fraction=1.0, workers=workers))
    assert failed.value.__notes__ == [f"while writing the object crop of {src}/txt/train.txt:150 to "
                                      f"{tmp_path}/out.partial/crops/train/train-000150.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rejects.jsonl", "src"]  # no out, no out.partial
