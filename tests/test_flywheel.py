"""The data flywheel: the policy's pass-rate-0 facts go to the teacher (template, or a local OpenAI-compatible
server), the usable rationales pass the SFT filter and gate, the cap holds, `sft` trains on the accepted
supplement, the next round measures the last round's facts again, and a disabled flywheel changes nothing."""

import json
import re
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer, gold_label, six_steps
from tiny_facts import write_facts

from configs import small_config
from morer1 import cli, generation
from morer1.files import folder_sha256, read_jsonl
from morer1.flywheel import FlywheelConfig, accept, run
from morer1.labels import DEFAULT_LABELS, NONE
from morer1.rollout import RolloutConfig
from morer1.sft import SFTConfig, supplement_rows
from morer1.sft import run as sft_run
from morer1.synthesize import SynthesizeConfig, rejection_reason, synthesize
from morer1.teacher_openai import OpenAITeacherConfig
from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus
from morer1.validate import ValidateConfig, run_sft

REPO = Path(__file__).resolve().parent.parent
SYNTH = small_config(SynthesizeConfig, splits=("train",), none_fraction=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Eight facts, their template SFT set, a tiny model built on it, and an empty supplement (as in the repo)."""
    root = tmp_path_factory.mktemp("flywheel")
    write_facts(root / "facts")
    synthesize(root / "facts", root / "sft", SYNTH)
    build_tiny_model(root / "tiny", sft_corpus(root / "sft"), small_config(TinyModelConfig, vocab_size=600))
    (root / "empty").mkdir()
    (root / "empty" / "rounds.json").write_text("[]\n")
    return root


def _cfg(tiny, **kw) -> FlywheelConfig:
    return FlywheelConfig(**{"enabled": True, "model": str(tiny / "tiny"), "max_facts": 64, "max_samples": None,
                             "batch_size": 4, **kw})


ROLLOUT = RolloutConfig(num_generations=2, max_completion_length=8)  # rollout.model is not read: flywheel.model is


def _scripted(passing: dict[str, int]):
    """Policy output for the selection only: fact id -> how many of its k rollouts answer the gold (default 0)."""

    def generate(model, processor, facts, facts_dir, labels, *, num_return_sequences, **decoding):
        say = lambda label: f"<think>Step 1: a</think><answer>{label}</answer>"  # noqa: E731
        wrong = lambda f: NONE if f["relation"] != NONE else "/per/per/partner"  # noqa: E731
        return [[say(f["relation"])] * passing.get(f["id"], 0)
                + [say(wrong(f))] * (num_return_sequences - passing.get(f["id"], 0)) for f in facts]

    return generate


def _mlflow_metrics() -> dict:
    import mlflow

    return mlflow.last_active_run().data.metrics


def test_blind_spots_are_exactly_the_pass_rate_0_facts_and_the_cap_holds(tiny, tmp_path, monkeypatch):
    """Even-numbered facts never pass (4 blind spots), the others pass 1 or 2 of 2; the cap sends 3 of the 4."""
    passing = {f"train-{i:06d}": 0 if i % 2 == 0 else 1 + i % 3 % 2 for i in range(1, 9)}
    monkeypatch.setattr(generation, "generate_completions", _scripted(passing))
    report = run(_cfg(tiny, max_facts=3), ROLLOUT, SYNTH, tiny / "facts", tiny / "empty", tmp_path / "round")
    rows = read_jsonl(tmp_path / "round" / "pass_rates.jsonl")
    assert {r["id"]: r["passes"] for r in rows} == passing
    blind = {r["id"] for r in rows if r["pass_rate"] == 0}
    assert blind == {i for i, n in passing.items() if n == 0} and len(blind) == 4
    sent = read_jsonl(tmp_path / "round" / "sent.jsonl")
    assert len(sent) == 3 and {s["id"] for s in sent} < blind and all(s["pass_rate"] == 0 for s in sent)
    assert (report["facts"], report["blind_spots"], report["sent"], report["usable"]) == (8, 4, 3, 3)
    metrics = _mlflow_metrics()
    assert (metrics["blind_spots"], metrics["sent"], metrics["usable"]) == (4, 3, 3)

    supplement = tmp_path / "round" / "supplement"
    kept = read_jsonl(supplement / "train.jsonl")
    assert [r["id"] for r in kept] == [s["id"] for s in sent]
    for row in kept:  # the SFT set's own filter and gate
        assert rejection_reason(row["messages"][-1]["content"][0]["text"], row["relation"], DEFAULT_LABELS,
                                SYNTH.leakage_phrases) is None
    assert run_sft(ValidateConfig(), supplement, tmp_path / "gate")["failed"] == 0
    sft_rows = {r["id"]: r for r in read_jsonl(tiny / "sft" / "train.jsonl")}
    assert all(row == sft_rows[row["id"]] for row in kept)  # the synthesize path's rows, same prompt and images


def imperfect_teacher(body: dict, key: str) -> str:
    """Six steps to the gold the instruction gives, except for the title of fact 4: a wrong label."""
    gold = gold_label(body)
    wrong = re.search(r"Lyon 4\b", json.dumps(body)) is not None
    return six_steps((NONE if gold != NONE else "/per/per/partner") if wrong else gold)


def test_blind_spots_of_the_real_policy_go_to_an_openai_compatible_teacher_and_the_filter_drops_a_wrong_one(
        tiny, tmp_path, monkeypatch):
    """The untrained tiny model never writes a valid answer in 8 tokens: every fact is a blind spot. Each is sent
    once to the server with its gold in the instruction; the one rationale ending in a wrong label is dropped."""
    monkeypatch.setenv("MORER1_TEACHER_API_KEY", "sk-test")
    with OpenAIServer(answer=imperfect_teacher) as server:
        openai = OpenAITeacherConfig(base_url=server.base_url, model="teacher-x", concurrency=2, timeout_s=5.0,
                                     connect_timeout_s=1.0, max_retries=1, cache_dir=str(tmp_path / "cache"))
        synth = SYNTH.model_copy(update={"teacher": "openai", "openai": openai})
        report = run(_cfg(tiny), ROLLOUT, synth, tiny / "facts", tiny / "empty", tmp_path / "round")
        assert sum(server.completions.values()) == 8 and len(server.calls) == 8
    rows = read_jsonl(tmp_path / "round" / "pass_rates.jsonl")
    assert len(rows) == 8 and all(r["rollouts"] == 2 and r["pass_rate"] == 0 for r in rows)
    assert (report["blind_spots"], report["sent"], report["usable"]) == (8, 8, 7)
    assert report["rejected"] == {"answer_not_gold": 1}
    sent = {s["id"]: s["usable"] for s in read_jsonl(tmp_path / "round" / "sent.jsonl")}
    assert [i for i, ok in sent.items() if not ok] == ["train-000004"]
    kept = read_jsonl(tmp_path / "round" / "supplement" / "train.jsonl")
    assert len(kept) == 7 and all(r["messages"][-1]["content"][0]["text"] == six_steps(r["relation"]) for r in kept)
    assert run_sft(ValidateConfig(), tmp_path / "round" / "supplement", tmp_path / "gate")["failed"] == 0


def test_sft_trains_on_the_accepted_supplement_and_the_next_round_measures_its_facts_again(
        tiny, tmp_path, monkeypatch):
    supplement = tmp_path / "supplement"
    supplement.mkdir()
    (supplement / "rounds.json").write_text("[]\n")
    run(_cfg(tiny, max_facts=3), ROLLOUT, SYNTH, tiny / "facts", supplement, tmp_path / "round1")
    accepted = accept(tmp_path / "round1", supplement)
    assert accepted == {"accepted": True, "rows_added": 3, "rounds": 1, "stale": False, "supplement_rows": 3}
    state = folder_sha256(supplement)
    assert accept(tmp_path / "round1", supplement)["stale"] and folder_sha256(supplement) == state  # taken once
    [round1] = json.loads((supplement / "rounds.json").read_text())
    ids = [f["id"] for f in round1["facts"]]
    assert len(ids) == 3 and all(f["pass_rate"] == 0 for f in round1["facts"])

    sft = dict(model=str(tiny / "tiny"), max_steps=1, per_device_train_batch_size=2, max_length=2048,
               checkpoint_dir=str(tmp_path / "ckpt"))
    base = sft_run(small_config(SFTConfig, **sft), tiny / "sft", tmp_path / "sft-base", None, tiny / "empty")
    grown = sft_run(small_config(SFTConfig, **sft), tiny / "sft", tmp_path / "sft-grown", None, supplement)
    assert (base["train_samples"], base["supplement_samples"]) == (8, 0)
    assert (grown["train_samples"], grown["supplement_samples"]) == (8 + 3, 3)
    assert _mlflow_metrics()["supplement_samples"] == 3

    # After the next training, the policy passes one of the round's facts twice and another once out of 2.
    monkeypatch.setattr(generation, "generate_completions", _scripted({ids[0]: 2, ids[1]: 1}))
    report = run(_cfg(tiny, max_samples=1, max_facts=1), ROLLOUT, SYNTH, tiny / "facts", supplement,
                 tmp_path / "round2")
    rolled = {r["id"] for r in read_jsonl(tmp_path / "round2" / "pass_rates.jsonl")}
    assert set(ids) <= rolled and len(rolled) <= 4  # a sample of 1, plus the last round's 3 facts
    assert report["previous"] == {"facts": 3, "missing": 0, "pass_rate_then": 0.0, "pass_rate_now": 0.5,
                                  "pass_rate_change": 0.5, "passing_now": 2}
    metrics = _mlflow_metrics()
    assert metrics["previous.pass_rate_change"] == 0.5 and metrics["previous.passing_now"] == 2

    again = accept(tmp_path / "round2", supplement)
    assert again["rounds"] == 2 and again["rows_added"] == 1
    new = {r["id"] for r in read_jsonl(tmp_path / "round2" / "supplement" / "train.jsonl")}
    rows = [r["id"] for r in read_jsonl(supplement / "train.jsonl")]  # a fact sent again keeps one row, its latest
    assert len(rows) == len(set(rows)) and set(rows) == set(ids) | new


def test_disabled_flywheel_loads_no_model_and_changes_nothing_sft_reads(tiny, tmp_path):
    """The repo's params.yaml keeps it off: the CLI round is only a report, and accepting it changes nothing."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["flywheel"]["enabled"] is False
    params["flywheel"]["model"] = str(tmp_path / "no-such-model")  # loading it would fail
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    supplement = tmp_path / "supplement"
    supplement.mkdir()
    (supplement / "rounds.json").write_text("[]\n")
    before = folder_sha256(supplement)
    cli.main(["--params", str(tmp_path / "params.yaml"), "flywheel", "--facts", str(tiny / "facts"),
              "--supplement", str(supplement), "--out", str(tmp_path / "round")])
    assert [p.name for p in (tmp_path / "round").iterdir()] == ["report.json"]
    report = json.loads((tmp_path / "round" / "report.json").read_text())
    assert report["enabled"] is False and report["sent"] == report["usable"] == 0
    import mlflow  # recorded like every stage, so a pipeline run has one nested run per stage

    run = mlflow.last_active_run()
    assert run.data.tags["morer1.stage"] == "flywheel" and run.data.params["flywheel.enabled"] == "False"
    assert run.data.metrics["sent"] == 0
    cli.main(["flywheel-accept", "--round", str(tmp_path / "round"), "--out", str(supplement)])
    assert folder_sha256(supplement) == before and supplement_rows(supplement, tiny / "sft") == []


def test_prefect_yaml_has_a_weekly_flywheel_deployment(tmp_path, monkeypatch):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    deployment = deployments["flywheel"]
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == "morer1-flywheel" and set(flow.parameters.properties) == {"project_dir", "accept"}
    [schedule] = deployment["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron.split()[2:] == ["*", "*", "0"]  # once a week
