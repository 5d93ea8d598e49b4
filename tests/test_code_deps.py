"""Code deps of the DVC stages, derived from the package's imports (`morer1.codedeps`)."""

import textwrap

import pytest
from test_pipeline_e2e import REPO

from morer1 import codedeps


def _package(root, files: dict[str, str]):
    pkg = root / "src" / "morer1"
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    return pkg


SYNTHETIC = {
    "__init__.py": '"""pkg."""\nVERSION = 1\n',
    "stage.py": """
        import json
        from morer1 import util
        from morer1.errors import BadInputError
        import morer1.cyc_a

        def run():
            from morer1.lazy import thing  # only inside a function
            return thing
        """,
    "util.py": "from . import helpers\n",          # relative import
    "helpers.py": "import os\n",
    "errors.py": "class BadInputError(Exception): ...\n",
    "cyc_a.py": "from morer1 import cyc_b\n",     # a cycle
    "cyc_b.py": "import morer1.cyc_a\nfrom morer1 import VERSION\n",  # a name from the package's __init__
    "lazy.py": "from morer1.sub.deep import x\n",
    "sub/__init__.py": "",
    "sub/deep.py": "x = 1\n",
    "unused.py": "import morer1.stage\n",          # imports the stage, is not imported by it
    "prompt.py": "",
}


def test_closure_follows_function_level_relative_and_cyclic_imports(tmp_path):
    pkg = _package(tmp_path, SYNTHETIC)
    assert codedeps.closure(pkg, "morer1.stage") == [
        "morer1", "morer1.cyc_a", "morer1.cyc_b", "morer1.errors", "morer1.helpers", "morer1.lazy",
        "morer1.stage", "morer1.sub.deep", "morer1.util"]
    assert codedeps.closure(pkg, "morer1.cyc_b") == ["morer1", "morer1.cyc_a", "morer1.cyc_b"]
    with pytest.raises(codedeps.CodeDepsError, match="no such module"):
        codedeps.closure(pkg, "morer1.nope")


def test_code_deps_are_paths_with_package_data_and_stage_exceptions(tmp_path, monkeypatch):
    _package(tmp_path, {**SYNTHETIC, "other.py": "from morer1.prompt import x\n", "validate.py": ""})
    assert codedeps.code_deps(tmp_path, "other") == [
        "src/morer1/other.py", "src/morer1/prompt.py", "src/morer1/templates"]
    assert codedeps.code_deps(tmp_path, "validate_facts") == ["expectations", "src/morer1/validate.py"]
    with pytest.raises(codedeps.CodeDepsError, match="stage 'mystery': no module morer1.mystery"):
        codedeps.code_deps(tmp_path, "mystery")
    monkeypatch.setitem(codedeps.STAGE_MODULES, "mystery", None)  # a stage that runs no package code
    assert codedeps.code_deps(tmp_path, "mystery") == []


DVC_YAML = """\
# the pipeline
stages:
  stage:
    cmd: morer1 stage --out out   # a comment
    deps:
      - data/in
      # code
      - src/morer1/stage.py  # the entry point
      - src/morer1/gone.py
    params:
      - stage
    outs:
      - out

  other:
    cmd: morer1 other
    deps:
    - out
    outs:
    - out2
"""


def test_write_replaces_only_code_dep_lines_and_check_agrees(tmp_path):
    _package(tmp_path, {**SYNTHETIC, "other.py": "from morer1.prompt import x\n"})
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    diff = codedeps.differences(tmp_path)
    assert diff["stage"]["extra"] == ["src/morer1/gone.py"] and "src/morer1/util.py" in diff["stage"]["missing"]
    assert diff["other"]["missing"] == ["src/morer1/other.py", "src/morer1/prompt.py", "src/morer1/templates"]
    assert codedeps.main(["--project-dir", str(tmp_path), "--check"]) == 1

    assert codedeps.write(tmp_path) is True
    text = (tmp_path / "dvc.yaml").read_text()
    assert text.startswith("# the pipeline\n") and "cmd: morer1 stage --out out   # a comment\n" in text
    assert "      - data/in\n      # code\n      - src/morer1/__init__.py\n      - src/morer1/cyc_a.py\n" in text
    assert "      - src/morer1/stage.py  # the entry point\n" in text and "gone.py" not in text
    assert "    deps:\n    - out\n    - src/morer1/other.py\n    - src/morer1/prompt.py\n    - src/morer1/templates\n" \
           "    outs:\n" in text
    assert codedeps.differences(tmp_path) == {}
    assert codedeps.main(["--project-dir", str(tmp_path), "--check"]) == 0
    assert codedeps.write(tmp_path) is False  # idempotent


def test_flow_style_deps_are_refused(tmp_path):
    _package(tmp_path, SYNTHETIC)
    (tmp_path / "dvc.yaml").write_text("stages:\n  stage:\n    cmd: x\n    deps: [a]\n")
    with pytest.raises(codedeps.CodeDepsError, match="flow style"):
        codedeps.write(tmp_path)


def test_dvc_yaml_lists_every_stage_code_dep():
    """Fails when a stage's module (or what it imports) changed and dvc.yaml was not updated: `make deps`."""
    assert codedeps.differences(REPO) == {}, "run `make deps` (python -m morer1.codedeps --write)"
