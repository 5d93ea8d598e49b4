"""Validate stages: three Great Expectations gates, each before the stage that would pay for, train on or publish
what it checks.

`validate_facts` (`run_facts`) gates the ingested facts before the teacher is asked for rationales;
`validate_sft` (`run_sft`) gates the SFT set before a model is built or trained on it; `validate_predictions`
(`run_predictions`) gates the chosen model's dev answers and metrics before `register` makes it a challenger and
may promote it (a model that answers nothing valid, one label only, or no better than the baselines stops there,
in one line naming the failed check and its params key). Each gate runs one
suite, a JSON file in `expectations/` (a serialised GE ExpectationSuite), on named pandas batches built from
the data, with the values of the suite's `{"$PARAMETER": name}` placeholders taken from params `validate:`,
so the rules are data and the numbers are params. An expectation runs on the batches named in its
`meta.batches` (on every batch when absent). A gate writes `report.json` and GE Data Docs, the same bytes
for the same data wherever the project lives, then raises DataValidationError if an expectation failed.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import sys
import types
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
from pydantic import Field, model_validator

from morer1 import tracking
from morer1.errors import BadInputError, GateFailedError
from morer1.files import swap_in, write_text_atomic
from morer1.labels import NONE, read_labels
from morer1.params import StageConfig

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # read when great_expectations is imported

SPLITS = ("train", "dev", "test")
ALL = "all"  # the batch of all splits together
ID_COLUMN = "id"  # every batch has it; failing rows are reported by it
REPORT = "report.json"
DATA_DOCS = "data_docs"
SUITES_DIR = Path("expectations")  # relative to the project, where DVC runs the gates
RUN_TIME = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)  # shown in the Data Docs; see _gx_run_id
INVALID = "invalid"  # an invalid answer (`predicted` null) as a predicted label of its own (as metrics.INVALID)
BASELINES = ("majority", "random")  # the baselines of metrics.json whose F1 the model must beat
FACT_COLUMNS = {  # the columns the facts suite checks, and their type
    "id": str, "relation": str, "text": str, "n_tokens": int, "entity_start": int, "entity_end": int,
    "width": int, "height": int, "box_x0": int, "box_y0": int, "box_x1": int, "box_y1": int,
}


class ValidateConfig(StageConfig):
    """Parameters of the three gates (the numbers the suites in `expectations/` refer to)."""

    min_facts_per_split: int = Field(1, ge=0, description="Fewest facts each split must have.")
    none_fraction_min: float = Field(0.3, ge=0.0, le=1.0, description="Lowest share of `none` facts in each split.")
    none_fraction_max: float = Field(0.95, ge=0.0, le=1.0, description="Highest share of `none` facts in each split.")
    max_label_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="Highest share of one relation among the non-none facts of train."
    )
    max_examples: int = Field(5, ge=1, description="Failing ids listed per expectation in the report and the error.")
    min_sft_rows: int = Field(1, ge=0, description="Fewest rationales each SFT split must keep.")
    rationale_chars_min: int = Field(100, ge=0, description="Shortest acceptable rationale (characters of the assistant turn).")
    rationale_chars_max: int = Field(4000, ge=1, description="Longest acceptable rationale (characters of the assistant turn).")
    predictions_max_invalid_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Highest share of the chosen model's dev answers that may be invalid "
                                         "(no parsable label in the label set).")
    predictions_max_label_share: float = Field(
        0.95, gt=0.0, le=1.0, description="Highest share of the chosen model's dev answers that one predicted label "
                                          "may take (invalid answers counted as one label): above it the "
                                          "predictions collapsed.")
    predictions_min_f1_margin: float = Field(
        0.01, ge=-1.0, le=1.0, description="How far the lower bound of the chosen model's dev micro-F1 interval must "
                                           "be above the upper bound of each baseline's (majority, random) at "
                                           "least; -1: no check.")

    @model_validator(mode="after")
    def _none_bounds_ordered(self) -> ValidateConfig:
        if self.none_fraction_min > self.none_fraction_max:
            raise ValueError("none_fraction_min must not exceed none_fraction_max")
        return self


class DataValidationError(GateFailedError):
    """The data failed the gate: one line per failed expectation (or the malformed record), then the Data Docs."""


@dataclass(frozen=True)
class SuiteRun:
    """One suite to run: `expectations/<name>.json` on `batches`, with `parameters` for its placeholders."""

    name: str
    batches: dict[str, pd.DataFrame]
    parameters: dict[str, Any]


def run_facts(cfg: ValidateConfig, facts_dir: Path, out: Path, suites_dir: Path = SUITES_DIR) -> dict:
    """The `validate_facts` gate: the `facts` suite on the ingested facts in `facts_dir`; writes `out`, returns
    the report's summary. Raises BadInputError when a file or the suite cannot be read, DataValidationError
    when a record is malformed or (after writing and logging the report and Data Docs) an expectation fails."""
    with tracking.stage_run("validate_facts", cfg):
        _clear(Path(out))
        batches, labels = fact_batches(Path(facts_dir))
        return _gate(SuiteRun("facts", batches, {**cfg.model_dump(), "labels": labels}), Path(out), suites_dir, cfg)


def run_sft(cfg: ValidateConfig, sft_dir: Path, out: Path, suites_dir: Path = SUITES_DIR) -> dict:
    """The `validate_sft` gate: the `sft` suite on the SFT set in `sft_dir` (scored against its `labels.json`);
    otherwise as `run_facts`."""
    with tracking.stage_run("validate_sft", cfg):
        _clear(Path(out))
        sft_dir = Path(sft_dir)
        batches = sft_batches(sft_dir, list(read_labels(sft_dir / "labels.json")))
        return _gate(SuiteRun("sft", batches, cfg.model_dump()), Path(out), suites_dir, cfg)


def run_predictions(cfg: ValidateConfig, eval_dir: Path, out: Path, suites_dir: Path = SUITES_DIR) -> dict:
    """The `validate_predictions` gate: the `predictions` suite on the chosen model's dev answers
    (`predictions_dev.jsonl`), its dev metrics (`metrics.json`) and label set (`chosen.json`) in `eval_dir`, the
    evaluate stage's folder; otherwise as `run_facts`, but the DataValidationError is one line: each failed check
    in words with the `validate.` key that bounds it, then the report's path."""
    with tracking.stage_run("validate_predictions", cfg):
        _clear(Path(out))
        batches, parameters = prediction_batches(Path(eval_dir))
        run = SuiteRun("predictions", batches, {**cfg.model_dump(), **parameters})
        return _gate(run, Path(out), suites_dir, cfg,
                     message=lambda report, where: _predictions_message(report, where, run, suites_dir))


def prediction_batches(eval_dir: Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The predictions suite's batches and the parameters they bring (the label set, the dev metrics it checks,
    the most frequent predicted label): `dev`, one row per dev answer (`predicted`, invalid as INVALID,
    `is_invalid`, `label_share`: the share of the row's predicted label among all answers), and `metrics`, one row
    of the chosen model's dev F1 interval against each baseline's (`f1_margin_<baseline>`: the model's lower bound
    minus the baseline's upper bound). BadInputError when a file or a metric is missing, DataValidationError at the
    first line of the predictions not shaped as the evaluate stage writes it."""
    chosen, metrics = (_read_json(eval_dir / name) for name in ("chosen.json", "metrics.json"))
    try:
        labels = [str(label) for label in chosen["labels"]]
    except (KeyError, TypeError):
        raise BadInputError(f"{eval_dir / 'chosen.json'}: no `labels` (the evaluate stage writes them)") from None
    keys = ["n", "f1", "f1_lo", "f1_hi", *(f"baseline_{b}_f1{end}" for b in BASELINES for end in ("", "_hi"))]
    dev = metrics.get("dev") if isinstance(metrics, dict) else None
    missing = [k for k in keys if not isinstance((dev or {}).get(k), (int, float))]
    if missing:
        raise BadInputError(f"{eval_dir / 'metrics.json'}: no number dev.{', dev.'.join(missing)} (the evaluate stage "
                            f"writes them)")
    values = {k: float(dev[k]) for k in keys}
    row = {"id": "dev", **values,
           **{f"f1_margin_{b}": values["f1_lo"] - values[f"baseline_{b}_f1_hi"] for b in BASELINES}}
    predictions = _read_predictions(eval_dir / "predictions_dev.jsonl")
    shares = predictions["predicted"].value_counts(normalize=True)
    top = str(shares.index[0]) if len(shares) else INVALID  # value_counts: most frequent first
    predictions = predictions.assign(label_share=predictions["predicted"].map(shares).astype(float))
    parameters = {"labels": [*labels, INVALID], "top_label": top,
                  **{f"metrics_{k}": v for k, v in values.items()}, "metrics_n": int(values["n"])}
    return {"dev": predictions, "metrics": pd.DataFrame([row])}, parameters


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: missing (the evaluate stage writes it)") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def _read_predictions(path: Path) -> pd.DataFrame:
    """`id`, `predicted` (INVALID for null) and `is_invalid` of each line of a predictions file."""
    rows = [{"id": record_id, "predicted": INVALID if predicted is None else sys.intern(predicted),
             "is_invalid": predicted is None}
            for record_id, predicted in _parsed_lines(path, _prediction, "not a prediction line", "evaluate")]
    return pd.DataFrame(rows, columns=["id", "predicted", "is_invalid"])


def _prediction(record: dict) -> tuple[str, str | None]:
    """`(id, predicted)` of one predictions line; TypeError when they are not a string and a string or null."""
    predicted = record["predicted"]
    if not isinstance(record["id"], str) or not (predicted is None or isinstance(predicted, str)):
        raise TypeError("id must be a string, predicted a string or null")
    return record["id"], predicted


def _parsed_lines(path: Path, parse: Callable[[dict], Any], what: str, writer: str):
    """`parse` of each non-blank JSON line of `path`, one at a time; DataValidationError `path:line: what (why)` at
    the first that is not JSON or that `parse` refuses, BadInputError when the file (which stage `writer` writes)
    is missing."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    parsed = parse(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataValidationError(f"{path}:{lineno}: {what} ({type(exc).__name__}: {exc})") from None
                yield parsed
    except FileNotFoundError:
        raise BadInputError(f"{path}: missing (the {writer} stage writes it)") from None


def _predictions_message(report: dict, out: Path, run: SuiteRun, suites_dir: Path) -> str:
    """The predictions gate's failure in one line: each failed expectation in the words of its `meta.failure`
    (its values: the run's parameters and `observed`, the value GE saw), else as in the report, in suite order."""
    suite = [e.get("meta", {}).get("failure") for e in load_suite(suites_dir / f"{run.name}.json", run)["expectations"]]
    failed = [(batch, exp) for batch, result in report["suites"][run.name]["batches"].items()
              for exp in result["expectations"] if not exp["success"]]
    failed.sort(key=lambda f: suite.index(f[1].get("failure")) if f[1].get("failure") in suite else len(suite))
    parts = []
    for batch, exp in failed:
        try:
            parts.append(exp["failure"].format(**run.parameters, observed=exp["observed_value"]))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # no template, or nothing observed
            parts.append(f"{run.name}/{batch}: {_failure_line(exp)}")
    return f"{run.name} gate failed: {'; '.join(parts)} (report: {out / REPORT})"


def _clear(out: Path) -> None:
    """Remove an earlier gate's output, so a run that stops early leaves no stale verdict; refuse any other folder."""
    if out.exists():
        if {p.name for p in out.iterdir()} - {REPORT, DATA_DOCS}:
            raise BadInputError(f"{out}: exists and is not a gate's output; refusing to overwrite it")
        shutil.rmtree(out)


def _gate(run: SuiteRun, out: Path, suites_dir: Path, cfg: ValidateConfig,
          message: Callable[[dict, Path], str] | None = None) -> dict:
    """Check `run`, log its summary, report and Data Docs to the active MLflow run; raise if it failed, with
    `message(report, out)` when given, else one line per failed expectation and the Data Docs' path."""
    import mlflow

    report = _check(run, out, suites_dir, cfg.max_examples)
    tracking.log_summary(report["summary"])
    mlflow.log_artifact(str(out / REPORT))
    mlflow.log_artifacts(str(out / DATA_DOCS), artifact_path=DATA_DOCS)
    if not report["success"]:
        if message is not None:
            raise DataValidationError(message(report, out))
        summary = report["summary"]
        raise DataValidationError("\n".join([f"{summary['failed']} of {summary['expectations']} expectations failed:",
                                             *report["failures"], f"Data Docs: {out / report['data_docs']}"]))
    return report["summary"]


def sft_batches(sft_dir: Path, labels: list[str]) -> dict[str, pd.DataFrame]:
    """One batch per SFT split file: per row, whether the answer is the gold, the steps are six in order, sizes."""
    from morer1.parsing import parse_completion

    batches = {}
    for path in sorted(sft_dir.glob("*.jsonl")):
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rationale = record["messages"][-1]["content"][0]["text"]
                parsed = parse_completion(rationale, labels)
                rows.append({"id": record["id"], "answer_is_gold": parsed.label == record["relation"],
                             "six_steps_in_order": parsed.well_formed and parsed.steps_in_order,
                             "rationale_chars": len(rationale), "n_images": len(record["images"])})
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise DataValidationError(
                    f"{path}:{lineno}: not an SFT row ({type(exc).__name__}: {exc})") from None
        batches[path.stem] = pd.DataFrame(
            rows, columns=["id", "answer_is_gold", "six_steps_in_order", "rationale_chars", "n_images"])
    if not batches:
        raise BadInputError(f"{sft_dir}: no SFT split files (*.jsonl); the synthesize stage writes them")
    return batches


def fact_batches(ingested_dir: Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The facts suite's batches (each split, and `all`) and the label set of `labels.json`."""
    tables = {split: _read_facts(ingested_dir / f"{split}.jsonl") for split in SPLITS}
    filled = [t for t in tables.values() if len(t)]  # as a frame of all rows: an empty split adds no column type
    tables[ALL] = pd.concat(filled, ignore_index=True) if filled else _facts_table({})
    return {name: _fact_frame(t) for name, t in tables.items()}, list(read_labels(ingested_dir / "labels.json"))


def _fact_row(record: dict) -> dict:
    """The FACT_COLUMNS of one fact record; KeyError, TypeError or ValueError if it is not shaped as documented."""
    x0, y0, x1, y1 = record["object"]["box"]
    row = {
        "id": record["id"], "relation": record["relation"], "text": record["text"],
        "n_tokens": len(record["tokens"]), "entity_start": record["entity"]["start"],
        "entity_end": record["entity"]["end"], "width": record["width"], "height": record["height"],
        "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1,
    }
    wrong = [f"{k} is {type(row[k]).__name__}" for k, kind in FACT_COLUMNS.items() if type(row[k]) is not kind]
    if wrong:
        raise TypeError(", ".join(wrong))
    return row


def _read_facts(path: Path) -> pd.DataFrame:
    """The FACT_COLUMNS of one split file, read line by line (one value per column and row is held, not the
    records); DataValidationError at the first record not shaped as in docs/data.md."""
    columns = {name: [] for name in FACT_COLUMNS}
    for row in _parsed_lines(path, _fact_row, "not a fact record of docs/data.md", "ingest"):
        for name, values in columns.items():
            values.append(row[name])
    columns["relation"] = [sys.intern(r) for r in columns["relation"]]  # one string per label, not per fact
    return _facts_table(columns)


def _facts_table(columns: dict[str, list]) -> pd.DataFrame:
    """The frame of FACT_COLUMNS from their values (typed as a frame of the same rows would be; no rows: no type)."""
    if not columns or not columns["id"]:
        return pd.DataFrame([], columns=list(FACT_COLUMNS))
    return pd.DataFrame(columns, columns=list(FACT_COLUMNS))


def _fact_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Fact rows with `is_none` and `label_share`, the share of a fact's relation among the non-none rows."""
    is_none = df["relation"] == NONE
    shares = df.loc[~is_none, "relation"].value_counts(normalize=True)
    return df.assign(is_none=is_none, label_share=df["relation"].map(shares).astype(float))


def load_suite(path: Path, run: SuiteRun) -> dict:
    """The suite JSON at `path`; BadInputError if an expectation is unknown or malformed, or names a
    batch or a parameter that `run` does not have."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    try:
        suite = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: suite not found") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    for i, exp in enumerate(suite.get("expectations", [])):
        where = f"{path}: expectation {i} ({exp.get('type')})"
        try:
            ExpectationConfiguration(**exp).to_domain_obj()  # GE's suite drops invalid ones with only a log line
        except Exception as exc:  # noqa: BLE001 - GE raises pydantic, GE and type errors alike
            raise BadInputError(f"{where}: {exc}") from None
        unknown = set(exp.get("meta", {}).get("batches", [])) - set(run.batches)
        if unknown:
            raise BadInputError(f"{where}: unknown batch(es) {sorted(unknown)}; batches are {list(run.batches)}")
        missing = set(_parameter_names(exp["kwargs"])) - set(run.parameters)
        if missing:
            raise BadInputError(f"{where}: no value for parameter(s) {sorted(missing)}")
    return suite


def _parameter_names(value) -> list[str]:
    """Names of the `{"$PARAMETER": name}` placeholders inside `value`."""
    if isinstance(value, dict):
        if "$PARAMETER" in value:
            return [value["$PARAMETER"]]
        return [name for v in value.values() for name in _parameter_names(v)]
    if isinstance(value, list):
        return [name for v in value for name in _parameter_names(v)]
    return []


def _check(run: SuiteRun, out: Path, suites_dir: Path, max_examples: int) -> dict:
    """Validate `run`'s batches with its suite; write `report.json` and Data Docs into `out` (built beside it and
    swapped in, also when an expectation failed) and return the report. Paths in both are relative to `out`."""
    suite = load_suite(suites_dir / f"{run.name}.json", run)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _reproducible_docs():
            context = _context(staging / DATA_DOCS)
            source = context.data_sources.add_pandas(run.name)
            batches = {batch: _validate_batch(context, source, run, suite, batch, max_examples)
                       for batch in run.batches}
            context.build_data_docs()
        checks = [(f"{run.name}/{batch}", exp) for batch, result in batches.items() for exp in result["expectations"]]
        failures = [f"{where}: {_failure_line(exp)}" for where, exp in checks if not exp["success"]]
        report = {"success": not failures, "summary": {"expectations": len(checks), "failed": len(failures)},
                  "failures": failures, "data_docs": f"{DATA_DOCS}/index.html",
                  "suites": {run.name: {"success": not failures, "batches": batches}}}
        write_text_atomic(staging / REPORT, json.dumps(report, indent=1, default=str) + "\n")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _context(docs_dir: Path):
    """An in-memory GE context without progress bars whose Data Docs site is `docs_dir`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    site = context.list_data_docs_sites()["local_site"]  # by default a temporary folder
    context.update_data_docs_site("local_site", {**site, "store_backend": {
        "class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())}})
    return context


def _gx_run_id(suite_name: str):
    """The GE run id of a validation: the suite name and the fixed RUN_TIME, so the Data Docs' folder names and
    pages do not change from run to run (the time of a run is that of its MLflow run)."""
    from great_expectations.core.run_identifier import RunIdentifier

    return RunIdentifier(run_name=suite_name, run_time=RUN_TIME)


@contextmanager
def _reproducible_docs():
    """What GE writes into the Data Docs without what changes on every run: the clock (each batch's load time, a
    `?d=<now>` on each link to GE's logo) reads RUN_TIME, and random element ids are numbered in page order."""
    from great_expectations.execution_engine import pandas_execution_engine
    from great_expectations.render.view import view

    class FixedClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return RUN_TIME

    ids = itertools.count()
    clock = types.SimpleNamespace(datetime=FixedClock, timezone=datetime.timezone)
    with (mock.patch.object(view, "datetime", clock), mock.patch.object(pandas_execution_engine, "datetime", clock),
          mock.patch.object(view, "uuid4", lambda: uuid.UUID(int=next(ids)))):
        yield


def _validate_batch(context, source, run: SuiteRun, suite: dict, batch: str, max_examples: int) -> dict:
    """Run the expectations of `suite` that apply to `batch` as the GE suite `<run>.<batch>`; its report."""
    import great_expectations as gx

    expectations = [_with_params_keys(e) for e in suite["expectations"]
                    if batch in e.get("meta", {}).get("batches", [batch])]
    gx_suite = context.suites.add(gx.ExpectationSuite(
        name=f"{run.name}.{batch}", expectations=expectations, meta=dict(suite.get("meta", {})),
        notes=suite.get("notes")))
    data = source.add_dataframe_asset(batch).add_batch_definition_whole_dataframe(batch)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=gx_suite.name, data=data,
                                                                            suite=gx_suite))
    result_format = {"result_format": "SUMMARY", "unexpected_index_column_names": [ID_COLUMN],
                     "partial_unexpected_count": max_examples}
    df = run.batches[batch]
    result = definition.run(batch_parameters={"dataframe": df}, expectation_parameters=run.parameters,
                            result_format=result_format, run_id=_gx_run_id(gx_suite.name)).to_json_dict()
    return {"success": result["success"], "rows": len(df),
            "expectations": [_expectation_report(r, max_examples) for r in result["results"]]}


def _with_params_keys(expectation: dict) -> dict:
    """The expectation with `meta.params`: each kwarg set by a `{"$PARAMETER": name}` placeholder that is a key of
    ValidateConfig, as the params key to change (`min_value` -> `validate.none_fraction_min`), so that a failure
    line names it; values from the data (the label set, the metrics) are no params key."""
    keys = {kwarg: f"validate.{value['$PARAMETER']}" for kwarg, value in expectation.get("kwargs", {}).items()
            if isinstance(value, dict) and value.get("$PARAMETER") in ValidateConfig.model_fields}
    return {**expectation, "meta": {**expectation.get("meta", {}), "params": keys}} if keys else expectation


def _expectation_report(result: dict, max_examples: int) -> dict:
    """One expectation's outcome from GE's JSON result: what was checked, what was seen, which rows failed."""
    config, seen = result["expectation_config"], result["result"]
    exception = result["exception_info"]
    if exception and "raised_exception" not in exception:  # GE keys it by metric when metrics fail
        exception = next(iter(exception.values()))
    failure = (config.get("meta") or {}).get("failure")  # the expectation's failure in words (predictions suite)
    params = (config.get("meta") or {}).get("params")  # kwarg -> the params key that sets it (_with_params_keys)
    return {
        **({"failure": failure} if failure else {}),
        **({"params": params} if params else {}),
        "expectation": config["type"],
        "kwargs": {k: v for k, v in config["kwargs"].items() if k != "batch_id"},
        "success": result["success"],
        "observed_value": seen.get("observed_value"),
        "element_count": seen.get("element_count"),
        "unexpected_count": seen.get("unexpected_count"),
        "unexpected_examples": seen.get("partial_unexpected_index_list", [])[:max_examples],
        "exception": exception.get("exception_message") if exception and exception.get("raised_exception") else None,
    }


def _failure_line(check: dict) -> str:
    """`expectation(kwargs): what was seen`, e.g. the observed value or the first failing ids, then the params keys
    that set its bounds (`[params: min_value = validate.none_fraction_min, ...]`), the keys to change."""
    args = ", ".join(f"{k}={_short(v)}" for k, v in check["kwargs"].items())
    head = f"{check['expectation']}({args})"
    keys = check.get("params") or {}
    named = [f"{k} = {keys[k]}" for k in check["kwargs"] if k in keys] + [
        f"{k} = {key}" for k, key in keys.items() if k not in check["kwargs"]]  # in the kwargs' order
    tail = f" [params: {', '.join(named)}]" if named else ""
    if check["exception"]:
        return f"{head}: error: {check['exception']}{tail}"
    if check["unexpected_count"] is None:
        return f"{head}: observed {check['observed_value']}{tail}"
    examples = ", ".join(_example(e) for e in check["unexpected_examples"])
    return f"{head}: {check['unexpected_count']} of {check['element_count']} rows unexpected, e.g. {examples}{tail}"


def _short(value) -> str:
    """A kwarg for a failure line: a list of more than four values (a label set) as its length."""
    return f"[{len(value)} values]" if isinstance(value, list) and len(value) > 4 else repr(value)


def _example(row: dict) -> str:
    """`<id> (column=value, ...)` of one failing row."""
    values = ", ".join(f"{k}={v!r}" for k, v in row.items() if k != ID_COLUMN)
    return f"{row[ID_COLUMN]} ({values})" if values else str(row[ID_COLUMN])
