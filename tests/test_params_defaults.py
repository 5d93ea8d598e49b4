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
    assert "params (grpo section of --params params.yaml" in text and "params (rollout section of --params" in text
    assert "rollout.temperature: Sampling temperature of the rollouts." in text and "grpo.beta:" in text


def test_help_shows_the_values_in_effect_from_the_params_file(tmp_path, monkeypatch, capsys):
    """A key params.yaml sets shows its value there, not "(required)" nor the code default; a key it leaves out, the
    code default; with no params file at all, the defaults and which keys the file must set."""
    from morer1.cli import build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"sft": {"learning_rate": 0.0123, "lora": {"r": 4}}, "ingest": {"source": "/data/MORE"}}))

    def help_of(*argv) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--help"])
        return capsys.readouterr().out

    text = help_of("sft")
    assert "params (sft section of --params params.yaml, values in effect):" in text
    assert "sft.learning_rate: Peak learning rate. (params.yaml: 0.0123)" in text
    assert "sft.lora.r: LoRA rank. (params.yaml: 4)" in text
    assert "sft.weight_decay: AdamW weight decay. (default 0.0)" in text  # not in the file: the code default
    assert "sft.max_steps: Stop after this many optimizer steps (-1: use epochs). (required: not set in params.yaml)" \
        in text
    # the repository's params.yaml: every key it sets shows its value, none reads "(required" although set
    project = Path(__file__).resolve().parent.parent / "params.yaml"
    text = help_of("--params", str(project), "sft")
    assert "(required" not in text and f"sft.learning_rate: Peak learning rate. ({project}: " in text
    # another file, given after the command as well as before it
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"ingest": {"source": "/elsewhere"}}))
    for argv in (("ingest", "--params", "other.yaml"), ("--params", "other.yaml", "ingest")):
        assert "ingest.source: Folder in the official MORE layout to read. (other.yaml: '/elsewhere')" in help_of(*argv)
    (tmp_path / "params.yaml").unlink()
    text = help_of("sft")
    assert "params.yaml: params file not found: the code's defaults shown" in text
    assert "sft.weight_decay: AdamW weight decay. (default 0.0)" in text
    assert "sft.max_steps: Stop after this many optimizer steps (-1: use epochs). (required: set it in params.yaml)" \
        in text


def test_params_before_or_after_the_command_and_the_version(capsys):
    from importlib.metadata import version

    from morer1.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ingest", "--output", "o"]).params == "params.yaml"
    assert parser.parse_args(["--params", "a.yaml", "ingest", "--output", "o"]).params == "a.yaml"
    assert build_parser().parse_args(["ingest", "--params", "b.yaml", "--output", "o"]).params == "b.yaml"
    assert build_parser().parse_args(["promote", "--params", "c.yaml"]).params == "c.yaml"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"morer1 {version('morer1')}\n"


def test_every_command_has_a_description(capsys):
    from morer1.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name in sub.choices:
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        usage, _, rest = capsys.readouterr().out.partition("\n\n")
        description = rest.split("\n\n", 1)[0]
        assert usage.startswith(f"usage: morer1 {name}") and description.strip(), name
        assert not description.startswith(("options:", "positional arguments:")), (name, description)
