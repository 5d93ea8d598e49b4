"""Self-consistency: a majority vote over the labels of K sampled completions of one fact, with abstention.

The rule, used alike by `morer1 predict --samples K`, the served model's `samples` param and evaluate:

- Each completion is parsed (`morer1.parsing.parse_completion`); one whose answer is invalid (unparsable, several
  labels, out of the set) casts no vote.
- The winner is the label with the most votes; a tie goes to the tied label voted first in sample order (the
  samples are seeded, so the choice is deterministic). With no valid vote at all, the answer is invalid (None).
- `confidence` = votes for the winner / K (invalid completions count in K): 0 when no completion is valid.
- The returned completion is the first sample that voted for the winner (its rationale goes with the answer);
  with no winner, the first sample.
- Abstention: with `abstain_below` T, an answer whose confidence is below T becomes `none` (no relation claimed);
  the confidence and completion stay those of the vote. T = 0 never abstains; T above 1 always does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from morer1.labels import NONE
from morer1.parsing import parse_completion


@dataclass(frozen=True)
class Vote:
    """The self-consistent answer of one fact: `label` after abstention, `voted` before it (None: invalid)."""

    label: str | None
    voted: str | None
    confidence: float
    completion: str
    votes: dict[str, int]

    @property
    def abstained(self) -> bool:
        return self.label != self.voted


def abstain(voted: str | None, confidence: float, abstain_below: float) -> str | None:
    """`none` when `confidence` < `abstain_below`, else the voted label."""
    return NONE if confidence < abstain_below else voted


def vote(completions: Sequence[str], labels, abstain_below: float = 0.0) -> Vote:
    """The majority vote over the parsed labels of the K `completions` of one fact (rules in the module docstring)."""
    if not completions:
        raise ValueError("a vote needs at least one completion")
    if not abstain_below >= 0:  # also refuses NaN
        raise ValueError(f"abstain_below must be >= 0, got {abstain_below}")
    parsed = [parse_completion(c, labels).label for c in completions]
    votes: dict[str, int] = {}
    for label in parsed:
        if label is not None:
            votes[label] = votes.get(label, 0) + 1  # dict order = order of first vote, the tie-break
    if votes:
        winner = max(votes, key=lambda label: votes[label])  # max keeps the first of equal counts
        completion, confidence = completions[parsed.index(winner)], votes[winner] / len(completions)
    else:
        winner, completion, confidence = None, completions[0], 0.0
    return Vote(abstain(winner, confidence, abstain_below), winner, confidence, completion, votes)
