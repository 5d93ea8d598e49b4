"""`morer1[cluster]` (deepspeed, vllm, dvc-s3 for GPU nodes) resolves with the pinned stack.

The extra re-pins torch, torchvision and numpy for vLLM (pyproject.toml explains why); on a cluster node a
package pinned both in `dependencies` and in the extra takes the extra's pin through uv's `--override`,
which `make cluster-install` generates from the same list. The resolver checks here use `uv pip compile`
(nothing is installed) for the project's Python on linux x86_64:

- the install as `make cluster-install` does it: `pyproject.toml --extra cluster --override ...`;
- the same set with the re-pinned packages substituted and no override, so that an override cannot hide
  a conflict with what vLLM, mistral-common, prefect, ... declare themselves.

They need the package registry (CI has it); unreachable, they fail and say so. ~10 s here (network-bound:
uv revalidates its cache on each run; both compiles run in parallel). Deselect with `-m "not network"`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "x86_64-manylinux_2_28"
TIMEOUT_S = 600
NETWORK_ERRORS = ("Failed to fetch", "error sending request", "dns error", "Connection refused", "timed out",
                  "Could not connect", "network was disabled")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(requirements: list[str]) -> dict[str, str]:
    """name -> exact version of `name==version` requirements (all of the project's are)."""
    out = {}
    for line in requirements:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"not an exact pin: {line}"
        out[canonicalize_name(req.name)] = spec.version
    return out


def _base() -> dict[str, str]:
    return _pins(_project()["dependencies"])


def _cluster() -> dict[str, str]:
    return _pins(_project()["optional-dependencies"]["cluster"])


def _overrides() -> list[str]:
    """What `make cluster-install` passes to `uv --override`: the extra's pins of packages the base pins too."""
    base = _base()
    return [f"{name}=={version}" for name, version in _cluster().items() if name in base]


def _python_version() -> str:
    allowed = SpecifierSet(_project()["requires-python"])
    return next(v for v in ("3.11", "3.12", "3.13", "3.14") if Version(v) in allowed)


def _uv() -> str:
    found = Path(sys.executable).with_name("uv")
    uv = str(found) if found.exists() else shutil.which("uv")
    if uv is None:
        pytest.fail("uv not found next to the interpreter or on PATH (`make install` puts it in .venv/bin)")
    return uv


def _compile(args: list[str]) -> subprocess.Popen:
    cmd = [_uv(), "pip", "compile", *args, "--python-version", _python_version(), "--python-platform", PLATFORM,
           "--no-header", "--no-annotate", "--quiet"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resolved(proc: subprocess.Popen, what: str) -> dict[str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what}: `uv pip compile` took more than {TIMEOUT_S} s (is PyPI reachable?)")
    if proc.returncode != 0:
        if any(marker in err for marker in NETWORK_ERRORS):
            pytest.fail(f"{what}: the package registry is unreachable; this test needs PyPI "
                        f"(deselect with -m 'not network').\n{err.strip()}")
        pytest.fail(f"{what}: does not resolve (uv exit {proc.returncode}):\n{err.strip()}")
    return {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", out, re.M)}


def test_cluster_pins_are_in_trl_supported_ranges() -> None:
    """vllm and deepspeed within the ranges of the installed TRL's own extras (no network)."""
    trl_requires = [Requirement(r) for r in importlib.metadata.requires("trl") or []]
    cluster = _cluster()
    for extra, name in (("vllm", "vllm"), ("deepspeed", "deepspeed")):
        (spec,) = [r.specifier for r in trl_requires
                   if canonicalize_name(r.name) == name and r.marker is not None and r.marker.evaluate({"extra": extra})]
        assert Version(cluster[name]) in spec, f"{name}=={cluster[name]} is outside TRL's {extra} extra: {spec}"
    assert importlib.metadata.version("trl") == _base()["trl"], "the installed TRL is not the pinned one"


@pytest.mark.network
def test_cluster_extra_resolves(tmp_path: Path) -> None:
    cluster, base, overrides = _cluster(), _base(), _overrides()
    assert {"vllm", "deepspeed", "dvc-s3", "torch"} <= set(cluster)
    override_file = tmp_path / "cluster-overrides.txt"
    override_file.write_text("\n".join(overrides) + "\n")
    # The same set without any override: the base pins with the extra's re-pins substituted, plus the extra.
    plain = {**base, **cluster}
    plain_file = tmp_path / "cluster-plain.in"
    plain_file.write_text("\n".join(f"{name}=={version}" for name, version in plain.items()) + "\n")

    as_installed = _compile(["pyproject.toml", "--extra", "cluster", "--override", str(override_file)])
    without_override = _compile([str(plain_file)])
    resolved = _resolved(as_installed, "pyproject.toml --extra cluster --override")
    resolved_plain = _resolved(without_override, "the cluster set without override")

    expected = {**base, **cluster}  # every pin of the stack, the extra's where it re-pins
    wrong = {name: (version, resolved.get(name)) for name, version in expected.items() if resolved.get(name) != version}
    assert not wrong, f"resolved versions differ from the pins (pin, resolved): {wrong}"
    assert resolved_plain == resolved, "the override changes the resolution: it hides a conflict"
