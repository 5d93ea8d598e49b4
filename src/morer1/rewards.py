"""Rule-based rewards of the GRPO stage: format (tags and six steps), accuracy (exact label), type (type pair).

Each reward is a callable in TRL's convention, `(completions, relation, **kwargs) -> list[float]`, named after
its registry entry (TRL logs it as `rewards/<name>/mean`). Completions are plain strings or conversational
message lists; `relation` is the gold label column of the dataset. Every component lies in [0, 1]; the weights
(`RewardsConfig.weights`, passed to `GRPOConfig.reward_weights`) set the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from pydantic import Field, model_validator

from morer1.labels import NONE, type_pair
from morer1.params import StageConfig
from morer1.parsing import Parsed, normalize_label, parse_completion

TOTAL = "total"  # key of the weighted sum in `score_completion`


class RewardsConfig(StageConfig):
    """Reward components of GRPO, their weights and their partial credits."""

    weights: dict[str, float] = Field(
        default_factory=lambda: {"format": 1.0, "accuracy": 1.0, "type": 0.5},
        description="Reward name (format, accuracy, type) -> weight; absent or 0 disables it; order is kept.",
    )
    format_partial: bool = Field(
        True, description="Format reward gives partial credit (tags, steps); off: 1 only when both hold, else 0."
    )
    format_tags_credit: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Format credit for one <think> block then one <answer> block, nothing else outside.",
    )
    format_steps_credit: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Format credit for the step headers Step 1 ... Step 6, in order and once each, in the (first) "
                    "think block (parsing.STEP_RE: headers, not steps cited in the prose).",
    )
    accuracy_requires_format: bool = Field(
        True,
        description="Accuracy and type rewards are 0 unless the tags are well formed (the steps are not required).",
    )
    type_credit: float = Field(
        1.0, ge=0.0, le=1.0, description="Type reward when the predicted typed label has the gold's type pair."
    )
    type_credit_gold_none: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Type reward for predicting `none` when the gold is `none` (`none` has no type pair).",
    )

    @model_validator(mode="after")
    def _check(self) -> RewardsConfig:
        unknown = sorted(set(self.weights) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown} in weights; known: {sorted(REGISTRY)}")
        negative = sorted(name for name, w in self.weights.items() if w < 0)
        if negative:
            raise ValueError(f"reward weights must be >= 0, got negative for {negative}")
        if not self.enabled():
            raise ValueError("at least one reward needs a weight > 0")
        if not math.isclose(self.format_tags_credit + self.format_steps_credit, 1.0):
            raise ValueError("format_tags_credit + format_steps_credit must be 1 (the weight sets the scale)")
        return self

    def enabled(self) -> dict[str, float]:
        """The rewards in use (weight > 0) and their weights, in config order."""
        return {name: w for name, w in self.weights.items() if w > 0}


# ---- pure per-completion scores ---------------------------------------------------------------------------------


def completion_text(completion) -> str:
    """The text of a completion: a string, or the concatenated contents of a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    parts = []
    for message in completion:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):  # multimodal content parts: [{"type": "text", "text": ...}, ...]
            parts.extend(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "\n".join(parts)


def gold_label(gold: str, labels) -> str:
    """The gold label in canonical form; a gold outside the label set is a data error."""
    label = normalize_label(gold, labels)
    if label is None:
        raise ValueError(f"gold relation {gold!r} is not in the label set")
    return label


def format_score(parsed: Parsed, gold: str, cfg: RewardsConfig) -> float:
    """Tags credit when well formed plus steps credit when the Step 1..6 headers are in order (the parser's
    `steps_in_order`, shared with the synthesis filter and validation); all or nothing when not partial."""
    if not cfg.format_partial:
        return float(parsed.well_formed and parsed.steps_in_order)
    return (cfg.format_tags_credit if parsed.well_formed else 0.0) + \
        (cfg.format_steps_credit if parsed.steps_in_order else 0.0)


def answer_counts(parsed: Parsed, cfg: RewardsConfig) -> bool:
    """Whether the answer may earn accuracy/type credit: it names one label, and the tags are valid if required."""
    return parsed.label is not None and (parsed.well_formed or not cfg.accuracy_requires_format)


def accuracy_score(parsed: Parsed, gold: str, cfg: RewardsConfig) -> float:
    """1 when the single answered label equals the (canonical) gold, else 0."""
    return float(answer_counts(parsed, cfg) and parsed.label == gold)


def type_score(parsed: Parsed, gold: str, cfg: RewardsConfig) -> float:
    """`type_credit` for a typed label of the gold's type pair; `type_credit_gold_none` for `none` on gold `none`."""
    if not answer_counts(parsed, cfg):
        return 0.0
    if parsed.label == NONE:
        return cfg.type_credit_gold_none if gold == NONE else 0.0
    return cfg.type_credit if gold != NONE and type_pair(parsed.label) == type_pair(gold) else 0.0


# ---- TRL reward functions -----------------------------------------------------------------------------------------

Scorer = Callable[[Parsed, str, RewardsConfig], float]


class RewardFunc:
    """One reward in TRL's convention, `(completions, relation, **kwargs) -> list[float]`, named `__name__`.

    A class rather than a closure so that it pickles (cfg, labels and a module-level scorer).
    """

    def __init__(self, name: str, scorer: Scorer, cfg: RewardsConfig, labels: Sequence[str]):
        self.__name__ = name
        self.scorer = scorer
        self.cfg = cfg
        self.labels = tuple(labels)

    def score(self, parsed: Parsed, gold: str) -> float:
        """This reward of one parsed completion against a canonical gold label."""
        return float(self.scorer(parsed, gold, self.cfg))

    def __call__(self, completions, relation, **kwargs) -> list[float]:
        return [self.score(parse_completion(completion_text(c), self.labels), gold_label(g, self.labels))
                for c, g in zip(completions, relation, strict=True)]

    def __repr__(self) -> str:
        return f"RewardFunc({self.__name__!r})"


def make_format_reward(cfg: RewardsConfig, labels: Sequence[str]) -> RewardFunc:
    """The format reward (tags and steps)."""
    return RewardFunc("format", format_score, cfg, labels)


def make_accuracy_reward(cfg: RewardsConfig, labels: Sequence[str]) -> RewardFunc:
    """The accuracy reward (exact label)."""
    return RewardFunc("accuracy", accuracy_score, cfg, labels)


def make_type_reward(cfg: RewardsConfig, labels: Sequence[str]) -> RewardFunc:
    """The type reward (gold type pair)."""
    return RewardFunc("type", type_score, cfg, labels)


REGISTRY: dict[str, Callable[[RewardsConfig, Sequence[str]], RewardFunc]] = {
    "format": make_format_reward,
    "accuracy": make_accuracy_reward,
    "type": make_type_reward,
}


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """The label set as a tuple; every label must be `none` or typed `/<obj>/<ent>/<relation>`."""
    labels = tuple(labels)
    if not labels:
        raise ValueError("the label set is empty")
    for label in labels:
        type_pair(label)  # raises ValueError on an untyped label
    return labels


def build_reward_funcs(cfg: RewardsConfig, labels: Sequence[str]) -> tuple[list[Callable], list[float]]:
    """The enabled reward functions and their weights, in config order, for GRPOTrainer and GRPOConfig."""
    labels = check_labels(labels)
    enabled = cfg.enabled()
    return [REGISTRY[name](cfg, labels) for name in enabled], list(enabled.values())


def score_completion(text, gold: str, labels: Sequence[str], cfg: RewardsConfig) -> dict[str, float]:
    """Every component (weighted or not) of one completion (string or messages) and the weighted `total`."""
    labels = tuple(labels)
    parsed, gold = parse_completion(completion_text(text), labels), gold_label(gold, labels)
    scores = {name: make(cfg, labels).score(parsed, gold) for name, make in REGISTRY.items()}
    scores[TOTAL] = sum(w * scores[name] for name, w in cfg.enabled().items())
    return scores
