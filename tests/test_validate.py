"""The two gates on hand-made folders: good data passes; each kind of bad data fails by name.

Great Expectations runs are slow (~2-3 s each), so all the bad records share one folder and one run:
each defect sits on its own records, and the run must report exactly the expected failures.
"""

import json
from pathlib import Path

import pytest

from morer1.errors import BadInputError
from morer1.validate import (
    DataValidationError,
    SuiteRun,
    ValidateConfig,
    fact_batches,
    load_suite,
    run_facts,
    run_sft,
)

SUITES = Path(__file__).resolve().parents[1] / "expectations"
LABELS = ["none", "/per/per/partner", "/per/loc/place_of_birth", "/org/loc/locate_at"]


def record(split: str, n: int, relation: str = "none") -> dict:
    """A valid fact record as docs/data.md describes it (640x480 image, entity 'Paris' = tokens [3, 4))."""
    fact_id = f"{split}-{n:06d}"
    tokens = ["Alice", "Smith", "visits", "Paris", "today"]
    return {
        "id": fact_id, "split": split, "source": f"txt/{split}.txt:{n}", "img_id": "a.jpg",
        "image": f"images/{split}/a.jpg", "width": 640, "height": 480, "text": " ".join(tokens), "tokens": tokens,
        "entity": {"name": "Paris", "start": 3, "end": 4},
        "object": {"name": "woman", "box": [10, 20, 110, 220], "crop": f"crops/{split}/{fact_id}.png", "caption": None},
        "relation": relation, "object_type": None, "entity_type": None, "pair_entities": 1, "pair_objects": 1,
    }


def good_splits() -> dict[str, list[dict]]:
    """Half `none` per split; train's two relations have a share of 0.5 each."""
    return {
        "train": [record("train", 1), record("train", 2, "/per/per/partner"), record("train", 3),
                  record("train", 4, "/per/loc/place_of_birth")],
        "dev": [record("dev", 1), record("dev", 2, "/org/loc/locate_at")],
        "test": [record("test", 1), record("test", 2, "/per/per/partner")],
    }


def write_ingested(root: Path, splits: dict[str, list], labels=LABELS) -> Path:
    """An ingested folder: `<split>.jsonl` (records, or raw strings as-is) and `labels.json`."""
    root.mkdir(parents=True)
    for split, rows in splits.items():
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        (root / f"{split}.jsonl").write_text(text, encoding="utf-8")
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def bad_splits() -> dict[str, list[dict]]:
    """Every defect at once, each on its own records."""
    splits = good_splits()
    train, dev = splits["train"], splits["dev"]
    train[1]["relation"] = "/per/per/enemy"           # label not in the set
    train[2]["text"] = " "                            # blank text
    train[3]["object"]["box"] = [600, 20, 700, 220]   # x1 = 700 beyond the width 640
    dev[0]["entity"]["end"] = 9                       # span beyond the 5 tokens
    dev[1]["relation"] = "none"                       # dev all `none`: share 1.0
    dev[1]["id"] = "train-000001"                     # duplicate of a train id
    splits["test"] = []                               # empty split
    return splits


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    summary = run_facts(ValidateConfig(), write_ingested(out / "ingested", good_splits()), out / "validation",
                        suites_dir=SUITES)
    return summary, out / "validation"


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    cfg = ValidateConfig(none_fraction_max=0.9, max_examples=3)
    with pytest.raises(DataValidationError) as info:
        run_facts(cfg, write_ingested(out / "ingested", bad_splits()), out / "validation", suites_dir=SUITES)
    return str(info.value), out / "validation"


def test_good_batch_passes_and_writes_report_and_data_docs(good_run):
    summary, out = good_run
    assert summary == {"expectations": 41, "failed": 0}
    report = json.loads((out / "report.json").read_text())
    assert report["success"] is True and report["summary"] == summary and report["data_docs"] == "data_docs/index.html"
    index = (out / "data_docs" / "index.html").read_text()
    assert "validations/facts/train/" in index
    assert sorted(p.name for p in out.iterdir()) == ["data_docs", "report.json"]
    batches = report["suites"]["facts"]["batches"]
    assert {name: b["rows"] for name, b in batches.items()} == {"train": 4, "dev": 2, "test": 2, "all": 8}
    share = next(e for e in batches["train"]["expectations"] if e["kwargs"].get("column") == "is_none")
    assert share["observed_value"] == 0.5 and share["kwargs"]["max_value"] == 0.95


def test_same_data_gives_the_same_bytes_in_another_folder_and_run(good_run, tmp_path):
    _, first = good_run
    again = tmp_path / "elsewhere" / "validation"
    run_facts(ValidateConfig(), write_ingested(tmp_path / "elsewhere" / "ingested", good_splits()), again,
              suites_dir=SUITES)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(first) == files(again)


@pytest.mark.parametrize("line", [
    "facts/train: expect_column_values_to_be_in_set(column='relation', value_set=['none', '/per/per/partner', "
    "'/per/loc/place_of_birth', '/org/loc/locate_at']): "
    "1 of 4 rows unexpected, e.g. train-000002 (relation='/per/per/enemy')",
    "facts/train: expect_column_pair_values_a_to_be_greater_than_b(column_A='width', column_B='box_x1', "
    "or_equal=True): 1 of 4 rows unexpected, e.g. train-000004 (width=640, box_x1=700)",
    "facts/dev: expect_column_pair_values_a_to_be_greater_than_b(column_A='n_tokens', column_B='entity_end', "
    "or_equal=True): 1 of 2 rows unexpected, e.g. dev-000001 (n_tokens=5, entity_end=9)",
    "facts/train: expect_column_values_to_match_regex(column='text', regex='\\\\S'): "
    "1 of 4 rows unexpected, e.g. train-000003 (text=' ')",
    "facts/all: expect_column_values_to_be_unique(column='id'): "
    "2 of 6 rows unexpected, e.g. train-000001, train-000001",
    "facts/test: expect_table_row_count_to_be_between(min_value=1): observed 0 "
    "[params: min_value = validate.min_facts_per_split]",
    "facts/dev: expect_column_mean_to_be_between(column='is_none', min_value=0.3, max_value=0.9): observed 1.0 "
    "[params: min_value = validate.none_fraction_min, max_value = validate.none_fraction_max]",
], ids=["label_not_in_set", "box_outside_image", "span_beyond_tokens", "empty_text", "duplicate_id",
        "empty_split", "none_share_above_bound"])
def test_each_defect_fails_with_split_expectation_and_id(bad_run, line):
    message, _ = bad_run
    assert line in message.splitlines()


def test_bad_batch_reports_exactly_its_defects_after_writing_report_and_docs(bad_run):
    message, out = bad_run
    report = json.loads((out / "report.json").read_text())
    failed = {(batch, e["expectation"], e["kwargs"].get("column", e["kwargs"].get("column_B")))
              for batch, b in report["suites"]["facts"]["batches"].items() for e in b["expectations"]
              if not e["success"]}
    assert failed == {
        ("train", "expect_column_values_to_be_in_set", "relation"),
        ("train", "expect_column_pair_values_a_to_be_greater_than_b", "box_x1"),
        ("train", "expect_column_values_to_match_regex", "text"),
        ("dev", "expect_column_pair_values_a_to_be_greater_than_b", "entity_end"),
        ("dev", "expect_column_mean_to_be_between", "is_none"),
        ("test", "expect_table_row_count_to_be_between", None),
        ("test", "expect_column_mean_to_be_between", "is_none"),  # the mean of an empty split is None
        ("all", "expect_column_values_to_be_unique", "id"),
    }
    assert report["success"] is False and report["failures"] == message.splitlines()[1:-1]
    assert message.splitlines()[0] == "8 of 41 expectations failed:"
    assert message.splitlines()[-1] == f"Data Docs: {out / 'data_docs' / 'index.html'}"
    assert (out / "data_docs" / "index.html").is_file()


def test_label_share_is_per_non_none_fact_and_checked_on_train(tmp_path):
    splits = good_splits()
    splits["train"][3]["relation"] = "/per/per/partner"
    batches, labels = fact_batches(write_ingested(tmp_path / "ingested", splits))
    assert labels == LABELS
    assert batches["train"]["label_share"].tolist()[1::2] == [1.0, 1.0]
    assert batches["train"]["label_share"].isna().tolist() == [True, False, True, False]
    suite = json.loads((SUITES / "facts.json").read_text())
    share = next(e for e in suite["expectations"] if e["kwargs"].get("column") == "label_share")
    assert share["meta"]["batches"] == ["train"]
    assert share["kwargs"]["max_value"] == {"$PARAMETER": "max_label_fraction"}


def test_batches_read_line_by_line_are_the_frames_of_all_records_at_once(tmp_path):
    """Each split is read line by line into columns; the frames are those of all its records at once (types too, an
    empty split, ints beyond int64), so GE's results and the data fingerprint in the Data Docs stay the same."""
    import pandas as pd

    from morer1.validate import FACT_COLUMNS, _fact_frame, _fact_row

    splits = good_splits()
    splits["test"] = []
    splits["dev"][0]["width"] = 10**30
    batches, _ = fact_batches(write_ingested(tmp_path / "ingested", splits))
    rows = {split: [_fact_row(r) for r in records] for split, records in splits.items()}
    rows["all"] = [row for split in ("train", "dev", "test") for row in rows[split]]
    assert list(batches) == ["train", "dev", "test", "all"]
    for name, expected in rows.items():
        expected = _fact_frame(pd.DataFrame(expected, columns=list(FACT_COLUMNS)))
        pd.testing.assert_frame_equal(batches[name], expected, check_dtype=True, check_index_type=True)
        assert (pd.util.hash_pandas_object(batches[name]) == pd.util.hash_pandas_object(expected)).all()
    assert batches["test"]["width"].dtype == object and batches["all"]["width"].dtype == object


def test_batches_hold_columns_not_records(tmp_path):
    """Python heap peak of reading the batches (tracemalloc, not timing) per added fact: the frames' values
    (~450 bytes), not a dict per record on top (~1350 bytes before the gate read line by line)."""
    import tracemalloc

    peaks = []
    for n in (200, 1000, 4000):  # the first warms pandas up
        train = [record("train", i, "none" if i % 2 else "/per/per/partner") for i in range(1, n + 1)]
        root = write_ingested(tmp_path / f"ingested{n}", {"train": train, "dev": [record("dev", 1)],
                                                          "test": [record("test", 1)]})
        tracemalloc.start()
        try:
            fact_batches(root)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert (peaks[2] - peaks[1]) / 3000 < 900, peaks


def test_malformed_record_fails_with_file_and_line(tmp_path):
    splits = good_splits()
    splits["dev"][1]["text"] = None
    splits["test"].append("{not json")
    root = write_ingested(tmp_path / "ingested", splits)
    with pytest.raises(DataValidationError, match=r"dev.jsonl:2: not a fact record of docs/data.md "
                                                  r"\(TypeError: text is NoneType\)"):
        fact_batches(root)
    (root / "dev.jsonl").write_text(json.dumps(record("dev", 1)) + "\n")
    with pytest.raises(DataValidationError, match=r"test.jsonl:3: not a fact record"):
        fact_batches(root)


def test_missing_labels_is_bad_input(tmp_path):
    root = write_ingested(tmp_path / "ingested", good_splits())
    (root / "labels.json").unlink()
    with pytest.raises(BadInputError, match=r"labels.json: missing"):
        fact_batches(root)


@pytest.mark.parametrize("change, error", [
    (lambda e: e.update(type="expect_column_to_be_nice"), r"expectation 0 \(expect_column_to_be_nice\): .*not found"),
    (lambda e: e["kwargs"].update(min_value={"$PARAMETER": "min_facts"}),
     r"no value for parameter\(s\) \['min_facts'\]"),
    (lambda e: e["meta"].update(batches=["trian"]), r"unknown batch\(es\) \['trian'\]"),
])
def test_suite_errors_are_bad_input(tmp_path, change, error):
    suite = json.loads((SUITES / "facts.json").read_text())
    change(suite["expectations"][0])
    (tmp_path / "facts.json").write_text(json.dumps(suite))
    batches = {"train": None, "dev": None, "test": None, "all": None}
    run = SuiteRun("facts", batches, {**ValidateConfig().model_dump(), "labels": LABELS})
    with pytest.raises(BadInputError, match=error):
        load_suite(tmp_path / "facts.json", run)


def test_none_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="none_fraction_min must not exceed none_fraction_max"):
        ValidateConfig(none_fraction_min=0.8, none_fraction_max=0.5)


def test_cli_gate_exits_3_and_logs_report_and_docs_to_mlflow(tmp_path, monkeypatch, capsys):
    from morer1 import tracking
    from morer1.cli import main

    monkeypatch.chdir(SUITES.parent)  # as DVC runs it: params.yaml and expectations/ in the working directory
    splits = good_splits()
    splits["test"][0]["object"]["box"] = [10, 20, 110, 500]
    root = write_ingested(tmp_path / "ingested", splits)
    with pytest.raises(SystemExit) as info:
        main(["validate-facts", "--facts", str(root), "--out", str(tmp_path / "out")])
    assert info.value.code == 3
    assert "e.g. test-000001 (height=480, box_y1=500)" in capsys.readouterr().err
    mlflow = tracking.setup()
    run = mlflow.search_runs(output_format="list")[0]
    assert run.info.run_name == "validate_facts" and run.info.status == "FAILED"
    assert run.data.metrics["failed"] == 1 and run.data.metrics["expectations"] == 41
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert artifacts == {"report.json", "data_docs", "summary.json"}


def test_a_gate_refuses_to_replace_a_folder_that_is_not_its_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="is not a gate's output"):
        run_facts(ValidateConfig(), write_ingested(tmp_path / "ingested", good_splits()), out, suites_dir=SUITES)
    assert (out / "keep.txt").read_text() == "mine"


def _sft_row(fact_id: str, relation: str, rationale: str, n_images: int = 2) -> dict:
    return {"id": fact_id, "relation": relation, "images": ["a.jpg", "a.png"][:n_images],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": rationale}]}]}


def test_sft_gate_passes_good_rationales_and_names_each_bad_one(tmp_path):
    from morer1.teachers import template_rationale

    good = [_sft_row(r["id"], r["relation"], template_rationale(r, LABELS)) for r in good_splits()["train"]]
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "labels.json").write_text(json.dumps(LABELS))  # as synthesize writes it
    (sft / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    assert run_sft(ValidateConfig(), sft, tmp_path / "ok", suites_dir=SUITES) == {"expectations": 6, "failed": 0}
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert list(report["suites"]) == ["sft"] and report["suites"]["sft"]["batches"]["train"]["success"]

    wrong = template_rationale(record("train", 9), LABELS).replace("<answer>none", "<answer>/per/per/partner")
    bad = good + [
        _sft_row("train-000009", "none", wrong),                                            # answer is not the gold
        _sft_row("train-000010", "none", "<think>Step 1: a.</think><answer>none</answer>"),  # steps missing, too short
        _sft_row("train-000011", "none", template_rationale(record("train", 11), LABELS), n_images=1),
    ]
    (sft / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(DataValidationError) as info:
        run_sft(ValidateConfig(), sft, tmp_path / "bad", suites_dir=SUITES)
    lines = str(info.value).splitlines()
    assert lines[0] == "4 of 6 expectations failed:"
    assert any("sft/train" in line and "answer_is_gold" in line and "train-000009" in line for line in lines)
    assert any("six_steps_in_order" in line and "train-000010" in line for line in lines)
    assert any("rationale_chars" in line and "train-000010" in line for line in lines)
    assert any("n_images" in line and "train-000011" in line for line in lines)
