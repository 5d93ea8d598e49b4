"""Preflight: what would make a training run useless, checked before anything is paid for (issue 24 §2).

At the start of the SFT stage, after the base model (`sft.model`) and its processor are loaded with the stage's
pixel bounds and before a trainer is built (`check_sft`):

- every generation cap (`GENERATION_CAPS`: GRPO's and difficulty's rollouts, evaluation, SFT's dev curve, the
  served model) must hold the longest completion the SFT set teaches, in the base model's tokens: think block and
  answer block. A cap below it cuts the answer off wherever the model reasons that long, so those completions
  are invalid for the rewards, the pass rates and the metrics alike. The check fails on the longest kept
  rationale rather than on a high percentile: a cap is cheap to raise (generation stops at the end of the
  answer, so a higher cap costs only where a completion is that long), while a cap below the longest SFT
  rationale teaches GRPO that the longest reasoning earns nothing and scores the facts that need it as invalid.
  Outliers are already bounded by `validate.rationale_chars_max`. `sft.generation_caps_check: warn` only logs it
  (the plumbing tests' 8-token caps, which learn nothing).
- prompt, image and rationale tokens against `sft.max_length`: longer samples are dropped, never truncated; more
  than `sft.max_dropped_fraction` of the training samples dropped, or all of them, fails.
- on one two-image sample (photo + crop), the image placeholder tokens the processor writes must equal the image
  features the model's vision tower gives for those pixels (`get_image_features`): the mismatch that otherwise
  stops training at its first batch, or, worse, trains on misplaced features.

Before synthesis pays a teacher (`check_prompts`, the `openai` teacher): the student prompts with their images
alone against `sft.max_length`, with the base model's processor when it is there; the rationale side can only be
checked once the rationales exist, at the start of SFT.

Every failure is a `PreflightError` (bad params or data: exit code 2, not retried) whose message lists each
problem on a line of its own, starting with `preflight: ` and naming the keys to change with the numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from morer1.errors import BadInputError
from morer1.params import read_params

logger = logging.getLogger(__name__)

# params keys of the generation lengths that must hold a whole completion, in the order they are named
GENERATION_CAPS = ("rollout.max_completion_length", "evaluate.max_new_tokens", "sft.dev_f1_max_new_tokens",
                   "register.max_new_tokens")


class PreflightError(BadInputError):
    """A preflight check failed: training would be useless or fail; nothing was trained."""


@dataclass(frozen=True)
class Row:
    """An SFT sample and where it comes from (1-based record number of its JSON-lines file)."""

    path: Path
    number: int
    data: dict
    name: str | None = None  # says where it is instead of the path and number

    @property
    def where(self) -> str:
        return self.name or f"{self.path} row {self.number}"


def rows_of(path: str | Path, records: list[dict]) -> list[Row]:
    return [Row(Path(path), i, r) for i, r in enumerate(records, 1)]


def generation_caps(params_path: str | Path | None, dev_f1_every: int, dev_f1_max_new_tokens: int) -> dict[str, int]:
    """The generation caps the SFT set must fit in: those of `GENERATION_CAPS` that the params file sets (none
    without one), and SFT's own dev-curve cap when the curve is on (`dev_f1_every`)."""
    params = read_params(params_path) if params_path is not None and Path(params_path).is_file() else {}
    caps = {}
    for key in GENERATION_CAPS:
        if key == "sft.dev_f1_max_new_tokens":
            if dev_f1_every:
                caps[key] = dev_f1_max_new_tokens
            continue
        section, name = key.split(".")
        value = (params.get(section) or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            caps[key] = value
    return caps


def image_tokens(processor, image_paths) -> int:
    """Image tokens the processor gives these image files at their sizes (read from the file headers)."""
    from PIL import Image

    from morer1.modeling import image_token_count

    total = 0
    for path in image_paths:
        with Image.open(path) as image:
            total += image_token_count(processor, *image.size)
    return total


def sequence_length(processor, messages: list[dict], image_paths: list[str], add_generation_prompt: bool = False) -> int:
    """Tokens of a conversation with its images, as the model sees it: the text's tokens, each image placeholder
    counted as the image tokens the processor gives that image's size (read from the file header)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return n_text + image_tokens(processor, image_paths) - len(image_paths)  # each placeholder is one text token


def completion_text(row: dict) -> str:
    """The assistant turn of an SFT row: the completion the model is taught (think block and answer block)."""
    content = row["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def completion_lengths(tokenizer, rows: list[Row]) -> list[int]:
    """Tokens of each row's completion, as the model generates them (no special tokens added)."""
    if not rows:
        return []
    ids = tokenizer([completion_text(r.data) for r in rows], add_special_tokens=False)["input_ids"]
    return [len(i) for i in ids]


def percentile(values: list[int], q: float) -> int:
    """The smallest value that at least `q` of `values` do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def caps_problem(rows: list[Row], lengths: list[int], caps: dict[str, int]) -> str | None:
    """A line naming every cap below the longest completion, or None."""
    if not rows or not caps:
        return None
    longest = max(range(len(rows)), key=lambda i: (lengths[i], -i))
    need = lengths[longest]
    short = [(key, cap) for key, cap in caps.items() if cap < need]
    if not short:
        return None
    named = ", ".join(f"{key} is {cap}" if i == 0 else f"{key} {cap}" for i, (key, cap) in enumerate(short))
    return (f"preflight: the longest SFT rationale is {need} tokens ({rows[longest].where}) but {named}: raise "
            f"{'it' if len(short) == 1 else 'them'} to at least {need} (99 % of the {len(rows)} rationales are within "
            f"{percentile(lengths, 0.99)} tokens, the median {percentile(lengths, 0.5)}): a completion cut off there "
            "has no answer")


def length_problem(rows: list[Row], lengths: list[int], max_length: int, max_dropped_fraction: float,
                   what: str = "SFT training samples", remedy: str = "") -> str | None:
    """A line when more than `max_dropped_fraction` of `rows` (or all of them) exceed `max_length` tokens."""
    over = [i for i, n in enumerate(lengths) if n > max_length]
    if not rows or not over or (len(over) < len(rows) and len(over) <= max_dropped_fraction * len(rows)):
        return None
    longest = max(over, key=lambda i: (lengths[i], -i))
    need = percentile(lengths, 1.0 - max_dropped_fraction)
    return (f"preflight: {len(over)} of {len(rows)} {what} ({len(over) / len(rows):.1%}) are longer than sft.max_length "
            f"{max_length} tokens and would be dropped (the longest {lengths[longest]} tokens, {rows[longest].where})"
            + ("" if len(over) < len(rows) else ": all of them")
            + f", above sft.max_dropped_fraction {max_dropped_fraction:g}: raise sft.max_length to at least {need}"
            + (remedy or " or lower sft.max_pixels (fewer image tokens)"))


def _image_features(model, pixel_values, image_grid_thw) -> int:
    """Rows of image features the model's own vision path gives for these pixels (all images together)."""
    import torch

    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    features = getattr(out, "pooler_output", out)
    if isinstance(features, torch.Tensor):
        return int(features.shape[0])
    return sum(int(f.shape[0]) for f in features)


def image_token_problem(model, processor, row: Row) -> str | None:
    """A line when, on `row`'s prompt with its images, the processor's image placeholder tokens differ from the
    image features the model's vision tower gives for the same pixels (or the tower cannot encode them)."""
    import torch

    from morer1.generation import load_rgb

    if not hasattr(model, "get_image_features"):
        logger.warning("preflight: %s has no get_image_features: image tokens not checked", type(model).__name__)
        return None
    turns = [m for m in row.data["messages"] if m["role"] != "assistant"]
    text = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[load_rgb(p) for p in row.data["images"]], return_tensors="pt")
    token_id = getattr(model.config, "image_token_id", None)
    placeholders = int((inputs["input_ids"] == token_id).sum())
    grids = inputs["image_grid_thw"].tolist()
    merge = getattr(processor.image_processor, "merge_size", None)
    vision = getattr(model.config, "vision_config", None)
    spatial = getattr(vision, "spatial_merge_size", None)
    where = f"on {row.where} ({len(row.data['images'])} images: photo + crop)"
    processor_side = (f"the processor writes {placeholders} image placeholder tokens (model.config.image_token_id "
                      f"{token_id}, the processor's {getattr(processor, 'image_token_id', None)}; image processor "
                      f"merge_size {merge}, patch grids {grids})")
    device = "cuda" if torch.cuda.is_available() else None
    original = next(model.parameters()).device
    try:
        if device:
            model.visual.to(device) if hasattr(model, "visual") else model.to(device)
        features = _image_features(model, inputs["pixel_values"].to(device or original),
                                   inputs["image_grid_thw"].to(device or original))
    except Exception as exc:  # noqa: BLE001 - any failure to encode the processor's pixels is the problem
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"preflight: {where} {processor_side} but the model's vision tower cannot encode those pixels "
                f"(vision_config.spatial_merge_size {spatial}): {type(exc).__name__}: {first}")
    finally:
        if device:
            model.visual.to(original) if hasattr(model, "visual") else model.to(original)
    if features == placeholders:
        return None
    return (f"preflight: {where} {processor_side} but the model's vision tower gives {features} image features for "
            f"those pixels (vision_config.spatial_merge_size {spatial}): processor and model do not match, training "
            "would stop at its first batch ('Image features and image tokens do not match')")


@dataclass
class SFTPreflight:
    """What `check_sft` found: the rows that fit, by file, and the numbers for the stage summary."""

    kept: dict[Path, list[dict]] = field(default_factory=dict)
    numbers: dict = field(default_factory=dict)


def check_sft(model, processor, train: dict[Path, list[dict]], dev: dict[Path, list[dict]], *, max_length: int,
              max_dropped_fraction: float, caps: dict[str, int], caps_check: str = "fail",
              check_images: bool = True) -> SFTPreflight:
    """The SFT stage's preflight over the training files `train` and the dev files `dev` (path -> records): drop the
    samples longer than `max_length` (they are never truncated), then check the drops, the completions against
    `caps` and, when `check_images`, the image tokens on the first training sample. PreflightError with every
    problem found; with `caps_check` "warn" a short cap is logged instead. Returns the kept rows per file and the
    numbers (`dropped_overlong`, `longest_rationale_tokens`, ...)."""
    result, problems = SFTPreflight(), []
    rows = {path: rows_of(path, records) for path, records in {**train, **dev}.items()}
    lengths = {path: [sequence_length(processor, r.data["messages"], r.data["images"]) for r in rows[path]]
               for path in rows}
    kept = {path: [row for row, n in zip(rows[path], lengths[path], strict=True) if n <= max_length] for path in rows}
    result.kept = {path: [row.data for row in kept[path]] for path in kept}
    train_rows = [row for path in train for row in rows[path]]
    train_lengths = [n for path in train for n in lengths[path]]
    problem = length_problem(train_rows, train_lengths, max_length, max_dropped_fraction)
    if problem:
        problems.append(problem)
    kept_rows = [row for path in rows for row in kept[path]]
    completions = completion_lengths(processor.tokenizer, kept_rows)
    problem = caps_problem(kept_rows, completions, caps)
    if problem and caps_check == "warn":
        logger.warning("%s (sft.generation_caps_check: warn, training anyway)", problem)
    elif problem:
        problems.append(problem)
    first = next((row for path in train for row in kept[path]), None)
    if check_images and first is not None:
        problem = image_token_problem(model, processor, first)
        if problem:
            problems.append(problem)
    if problems:
        raise PreflightError("\n".join(problems))
    dev_kept = sum(len(result.kept[p]) for p in dev)
    result.numbers = {
        "dropped_overlong": sum(len(train[p]) - len(result.kept[p]) for p in train),
        "dev_dropped_overlong": sum(len(dev[p]) - len(result.kept[p]) for p in dev),
        "longest_sequence_tokens": max(train_lengths, default=0),
        "longest_rationale_tokens": max(completions, default=0),
        "rationale_tokens_p99": percentile(completions, 0.99) if completions else 0,
    }
    logger.info("preflight passed: %d training samples (%d dropped, longer than sft.max_length %d), %d dev; the "
                "longest rationale %d tokens within %s", len(train_rows) - result.numbers["dropped_overlong"],
                result.numbers["dropped_overlong"], max_length, dev_kept, result.numbers["longest_rationale_tokens"],
                ", ".join(f"{k} {v}" for k, v in caps.items()) or "no generation cap")
    return result


@dataclass(frozen=True)
class PromptBudget:
    """What the SFT stage will allow a sample (its `sft` params), for the check before synthesis."""

    model: str
    max_length: int
    max_dropped_fraction: float
    min_pixels: int | None = None
    max_pixels: int | None = None


def load_processor(budget: PromptBudget):
    """The base model's processor with the SFT stage's pixel bounds, or None (logged) when `budget.model` holds none
    yet (e.g. the tiny model, built from the SFT set)."""
    from transformers import AutoProcessor

    from morer1.modeling import set_pixel_bounds

    if not (Path(budget.model) / "config.json").is_file():
        logger.info("preflight: sft.model %s is not there yet: prompt lengths are checked at the start of sft",
                    budget.model)
        return None
    processor = AutoProcessor.from_pretrained(budget.model, local_files_only=True)
    set_pixel_bounds(processor, budget.min_pixels, budget.max_pixels)
    return processor


def check_prompts(processor, prompts: dict[str, list[tuple[str, list[dict], list[str]]]], budget: PromptBudget) -> None:
    """Before synthesis: per split, (fact id, prompt turns, image paths) of the facts the teacher would be asked about.
    PreflightError when more than `budget.max_dropped_fraction` of a split's prompts (or all) exceed
    `budget.max_length` with their images alone, before any rationale: SFT would drop them whatever the teacher
    writes."""
    problems = []
    for split, items in prompts.items():
        rows = [Row(Path(split), i, {}, f"{split} fact {fact_id}") for i, (fact_id, _, _) in enumerate(items, 1)]
        lengths = [sequence_length(processor, turns, images, add_generation_prompt=True) for _, turns, images in items]
        problem = length_problem(rows, lengths, budget.max_length, budget.max_dropped_fraction,
                                 what=f"{split} prompts with their images, before any rationale,",
                                 remedy=" or lower sft.max_pixels (fewer image tokens), before the teacher is paid")
        if problem:
            problems.append(problem)
        elif items:
            logger.info("preflight: the longest %s prompt is %d tokens with its images (sft.max_length %d)", split,
                        max(lengths), budget.max_length)
    if problems:
        raise PreflightError("\n".join(problems))
