"""Reading a model's completion: `<think>` and `<answer>` blocks, the six steps, the label."""

from __future__ import annotations

import re
from dataclasses import dataclass

from morer1.labels import NONE

THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
# A step header, not a step mention. A header is `Step N:` (or `Step N.`, `Step N -`, `Step N –`, bold `**Step N:**`
# or `**Step N**:`, a `### Step N:` heading, `Step N` alone on its line) standing where a header can stand: at the
# start of the think block or of a line (after optional whitespace, a markdown bullet or a list number), or after a
# sentence end (`.`, `!`, `?`, possibly closed by a quote, bracket or bold marker; not `e.g.`, `i.e.`, `cf.`, `vs.`)
# and whitespace. A step cited inside a sentence ("as shown in step 1.", "from step 2, ...") is prose, not read.
STEP_RE = re.compile(
    r"""
    (?: ^                                       # start of the think block or of a line (re.M)
      | (?: (?<=[.!?]) | (?<=[.!?]["'”’)\]*_]) | (?<=[.!?]\*\*) )   # after a sentence end ...
        (?<!e\.g\.) (?<!i\.e\.) (?<!\bcf\.) (?<!\bvs\.) \s+          # ... not an abbreviation, and a space
    )
    [ \t]*
    (?: (?: [-*+•>] | \d{1,2}[.)] ) [ \t]+ )?      # markdown bullet, quote or list number
    (?: \#{1,6} [ \t]* )?                         # markdown heading
    (?: \*\*? | __? )?                              # bold or italic opens
    step [ \t]* (\d{1,2})
    (?: \*\*? | __? )?                              # bold or italic closes
    (?: [ \t]* [:.\-–—] | [ \t]* $ )               # a separator, or the end of the line
    """,
    re.I | re.M | re.X,
)
LABEL_LIKE_RE = re.compile(r"/?\b(?:per|org|loc|misc)/(?:per|org|loc|misc)/[a-z_]+/?|\bnone\b", re.I)
N_STEPS = 6


@dataclass(frozen=True)
class Parsed:
    """What a completion says. `label` is None when the answer is missing, several labels, or out of set."""

    think: str | None
    answer: str | None
    label: str | None
    steps: tuple[int, ...]
    n_think: int
    n_answer: int
    well_formed: bool  # exactly one think block then exactly one answer block, nothing else outside

    @property
    def steps_in_order(self) -> bool:
        return self.steps == tuple(range(1, N_STEPS + 1))


def normalize_label(text: str, labels) -> str | None:
    """The label of `labels` that `text` names (case, spaces, missing/extra slashes, a final period forgiven), else None."""
    norm = re.sub(r"\s+", "", text.strip().lower()).rstrip(".").strip("/")
    if norm == NONE:
        return NONE if NONE in labels else None
    candidate = "/" + norm
    return candidate if candidate in labels else None


def answer_label(answer: str | None, labels) -> str | None:
    """The single label of an answer; None when it is empty, names several labels, or none of the set."""
    if answer is None or not answer.strip():
        return None
    if len(LABEL_LIKE_RE.findall(answer)) > 1:
        return None
    return normalize_label(answer, labels)


def step_headers(think: str) -> tuple[int, ...]:
    """The step numbers of the step headers of a think block, in order of appearance (see STEP_RE)."""
    return tuple(int(m) for m in STEP_RE.findall(think))


def parse_completion(text: str, labels) -> Parsed:
    """Parse one completion against the label set."""
    thinks, answers = THINK_RE.findall(text), ANSWER_RE.findall(text)
    think = thinks[0] if thinks else None
    answer = answers[-1] if answers else None
    steps = step_headers(think) if think is not None else ()
    shape = re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", text, re.S)
    well_formed = bool(shape) and all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    label = answer_label(answer, labels) if len(answers) == 1 else None
    return Parsed(think, answer, label, steps, len(thinks), len(answers), well_formed)
