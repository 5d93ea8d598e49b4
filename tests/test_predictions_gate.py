"""The predictions gate (issue 24 §1) on hand-made evaluate folders: the demo's good model passes; a model that answers
nothing valid, one collapsed onto one label, and one whose F1 interval reaches a baseline's are refused, each in one
line naming the failed check and the params key that bounds it."""

import json
from collections import Counter
from pathlib import Path

import pytest

from morer1.errors import BadInputError
from morer1.validate import DataValidationError, ValidateConfig, run_predictions

SUITES = Path(__file__).resolve().parents[1] / "expectations"
LABELS = ["none", "/per/per/opponent", "/per/per/partner", "/per/org/leader_of", "/per/loc/place_of_birth",
          "/org/loc/locate_at", "/loc/loc/contain"]
# The chosen model's dev metrics of a finished demo run (metrics.json `dev`, 1224 facts): F1 0.672 [0.634, 0.717]
# against the majority baseline's 0 [0, 0] and the random one's 0.010 [0, 0.024].
DEMO_DEV = {"n": 1224, "f1": 0.6724, "f1_lo": 0.6341, "f1_hi": 0.7172, "accuracy": 0.777, "invalid_rate": 0.0,
            "baseline_majority_f1": 0.0, "baseline_majority_f1_lo": 0.0, "baseline_majority_f1_hi": 0.0,
            "baseline_random_f1": 0.0104, "baseline_random_f1_lo": 0.0, "baseline_random_f1_hi": 0.0239,
            "baseline_majority_accuracy": 0.709}
USELESS_DEV = {**DEMO_DEV, "f1": 0.0, "f1_lo": 0.0, "f1_hi": 0.0, "accuracy": 0.0, "invalid_rate": 1.0}


def demo_answers(n: int = 1224, none_share: float = 0.53) -> list[str | None]:
    """Answers shaped as the demo model's: about half `none`, the rest spread over the relations."""
    n_none = round(n * none_share)
    return ["none"] * n_none + [LABELS[1 + i % (len(LABELS) - 1)] for i in range(n - n_none)]


def write_eval(root: Path, answers: list[str | None], dev: dict) -> Path:
    """An evaluate folder: predictions_dev.jsonl (one line per answer, as evaluate writes it), metrics.json with
    `dev`, chosen.json with the label set."""
    root.mkdir(parents=True)
    lines = [{"id": f"dev-{i:06d}", "image": f"images/dev/{i // 4}.jpg", "relation": "none", "predicted": answer,
              "completion": f"<answer>{answer}</answer>" if answer else "no answer"} for i, answer in enumerate(answers)]
    (root / "predictions_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    (root / "metrics.json").write_text(json.dumps({"dev": {**dev, "n": len(answers)}, "test": {}}))
    (root / "chosen.json").write_text(json.dumps({"model_dir": "models/sft", "labels": LABELS}))
    return root


def refused(tmp_path: Path, answers, dev: dict, cfg: ValidateConfig | None = None) -> str:
    """The one-line message with which the gate refuses these predictions (after writing its report)."""
    out = tmp_path / "validation"
    with pytest.raises(DataValidationError) as info:
        run_predictions(cfg or ValidateConfig(), write_eval(tmp_path / "eval", answers, dev), out, suites_dir=SUITES)
    message = str(info.value)
    assert "\n" not in message and message.endswith(f"(report: {out / 'report.json'})")
    report = json.loads((out / "report.json").read_text())
    assert report["success"] is False and (out / report["data_docs"]).is_file()
    return message


def test_the_demo_models_predictions_pass(tmp_path):
    answers = demo_answers()
    assert Counter(answers).most_common(1)[0] == ("none", 649)
    out = tmp_path / "validation"
    summary = run_predictions(ValidateConfig(), write_eval(tmp_path / "eval", answers, DEMO_DEV), out,
                              suites_dir=SUITES)
    assert summary == {"expectations": 7, "failed": 0}
    report = json.loads((out / "report.json").read_text())
    assert report["success"] is True and report["failures"] == [] and (out / "data_docs" / "index.html").is_file()
    checks = {e["expectation"] + "/" + e["kwargs"].get("column", ""): e for batch in
              report["suites"]["predictions"]["batches"].values() for e in batch["expectations"]}
    assert checks["expect_column_mean_to_be_between/is_invalid"]["observed_value"] == 0.0
    assert checks["expect_column_max_to_be_between/label_share"]["observed_value"] == pytest.approx(649 / 1224)
    assert checks["expect_column_min_to_be_between/f1_margin_random"]["observed_value"] == pytest.approx(0.6341 - 0.0239)


def test_a_model_with_no_valid_answer_is_refused_naming_each_key(tmp_path):
    message = refused(tmp_path, [None] * 40, USELESS_DEV)
    assert message == (
        "predictions gate failed: invalid answer rate 1.00 above validate.predictions_max_invalid_rate 0.2; "
        "predictions collapsed: invalid is 1.00 of the dev answers, above validate.predictions_max_label_share 0.95; "
        "dev F1 lower bound 0.000 not above the majority baseline's F1 upper bound 0.000 by "
        "validate.predictions_min_f1_margin 0.01; "
        "dev F1 lower bound 0.000 not above the random baseline's F1 upper bound 0.024 by "
        f"validate.predictions_min_f1_margin 0.01 (report: {tmp_path / 'validation' / 'report.json'})")


def test_predictions_collapsed_onto_one_label_are_refused(tmp_path):
    message = refused(tmp_path, demo_answers(200, none_share=0.97), DEMO_DEV)
    assert message == ("predictions gate failed: predictions collapsed: none is 0.97 of the dev answers, above "
                       "validate.predictions_max_label_share 0.95 (report: "
                       f"{tmp_path / 'validation' / 'report.json'})")


def test_an_f1_interval_that_reaches_a_baselines_is_refused(tmp_path):
    dev = {**DEMO_DEV, "f1": 0.05, "f1_lo": 0.02, "f1_hi": 0.09}  # above the random baseline's F1, not its interval
    message = refused(tmp_path, demo_answers(), dev)
    assert message.startswith("predictions gate failed: dev F1 lower bound 0.020 not above the random baseline's F1 "
                              "upper bound 0.024 by validate.predictions_min_f1_margin 0.01 (report: ")


def test_relaxed_bounds_let_the_plumbing_projects_useless_model_through(tmp_path):
    """What the tiny plumbing projects of the e2e tests set (tests/test_pipeline_e2e.py SMALL)."""
    cfg = ValidateConfig(predictions_max_invalid_rate=1.0, predictions_max_label_share=1.0,
                         predictions_min_f1_margin=-1.0)
    dev = {**USELESS_DEV, "baseline_random_f1_hi": 1.0}
    summary = run_predictions(cfg, write_eval(tmp_path / "eval", [None] * 6, dev), tmp_path / "out", suites_dir=SUITES)
    assert summary["failed"] == 0


def test_predictions_of_another_run_or_label_set_fail_in_words(tmp_path):
    root = write_eval(tmp_path / "eval", [*demo_answers(100), "/per/per/enemy"], DEMO_DEV)
    metrics = json.loads((root / "metrics.json").read_text())
    metrics["dev"]["n"] = 120
    (root / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(DataValidationError) as info:
        run_predictions(ValidateConfig(), root, tmp_path / "out", suites_dir=SUITES)
    message = str(info.value)
    assert ("101 dev answers in predictions_dev.jsonl but metrics.json dev.n is 120: the files are of different runs "
            "(rerun evaluate)") in message
    assert "predictions/dev: expect_column_values_to_be_in_set(column='predicted'" in message
    assert "dev-000100 (predicted='/per/per/enemy')" in message


def test_missing_metrics_and_malformed_lines_are_named(tmp_path):
    root = write_eval(tmp_path / "eval", demo_answers(20), DEMO_DEV)
    metrics = json.loads((root / "metrics.json").read_text())
    del metrics["dev"]["f1_lo"]
    (root / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(BadInputError, match=r"metrics.json: no number dev.f1_lo \(the evaluate stage writes them\)"):
        run_predictions(ValidateConfig(), root, tmp_path / "out", suites_dir=SUITES)
    (root / "metrics.json").write_text(json.dumps({"dev": DEMO_DEV}))
    with (root / "predictions_dev.jsonl").open("a") as f:
        f.write('{"id": "dev-x"}\n')
    with pytest.raises(DataValidationError, match=r"predictions_dev.jsonl:21: not a prediction line \(KeyError"):
        run_predictions(ValidateConfig(), root, tmp_path / "out", suites_dir=SUITES)
    (root / "chosen.json").unlink()
    with pytest.raises(BadInputError, match="chosen.json: missing"):
        run_predictions(ValidateConfig(), root, tmp_path / "out", suites_dir=SUITES)


def test_cli_gate_exits_3_with_the_line_and_logs_report_and_docs_to_mlflow(tmp_path, monkeypatch, capsys):
    from morer1 import tracking
    from morer1.cli import main

    monkeypatch.chdir(SUITES.parent)  # as DVC runs it: params.yaml and expectations/ in the working directory
    root = write_eval(tmp_path / "eval", [None] * 10, USELESS_DEV)
    with pytest.raises(SystemExit) as info:
        main(["validate-predictions", "--eval", str(root), "--out", str(tmp_path / "out")])
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "predictions gate failed: invalid answer rate 1.00 above validate.predictions_max_invalid_rate 0.2; " in err
    mlflow = tracking.setup()
    run = mlflow.search_runs(output_format="list")[0]
    assert run.info.run_name == "validate_predictions" and run.info.status == "FAILED"
    assert run.data.metrics["failed"] == 4 and run.data.metrics["expectations"] == 7
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} >= {"report.json", "data_docs"}
