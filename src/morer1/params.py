"""Typed access to params.yaml: one pydantic model per stage section."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from morer1.errors import BadInputError

DEFAULT_PARAMS = Path("params.yaml")

# params.yaml section -> "module:Config" of the typed config that reads it (imported on demand)
SECTIONS = {
    "demo_data": "morer1.demo_data:DemoDataConfig",
    "ingest": "morer1.ingest:IngestConfig",
    "validate": "morer1.validate:ValidateConfig",
    "synthesize": "morer1.synthesize:SynthesizeConfig",
    "tiny_model": "morer1.tiny_model:TinyModelConfig",
    "sft": "morer1.sft:SFTConfig",
    "rollout": "morer1.rollout:RolloutConfig",
    "difficulty": "morer1.difficulty:DifficultyConfig",
    "curriculum": "morer1.curriculum:CurriculumConfig",
    "grpo": "morer1.grpo:GRPOConfig",
    "evaluate": "morer1.evaluate:EvaluateConfig",
    "register": "morer1.registry:RegisterConfig",
    "flywheel": "morer1.flywheel:FlywheelConfig",
    "placement": "morer1.placement:PlacementConfig",
}


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T", bound=StageConfig)


class ParamsError(BadInputError, ValueError):
    """params.yaml is missing, unreadable, or a section does not match its config."""


def read_yaml_mapping(path: str | Path, what: str, shape: str, error: type[Exception] = BadInputError) -> dict:
    """A YAML file whose top level is a mapping; `error` naming the file when it is missing, not YAML, or another
    shape (`what`: the kind of file, `shape`: what its top level must be)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path}: {what} not found") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: {shape}")
    return data


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    """The whole params file as a dict."""
    return read_yaml_mapping(path, "params file", "top level must be a mapping of stage sections", ParamsError)


def section_config(section: str) -> type[StageConfig]:
    """The config class of a params section (ParamsError naming the known sections when there is none)."""
    from importlib import import_module

    if section not in SECTIONS:
        raise ParamsError(f"no params section '{section}'; sections: {', '.join(SECTIONS)}")
    module, name = SECTIONS[section].split(":")
    return getattr(import_module(module), name)


def load_section(section: str, model: type[T], path: str | Path | None = DEFAULT_PARAMS, **overrides) -> T:
    """Section `section` of the params file (None: defaults only) as `model`; overrides that are not None win."""
    values = dict(read_params(path).get(section) or {}) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model(**values)
    except ValidationError as exc:
        where = path or "no params file: the code's defaults, which do not cover every setting (params.yaml does)"
        raise ParamsError(f"{where}: section '{section}': {exc}") from exc


def describe(model: type[BaseModel], section: str, values: dict | None = None, source: str = "params.yaml") -> str:
    """Help text for a params section, one line per field from the config's own descriptions, each with the value in
    effect: `values` (the section as the params file `source` sets it; None: no file read) where it sets the key,
    else the code's default, else `required` (a key the code has no default for and the file does not set)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{section}.{name}"
        annotation = field.annotation
        given = values.get(name) if isinstance(values, dict) else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(describe(annotation, key, given if isinstance(given, dict) else
                                  ({} if values is not None else None), source))
            continue
        if isinstance(values, dict) and name in values:
            effect = f"{source}: {values[name]!r}"
        elif not field.is_required():
            effect = f"default {field.get_default(call_default_factory=True)!r}"
        else:
            effect = f"required: not set in {source}" if values is not None else f"required: set it in {source}"
        lines.append(f"  {key}: {field.description or ''} ({effect})")
    return "\n".join(lines)
