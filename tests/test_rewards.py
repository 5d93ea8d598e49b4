"""Rewards of the GRPO stage: format, accuracy, type, the factory and TRL's call convention."""

import pickle

import pytest
from pydantic import ValidationError

from morer1.labels import DEFAULT_LABELS, NONE
from morer1.rewards import REGISTRY, RewardsConfig, build_reward_funcs, score_completion

SIX = "\n".join(f"Step {i}: thought {i}." for i in range(1, 7))
BIRTH = "/per/loc/place_of_birth"


def good(answer: str, think: str = SIX) -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def funcs(**cfg):
    """name -> reward function, every reward enabled, the rest of the config from `cfg`."""
    cfg.setdefault("weights", {"format": 1.0, "accuracy": 1.0, "type": 1.0})
    rewards, _ = build_reward_funcs(RewardsConfig(**cfg), DEFAULT_LABELS)
    return {f.__name__: f for f in rewards}


def one(name: str, text: str, gold: str, **cfg) -> float:
    [value] = funcs(**cfg)[name]([text], [gold])
    return value


FORMAT_CASES = [  # (completion, partial-credit score)
    (good(BIRTH), 1.0),
    (good(""), 1.0),                                                      # empty answer: format only judges the shape
    (f"  \n{good(BIRTH)}\n  ", 1.0),                                      # whitespace outside is allowed
    (f"<answer>{BIRTH}</answer>", 0.0),                                   # missing think
    (f"{SIX}\n{BIRTH}", 0.0),                                             # no tags at all
    (f"<think>{SIX}</think>", 0.5),                                       # no answer: steps only
    (f"<think>{SIX}</think><think>again</think><answer>none</answer>", 0.5),  # repeated think
    (f"{good(BIRTH)}<answer>{BIRTH}</answer>", 0.5),                       # repeated answer
    (f"{good(BIRTH)} because I am sure", 0.5),                            # text after the answer
    (f"Sure! {good(BIRTH)}", 0.5),                                        # text before the think
    (f"<answer>{BIRTH}</answer><think>{SIX}</think>", 0.5),               # answer before think
    (good(BIRTH, "Step 2: b. Step 1: a. Step 3: c. Step 4: d. Step 5: e. Step 6: f."), 0.5),  # out of order
    (good(BIRTH, "Step 1: a. Step 2: b. Step 3: c. Step 4: d. Step 5: e."), 0.5),  # Step 6 missing
    (good(BIRTH, SIX + "\nStep 6: again."), 0.5),                         # a step repeated
    (good(BIRTH, "no steps at all"), 0.5),
    (f"<think>short</think><answer>{SIX}\n{BIRTH}</answer>", 0.5),        # steps in the answer, not the think
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_format_partial_credit(text, expected):
    assert one("format", text, BIRTH) == pytest.approx(expected)


@pytest.mark.parametrize("text,partial", FORMAT_CASES)
def test_format_strict_is_zero_or_one(text, partial):
    assert one("format", text, BIRTH, format_partial=False) == (1.0 if partial == 1.0 else 0.0)


def test_format_split_is_configurable():
    text = good(BIRTH, "no steps")
    assert one("format", text, BIRTH, format_tags_credit=0.2, format_steps_credit=0.8) == pytest.approx(0.2)
    with pytest.raises(ValidationError, match="must be 1"):
        RewardsConfig(format_tags_credit=0.5, format_steps_credit=0.6)


@pytest.mark.parametrize("answer,gold,expected", [
    (BIRTH, BIRTH, 1.0),
    ("  /PER/Loc/Place_Of_Birth  ", BIRTH, 1.0),                    # case and spaces
    ("per/loc/place_of_birth/", BIRTH, 1.0),                          # missing leading, extra trailing slash
    ("per / loc / place_of_birth", BIRTH, 1.0),
    (BIRTH, "per/loc/place_of_birth", 1.0),                           # the gold is normalised too
    ("None", NONE, 1.0),
    ("", BIRTH, 0.0),                                                 # empty answer
    ("   ", NONE, 0.0),
    (f"{BIRTH}, /per/loc/place_of_residence", BIRTH, 0.0),            # several labels: no hedging
    (f"{BIRTH} {BIRTH}", BIRTH, 0.0),                                 # the same label twice is several labels
    (f"none or {BIRTH}", BIRTH, 0.0),
    ("/per/loc/birthplace", BIRTH, 0.0),                              # out of the label set
    (f"The relation is {BIRTH}", BIRTH, 0.0),                         # the answer is the label alone
    ("/per/misc/present_in", "/org/misc/present_in", 0.0),           # same relation name, other object type
    ("/org/misc/present_in", "/per/misc/present_in", 0.0),
    ("misc/present_in", "/per/misc/present_in", 0.0),                 # a suffix of a label is not the label
    ("/org/org/alternate_names", "/per/per/alternate_names", 0.0),
    ("/per/per/alternate_names", "/org/org/alternate_names", 0.0),
    (NONE, BIRTH, 0.0),
    (BIRTH, NONE, 0.0),
])
def test_accuracy_exact_label(answer, gold, expected):
    assert one("accuracy", good(answer), gold) == expected


@pytest.mark.parametrize("text,with_format,without_format", [
    (good(BIRTH), 1.0, 1.0),
    (f"<answer>{BIRTH}</answer>", 0.0, 1.0),                            # missing think
    (f"{good(BIRTH)} trailing", 0.0, 1.0),                              # text after the answer
    (f"<answer>{BIRTH}</answer><think>{SIX}</think>", 0.0, 1.0),        # answer before think
    (f"<think>{SIX}</think><think>x</think><answer>{BIRTH}</answer>", 0.0, 1.0),  # repeated think
    (f"{good(BIRTH)}<answer>{BIRTH}</answer>", 0.0, 0.0),               # two answer blocks never count
    (f"{good('none')}<answer>{BIRTH}</answer>", 0.0, 0.0),
    (good(BIRTH, "Step 3: c. Step 1: a."), 1.0, 1.0),                   # steps are the format reward's job
    (BIRTH, 0.0, 0.0),                                                  # no answer block at all
])
def test_accuracy_requires_format(text, with_format, without_format):
    assert one("accuracy", text, BIRTH) == with_format
    assert one("accuracy", text, BIRTH, accuracy_requires_format=False) == without_format


@pytest.mark.parametrize("answer,gold,expected", [
    ("/per/loc/place_of_residence", BIRTH, 1.0),                      # same type pair, other relation
    (BIRTH, BIRTH, 1.0),                                              # the exact label has the pair too
    ("/per/misc/present_in", BIRTH, 0.0),                             # other entity type
    ("/org/loc/locate_at", BIRTH, 0.0),                               # other object type
    (NONE, BIRTH, 0.0),                                               # `none` has no type pair
    ("/per/per/opponent", NONE, 0.0),
    ("", BIRTH, 0.0),                                                 # empty answer
    (f"{BIRTH}, /per/loc/place_of_residence", BIRTH, 0.0),            # listing the pair's labels is no answer
    ("/per/loc/birthplace", BIRTH, 0.0),                              # out of set, even with a valid-looking pair
    ("/org/org/alternate_names", "/per/per/alternate_names", 0.0),
])
def test_type_credit_for_same_type_pair(answer, gold, expected):
    assert one("type", good(answer), gold) == expected
    assert one("type", good(answer), gold, type_credit=0.25) == pytest.approx(0.25 * expected)


def test_type_credit_for_none_gold_is_a_param():
    assert one("type", good(NONE), NONE) == 0.0                       # default: `none` has no types to credit
    assert one("type", good(NONE), NONE, type_credit_gold_none=0.4) == pytest.approx(0.4)
    assert one("type", good("/per/per/opponent"), NONE, type_credit_gold_none=0.4) == 0.0
    assert one("type", good(NONE), BIRTH, type_credit_gold_none=0.4) == 0.0


def test_type_follows_accuracy_requires_format():
    text = f"{good('/per/loc/place_of_residence')} trailing"
    assert one("type", text, BIRTH) == 0.0
    assert one("type", text, BIRTH, accuracy_requires_format=False) == 1.0


def test_conversational_and_string_completions_score_the_same():
    texts = [good(BIRTH), good("/per/loc/place_of_residence"), f"<answer>{BIRTH}</answer>", "",
             f"{good(BIRTH)} tail", good("per / LOC / place_of_birth")]
    gold = [BIRTH] * len(texts)
    chat = [[{"role": "assistant", "content": t}] for t in texts]
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in texts]
    for f in funcs().values():
        assert f(texts, gold) == f(chat, gold) == f(parts, gold)


def test_build_reward_funcs_names_order_weights():
    rewards, weights = build_reward_funcs(RewardsConfig(), DEFAULT_LABELS)
    assert [f.__name__ for f in rewards] == ["format", "accuracy", "type"] and weights == [1.0, 1.0, 0.5]

    cfg = RewardsConfig(weights={"type": 2, "accuracy": 1.5, "format": 0})
    rewards, weights = build_reward_funcs(cfg, DEFAULT_LABELS)
    assert [f.__name__ for f in rewards] == ["type", "accuracy"] and weights == [2.0, 1.5]

    rewards, weights = build_reward_funcs(RewardsConfig(weights={"accuracy": 1}), DEFAULT_LABELS)
    assert [f.__name__ for f in rewards] == ["accuracy"] and weights == [1.0]


@pytest.mark.parametrize("weights,message", [
    ({"format": 1.0, "lenght": 1.0}, "unknown reward"),
    ({"format": -1.0}, ">= 0"),
    ({"format": 0.0}, "at least one"),
    ({}, "at least one"),
])
def test_bad_weights_rejected(weights, message):
    with pytest.raises(ValidationError, match=message):
        RewardsConfig(weights=weights)


def test_unknown_field_rejected():
    with pytest.raises(ValidationError):
        RewardsConfig(type_bonus=1.0)


def test_bad_labels_and_gold_rejected():
    with pytest.raises(ValueError, match="typed"):
        build_reward_funcs(RewardsConfig(), ["none", "place_of_birth"])
    [accuracy] = build_reward_funcs(RewardsConfig(weights={"accuracy": 1}), DEFAULT_LABELS)[0]
    with pytest.raises(ValueError, match="not in the label set"):
        accuracy([good(BIRTH)], ["/per/loc/birthplace"])


def test_score_completion_components_and_total():
    cfg = RewardsConfig()
    scores = score_completion(good("/per/loc/place_of_residence"), BIRTH, DEFAULT_LABELS, cfg)
    assert scores == {"format": 1.0, "accuracy": 0.0, "type": 1.0, "total": pytest.approx(1.5)}
    chat = [{"role": "assistant", "content": good(BIRTH)}]
    assert score_completion(chat, BIRTH, DEFAULT_LABELS, cfg)["total"] == pytest.approx(2.5)
    # a disabled component is still reported, but not counted
    scores = score_completion(good(BIRTH), BIRTH, DEFAULT_LABELS, RewardsConfig(weights={"accuracy": 2.0}))
    assert scores == {"format": 1.0, "accuracy": 1.0, "type": 1.0, "total": pytest.approx(2.0)}


def test_score_completion_agrees_with_reward_funcs():
    cfg = RewardsConfig()
    rewards, weights = build_reward_funcs(cfg, DEFAULT_LABELS)
    texts = [text for text, _ in FORMAT_CASES]
    per_func = [f(texts, [BIRTH] * len(texts)) for f in rewards]
    for i, text in enumerate(texts):
        scores = score_completion(text, BIRTH, DEFAULT_LABELS, cfg)
        assert [scores[f.__name__] for f in rewards] == [values[i] for values in per_func]
        assert scores["total"] == pytest.approx(sum(w * values[i] for w, values in zip(weights, per_func)))


def test_trl_call_convention():
    """Called as GRPOTrainer._calculate_rewards does: keyword args, every dataset column, trainer state, loggers."""
    texts = [good(BIRTH), good(NONE), "garbage", f"<answer>{BIRTH}</answer>"]
    n = len(texts)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}]
    kwargs = dict(
        prompts=[prompt] * n,
        completions=[[{"role": "assistant", "content": t}] for t in texts],
        completion_ids=[[1, 2, 3]] * n,
        relation=[BIRTH, NONE, BIRTH, BIRTH],
        id=[f"f{i}" for i in range(n)], images=[[None, None]] * n, phase=[0] * n, pool=["learnable"] * n,
        trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None,
    )
    rewards, weights = build_reward_funcs(RewardsConfig(), DEFAULT_LABELS)
    assert len(rewards) == len(weights)
    for f in rewards:
        # TRL names the metric `rewards/<name>/mean` after `__name__` (trl.trainer.utils.get_callable_name)
        assert getattr(f, "__name__") in REGISTRY
        values = f(**kwargs)
        assert len(values) == n and all(type(v) is float for v in values)
        again = pickle.loads(pickle.dumps(f))                           # picklable, e.g. for worker processes
        assert again.__name__ == f.__name__ and again(**kwargs) == values
    assert {f.__name__: f(**kwargs) for f in rewards} == {
        "format": [1.0, 1.0, 0.0, 0.0], "accuracy": [1.0, 1.0, 0.0, 0.0], "type": [1.0, 0.0, 0.0, 0.0]}


def test_format_gives_full_credit_to_step_headers_whose_prose_cites_earlier_steps():
    think = ("Step 1: The crop shows a man at a lectern.\n"
             "Step 2: The photo is relevant, as shown in step 1. The lectern fits the speech.\n"
             "Step 3: From step 2, the man is Alice Moreau, born in Lyon.\n"
             "Step 4: Building on Step 3: a person (per) and a location (loc).\n"
             "Step 5: Given step 4, the per/loc candidates and none remain.\n"
             "Step 6: The title calls her a Lyon native, so with step 3. it is place_of_birth.\n"
             "In summary, Steps 1-6 agree.")
    assert one("format", good(BIRTH, think), BIRTH) == pytest.approx(1.0)
    assert one("format", good(BIRTH, think), BIRTH, format_partial=False) == 1.0
    assert score_completion(good(BIRTH, think), BIRTH, DEFAULT_LABELS, RewardsConfig())["accuracy"] == 1.0
