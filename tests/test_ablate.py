"""The ablation grid: grid file checks, the table from cell results, real DVC experiments per cell (a toy pipeline,
fast; the real pipeline on a tiny demo, e2e), failed cells kept as table lines, the table rebuilt from MLflow."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from servers import hold_pipeline_lock
from test_orchestration import toy_project
from test_pipeline_e2e import REPO, SMALL, _project

from morer1.ablate import (
    SFT_ONLY,
    Cell,
    Grid,
    Row,
    build_table,
    load_grid,
    paired_results,
    rebuild_from_mlflow,
    run,
    table_markdown,
    write_table,
)
from morer1.errors import BadInputError
from morer1.orchestrate import PipelineLocked, StageFailed

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _cell(row, seed, sft_dev_f1, grpo_dev_f1, status="ran", reason=None, **more):
    cell = {"cell": f"g-{row}-s{seed}", "row": row, "seed": seed, "status": status, "reason": reason,
            "rev": "abcdef0123", "seconds": 100.0}
    for model, f1 in (("sft", sft_dev_f1), ("grpo", grpo_dev_f1)):
        cell.update({f"{model}_dev_f1": f1, f"{model}_test_f1": f1 and f1 - 0.1,
                     f"{model}_dev_accuracy": f1 and f1 + 0.1, f"{model}_test_accuracy": f1,
                     f"{model}_dev_invalid_rate": 0.0, f"{model}_test_invalid_rate": 0.02})
    cell.update({"grpo_reward_last": 1.5, "grpo_seconds": 60.0, **more})
    return cell


def test_table_rows_are_means_and_sample_spreads_over_seeds_with_differences_to_sft_only():
    cells = [_cell("uniform", 0, 0.5, 0.6), _cell("uniform", 1, 0.7, 0.7, grpo_seconds=80.0),
             _cell("psm", 0, 0.5, 0.9),
             _cell("psm", 1, None, None, status="failed", reason="stage 'x' failed (exit 1)")]
    rows = {r["row"]: r for r in build_table(cells)}
    assert list(rows) == [SFT_ONLY, "uniform", "psm"]
    sft = rows[SFT_ONLY]  # one SFT model per seed: the SFT candidate of that seed's cells
    assert (sft["cells"], sft["of"]) == (2, 2)
    assert sft["dev_f1_mean"] == pytest.approx(0.6) and sft["dev_f1_std"] == pytest.approx(0.1414213, abs=1e-6)
    uniform = rows["uniform"]
    assert uniform["dev_f1_mean"] == pytest.approx(0.65) and uniform["dev_f1_std"] == pytest.approx(0.0707106, abs=1e-6)
    assert uniform["delta_dev_f1_mean"] == pytest.approx(0.05)  # (0.1 + 0.0) / 2, per cell
    assert uniform["delta_test_f1_mean"] == pytest.approx(0.05) and uniform["seconds_mean"] == pytest.approx(70.0)
    psm = rows["psm"]  # the failed cell is counted and named, never averaged
    assert (psm["cells"], psm["of"]) == (1, 2) and psm["dev_f1_std"] is None
    assert psm["dev_f1_mean"] == pytest.approx(0.9)
    assert psm["delta_dev_f1_mean"] == pytest.approx(0.4)
    assert psm["failed"] == ["g-psm-s1: stage 'x' failed (exit 1)"]

    md = table_markdown("g", build_table(cells), cells)
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "0.6000 ± 0.1414" in lines[SFT_ONLY] and "+0.0500 ± 0.0707" in lines["uniform"]
    assert "1/2" in lines["psm"] and "g-psm-s1: stage 'x' failed (exit 1)" in lines["psm"]
    assert "| g-psm-s1 | failed |" in md and "stage 'x' failed (exit 1) |" in lines["g-psm-s1"]


def _paired(cell, dev_f1, test_f1=None, confidence=0.95, resamples=1000):
    """The cell with paired GRPO-minus-SFT intervals, as experiment_results reads them from metrics.json:
    `dev_f1` / `test_f1` are (lo, hi); Δ is the candidates' difference."""
    for key, interval in (("dev_f1", dev_f1), ("test_f1", test_f1 or dev_f1)):
        cell.update({f"delta_{key}": cell[f"grpo_{key}"] - cell[f"sft_{key}"], f"delta_{key}_lo": interval[0],
                     f"delta_{key}_hi": interval[1], f"p_{key}": 0.04})
    cell.update(wins_dev=7, losses_dev=2, n_dev=186, paired_confidence=confidence, paired_resamples=resamples)
    return cell


def _md_lines(md: str) -> dict:
    return {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}


def test_a_row_is_better_only_when_the_paired_interval_of_every_seed_lies_above_zero():
    cells = [_paired(_cell("up", 0, 0.5, 0.56), (0.01, 0.11)), _paired(_cell("up", 1, 0.7, 0.74), (0.004, 0.08)),
             # one seed's interval includes 0: not marked, though its mean Δ is the largest
             _paired(_cell("one-in", 0, 0.5, 0.6), (0.05, 0.15)), _paired(_cell("one-in", 1, 0.7, 0.75), (-0.01, 0.11)),
             _paired(_cell("touch", 0, 0.5, 0.52), (0.0, 0.05)), _paired(_cell("touch", 1, 0.7, 0.72), (0.0, 0.04)),
             _paired(_cell("down", 0, 0.5, 0.4), (-0.2, -0.01), test_f1=(-0.2, 0.01)),
             _paired(_cell("down", 1, 0.7, 0.6), (-0.2, -0.02)),
             _paired(_cell("split", 0, 0.5, 0.6), (0.01, 0.2)), _paired(_cell("split", 1, 0.7, 0.6), (-0.2, -0.01)),
             _paired(_cell("lost", 0, 0.5, 0.6), (0.01, 0.2)),
             _cell("lost", 1, None, None, status="failed", reason="killed")]
    rows = {r["row"]: r for r in build_table(cells)}
    assert {name: r["verdict_dev_f1"] for name, r in rows.items()} == {
        SFT_ONLY: None, "up": "better", "one-in": "inconclusive", "touch": "inconclusive", "down": "worse",
        "split": "inconclusive", "lost": "better"}  # `lost`: its one ok cell (the table says 1/2)
    assert rows["down"]["verdict_test_f1"] == "inconclusive" and rows["up"]["verdict_test_f1"] == "better"
    assert (rows["one-in"]["paired_dev_f1_above"], rows["one-in"]["paired_dev_f1_below"],
            rows["one-in"]["paired_dev_f1_cells"]) == (1, 0, 2)
    assert rows["up"]["delta_dev_f1_mean"] == pytest.approx(0.05)  # the paired Δ, the same number as before

    md = table_markdown("g", build_table(cells), cells)
    lines = _md_lines(md)
    assert lines["up"].endswith("| better | better | – |") and "| inconclusive | inconclusive |" in lines["one-in"]
    assert "| worse | inconclusive |" in lines["down"] and lines[SFT_ONLY].endswith("| – | – | – |")
    assert "| +0.060 [+0.010, +0.110] | 0.040 | 7/2 |" in lines["g-up-s0"]
    assert "| +0.050 [-0.010, +0.110] |" in lines["g-one-in-s1"]
    # the text under the table reads these numbers
    assert "95 % pair-bootstrap interval (1000 resamples)" in md
    assert ("- dev F1: 3 of 6 rows differ from SFT in every seed: up better (2 seeds, mean Δ +0.0500); down worse "
            "(2 seeds, mean Δ -0.1000); lost better (1 seed, mean Δ +0.1000); the others' paired intervals include 0 "
            "in at least one seed (one-in: above 0 in 1 of 2; split: above 0 in 1 and below 0 in 1 of 2).") in md
    assert "- test F1: 2 of 6 rows differ from SFT in every seed: up better" in md
    assert "- 1 of 12 cells failed" in md
    assert "- Seed spread: SFT dev F1 0.6000 ± 0.1414 over 2 seeds (sample std); the largest row mean Δ dev F1 " \
           "is -0.1000 (down)." in md

    # the text follows the numbers: with no row marked it says so
    quiet = [_paired(_cell("a", 0, 0.5, 0.51), (-0.01, 0.03)), _paired(_cell("a", 1, 0.7, 0.7), (-0.02, 0.02))]
    assert ("- dev F1: no row differs from SFT in every seed; a's paired interval includes 0 in at least one "
            "seed.") in table_markdown("g", build_table(quiet), quiet)
    quiet += [_paired(_cell("b", 0, 0.5, 0.6), (0.01, 0.2)), _paired(_cell("b", 1, 0.7, 0.7), (-0.02, 0.02))]
    assert ("- dev F1: no row differs from SFT in every seed; the paired intervals of all 2 include 0 in at least "
            "one seed (b: above 0 in 1 of 2).") in table_markdown("g", build_table(quiet), quiet)


def test_cells_from_a_metrics_json_without_paired_comparisons_read_and_render_as_dashes():
    old = {"candidates": {m: {f"{split}_{k}": 0.5 for split in ("dev", "test")
                              for k in ("f1", "accuracy", "invalid_rate")} for m in ("sft", "grpo")}}
    assert set(paired_results(old).values()) == {None}
    new = {"comparisons": {"grpo_vs_sft": {split: {
        "delta_f1": 0.01, "delta_f1_lo": -0.02, "delta_f1_hi": 0.04, "p_value_f1": 0.5, "delta_accuracy": 0.02,
        "delta_accuracy_lo": 0.01, "delta_accuracy_hi": 0.03, "p_value_accuracy": 0.01, "delta_precision": 0.3,
        "wins": 12 if split == "dev" else 4, "losses": 9, "n": 1040, "n_pairs": 175, "confidence": 0.9,
        "resamples": 500} for split in ("dev", "test")}}}
    read = paired_results(new)
    assert (read["delta_dev_f1"], read["delta_dev_f1_lo"], read["delta_dev_f1_hi"], read["p_dev_f1"]) == (
        0.01, -0.02, 0.04, 0.5)
    assert (read["delta_test_accuracy_lo"], read["p_test_accuracy"]) == (0.01, 0.01)
    assert (read["wins_dev"], read["wins_test"], read["losses_dev"], read["n_test"]) == (12, 4, 9, 1040)
    assert (read["paired_confidence"], read["paired_resamples"]) == (0.9, 500)
    assert "delta_dev_precision" not in read

    cells = [_cell("u", 0, 0.5, 0.6), _paired(_cell("u", 1, 0.7, 0.74), (0.01, 0.07)), _cell("v", 0, 0.5, 0.55)]
    rows = {r["row"]: r for r in build_table(cells)}
    assert rows["u"]["delta_dev_f1_mean"] == pytest.approx(0.07)  # the old cell's Δ: its candidates' difference
    assert rows["u"]["verdict_dev_f1"] is None and rows["v"]["verdict_dev_f1"] is None  # not every cell is paired
    md = table_markdown("g", build_table(cells), cells)
    lines = _md_lines(md)
    assert "| 0.5000 | 0.6000 | – | – | – | 0.4000 | 0.5000 | – | – |" in lines["g-u-s0"]
    assert "| +0.0700 ± 0.0424 |" in lines["u"] and lines["u"].endswith("| – | – | – |")
    assert ("- dev F1: 0 of the 1 row with a paired interval in every cell differ from SFT" not in md
            and "- dev F1: no row has a paired interval in every cell, so none is marked." in md)
    mixed = cells + [_paired(_cell("w", 0, 0.5, 0.6), (0.01, 0.2))]
    md = table_markdown("g", build_table(mixed), mixed)
    assert ("- dev F1: 1 of the 1 row with a paired interval in every cell differs from SFT in every seed: w better "
            "(1 seed, mean Δ +0.1000); not marked: u (1 of its 2 ok cells without a paired interval); v (1 of its "
            "1 ok cell without a paired interval).") in md


def test_the_cell_reads_the_keys_that_the_paired_bootstrap_of_evaluate_writes():
    from morer1.metrics import paired_bootstrap

    golds = ["a", "none", "a", "b", "none", "b"] * 5
    sft, grpo = ["a", "a", "b", "b", "none", "none"] * 5, ["a", "none", "a", "b", "none", "none"] * 5
    block = paired_bootstrap(golds, grpo, sft, [i // 2 for i in range(len(golds))], ["a", "b", "none"],
                             resamples=200, seed=0)
    read = paired_results({"comparisons": {"grpo_vs_sft": {"dev": block, "test": block}}})
    assert None not in read.values()
    assert read["delta_dev_f1"] == block["delta_f1"] > 0
    assert read["delta_test_accuracy_hi"] == block["delta_accuracy_hi"] and read["p_dev_f1"] == block["p_value_f1"]
    assert (read["wins_dev"], read["losses_dev"], read["n_dev"], read["paired_resamples"]) == (10, 0, 30, 200)


def test_a_row_whose_every_cell_failed_is_still_in_the_table(tmp_path):
    cells = [_cell("a", 0, 0.4, 0.5), _cell("b", 0, None, None, status="failed", reason="out of | memory\nkilled")]
    written = write_table(tmp_path, "g", cells)
    rows = {r["row"]: r for r in written["rows"]}
    assert rows["b"]["cells"] == 0 and rows["b"]["dev_f1_mean"] is None and rows["b"]["failed"]
    assert "out of \\| memory killed" in written["markdown"]  # a reason cannot break the markdown table
    import csv

    table = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["row"] for r in table] == [SFT_ONLY, "a", "b"]
    assert table[2]["failed"] == "g-b-s0: out of | memory\nkilled"
    per_cell = list(csv.DictReader((tmp_path / "cells.csv").open()))
    assert [(c["cell"], c["status"]) for c in per_cell] == [("g-a-s0", "ran"), ("g-b-s0", "failed")]
    assert float(per_cell[0]["grpo_dev_f1"]) == 0.5


# --- the grid file -------------------------------------------------------------------------------------------

def test_the_demo_grid_file_gives_every_row_on_two_seeds_as_valid_set_param_overrides(tmp_path):
    from dvc.utils.hydra import apply_overrides

    from morer1.params import load_section, read_params, section_config

    grid, cells = load_grid(REPO / "ablation.yaml", REPO)
    assert grid.name == "demo" and set(grid.rows) == {"uniform", "psm-linear", "psm-cosine", "psm-step", "reward-fa"}
    assert [c.name for c in cells[:2]] == ["demo-uniform-s0", "demo-uniform-s1"] and len(cells) == 10
    for cell in cells:  # DVC's own override code writes each cell's params.yaml; every stage config reads it
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        apply_overrides(tmp_path / "params.yaml", list(cell.overrides))
        params = read_params(tmp_path / "params.yaml")
        cfg = {s: load_section(s, section_config(s), tmp_path / "params.yaml") for s in params}
        assert all(getattr(cfg[s], "seed") == cell.seed for s in ("sft", "difficulty", "curriculum", "grpo"))
        row = cell.row
        assert cfg["curriculum"].mode == ("uniform" if row == "uniform" else "progressive")
        if row.startswith("psm-"):
            assert cfg["curriculum"].shape == row.removeprefix("psm-")
        assert cfg["rollout"].rewards.weights == (
            {"format": 1.0, "accuracy": 1.0, "type": 0.0 if row == "reward-fa" else 0.5})


def _project_with(tmp_path, grid: str, profile: str | None = None):
    project = tmp_path / "p"
    (project / "profiles").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    if profile:
        (project / "profiles" / "big.yaml").write_text(profile)
    (project / "grid.yaml").write_text(grid)
    return project


GRID = "name: g\nseeds: [0, 1]\nseed_keys: [grpo.seed]\nrows:\n"


@pytest.mark.parametrize("grid, message", [
    (GRID + "  r1:\n    params: {grpo: {learning_rate: 0.1, lr: 1}}\n",
     r"grid.yaml: row r1: keys not in params.yaml: grpo.lr"),
    (GRID + "  r1:\n    params: {curriculum: {shape: cubic}}\n",
     r"grid.yaml: row r1, seed 0: curriculum.shape: Input should be 'linear', 'cosine' or 'step'"),
    ("name: g\nseeds: [0]\nseed_keys: [grpo.seeds]\nrows: {r: {params: {}}}\n",
     r"grid.yaml: seed_keys not in params.yaml: grpo.seeds"),
    (GRID + "  sft-only:\n    params: {}\n", r"grid.yaml: row sft-only: a row name is"),
    (GRID + "  Bad Row:\n    params: {}\n", r"grid.yaml: row Bad Row: a row name is"),
    (GRID + "  r1:\n    param: {}\n", r"grid.yaml: rows.r1.params: Field required; rows.r1.param: Extra inputs"),
    ("name: g\nseeds: []\nseed_keys: [grpo.seed]\nrows: {r: {params: {}}}\n",
     r"grid.yaml: seeds: List should have at least 1"),
    ("- a\n", r"grid.yaml: a grid file is a mapping"),
])
def test_a_bad_grid_file_is_rejected_naming_the_file_row_and_reason(tmp_path, grid, message):
    project = _project_with(tmp_path, grid)
    with pytest.raises(BadInputError, match=message):
        load_grid(project / "grid.yaml", project)


def test_a_profile_lies_under_the_grid_s_overrides_and_a_stale_profile_key_is_rejected(tmp_path):
    project = _project_with(tmp_path, GRID + "  r1:\n    params: {grpo: {learning_rate: 0.1}}\n",
                            profile="grpo: {learning_rate: 0.5, beta: 0.1}\nevaluate: {max_facts: 7}\n")
    grid, cells = load_grid(project / "grid.yaml", project, profile="big")
    assert grid.profile == "big" and [c.name for c in cells] == ["g-r1-s0", "g-r1-s1"]
    assert cells[1].overrides == ("grpo.learning_rate=0.1", "grpo.beta=0.1", "grpo.seed=1", "evaluate.max_facts=7")
    assert load_grid(project / "grid.yaml", project)[1][0].overrides == ("grpo.learning_rate=0.1", "grpo.seed=0")
    (project / "profiles" / "big.yaml").write_text("grpo: {lr: 1}\n")
    with pytest.raises(BadInputError, match="profile big: keys not in params.yaml: grpo.lr"):
        load_grid(project / "grid.yaml", project, profile="big")
    with pytest.raises(BadInputError, match="no such params profile"):
        load_grid(project / "grid.yaml", project, profile="small")


# --- cells as real DVC experiments of a toy pipeline ---------------------------------------------------------

TOY_STAGE = """\
import json, sys, yaml
from pathlib import Path

p = yaml.safe_load(open("params.yaml"))["a"]
if sys.argv[1] == "grpo":
    if p["fail"]:
        sys.exit(3)
    import mlflow
    from morer1 import tracking
    with tracking.stage_run("grpo"):
        mlflow.log_metric("train_runtime", 10.0 + p["x"])
    Path("models/grpo").mkdir(parents=True, exist_ok=True)
    Path("models/grpo/grpo_summary.json").write_text(json.dumps({"reward_last": p["x"] / 10}))
else:
    sft = 0.3 + p["seed"] / 10
    scores = lambda f1: {"dev_f1": f1, "dev_accuracy": f1 + 0.01, "dev_invalid_rate": 0.1, "test_f1": f1 + 0.02,
                         "test_accuracy": f1 + 0.03, "test_invalid_rate": 0.2, "dev_precision": 0.0}
    metrics = {"dev": {"f1": 0.0}, "candidates": {"sft": scores(sft), "grpo": scores(sft + p["x"] / 100)}}
    if p["seed"] == 0:  # evaluate's paired comparison and the candidates' intervals; seed 1: a metrics.json of before
        for model in metrics["candidates"].values():
            model.update({f"{k}_{end}": model[k] + (0.05 if end == "hi" else -0.05) for k in list(model)
                          if k.endswith(("_f1", "_accuracy")) for end in ("lo", "hi")})
        d = p["x"] / 100
        metrics["comparisons"] = {"grpo_vs_sft": {split: {
            **{f"{k}{end}": d + off for k in ("delta_f1", "delta_accuracy")
               for end, off in (("", 0), ("_lo", -0.015), ("_hi", 0.015))},
            "p_value_f1": 0.01, "p_value_accuracy": 0.02, "delta_precision": 0.5, "wins": 3, "losses": 1, "n": 100,
            "n_pairs": 40, "confidence": 0.95, "resamples": 200} for split in ("dev", "test")}}
    Path("reports/eval").mkdir(parents=True, exist_ok=True)
    Path("reports/eval/metrics.json").write_text(json.dumps(metrics))
"""
TOY_DVC = """\
stages:
  grpo:
    cmd: python stage.py grpo
    deps: [stage.py]
    params: [a]
    outs: [models/grpo]
  evaluate:
    cmd: python stage.py evaluate
    deps: [stage.py, models/grpo]
    params: [a]
    metrics: [reports/eval/metrics.json]
  register:
    cmd: python -c "open('registered', 'w').write('never in an ablation')"
    deps: [reports/eval/metrics.json]
    outs: [registered]
"""


def _git_status(project) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True,
                          check=True).stdout


def test_each_cell_is_a_dvc_experiment_and_an_mlflow_run_and_a_failed_cell_is_a_table_line(tmp_path):
    import dvc.api
    import mlflow

    project = tmp_path / "toy"
    project.mkdir()
    (project / "stage.py").write_text(TOY_STAGE)
    toy_project(project, TOY_DVC, "a:\n  x: 1\n  fail: false\n  seed: 0\n")
    grid = Grid(name="toy", seeds=[0, 1], seed_keys=["a.seed"],
                rows={"two": Row(params={"a": {"x": 2}}), "bad": Row(params={"a": {"fail": True}}, seeds=[0])})
    cells = [Cell("toy-two-s0", "two", 0, ("a.x=2", "a.seed=0")), Cell("toy-two-s1", "two", 1, ("a.x=2", "a.seed=1")),
             Cell("toy-bad-s0", "bad", 0, ("a.fail=true", "a.seed=0"))]
    before = (project / "params.yaml").read_bytes()

    result = run(grid, cells, project, project / "reports" / "ablation")
    by_cell = {c["cell"]: c for c in result["cells"]}
    assert [by_cell[c.name]["status"] for c in cells] == ["ran", "ran", "failed"]
    assert "stage 'experiment toy-bad-s0' failed (data validation failed)" in by_cell["toy-bad-s0"]["reason"]
    for name in ("toy-two-s0", "toy-two-s1"):  # the table holds each experiment's own numbers
        metrics = json.loads(dvc.api.read("reports/eval/metrics.json", repo=str(project), rev=by_cell[name]["rev"]))
        for model in ("sft", "grpo"):
            for key, value in metrics["candidates"][model].items():
                if key != "dev_precision":
                    assert by_cell[name][f"{model}_{key}"] == value
        assert by_cell[name]["grpo_reward_last"] == 0.2 and by_cell[name]["grpo_seconds"] == 12.0
        paired = metrics.get("comparisons", {}).get("grpo_vs_sft", {})
        for split in ("dev", "test"):
            for metric in ("f1", "accuracy"):
                key, block = f"{split}_{metric}", paired.get(split, {})
                assert [by_cell[name][k] for k in (f"delta_{key}", f"delta_{key}_lo", f"delta_{key}_hi", f"p_{key}")] \
                    == [block.get(k) for k in (f"delta_{metric}", f"delta_{metric}_lo", f"delta_{metric}_hi",
                                               f"p_value_{metric}")], (name, key)
            assert (by_cell[name][f"wins_{split}"], by_cell[name][f"losses_{split}"]) == (
                block.get("wins"), block.get("losses"))
    assert by_cell["toy-two-s0"]["delta_dev_f1_lo"] == pytest.approx(0.005)  # seed 0 has the paired comparison
    assert by_cell["toy-two-s1"]["delta_dev_f1"] is None and by_cell["toy-two-s1"]["sft_dev_f1_lo"] is None
    rows = {r["row"]: r for r in result["rows"]}
    assert rows[SFT_ONLY]["dev_f1_mean"] == pytest.approx(0.35)  # seeds 0 and 1: 0.3 and 0.4
    assert rows["two"]["delta_dev_f1_mean"] == pytest.approx(0.02) and rows["two"]["cells"] == 2
    assert rows["bad"]["cells"] == 0 and rows["bad"]["failed"][0].startswith("toy-bad-s0: stage")
    assert rows["two"]["verdict_dev_f1"] is None and rows["two"]["paired_dev_f1_above"] == 1  # seed 1 has none
    lines = _md_lines(result["markdown"])
    assert "| +0.020 [+0.005, +0.035] | 0.010 | 3/1 |" in lines["toy-two-s0"]
    assert "| 0.4000 | 0.4200 | – | – | – |" in lines["toy-two-s1"]
    assert (project / "reports" / "ablation" / "toy" / "table.md").read_text() == result["markdown"]
    assert (project / "params.yaml").read_bytes() == before and _git_status(project) == "?? reports/\n"
    assert not (project / "registered").exists()
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=project,
                            capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == ["toy-two-s0", "toy-two-s1"]

    mlflow.set_tracking_uri(f"sqlite:///{os.environ['MORER1_STATE_DIR']}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["morer1"], output_format="list")
    grid_run = next(r for r in runs if r.info.run_name == "ablation-toy")
    cell_runs = {r.info.run_name: r for r in runs if r.data.tags.get("morer1.kind") == "cell"}
    assert set(cell_runs) == {c.name for c in cells}
    assert all(r.data.tags["mlflow.parentRunId"] == grid_run.info.run_id for r in cell_runs.values())
    assert cell_runs["toy-bad-s0"].info.status == "FAILED"
    assert cell_runs["toy-two-s1"].data.metrics["grpo_dev_f1"] == pytest.approx(0.42)
    assert cell_runs["toy-two-s0"].data.metrics["delta_test_f1_hi"] == pytest.approx(0.035)
    assert "delta_dev_f1" not in cell_runs["toy-two-s1"].data.metrics
    stage_runs = [r for r in runs if r.data.tags.get("morer1.stage") == "grpo"]  # the stage's own, nested and tagged
    assert sorted(r.data.tags["morer1.cell"] for r in stage_runs) == ["toy-two-s0", "toy-two-s1"]
    assert all(r.data.tags["mlflow.parentRunId"] == cell_runs[r.data.tags["morer1.cell"]].info.run_id
               and r.data.tags["morer1.grid"] == "toy" for r in stage_runs)

    rebuilt = rebuild_from_mlflow("toy", tmp_path / "rebuilt")  # the same table from MLflow alone
    assert rebuilt["rows"] == result["rows"]
    assert [(c["cell"], c["status"]) for c in rebuilt["cells"]] == [(c["cell"], c["status"]) for c in result["cells"]]
    assert rebuilt["cells"] == result["cells"]  # every number, the paired ones too (counts come back as floats)
    assert rebuilt["markdown"].split("| row |", 1)[1] == result["markdown"].split("| row |", 1)[1]

    # a second run reads the cells that exist and runs only the failed one (which fails again)
    again = run(grid, cells, project, project / "reports" / "ablation")
    assert [c["status"] for c in again["cells"]] == ["reused", "reused", "failed"] and again["rows"] == result["rows"]
    read = run(grid, cells, project, tmp_path / "read", read_only=True)
    assert read["cells"][2]["reason"] == "no DVC experiment toy-bad-s0 on this commit"
    forced = run(grid, cells[:1], project, tmp_path / "forced", force=True)
    assert forced["cells"][0]["status"] == "ran"
    assert forced["cells"][0]["grpo_dev_f1"] == by_cell["toy-two-s0"]["grpo_dev_f1"]


def _try_lock(project) -> str:
    """What another process hears when it asks for the project's pipeline lock."""
    code = ("from morer1.orchestrate import PipelineLocked, pipeline_lock\n"
            f"try:\n    with pipeline_lock({str(project)!r}):\n        print('free')\n"
            "except PipelineLocked as exc:\n    print(exc)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_a_grid_holds_the_pipeline_lock_and_stops_at_once_while_another_run_holds_it(tmp_path, monkeypatch):
    """Fault: a pipeline run (or another grid) in the same checkout. Promise: the grid stops before any cell, in one
    line naming the holder; while a grid runs, a pipeline run is refused, told that an ablation holds the lock."""
    import mlflow

    from morer1 import ablate, cli

    project = toy_project(tmp_path / "toy", TOY_DVC, "a:\n  x: 1\n  fail: false\n  seed: 0\n")
    grid = Grid(name="toy", seeds=[0], seed_keys=["a.seed"], rows={"two": Row(params={"a": {"x": 2}})})
    cells = [Cell("toy-two-s0", "two", 0, ("a.x=2", "a.seed=0"))]
    heard = []

    def cell_runner(project_dir, name, overrides, env):
        heard.append(_try_lock(project_dir))
        raise StageFailed(name, 1, "stopped by the test")

    result = run(grid, cells, project, tmp_path / "out", cell_runner=cell_runner)
    assert result["cells"][0]["status"] == "failed"
    assert len(heard) == 1 and heard[0].startswith("another ablation run of grid 'toy' (pid ")
    assert _try_lock(project) == "free"  # released when the grid is done

    holder = hold_pipeline_lock(project)
    try:
        mlflow.set_tracking_uri(f"sqlite:///{os.environ['MORER1_STATE_DIR']}/mlflow.db")
        grids_before = len(mlflow.search_runs(experiment_names=["morer1"], output_format="list"))
        with pytest.raises(PipelineLocked, match=rf"^another pipeline run \(pid {holder.pid}\) holds the lock "):
            run(grid, cells, project, tmp_path / "out2", cell_runner=cell_runner)
        assert len(heard) == 1 and not (tmp_path / "out2").exists()
        assert len(mlflow.search_runs(experiment_names=["morer1"], output_format="list")) == grids_before
        monkeypatch.chdir(project)  # `morer1 ablate` in the checkout: one line, exit status 1
        monkeypatch.setattr(ablate, "load_grid", lambda *args: (grid, cells))
        with pytest.raises(SystemExit) as stopped:
            cli.main(["ablate"])
        assert str(stopped.value.code).startswith(f"morer1 ablate: another pipeline run (pid {holder.pid}) holds ")
        assert len(heard) == 1
        # reading the cells' experiments runs nothing and needs no lock
        assert run(grid, cells, project, tmp_path / "read", read_only=True)["cells"][0]["status"] == "failed"
    finally:
        holder.kill()
        holder.wait()


# --- the real pipeline: a 2-cell grid on a tiny demo -----------------------------------------------------------

@pytest.mark.e2e
def test_make_ablate_runs_real_cells_to_the_end_and_the_table_holds_their_metrics(tmp_path, monkeypatch):
    """`python flows/ablate.py` on a tiny project: two cells (uniform vs progressive) share one SFT (DVC's run cache),
    each is a DVC experiment whose metrics.json the table holds, and an MLflow run; git stays clean."""
    project = _project(tmp_path, SMALL)
    (project / ".gitignore").write_text("/reports/ablation/\n")
    (project / "ablation.yaml").write_text(
        "name: tiny\nseeds: [3]\nseed_keys: [grpo.seed, curriculum.seed]\nrows:\n"
        "  uniform: {params: {curriculum: {mode: uniform}}}\n  psm: {params: {curriculum: {mode: progressive}}}\n")
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "tiny"], cwd=project, check=True)
    before = (project / "params.yaml").read_bytes()
    env = dict(os.environ, MORER1_STATE_DIR=str(tmp_path / "state"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(REPO / "flows" / "ablate.py"), "--project-dir", str(project)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tiny-uniform-s3 | ran |" in proc.stdout and "| tiny-psm-s3 | ran |" in proc.stdout

    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project,
                                      capture_output=True, text=True, check=True).stdout)
    exps = {r["name"]: r for b in shown for e in b.get("experiments") or [] for r in e["revs"]}
    assert set(exps) == {"tiny-uniform-s3", "tiny-psm-s3"}
    import csv

    cells = {c["cell"]: c for c in csv.DictReader((project / "reports" / "ablation" / "tiny" / "cells.csv").open())}
    for name, exp in exps.items():
        metrics = exp["data"]["metrics"]["reports/eval/metrics.json"]["data"]
        assert metrics["dev"]["n"] > 0 and cells[name]["rev"] == exp["rev"]
        for model in ("sft", "grpo"):
            for key in ("dev_f1", "dev_accuracy", "test_f1", "test_accuracy", "dev_invalid_rate", "test_invalid_rate"):
                assert float(cells[name][f"{model}_{key}"]) == metrics["candidates"][model][key], (name, model, key)
        # the paired comparison the real evaluate stage wrote is the cell's Δ and interval
        for split in ("dev", "test"):
            paired = metrics["comparisons"]["grpo_vs_sft"][split]
            for end in ("", "_lo", "_hi"):
                assert float(cells[name][f"delta_{split}_f1{end}"]) == paired[f"delta_f1{end}"], (name, split, end)
            assert float(cells[name][f"wins_{split}"]) == paired["wins"]
        assert cells[name]["sft_dev_f1_lo"] not in ("", None)
        params = exp["data"]["params"]["params.yaml"]["data"]
        assert params["curriculum"]["mode"] == ("uniform" if "uniform" in name else "progressive")
        assert params["grpo"]["seed"] == 3 and float(cells[name]["grpo_seconds"]) > 0
    assert cells["tiny-uniform-s3"]["sft_dev_f1"] == cells["tiny-psm-s3"]["sft_dev_f1"]  # one SFT model
    assert (project / "params.yaml").read_bytes() == before and _git_status(project) == ""

    import mlflow

    monkeypatch.setenv("MORER1_STATE_DIR", str(tmp_path / "state"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["morer1"], output_format="list")
    stages = [(r.data.tags.get("morer1.stage"), r.data.tags.get("morer1.cell")) for r in runs
              if r.data.tags.get("morer1.grid") == "tiny" and r.data.tags.get("morer1.stage")]
    assert sorted(c for s, c in stages if s == "evaluate") == ["tiny-psm-s3", "tiny-uniform-s3"]
    assert [s for s, _ in stages].count("sft") == 1  # the second cell restored SFT from DVC's run cache
    assert "register" not in {s for s, _ in stages}
    rebuilt = rebuild_from_mlflow("tiny", tmp_path / "rebuilt")
    assert {c["cell"]: c["grpo_dev_f1"] for c in rebuilt["cells"]} == {
        n: float(c["grpo_dev_f1"]) for n, c in cells.items()}
