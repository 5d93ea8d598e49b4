"""params.yaml is the one source of the pipeline's settings: a config default that disagrees with it is a bug."""

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

from morer1.params import SECTIONS, describe, section_config

PARAMS = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())


def _disagreements(model: type[BaseModel], values: dict, prefix: str) -> list[str]:
    """`key: code default X, params.yaml Y` for every field whose default differs from the params value."""
    out = []
    for name, value in values.items():
        field = model.model_fields[name]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            out += _disagreements(annotation, value, f"{prefix}{name}.")
            continue
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        # compared as the config holds them (a YAML list is a tuple field, an int a float field)
        if TypeAdapter(annotation).validate_python(value) != default:
            out.append(f"{prefix}{name}: code default {default!r}, params.yaml {value!r}")
    return out


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_config_defaults_equal_params_yaml(section):
    model = section_config(section)
    assert _disagreements(model, PARAMS.get(section) or {}, f"{section}.") == []


def test_every_params_section_has_a_config():
    assert set(PARAMS) == set(SECTIONS)


def test_help_lists_every_field_with_its_description():
    from morer1.sft import SFTConfig

    text = describe(SFTConfig, "sft")
    for name, field in SFTConfig.model_fields.items():
        assert f"sft.{name}" in text
    assert "sft.lora.r: LoRA rank." in text and "sft.training" not in text


def test_stage_help_ends_with_the_params_it_reads(capsys):
    from morer1.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["grpo", "--help"])
    text = capsys.readouterr().out
    assert "params (grpo section of --params):" in text and "params (rollout section of --params):" in text
    assert "rollout.temperature: Sampling temperature of the rollouts." in text and "grpo.beta:" in text
