"""The model card of a registered version: Markdown in the Hugging Face convention (`README.md` with YAML front
matter), written by the register stage.

It says what the model is and where it came from (data version, dev set, code and `dvc.lock` versions, model hash),
what it was trained from and how (the base model and the params.yaml sections of the stages that made it: `sft`, and
for a GRPO model `rollout`, `curriculum` and `grpo`), how it scored (dev and test metrics with their intervals beside
the baselines of `metrics.json`), the promotion decision of the register stage, the prompt it is asked with, and what
it is for. A demo run (`ingest.source` the demo generator's folder, or the base model the embedded tiny one) is
marked a toy task: its numbers say the pipeline works, not what the method reaches.

`lineage` is the same provenance as JSON (every metric, the settings, the hashes), logged beside the card.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

DEMO_SOURCE = "data/demo"  # demo_data's output (dvc.yaml): ingest.source of the demo
TINY_MODEL = "models/tiny"  # tiny_model's output: the embedded default base model
METRIC_ROWS = (("f1", "micro F1 (MORE protocol, without none)"), ("precision", "precision"), ("recall", "recall"),
               ("accuracy", "accuracy (none included)"), ("macro_f1", "macro F1"), ("invalid_rate", "invalid answers"))
BASELINES = (("baseline_majority", "majority (always the most frequent label)"),
             ("baseline_random", "random (labels drawn by their train frequency)"))


def training_sections(model_dir: str, params: dict) -> list[str]:
    """The params.yaml sections of the stages that produced `model_dir`: SFT only, or SFT then GRPO."""
    sections = ["sft"]
    if Path(model_dir).name == "grpo" or "grpo" in Path(model_dir).parts:
        sections += ["rollout", "curriculum", "grpo"]
    return [s for s in sections if s in params]


def is_demo(params: dict) -> bool:
    """Whether the run is the embedded demo: the demo generator's data, or the tiny model trained from scratch."""
    source = str((params.get("ingest") or {}).get("source") or "").rstrip("/")
    base = str((params.get("sft") or {}).get("model") or "").rstrip("/")
    return source == DEMO_SOURCE or base == TINY_MODEL


def parameter_count(model_dir: str | Path) -> int | None:
    """Parameters of a model folder from its safetensors headers (no weights read), or None."""
    total, files = 0, sorted(Path(model_dir).glob("*.safetensors"))
    try:
        for path in files:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return total or None


def lineage(chosen: dict, tags: dict[str, str], dvc_lock_sha256: str, params: dict, eval_metrics: dict | None,
            registered: dict) -> dict:
    """The version's provenance as JSON: what the version tags hold and what they leave out (every metric, the
    baselines, `dvc.lock`'s hash, the training settings)."""
    sections = training_sections(chosen["model_dir"], params)
    return {
        **registered, "model_dir": chosen["model_dir"], "model_sha256": chosen["model_sha256"],
        "git_commit": tags.get("git_commit"), "dvc_lock_sha256": dvc_lock_sha256,
        "data_version": tags.get("data_version"), "dev_set": chosen["dev_set"], "dev_eval": chosen["dev_eval"],
        "serve_config": json.loads(tags["serve_config"]) if "serve_config" in tags else None,
        "selection_metric": chosen.get("selection_metric"), "labels": chosen.get("labels"),
        "metrics": chosen["metrics"], "baselines": baselines(eval_metrics),
        "settings": {s: params[s] for s in ("ingest", *(["tiny_model"] if is_demo(params) else []), *sections)
                     if s in params},
    }


def baselines(eval_metrics: dict | None) -> dict:
    """The baselines' dev and test figures of evaluate's metrics.json (`dev.baseline_majority_f1`, ...)."""
    out = {}
    for split in ("dev", "test"):
        values = (eval_metrics or {}).get(split) or {}
        out[split] = {k: v for k, v in values.items() if k.startswith("baseline_")}
    return out


def _num(value) -> str:
    return "–" if value is None else f"{value:.0f}" if isinstance(value, int) else f"{value:.3f}"


def _with_interval(values: dict, key: str) -> str:
    if values.get(key) is None:
        return "–"
    lo, hi = values.get(f"{key}_lo"), values.get(f"{key}_hi")
    return _num(values[key]) + (f" [{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None else "")


def _settings_table(section: str, values: dict) -> list[str]:
    lines = [f"`{section}`:", "", "| setting | value |", "|---|---|"]
    for key, value in values.items():
        if isinstance(value, dict):
            lines += [f"| {key}.{k} | `{json.dumps(v)}` |" for k, v in value.items()]
        else:
            lines.append(f"| {key} | `{json.dumps(value)}` |")
    return lines + [""]


def render(info: dict, decision: dict | None, prompt_name: str, prompt_template: str, system: str | None,
           confidence: float = 0.95, n_parameters: int | None = None) -> str:
    """The card's Markdown from `lineage`'s dict, the register stage's promotion decision and the prompt."""
    demo = info.get("demo", False)
    metrics, base = info["metrics"], info.get("baselines") or {}
    split = {s: {k[len(s) + 1:]: v for k, v in metrics.items() if k.startswith(f"{s}_")} for s in ("dev", "test")}
    for s in split:
        split[s].update({k: v for k, v in (base.get(s) or {}).items()})
    settings = info.get("settings") or {}
    base_model = (settings.get("sft") or {}).get("model", "unknown")
    stages = "SFT then GRPO" if "grpo" in settings else "SFT"
    level = f"{confidence * 100:g} %"
    name = f"{info.get('name', 'morer1')} version {info.get('version', '?')}"
    tags = ["morer1", "multimodal-relation-extraction", "qwen2.5-vl", *(["toy-task"] if demo else [])]
    out = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
           "tags:", *[f"- {t}" for t in tags]]
    if base_model and not str(base_model).startswith(("models/", "/", ".")):
        out.append(f"base_model: {base_model}")  # a Hub id; a local folder is named in the text
    out += ["---", "", f"# {name} ({info['model_dir']})", "",
            "Multimodal relation extraction (the MORE task): given a news photo, an object box in it and an entity of "
            "its title, the model reasons in six steps and answers the relation between the object and the entity "
            f"(one of {len(info.get('labels') or []) or 'the'} labels, `none` included). Trained by morer1 ({stages}).",
            ""]
    out += ["## Intended use and limits", ""]
    if demo:
        out += ["**A toy task.** This model was trained and scored on the synthetic demo data (`ingest.source: "
                f"{(settings.get('ingest') or {}).get('source')}`, docs/demo_data.md) from a tiny Qwen2.5-VL with "
                "random weights: its numbers say the pipeline works (a broken loss mask, prompt, parser or reward "
                "shows up there first), not what the method reaches on MORE. Do not use it on real photos or titles.",
                ""]
    else:
        out += ["Relation extraction between objects in news photos and entities of their titles, for the domain of "
                "the data it was trained on (English news, the MORE label set). It answers one of its labels for one "
                "object-entity pair at a time; a box outside the image or an entity not in the title is refused. The "
                "metrics below hold for data like its dev and test splits, not for other domains; an answer comes with "
                "a rationale that is generated, not a proof.", ""]
    out += ["## Data and lineage", "", "| | |", "|---|---|",
            f"| data version (DVC hash of `data/ingested`) | `{info.get('data_version')}` |",
            f"| dev set (sha256 of the dev facts scored) | `{info.get('dev_set')}` |",
            f"| evaluate settings of the dev figures | `{json.dumps(info.get('dev_eval'), sort_keys=True)}` |",
            f"| git commit | `{info.get('git_commit')}` |",
            f"| `dvc.lock` sha256 | `{info.get('dvc_lock_sha256')}` |",
            f"| model folder, its sha256 | `{info['model_dir']}`, `{info.get('model_sha256')}` |",
            f"| MLflow | registered model `{info.get('name')}` version {info.get('version')}, run "
            f"`{info.get('run_id')}` (`lineage.json` there holds all of this as JSON) |", ""]
    if "ingest" in settings:
        out.append(f"Data source: `{settings['ingest'].get('source')}`.")
        out.append("")
    out += ["## Base model and training", "",
            f"Base model: `{base_model}`" + (", the embedded tiny Qwen2.5-VL built by the `tiny_model` stage "
                                             "(random weights, tokenizer trained on the SFT set)"
                                             if str(base_model).rstrip("/") == TINY_MODEL else "") +
            (f"; this model has {n_parameters / 1e6:.2f}M parameters." if n_parameters else "."), ""]
    for section in ("tiny_model", "sft", "rollout", "curriculum", "grpo"):
        if section in settings:
            out += _settings_table(section, settings[section])
    out += [f"## Evaluation ({level} pair-bootstrap intervals)", "",
            f"Dev chose the model (`{info.get('selection_metric') or 'f1'}`); test chose nothing. Intervals resample "
            "the image-title pairs of a split (docs/evaluation.md).", "",
            "| metric | dev | test | " + " | ".join(f"{label}: dev / test" for _, label in BASELINES) + " |",
            "|---|---|---|" + "---|" * len(BASELINES)]
    for key, label in METRIC_ROWS:
        if split["dev"].get(key) is None and split["test"].get(key) is None:
            continue
        cells = [_with_interval(split["dev"], key), _with_interval(split["test"], key)]
        for prefix, _ in BASELINES:
            b = f"{prefix}_{key}"
            cells.append("–" if split["dev"].get(b) is None and split["test"].get(b) is None else
                         f"{_with_interval(split['dev'], b)} / {_with_interval(split['test'], b)}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", f"Facts scored: dev {_num(split['dev'].get('n'))}, test {_num(split['test'].get('n'))}.", ""]
    out += ["## Promotion", ""]
    if decision:
        out += [f"Decision of the register stage: **{decision.get('decision')}** — {decision.get('reason')}", "",
                f"Rule: {decision.get('rule')}. Later decisions (`morer1 promote`) are in the version's `promotion` "
                "tag.", ""]
    else:
        out += ["No promotion decision recorded.", ""]
    out += ["## Prompt", "",
            f"Template `{prompt_name}` (`src/morer1/templates`, recorded in the model folder's `morer1_prompt.json`); "
            "the user turn holds the photo, the object's crop, then this text with `{title}`, `{marked_title}` (the "
            "entity between `[ ` and ` ]`), `{entity}` and `{labels}` filled in:", ""]
    if system:
        out += [f"System turn: {system}", ""]
    out += ["```text", prompt_template.strip(), "```", "",
            "## How to use", "", "```sh",
            f"morer1 predict --model models:/{info.get('name')}/{info.get('version')} --image photo.jpg \\",
            "    --title \"Italy Storms Back Into the World Cup\" --entity \"World Cup\" --box 10 20 110 220",
            f"mlflow models serve -m models:/{info.get('name')}/{info.get('version')}", "```", ""]
    return "\n".join(out)
