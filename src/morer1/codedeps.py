"""Code dependencies of each DVC stage, derived from the package: the import closure of the stage's module.

A stage `s` runs `morer1.<s>` (exceptions in `STAGE_MODULES`). Its code deps are every module of the package
that module imports, directly or through other package modules, at module level or inside functions
(`import morer1.x`, `from morer1 import x`, `from morer1.x import y`, relative imports), plus the package data
those modules read (`DATA`). Only the source is parsed (`ast`): no stage module is imported.

    python -m morer1.codedeps            # each stage's code deps
    python -m morer1.codedeps --check    # exit 1 listing where dvc.yaml differs (`make deps` checks it)
    python -m morer1.codedeps --write    # rewrite the `src/morer1/...` dep lines of dvc.yaml in place

`--write` touches only the `- src/morer1/...` items of each stage's `deps:` list (the computed list replaces
them where the first of them stood, keeping a trailing comment of a path that stays) and adds a missing
package-data path after them; every other line, comment included, stays as it is.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

PACKAGE = "morer1"
# stage -> module, where the convention `morer1.<stage>` does not hold; None: the stage runs no package code
STAGE_MODULES: dict[str, str | None] = {
    "validate_facts": "morer1.validate",
    "validate_sft": "morer1.validate",
    "validate_predictions": "morer1.validate",
    "register": "morer1.registry",
}
# module -> data its code reads (paths relative to the project): a closure holding the module depends on them
DATA: dict[str, tuple[str, ...]] = {
    "morer1.prompt": ("src/morer1/templates",),
    "morer1.validate": ("expectations",),
}


class CodeDepsError(Exception):
    """A stage without a module, or a dvc.yaml this tool cannot edit safely."""


def module_file(package_dir: Path, module: str) -> Path | None:
    """Source file of `module` (`morer1.a.b`) under `package_dir` (the `morer1/` folder), or None."""
    parts = module.split(".")[1:]
    base = package_dir.joinpath(*parts) if parts else package_dir
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _module_name(package_dir: Path, path: Path) -> str:
    rel = path.relative_to(package_dir).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package_dir.name, *parts])


def imported_modules(package_dir: Path, path: Path) -> set[str]:
    """Package modules that the source file `path` imports anywhere (module level, functions, branches)."""
    package = package_dir.name
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    this = _module_name(package_dir, path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        """Module `name`, or the nearest enclosing module that exists (a name imported from it)."""
        while name and not module_file(package_dir, name):
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from .x import y`, `from .. import z`
                anchor = this.split(".") if is_package else this.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == package or base.startswith(package + ".")):
                continue
            for alias in node.names:  # `from morer1 import tracking` names a submodule; `from morer1.x import y` a name
                if alias.name != "*" and module_file(package_dir, f"{base}.{alias.name}"):
                    found.add(f"{base}.{alias.name}")
                else:
                    add(base)
    # `import morer1.x` runs the package's `__init__` too; it counts only when a name is taken from it
    return {m for m in found if m != this}


def closure(package_dir: str | Path, module: str) -> list[str]:
    """`module` and every package module it imports, recursively (cycles are fine), sorted by name."""
    package_dir = Path(package_dir)
    if module_file(package_dir, module) is None:
        raise CodeDepsError(f"{module}: no such module under {package_dir}")
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(package_dir, module_file(package_dir, name)) - seen)
    return sorted(seen)


def stage_module(stage: str) -> str | None:
    return STAGE_MODULES.get(stage, f"{PACKAGE}.{stage}")


def code_deps(project_dir: str | Path, stage: str) -> list[str]:
    """The deps a stage needs for its code: sorted project-relative paths of its closure's files and data."""
    project = Path(project_dir)
    package_dir = project / "src" / PACKAGE
    module = stage_module(stage)
    if module is None:
        return []
    if module_file(package_dir, module) is None:
        raise CodeDepsError(f"stage '{stage}': no module {module} (src/{module.replace('.', '/')}.py); "
                            "name the module in morer1.codedeps.STAGE_MODULES")
    paths: set[str] = set()
    for name in closure(package_dir, module):
        paths.add(module_file(package_dir, name).relative_to(project).as_posix())
        paths.update(DATA.get(name, ()))
    return sorted(paths)


def _is_code(path: str) -> bool:
    return path.startswith(f"src/{PACKAGE}/")


def differences(project_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """Per stage of dvc.yaml whose deps disagree with its code: `missing` and `extra` (package paths only)."""
    project = Path(project_dir)
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for stage, spec in stages.items():
        listed = [str(d) for d in spec.get("deps") or []]
        want = code_deps(project, stage)
        code_listed = {d for d in listed if _is_code(d)}
        missing = [p for p in want if (p not in code_listed if _is_code(p)
                                       else not any(d == p or d.startswith(p + "/") for d in listed))]
        extra = sorted(code_listed - set(want))
        if missing or extra:
            out[stage] = {"missing": missing, "extra": extra}
    return out


_ITEM = re.compile(r"^(?P<indent> *)- +(?P<value>[^#\s]+)(?P<comment>\s+#.*)?$")
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _skippable(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def rewrite(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml `text` with each stage's code deps replaced by `deps[stage]` (see the module doc)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    top = stage = None
    stage_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        key = None if _skippable(line) else _KEY.match(line.rstrip("\n"))
        if key and _indent(line) == 0:
            top, stage, stage_indent = key["key"], None, None
        elif key and top == "stages":
            if stage_indent is None or _indent(line) <= stage_indent:
                stage_indent, stage = _indent(line), key["key"]
            elif key["key"] == "deps" and stage in deps:
                if key["rest"].split("#")[0].strip():
                    raise CodeDepsError(f"stage '{stage}': deps in flow style; write one `- path` per line")
                own = _indent(line)
                out.append(line)
                i += 1
                start = i
                while i < len(lines) and (_skippable(lines[i]) or _indent(lines[i]) > own
                                          or (_indent(lines[i]) == own and lines[i].lstrip().startswith("- "))):
                    i += 1
                out.extend(_rewrite_deps(lines[start:i], deps[stage], stage))
                continue
        out.append(line)
        i += 1
    return "".join(out)


def _rewrite_deps(block: list[str], want: list[str], stage: str) -> list[str]:
    """The lines of one `deps:` list with its code items replaced by `want`'s, and `want`'s missing data added."""
    items = [(n, m) for n, m in ((n, _ITEM.match(line.rstrip("\n"))) for n, line in enumerate(block)) if m]
    if not items:
        raise CodeDepsError(f"stage '{stage}': no `- path` items under deps")
    indent = items[0][1]["indent"]
    listed = [m["value"] for _, m in items]
    comments = {m["value"]: m["comment"] or "" for _, m in items if _is_code(m["value"])}
    code_rows = {n for n, m in items if _is_code(m["value"])}
    new = [f"{indent}- {p}{comments.get(p, '')}\n" for p in want if _is_code(p)]
    new += [f"{indent}- {p}\n" for p in want
            if not _is_code(p) and not any(d == p or d.startswith(p + "/") for d in listed)]
    at = min(code_rows) if code_rows else items[-1][0] + 1  # where the first code item stood, else after the last
    kept = [line for n, line in enumerate(block) if n not in code_rows]
    at -= sum(1 for n in code_rows if n < at)
    return kept[:at] + new + kept[at:]


def _skeleton(doc: dict) -> dict:
    """dvc.yaml without code deps and package-data deps: what `--write` must leave unchanged."""
    data = {p for paths in DATA.values() for p in paths}
    stages = {name: {**spec, "deps": [d for d in spec.get("deps") or [] if not _is_code(d) and d not in data]}
              for name, spec in (doc.get("stages") or {}).items()}
    return {**doc, "stages": stages}


def write(project_dir: str | Path) -> bool:
    """Rewrite dvc.yaml's code deps in place; True when it changed. Refuses an edit that would change more."""
    path = Path(project_dir) / "dvc.yaml"
    text = path.read_text(encoding="utf-8")
    before = yaml.safe_load(text)
    want = {stage: code_deps(project_dir, stage) for stage in before["stages"]}
    new = rewrite(text, want)
    after = yaml.safe_load(new)
    if _skeleton(after) != _skeleton(before) or any(
            [d for d in after["stages"][s].get("deps") or [] if _is_code(d)] != [p for p in w if _is_code(p)]
            for s, w in want.items()):
        raise CodeDepsError("refusing to write dvc.yaml: the edit would change more than the code deps")
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m morer1.codedeps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", default=".", help="folder holding dvc.yaml and src/morer1 (default: .)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's code deps differ")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps in place")
    args = parser.parse_args(argv)
    try:
        if args.write:
            print("dvc.yaml updated" if write(args.project_dir) else "dvc.yaml already up to date")
            return 0
        if args.check:
            diff = differences(args.project_dir)
            for stage, d in diff.items():
                for path in d["missing"]:
                    print(f"{stage}: missing dep {path}")
                for path in d["extra"]:
                    print(f"{stage}: dep {path} is not in the stage's code")
            if diff:
                print("run `python -m morer1.codedeps --write` (or `make deps`) to fix dvc.yaml", file=sys.stderr)
            return 1 if diff else 0
        stages = yaml.safe_load((Path(args.project_dir) / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
        for stage in stages:
            print(f"{stage}:", *code_deps(args.project_dir, stage), sep="\n  ")
        return 0
    except CodeDepsError as exc:
        print(f"codedeps: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
