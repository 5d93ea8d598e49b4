"""Progressive Sample-Mixing: pure and fast, no model; the stage's run() writes and logs the stream."""

import json
import math
from collections import Counter

import pytest

from morer1.curriculum import CurriculumConfig, build_stream, run
from morer1.difficulty import pool_of
from morer1.errors import BadInputError
from morer1.files import read_jsonl, write_jsonl


def rows(learnable=0, hard=0, solved=0, k=4):
    """Difficulty rows: learnable ones pass 1..k-1 of k, hard ones 0, solved ones k."""
    out = []
    for i in range(learnable):
        out.append({"id": f"l{i}", "relation": "none", "passes": 1 + i % (k - 1), "rollouts": k})
    out += [{"id": f"h{i}", "relation": "none", "passes": 0, "rollouts": k} for i in range(hard)]
    out += [{"id": f"s{i}", "relation": "none", "passes": k, "rollouts": k} for i in range(solved)]
    for r in out:
        r["pass_rate"] = r["passes"] / r["rollouts"]
    return out


def per_phase(stream, phases):
    """Counter of pools per phase, from the stream items themselves."""
    counts = [Counter() for _ in range(phases)]
    for item in stream:
        counts[item["phase"]][item["pool"]] += 1
    return counts


BIG = rows(learnable=400, hard=400, solved=400)
START, END = 0.1, 0.7
EXPECTED_SHARES = {  # phases = 5, t = 0, .25, .5, .75, 1
    "linear": [START + (END - START) * t for t in (0, 0.25, 0.5, 0.75, 1)],
    "cosine": [START + (END - START) * (1 - math.cos(math.pi * t)) / 2 for t in (0, 0.25, 0.5, 0.75, 1)],
    "step": [START, START, END, END, END],
}


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_hard_counts_per_phase_follow_the_schedule_exactly(shape):
    cfg = CurriculumConfig(phases=5, phase_size=100, hard_start=START, hard_end=END, shape=shape, solved_fraction=0.05)
    stream, plan = build_stream(BIG, cfg)
    assert len(stream) == plan["total"] == 500
    counts = per_phase(stream, 5)
    for i, share in enumerate(EXPECTED_SHARES[shape]):
        phase = plan["phases"][i]
        assert phase["hard_share"] == pytest.approx(share)
        hard = round(share * 100)
        assert phase["planned"] == {"hard": hard, "solved": 5, "learnable": 95 - hard}
        assert phase["actual"] == phase["planned"] and phase["shortfall"] == {} and phase["repeats"] == 0
        assert counts[i] == Counter({k: v for k, v in phase["planned"].items() if v})
        assert [item["phase"] for item in stream[phase["start"]:phase["end"]]] == [i] * 100
    assert plan["warnings"] == []


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_progressive_hard_share_grows(shape):
    cfg = CurriculumConfig(phases=6, phase_size=50, hard_start=0.0, hard_end=0.6, shape=shape)
    stream, plan = build_stream(BIG, cfg)
    shares = [p["hard_share"] for p in plan["phases"]]
    hard = [c["hard"] for c in per_phase(stream, 6)]
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == pytest.approx(0.6)
    assert hard == sorted(hard) and hard[0] == 0 and hard[-1] == 30


def test_first_phase_is_learnable_only_without_hard_start_and_solved():
    cfg = CurriculumConfig(phases=4, phase_size=40, hard_start=0.0, hard_end=0.5, solved_fraction=0.0)
    stream, plan = build_stream(BIG, cfg)
    assert {item["pool"] for item in stream if item["phase"] == 0} == {"learnable"}
    assert "solved" not in {item["pool"] for item in stream}
    assert plan["phases"][0]["actual"] == {"learnable": 40, "hard": 0, "solved": 0}


def test_always_solved_samples_are_down_sampled():
    data = rows(learnable=300, hard=100, solved=800)  # two thirds solved in the data
    stream, plan = build_stream(data, CurriculumConfig(phases=4, solved_fraction=0.05))
    assert plan["phase_size"] == 100 and len(stream) == 400  # phases sized on learnable + hard
    assert sum(item["pool"] == "solved" for item in stream) == 4 * round(0.05 * 100)  # 20 of 400
    assert all(p["actual"]["solved"] == 5 and p["shortfall"] == {} for p in plan["phases"])
    assert plan["warnings"] == []


def test_an_empty_hard_pool_is_filled_from_learnable_and_recorded():
    data = rows(learnable=300, solved=50)
    stream, plan = build_stream(data, CurriculumConfig(phases=3, phase_size=100, hard_end=0.5, solved_fraction=0.1))
    last = plan["phases"][-1]
    assert last["planned"] == {"learnable": 40, "hard": 50, "solved": 10}
    assert last["actual"] == {"learnable": 90, "hard": 0, "solved": 10}
    assert last["shortfall"] == {"hard": 50}
    assert any("phase 2" in w and "hard" in w for w in plan["warnings"])
    assert sum(item["pool"] == "hard" for item in stream) == 0


def test_a_small_pool_gives_what_it_has_without_repeats_and_the_rest_is_recorded():
    data = rows(learnable=200, hard=3, solved=0)
    stream, plan = build_stream(data, CurriculumConfig(phases=2, phase_size=40, hard_end=0.5, solved_fraction=0.05))
    last = plan["phases"][1]
    assert last["planned"] == {"learnable": 18, "hard": 20, "solved": 2}
    assert last["actual"] == {"learnable": 37, "hard": 3, "solved": 0}
    assert last["shortfall"] == {"hard": 17, "solved": 2}
    ids = [item["id"] for item in stream[last["start"]:last["end"]]]
    assert len(ids) == len(set(ids))


def test_pools_cycle_across_phases_but_never_repeat_within_a_phase():
    data = rows(learnable=10, hard=10, solved=0)
    stream, plan = build_stream(data, CurriculumConfig(phases=4, phase_size=8, hard_end=0.5, solved_fraction=0.0))
    for p in plan["phases"]:
        ids = [item["id"] for item in stream[p["start"]:p["end"]]]
        assert len(ids) == len(set(ids)) == 8
    first, second = ({item["id"] for item in stream if item["pool"] == "learnable" and item["phase"] == i} for i in (0, 1))
    assert len(first) == 8 and first | second == {f"l{i}" for i in range(10)}  # a whole cycle before any repeat
    assert plan["pool_cycles"]["learnable"] >= 2


def test_a_phase_larger_than_all_pools_repeats_and_says_so():
    data = rows(learnable=3, hard=2, solved=1)
    stream, plan = build_stream(data, CurriculumConfig(phases=2, phase_size=10, hard_end=0.5, solved_fraction=0.1))
    assert len(stream) == 20
    assert all(p["repeats"] == 4 for p in plan["phases"])
    assert any("repeat" in w for w in plan["warnings"])


def test_uniform_has_the_same_length_and_no_phase_ordering():
    data = rows(learnable=60, hard=60, solved=30)
    cfg = dict(phases=3, hard_end=0.6, seed=3)
    progressive, _ = build_stream(data, CurriculumConfig(mode="progressive", **cfg))
    uniform, plan = build_stream(data, CurriculumConfig(mode="uniform", **cfg))
    assert len(uniform) == len(progressive) == 120 and plan["mode"] == "uniform"  # 3 x ceil(120 / 3)
    assert len({item["id"] for item in uniform}) == 120  # within one cycle over all 150: no repeats
    assert [item["phase"] for item in uniform] == [i // 40 for i in range(120)]
    first = per_phase(uniform, 3)[0]
    assert first["hard"] > 0 and first["solved"] > 0  # hard and solved samples from the start
    pools = {r["id"]: pool_of(r["passes"], r["rollouts"]) for r in data}
    assert all(item["pool"] == pools[item["id"]] for item in uniform)
    assert sum(p["actual"]["hard"] for p in plan["phases"]) == sum(item["pool"] == "hard" for item in uniform)


def test_deterministic_for_a_seed():
    data = rows(learnable=50, hard=50, solved=20)
    for mode in ("progressive", "uniform"):
        a = build_stream(data, CurriculumConfig(mode=mode, seed=7))
        b = build_stream(data, CurriculumConfig(mode=mode, seed=7))
        c = build_stream(data, CurriculumConfig(mode=mode, seed=8))
        assert a == b
        assert [i["id"] for i in a[0]] != [i["id"] for i in c[0]]


def test_run_writes_the_stream_in_training_order_and_logs_the_plan(tmp_path):
    import mlflow

    data = rows(learnable=30, hard=20, solved=5)
    write_jsonl(tmp_path / "difficulty.jsonl", data)
    cfg = CurriculumConfig(phases=3, seed=1)
    summary = run(cfg, tmp_path, tmp_path / "out")
    stream, plan = build_stream(data, cfg)
    assert read_jsonl(tmp_path / "out" / "stream.jsonl") == stream
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == plan
    assert summary["prompts"] == len(stream) and summary["pool_sizes"] == {"learnable": 30, "hard": 20, "solved": 5}
    stage = mlflow.last_active_run()
    assert stage.data.tags["morer1.stage"] == "curriculum" and stage.data.metrics["prompts"] == len(stream)
    history = mlflow.MlflowClient().get_metric_history(stage.info.run_id, "actual_share_hard")
    assert [m.step for m in history] == [0, 1, 2]


def test_config_checks():
    with pytest.raises(ValueError):
        CurriculumConfig(hard_end=0.98, solved_fraction=0.05)
    with pytest.raises(ValueError):
        CurriculumConfig(shape="exp")
    with pytest.raises(ValueError):
        CurriculumConfig(typo=1)
    with pytest.raises(BadInputError):
        build_stream([], CurriculumConfig())
    with pytest.raises(BadInputError):
        build_stream(rows(learnable=2) + rows(learnable=1), CurriculumConfig())


def test_only_solved_samples_still_give_a_stream_and_say_why():
    stream, plan = build_stream(rows(solved=8), CurriculumConfig(phases=2, solved_fraction=0.25))
    assert plan["phase_size"] == 4 and [item["pool"] for item in stream] == ["solved"] * 8
    assert plan["phases"][0]["shortfall"] == {"learnable": 3} and plan["warnings"]
