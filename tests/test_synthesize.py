"""Prompt building, the rationale filter (each reason), template rationales, and the synthesize stage."""

import contextlib
import json
import re
import time

import pytest
from openai_server import FAULTS, OpenAIServer, gold_label, six_steps
from PIL import Image
from servers import free_port

from configs import small_config
from morer1 import cli
from morer1.errors import EXIT_BAD_INPUT, BadInputError
from morer1.labels import DEFAULT_LABELS, NONE
from morer1.parsing import parse_completion
from morer1.prompt import prompt_messages, prompt_text, teacher_instruction
from morer1.synthesize import (
    SynthesisError,
    SynthesizeConfig,
    rejection_reason,
    select_facts,
    synthesize,
)
from morer1.teacher_openai import OpenAITeacherConfig
from morer1.teachers import template_rationale

LEAK = small_config(SynthesizeConfig).leakage_phrases


def make_fact(i=1, relation="/per/loc/place_of_birth", split="train"):
    types = relation.strip("/").split("/")[:2] if relation != NONE else [None, None]
    return {"id": f"{split}-{i:06d}", "split": split, "img_id": "a.jpg", "image": "images/train/a.jpg",
            "width": 120, "height": 90, "text": "red native Alice Moreau returns to Lyon",
            "tokens": "red native Alice Moreau returns to Lyon".split(),
            "entity": {"name": "Lyon", "start": 6, "end": 7},
            "object": {"name": "object 1", "box": [10, 20, 50, 70], "crop": f"crops/train/{split}-{i:06d}.png",
                       "caption": "a red circle"},
            "relation": relation, "object_type": types[0], "entity_type": types[1]}


def test_prompt_has_two_images_title_entity_labels_types_steps_and_format():
    messages = prompt_messages(make_fact(), DEFAULT_LABELS)
    user = messages[-1]["content"]
    assert [p["type"] for p in user] == ["image", "image", "text"]
    text = user[2]["text"]
    assert '"red native Alice Moreau returns to Lyon"' in text and 'Target entity: "Lyon"' in text
    assert all(label in text for label in DEFAULT_LABELS)
    assert all(f"Step {i}:" in text for i in range(1, 7)) and "<think></think>" in text and "<answer></answer>" in text
    assert "per (person)" in text and "misc (anything else)" in text
    assert prompt_text("t", "e", ["none"]).count("\n") > 6


def test_teacher_instruction_gives_gold_and_forbids_mentioning_it():
    text = teacher_instruction(make_fact())
    assert "/per/loc/place_of_birth" in text and "object type is per" in text and "Never mention" in text
    assert "not related" in teacher_instruction(make_fact(relation=NONE))


@pytest.mark.parametrize("relation", DEFAULT_LABELS)
def test_template_rationales_pass_the_filter_for_every_label(relation):
    rationale = template_rationale(make_fact(relation=relation), DEFAULT_LABELS)
    assert rejection_reason(rationale, relation, DEFAULT_LABELS, LEAK) is None
    assert parse_completion(rationale, DEFAULT_LABELS).steps_in_order


GOOD = "<think>" + " ".join(f"Step {i}: x." for i in range(1, 7)) + "</think><answer>none</answer>"


@pytest.mark.parametrize("completion,reason", [
    (None, "no_completion"),
    ("The relation is none.", "unparsable"),
    (GOOD + " trailing", "unparsable"),
    (GOOD.replace("Step 3", "Step 4"), "steps_not_six_in_order"),
    (GOOD.replace("Step 6: x.", ""), "steps_not_six_in_order"),
    (GOOD.replace("none</answer>", "/per/per/partner</answer>"), "answer_not_gold"),
    (GOOD.replace("none</answer>", "none, /per/per/partner</answer>"), "answer_not_gold"),
    (GOOD.replace("Step 6: x.", "Step 6: the gold label is none."), "leakage"),
    (GOOD.replace("Step 6: x.", "Step 6: As instructed, none."), "leakage"),
    (GOOD.replace("Step 1: x.", "Step 1: a Golden Lion trophy."), None),  # a word inside a name is no leak
    (GOOD, None),
])
def test_filter_reasons(completion, reason):
    assert rejection_reason(completion, NONE, DEFAULT_LABELS, LEAK) == reason


def test_select_facts_balances_none_and_caps_in_source_order():
    facts = [make_fact(i, NONE) for i in range(1, 31)] + [make_fact(i, "/per/per/partner") for i in range(31, 41)]
    chosen = select_facts(facts, small_config(SynthesizeConfig, none_fraction=0.5, max_facts=None))
    assert sum(f["relation"] == NONE for f in chosen) == 10 and len(chosen) == 20
    assert [f["id"] for f in chosen] == sorted(f["id"] for f in chosen)
    assert len(select_facts(facts, small_config(SynthesizeConfig, none_fraction=None, max_facts=7))) == 7


class _Scripted:
    def __init__(self, texts):
        self.texts, self.stats = texts, {"requests": len(texts)}

    def generate(self, requests):
        return self.texts[: len(requests)]


def _facts_dir(tmp_path, n=4):
    d = tmp_path / "facts"
    d.mkdir()
    (d / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    (d / "train.jsonl").write_text("".join(json.dumps(make_fact(i)) + "\n" for i in range(1, n + 1)))
    return d


KEY = "sk-test-synth-0a1b2c3d-SECRET"
OPENAI_RELATIONS = (NONE, "/per/per/partner", "/per/loc/place_of_birth", "/org/loc/locate_at")


def _openai_facts_dir(tmp_path, n=50, distinct=48):
    """`n` facts over one photo, each with its own crop; fact i > `distinct` repeats the content of fact
    i - `distinct` (same title, crop pixels and label: the same teacher request, to be paid once)."""
    d = tmp_path / "facts"
    (d / "images" / "train").mkdir(parents=True)
    (d / "crops" / "train").mkdir(parents=True)
    Image.new("RGB", (48, 32), (20, 120, 200)).save(d / "images/train/a.jpg")
    facts = []
    for i in range(1, n + 1):
        j = (i - 1) % distinct + 1
        fact = make_fact(i, OPENAI_RELATIONS[j % len(OPENAI_RELATIONS)])
        fact["text"] = f"story {j}: Alice Moreau returns to Lyon"
        Image.new("RGB", (8, 6), (j * 5 % 256, 40, 200)).save(d / fact["object"]["crop"])
        facts.append(fact)
    (d / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    (d / "train.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    return d


def _openai_config(tmp_path, base_url, **openai) -> SynthesizeConfig:
    """Short timeouts and backoff for tests; a stall of the test server (1.5 s) outlasts the 1 s timeout."""
    values = dict(base_url=base_url, model="teacher-x", concurrency=4, timeout_s=1.0, connect_timeout_s=1.0,
                  max_retries=3, backoff_base_s=0.01, backoff_max_s=0.02, cache_dir=str(tmp_path / "cache"))
    return small_config(SynthesizeConfig, teacher="openai", splits=("train",), none_fraction=None,
                            openai=OpenAITeacherConfig(**{**values, **openai}))


def imperfect_teacher(body: dict, key: str) -> str | tuple[int, str]:
    """A real teacher: stories 16 and 32 get a wrong label (paid for, rejected by the filter), story 7 is refused
    with a 400 every time (never paid), the others get six steps to the gold label."""
    gold, story = gold_label(body), int(re.search(r"story (\d+):", json.dumps(body)).group(1))
    if story == 7:
        return 400, "image too large"
    if story in (16, 32):
        return six_steps("/per/per/partner" if gold == NONE else NONE)
    return six_steps(gold)


def test_synthesis_against_a_flaky_paid_endpoint_loses_nothing_and_pays_once(tmp_path, monkeypatch):
    """A fifth of the calls fail (500, 429, 200 with a cut body, 200 without content, a stall past the timeout,
    a dropped connection), deterministically by request and attempt: every fact is kept or counted with its
    reason, each request is paid at most once, and a rerun is answered from the cache alone."""
    monkeypatch.setenv("MORER1_TEACHER_API_KEY", KEY)
    facts = _openai_facts_dir(tmp_path)
    with OpenAIServer(fault_rate=0.2, stall_s=1.5, answer=imperfect_teacher) as server:
        start = time.monotonic()
        report = synthesize(facts, tmp_path / "sft", _openai_config(tmp_path, server.base_url))
        seconds = time.monotonic() - start
        split, stats = report["splits"]["train"], report["teacher_stats"]
        assert set(server.fault_counts) == set(FAULTS)  # every kind of fault happened
        assert 0.1 < len(server.failed_calls) / server.total_calls < 0.3
        # Nothing lost to the faults: 47 of 50 kept, the 3 the teacher itself got wrong counted with their reason.
        assert split["requested"] == 50 and split["kept"] == 47
        assert split["rejected"] == {"answer_not_gold": 2, "no_completion": 1}
        assert stats["failures"] == {"http_400": 1}
        assert len((tmp_path / "sft" / "train.jsonl").read_text().splitlines()) == 47
        # Paid once: 48 distinct requests (facts 49 and 50 repeat 1 and 2: read from the cache), each answered
        # successfully at most once; only the refused one has no completion.
        assert len(server.calls) == 48 and set(server.completions.values()) == {1}
        paid = sum(server.completions.values())
        assert paid == 47 == stats["completions"] and stats["cache_hits"] == 2
        print(f"\nflaky endpoint: kept {split['kept']}/50, rejected {split['rejected']}, "
              f"{server.total_calls} calls, faults {dict(server.fault_counts)}, paid {paid}, {seconds:.1f} s")

        rerun = synthesize(facts, tmp_path / "sft-rerun", _openai_config(tmp_path, server.base_url))
        assert rerun["splits"]["train"] == split
        assert sum(server.completions.values()) == paid  # no new successful call: all from the cache
        assert rerun["teacher_stats"]["cache_hits"] == 49 and rerun["teacher_stats"]["completions"] == 0
    for path in [*(tmp_path / "sft").iterdir(), *(p for p in (tmp_path / "cache").rglob("*") if p.is_file())]:
        assert KEY.encode() not in path.read_bytes()


def _no_tracking(monkeypatch) -> None:
    """cli.main without MLflow: a fresh tracking store costs seconds, more than a fail-fast check allows."""
    from morer1 import tracking

    monkeypatch.setattr(tracking, "stage_run", lambda *a, **k: contextlib.nullcontext())


def _write_params(tmp_path, base_url, **openai) -> str:
    values = dict(base_url=base_url, model="teacher-x", concurrency=4, timeout_s=1.0, connect_timeout_s=1.0,
                  max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02, cache_dir=str(tmp_path / "cache"))
    params = {"synthesize": {"teacher": "openai", "prompt": "full", "splits": ["train"], "none_fraction": None,
                             "openai": {**values, **openai}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    return str(tmp_path / "params.yaml")


def _error_lines(capsys) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("morer1 synthesize:")], err


def test_cli_too_few_rationales_exits_bad_input_with_one_line(tmp_path, monkeypatch, capsys):
    """Kept share under min_kept_fraction: exit 2 and one line with the split, the kept share and the reasons."""
    monkeypatch.setenv("MORER1_TEACHER_API_KEY", KEY)

    def poor_teacher(body, key):  # by request: 1 in 4 good, 1 in 4 unparsable, half the wrong label
        gold, pick = gold_label(body), int(key[:8], 16) % 4
        return [six_steps(gold), "I think the relation is " + gold, six_steps("/org/org/subsidiary"),
                six_steps("/org/org/subsidiary")][pick]

    facts = _openai_facts_dir(tmp_path, n=12, distinct=12)
    with OpenAIServer(answer=poor_teacher) as server:
        params = _write_params(tmp_path, server.base_url)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--params", params, "synthesize", "--facts", str(facts), "--out", str(tmp_path / "sft")])
    assert exit_.value.code == EXIT_BAD_INPUT
    lines, err = _error_lines(capsys)
    assert "Traceback" not in err and len(lines) == 1, err
    assert not (tmp_path / "sft").exists()  # nothing half-good is swapped in
    report = json.loads((tmp_path / "sft.failed-report.json").read_text())["splits"]["train"]
    kept, rejected = report["kept"], report["rejected"]
    assert kept < 6 and set(rejected) == {"answer_not_gold", "unparsable"}
    top = ", ".join(f"{r} {n}" for r, n in sorted(rejected.items(), key=lambda item: -item[1]))
    assert lines[0] == (f"morer1 synthesize: error: train: kept {kept} of 12 rationales ({kept / 12:.1%}), below "
                        f"synthesize.min_kept_fraction=0.5; rejected: {top} (see {tmp_path / 'sft.failed-report.json'}; "
                        f"{tmp_path / 'sft'} is unchanged)")
    from morer1 import tracking

    mlflow = tracking.setup()  # the failed stage run still gets the report
    (run,) = mlflow.search_runs(output_format="list")
    assert run.info.run_name == "synthesize" and run.info.status == "FAILED"
    assert run.data.metrics["splits.train.kept"] == kept
    logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json")
    assert logged["splits"]["train"] == report


def test_cli_unreachable_endpoint_fails_fast_with_one_line_naming_the_url(tmp_path, monkeypatch, capsys):
    _no_tracking(monkeypatch)
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    params = _write_params(tmp_path, url)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--params", params, "synthesize", "--facts", str(_openai_facts_dir(tmp_path, n=20)),
                  "--out", str(tmp_path / "sft")])
    assert time.monotonic() - start < 10
    assert exit_.value.code == EXIT_BAD_INPUT
    lines, err = _error_lines(capsys)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"morer1 synthesize: error: teacher endpoint {url}/chat/completions is unreachable: "
                               f"ConnectError on 3 attempts")
    assert "check synthesize.openai.base_url" in lines[0]


def test_synthesis_error_is_a_bad_input_error():
    assert issubclass(SynthesisError, BadInputError)


def test_synthesize_writes_chat_rows_with_images_and_a_report(tmp_path):
    report = synthesize(_facts_dir(tmp_path), tmp_path / "sft", small_config(SynthesizeConfig, splits=("train",)))
    rows = [json.loads(line) for line in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()]
    assert report["splits"]["train"] == {"requested": 4, "kept": 4, "rejected": {},
                                         "labels": {"/per/loc/place_of_birth": 4}}
    row = rows[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["images"] == [str(tmp_path / "facts" / "images/train/a.jpg"),
                             str(tmp_path / "facts" / "crops/train/train-000001.png")]
    assert row["messages"][-1]["content"][0]["text"].endswith("<answer>/per/loc/place_of_birth</answer>")
    assert json.loads((tmp_path / "sft" / "report.json").read_text())["teacher"] == "template"
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == [
        "labels.json", "morer1_prompt.json", "report.json", "train.jsonl"]


def test_a_rerun_replaces_the_whole_set_and_a_foreign_folder_is_refused(tmp_path):
    facts = _facts_dir(tmp_path)
    synthesize(facts, tmp_path / "sft", small_config(SynthesizeConfig, splits=("train",)))
    (tmp_path / "sft" / "dev.jsonl").write_text("{}\n")  # a split of an earlier run with other splits
    synthesize(facts, tmp_path / "sft", small_config(SynthesizeConfig, splits=("train",)))
    assert not (tmp_path / "sft" / "dev.jsonl").exists() and not (tmp_path / "sft.partial").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(BadInputError, match="is not an SFT set"):
        synthesize(facts, tmp_path / "mine", small_config(SynthesizeConfig, splits=("train",)))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_stage_logs_counts_report_and_rationale_samples_to_its_mlflow_run(tmp_path):
    from morer1 import tracking
    from morer1.synthesize import run

    report = run(small_config(SynthesizeConfig, splits=("train",)), _facts_dir(tmp_path), tmp_path / "sft")
    mlflow = tracking.setup()
    (logged,) = mlflow.search_runs(output_format="list")
    assert logged.info.run_name == "synthesize" and logged.info.status == "FINISHED"
    assert logged.data.metrics["splits.train.kept"] == report["splits"]["train"]["kept"] == 4
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(logged.info.run_id)}
    assert {"summary.json", "rationale_samples.json"} <= artifacts


def test_synthesize_fails_when_the_teacher_gives_too_little_and_keeps_the_earlier_set(tmp_path):
    facts, cfg = _facts_dir(tmp_path), small_config(SynthesizeConfig, splits=("train",))
    synthesize(facts, tmp_path / "sft", cfg)  # an earlier good set
    before = {p.name: p.read_bytes() for p in (tmp_path / "sft").iterdir()}
    teacher = _Scripted([GOOD.replace("none", "/per/loc/place_of_birth"), None, None, "junk"])
    with pytest.raises(SynthesisError, match=r"^train: kept 1 of 4 rationales \(25.0%\), below synthesize."
                                             r"min_kept_fraction=0\.5; rejected: no_completion 2, unparsable 1 "
                                             r"\(see .*sft.failed-report.json; .*sft is unchanged\)$"):
        synthesize(facts, tmp_path / "sft", cfg, teacher=teacher)
    assert {p.name: p.read_bytes() for p in (tmp_path / "sft").iterdir()} == before
    report = json.loads((tmp_path / "sft.failed-report.json").read_text())
    assert report["splits"]["train"]["rejected"] == {"no_completion": 2, "unparsable": 1}
    synthesize(facts, tmp_path / "sft", cfg)  # a good run clears the failed report
    assert not (tmp_path / "sft.failed-report.json").exists()


def test_filter_keeps_a_rationale_whose_prose_cites_earlier_steps():
    completion = ("<think>Step 1: The crop shows a man at a lectern; the photo is a rally.\n"
                  "Step 2: The photo is relevant to the title, as shown in step 1.\n"
                  "Step 3: From step 2, the man is not linked to any entity of the title.\n"
                  "Step 4: **Step 3** found no grounding, so the types give no relation (see step 3.)\n"
                  "**Step 5:** Only none remains, per step 4.\n"
                  "Step 6: As step 5. left only none, the relation is none.</think>\n<answer>none</answer>")
    assert rejection_reason(completion, NONE, DEFAULT_LABELS, LEAK) is None


def test_the_demo_teacher_on_real_data_says_it_only_knows_the_demo(tmp_path):
    """Facts that are not from `morer1 demo-data` get no rationale from the demo teacher: the error says why and
    which teacher to use instead, not only "rejected: no_completion N"."""
    facts = tmp_path / "facts"
    facts.mkdir()
    (facts / "labels.json").write_text(json.dumps(list(DEFAULT_LABELS)))
    title = "Angela Merkel speaks in Berlin"
    real = [{**make_fact(i), "text": title, "tokens": title.split(),
             "entity": {"name": "Berlin", "start": 4, "end": 5},
             "object": {"name": "person", "box": [10, 20, 50, 70], "crop": f"crops/train/train-{i:06d}.png",
                        "caption": None}} for i in range(1, 5)]
    (facts / "train.jsonl").write_text("".join(json.dumps(f) + "\n" for f in real))
    cfg = small_config(SynthesizeConfig, teacher="demo", splits=("train",))
    with pytest.raises(SynthesisError) as refused:
        synthesize(facts, tmp_path / "sft", cfg)
    message = str(refused.value)
    assert "rejected: no_completion 4" in message
    assert "the demo teacher only explains the synthetic demo data" in message
    assert "synthesize.teacher: template" in message and "openai" in message
