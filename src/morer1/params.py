"""Typed access to params.yaml: one pydantic model per stage section."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from morer1.errors import BadInputError

DEFAULT_PARAMS = Path("params.yaml")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T", bound=StageConfig)


class ParamsError(BadInputError, ValueError):
    """params.yaml is missing, unreadable, or a section does not match its config."""


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    """The whole params file as a dict."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: params file not found") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections")
    return data


def load_section(section: str, model: type[T], path: str | Path | None = DEFAULT_PARAMS, **overrides) -> T:
    """Section `section` of the params file (None: defaults only) as `model`; overrides that are not None win."""
    values = dict(read_params(path).get(section) or {}) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model(**values)
    except ValidationError as exc:
        raise ParamsError(f"{path or 'defaults'}: section '{section}': {exc}") from exc
