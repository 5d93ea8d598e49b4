"""Running the DVC pipeline from an orchestrator: DVC's own stage order and status, one `dvc repro --single-item`
per stage that may have changed, exit-code triage, params profiles as DVC experiments, and the markdown
summaries the Prefect flows post.

Nothing here reads DVC's log text:
- the order is a topological order of DVC's stage graph (`Repo.index.graph`; ties keep dvc.yaml's order);
- what changed comes from `Repo.status()`, asked once for the whole pipeline (`plan_pipeline`): a stage runs
  when it changed or a stage upstream of it ran, so a run where nothing changed calls no stage at all;
- a stage runs in a helper process (`python -m morer1.orchestrate --result FILE repro STAGE`) that calls DVC's
  `Repo.reproduce` in-process and writes what happened as JSON: `ran` or `skipped` from the stages DVC returns
  as reproduced, or `failed` with the stage command's exit code. That code comes from the file the morer1
  CLI writes when `MORER1_EXIT_FILE` is set (`record_exit`; it survives `accelerate launch`, which turns
  every failure into exit code 1), else from DVC's `StageCmdFailedError`, whose message is the only place
  DVC keeps the code (`failed to run: <cmd>, exited with N`; the exception has no attribute for it).

A params profile (`profiles/<name>.yaml`) is an overlay: only the keys it changes. `run_experiment` runs it as
a DVC experiment in a temporary copy of the workspace (`dvc exp run --temp -S key=value ...`), so params.yaml,
dvc.lock and the outputs in the workspace stay as they are; the experiment is kept as a Git ref
(`dvc exp show`, `dvc exp apply <name>`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import chdir, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from morer1.errors import EXIT_BAD_INPUT, EXIT_FILE_ENV, EXIT_GATE_FAILED, BadInputError

TAIL_LINES = 40
PIPELINE_LOCK = ".dvc/tmp/morer1-pipeline.lock"  # in DVC's git-ignored tmp folder


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "skipped"
    seconds: float | None


class StageFailed(Exception):
    """A DVC stage (or a profile's experiment) failed; `exit_code` is the stage command's own exit code when known."""

    def __init__(self, stage: str, exit_code: int | None, log_tail: str):
        self.stage, self.exit_code, self.log_tail = stage, exit_code, log_tail
        what = {EXIT_GATE_FAILED: "data validation failed", EXIT_BAD_INPUT: "bad input or params",
                None: "no exit code"}.get(exit_code, f"exit code {exit_code}")
        super().__init__(f"stage '{stage}' failed ({what}):\n{log_tail}")

    @property
    def transient(self) -> bool:
        """Worth retrying: not a data gate, not bad input."""
        return self.exit_code not in (EXIT_BAD_INPUT, EXIT_GATE_FAILED)


class PipelineLocked(Exception):
    """Another pipeline run, or another DVC process, holds the project's lock: stop at once, never retry."""


_held_locks: dict[Path, int] = {}  # lock file -> how many times this process holds it


@contextmanager
def pipeline_lock(project_dir: str | Path, holder: str = "pipeline run"):
    """Hold the project's pipeline lock (`PIPELINE_LOCK`, an flock the kernel drops when the process dies) for a
    whole pipeline run or ablation grid: DVC's repo lock is held only while one stage runs, so two runs would
    interleave their stages. Re-entrant within a process; PipelineLocked, one line naming what holds it (`holder`,
    written into the lock file) and its pid, when another process holds it."""
    import fcntl

    path = (Path(project_dir) / PIPELINE_LOCK).resolve()
    if path in _held_locks:
        _held_locks[path] += 1
        try:
            yield
        finally:
            _held_locks[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, _, what = os.read(fd, 512).decode(errors="replace").strip().partition(" ")
        os.close(fd)
        raise PipelineLocked(f"another {what or 'pipeline run'} (pid {pid or 'unknown'}) holds the lock {path} of "
                             f"{Path(project_dir).resolve()}; wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {holder}\n".encode())
    _held_locks[path] = 1
    try:
        yield
    finally:
        del _held_locks[path]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def dvc_lock_message(project_dir: str | Path, exc: BaseException) -> str:
    """One line for DVC's LockError (its repo lock, or an output's read/write lock held by another DVC process)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"another DVC process holds a lock of {Path(project_dir).resolve()}: {first}"


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage commands: this interpreter's bin folder first on PATH (for `morer1`, `dvc`)."""
    env = dict(os.environ, **(extra or {}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# --- the pipeline as DVC sees it ----------------------------------------------------------------------------

@dataclass
class Plan:
    """The stages to consider, in DVC's dependency order, and which of them DVC reports as changed."""

    stages: list[str]
    changed: set[str]
    upstream: dict[str, set[str]] = field(default_factory=dict)  # stage -> stages it depends on (transitively)

    def needs_run(self, stage: str, ran: set[str]) -> bool:
        """Ask DVC to reproduce `stage`: it changed, or a stage it depends on ran in this pipeline run."""
        return stage in self.changed or bool(self.upstream.get(stage, set()) & ran)


def _graph_order(repo) -> tuple[list, dict]:
    """Pipeline stages of `repo` (dvc.yaml stages, not .dvc files) in a topological order of DVC's graph, upstream
    first, ties broken by their order in the dvc.yaml files; and each one's upstream stages."""
    import networkx as nx
    from dvc.stage import PipelineStage

    graph = repo.index.graph  # edges point from a stage to the stages whose outputs it depends on
    position = {stage: i for i, stage in enumerate(repo.index.stages)}
    order = [s for s in nx.lexicographical_topological_sort(graph.reverse(copy=False),
                                                            key=lambda s: f"{position.get(s, 0):09d}")
             if isinstance(s, PipelineStage)]
    upstream = {s.addressing: {u.addressing for u in nx.descendants(graph, s) if isinstance(u, PipelineStage)}
                for s in order}
    return order, upstream


@contextmanager
def _hash_each_path_once():
    """Within one `Repo.status`, hash each path once. DVC hashes a folder again for every stage that reads or
    writes it (the ingested facts, 17k files in the demo: seven walks of the folder and lookups in DVC's state
    database); nothing changes during a status, so the first answer holds for all. The hash is DVC's own
    (`Output._get_hash_meta`, DVC pinned); were it renamed, status runs unmemoized."""
    from dvc.output import Output

    original = getattr(Output, "_get_hash_meta", None)
    if original is None:
        yield
        return
    memo: dict = {}

    def hash_meta(self):
        key = (self.fs_path, self.hash_name)
        if key not in memo:
            memo[key] = original(self)
        return memo[key]

    Output._get_hash_meta = hash_meta
    try:
        yield
    finally:
        Output._get_hash_meta = original


def plan_pipeline(project_dir: str | Path, stages: list[str] | None = None) -> Plan:
    """Order `stages` (default: all) by DVC's graph and ask DVC once which of them changed (`Repo.status`)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    with chdir(project_dir), Repo() as repo, _hash_each_path_once():  # DVC names stages relative to the cwd
        order, upstream = _graph_order(repo)
        names = [s.addressing for s in order]
        unknown = sorted(set(stages or []) - set(names))
        if unknown:
            raise BadInputError(f"no such stage: {', '.join(unknown)}; stages: {', '.join(names)}")
        chosen = [n for n in names if not stages or n in stages]
        # One status for the whole pipeline when it is all chosen: with targets, DVC parses dvc.yaml and dvc.lock
        # again for each target (a third of a no-op run's time).
        try:
            status = repo.status(targets=None if chosen == names else chosen) if chosen else {}
        except LockError as exc:
            raise PipelineLocked(dvc_lock_message(project_dir, exc)) from None
        changed = set(status) & set(chosen)
    return Plan(chosen, changed, {n: upstream[n] for n in chosen})


# --- running DVC in a helper process -------------------------------------------------------------------------

_CMD_EXIT = re.compile(r"exited with (-?\d+)$")


def command_exit_code(exc: BaseException) -> int | None:
    """The stage command's exit code carried by DVC's `StageCmdFailedError` in `exc`'s chain, if any."""
    from dvc.stage.exceptions import StageCmdFailedError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StageCmdFailedError):
            match = _CMD_EXIT.search(str(exc))
            return int(match.group(1)) if match else None
        exc = exc.__cause__ or exc.__context__
    return None


def _helper(project_dir: Path, action: list[str]) -> dict:
    """In the helper process: run DVC in-process; what happened, as a JSON-able dict."""
    from dvc.lock import LockError
    from dvc.repo import Repo  # importing dvc sets up its console logging, as `dvc repro` prints it

    try:
        with Repo(str(project_dir)) as repo:
            if action[0] == "repro":
                done = repo.reproduce(action[1], single_item=True)
                return {"status": "ran" if done else "skipped"}
            name, targets, overrides = action[1], action[2], action[3]
            result = repo.experiments.run(targets=targets or None, params=overrides or None, tmp_dir=True, name=name)
            return {"status": "ran", "experiment": name, "rev": next(iter(result), None)}
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the orchestrator
        chain, seen = [], set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            chain.append(exc)
            exc = exc.__cause__ or exc.__context__
        error = ": ".join(str(e) or type(e).__name__ for e in chain)
        print(f"ERROR: {error}", file=sys.stderr)  # as `dvc repro` reports it
        if isinstance(chain[0], LockError):
            return {"status": "locked", "error": dvc_lock_message(project_dir, chain[0])}
        return {"status": "failed", "exit_code": command_exit_code(chain[0]), "error": error}


def _run_helper(project_dir: str | Path, label: str, args: list[str], env: dict[str, str] | None) -> dict:
    """Run the helper (`python -m morer1.orchestrate ...`) with the stage output captured; its result, or
    StageFailed with the output's tail, or PipelineLocked when another DVC process holds DVC's lock."""
    with tempfile.TemporaryDirectory(prefix="morer1-stage-") as tmp:
        result_file, exit_file = Path(tmp) / "result.json", Path(tmp) / "exit.json"
        proc = subprocess.run([sys.executable, "-m", "morer1.orchestrate", "--result", str(result_file), *args],
                              cwd=project_dir, env=stage_env({**(env or {}), EXIT_FILE_ENV: str(exit_file)}),
                              capture_output=True, text=True)
        result = json.loads(result_file.read_text()) if result_file.is_file() else {
            "status": "failed", "exit_code": None, "error": f"helper exited with {proc.returncode}"}
        if exit_file.is_file():  # the morer1 command said why it stopped
            result["exit_code"] = json.loads(exit_file.read_text())["exit_code"]
    if result["status"] == "locked":
        raise PipelineLocked(result["error"])
    if result["status"] == "failed":
        log = (proc.stdout + proc.stderr).strip() or result.get("error", "")
        raise StageFailed(label, result.get("exit_code"), "\n".join(log.splitlines()[-TAIL_LINES:]))
    return result


def repro_stage(project_dir: str | Path, stage: str, env: dict[str, str] | None = None) -> StageResult:
    """`dvc repro --single-item <stage>`: ran or skipped (DVC's own answer); StageFailed with the log tail."""
    start = time.monotonic()
    result = _run_helper(project_dir, stage, ["repro", stage], env)
    return StageResult(stage, result["status"], round(time.monotonic() - start, 1))


# --- params profiles: overlays run as DVC experiments --------------------------------------------------------

def profiles(project_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(project_dir) / "profiles").glob("*.yaml"))


def load_profile(project_dir: str | Path, profile: str) -> dict:
    """The overlay `profiles/<profile>.yaml`: a mapping holding only the keys the profile changes."""
    path = Path(project_dir) / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        raise BadInputError(f"{path}: no such params profile; profiles: {', '.join(profiles(project_dir)) or 'none'}")
    overlay = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(overlay, dict):
        raise BadInputError(f"{path}: a profile is a mapping of params.yaml sections")
    return overlay


def leaves(overlay: dict, prefix: tuple[str, ...] = ()):
    """(key path, value) of every value an overlay sets; a mapping is descended into, a list is one value."""
    for key, value in overlay.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value


def stale_keys(params: dict, overlay: dict) -> list[str]:
    """Dotted keys the overlay sets that params.yaml does not have (a profile may change keys, not add them; under
    a mapping that params.yaml leaves empty, such as `placement.pools`, it may)."""
    stale = []
    for path, _ in leaves(overlay):
        node = params
        for key in path:
            if isinstance(node, dict) and not node:
                break
            if not isinstance(node, dict) or key not in node:
                stale.append(".".join(path))
                break
            node = node[key]
    return stale


def merge_params(params: dict, overlay: dict) -> dict:
    """params.yaml with the overlay applied: mappings merge key by key, anything else is replaced."""
    merged = dict(params)
    for key, value in overlay.items():
        merged[key] = (merge_params(params[key], value) if isinstance(value, dict) and isinstance(params.get(key), dict)
                       else value)
    return merged


def hydra_value(value, where: str) -> str:
    """`value` in the override grammar of `dvc exp run -S` (Hydra's), so that it parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "\\" in value or "${" in value:
            raise BadInputError(f"{where}: a profile value may not hold a backslash or `${{`: {value!r}")
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v, where) for v in value) + "]"
    raise BadInputError(f"{where}: unsupported profile value {value!r}")


def set_param_overrides(project_dir: str | Path, profile: str) -> list[str]:
    """The profile as `dvc exp run -S` overrides of params.yaml (`section.key=value`), after checking that every
    key it sets exists in params.yaml (BadInputError naming the profile and the stale keys)."""
    from morer1.params import read_params

    overlay = load_profile(project_dir, profile)
    params = read_params(Path(project_dir) / "params.yaml")
    stale = stale_keys(params, overlay)
    if stale:
        raise BadInputError(f"profile {profile}: keys not in params.yaml: {', '.join(stale)}")
    return [f"{'' if _has(params, path) else '+'}{'.'.join(path)}="  # `+`: a key added under an empty mapping
            f"{hydra_value(value, f'profile {profile}: ' + '.'.join(path))}" for path, value in leaves(overlay)]


def _has(params: dict, path: tuple[str, ...]) -> bool:
    node = params
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def experiment_name(profile: str, when: datetime | None = None) -> str:
    """A DVC experiment name for a run of `profile`: the profile and the UTC time, unique per second."""
    return f"{profile}-{(when or datetime.now(timezone.utc)):%Y%m%d-%H%M%S}"


def run_experiment(project_dir: str | Path, name: str, overrides: list[str], stages: list[str] | None = None,
                   env: dict[str, str] | None = None) -> dict:
    """`dvc exp run --temp -n <name> -S ... [stages]`: the pipeline with the overrides applied in a temporary copy
    of the workspace; the workspace is left as it was. {"experiment", "rev", "seconds"}; StageFailed on failure."""
    start = time.monotonic()
    args = ["exp-run", name, *[a for s in stages or [] for a in ("--target", s)],
            *[a for o in overrides for a in ("--set-param", o)]]
    result = _run_helper(project_dir, f"experiment {name}", args, env)
    return {"experiment": name, "rev": result["rev"], "seconds": round(time.monotonic() - start, 1)}


def _lock_stages(text: str | None) -> dict:
    return (yaml.safe_load(text) or {}).get("stages", {}) if text else {}


def experiment_stage_results(project_dir: str | Path, rev: str, stages: list[str]) -> list[dict]:
    """Per stage: `ran` when the experiment's dvc.lock entry differs from the workspace's (its inputs or outputs
    differ from the workspace's), else `skipped`."""
    project = Path(project_dir)
    shown = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=project, capture_output=True, text=True)
    theirs = _lock_stages(shown.stdout if shown.returncode == 0 else None)
    ours = _lock_stages((project / "dvc.lock").read_text(encoding="utf-8") if (project / "dvc.lock").is_file() else None)
    return [{"stage": s, "status": "ran" if theirs.get(s) != ours.get(s) else "skipped", "seconds": None}
            for s in stages]


# --- process set-up and summaries ----------------------------------------------------------------------------

def set_env_defaults(project_dir: str | Path) -> None:
    """Default `MORER1_STATE_DIR` (`<project>/.state`), a Prefect home inside it, no Prefect analytics, and a
    patient start-up timeout for Prefect's temporary server.

    Call before importing prefect: Prefect reads its settings at import.
    """
    os.environ.setdefault("MORER1_STATE_DIR", str(Path(project_dir).resolve() / ".state"))
    os.environ.setdefault("PREFECT_HOME", str(Path(os.environ["MORER1_STATE_DIR"]) / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server may need more than Prefect's default 20 s to start on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level


METRIC_COLUMNS = (("n", "n"), ("accuracy", "accuracy"), ("precision", "P"), ("recall", "R"), ("f1", "F1"),
                  ("invalid_rate", "invalid rate"), ("baseline_majority_accuracy", "majority accuracy"),
                  ("baseline_majority_f1", "majority F1"))


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "–" if value is None else str(value)


def promotion_markdown(decision: dict) -> str:
    """A promotion decision of `morer1.registry.promote` as a markdown paragraph."""
    source = decision.get("candidates_model_name", decision["model_name"])  # decisions made before candidates existed
    return (f"Promotion of `{source}` version {decision['challenger_version']} into `{decision['model_name']}`: "
            f"**{decision['decision']}** — {decision['reason']} (champion before: "
            f"{_cell(decision['champion_version'])}, {decision['metric']} {_cell(decision['challenger_value'])} "
            f"vs {_cell(decision['champion_value'])}; {decision['rule']}).\n")


# --- what a run did, from the stages' own outputs: the console's closing summary and the artifact's stage table -----

HEADLINE_METRICS = ("dev_f1", "dev_f1_lo", "dev_f1_hi", "test_f1", "test_f1_lo", "test_f1_hi", "dev_accuracy",
                    "test_accuracy")


def _json(project: Path, path: str) -> dict | None:
    try:
        return json.loads((project / path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _interval(values: dict, key: str) -> str:
    """`0.672 [0.634, 0.717]`: a figure with its interval (`key_lo`, `key_hi`), or just the figure."""
    if values.get(f"{key}_lo") is None:
        return _num(values.get(key))
    return f"{_num(values.get(key))} [{_num(values[f'{key}_lo'])}, {_num(values[f'{key}_hi'])}]"


def _signed_interval(values: dict, key: str) -> str:
    return (f"{values[key]:+.3f} [{values[f'{key}_lo']:+.3f}, {values[f'{key}_hi']:+.3f}]"
            if values.get(f"{key}_lo") is not None else f"{values[key]:+.3f}")


def _gate(report: dict) -> str:
    summary = report["summary"]
    passed = summary["expectations"] - summary["failed"]
    return (f"{passed}/{summary['expectations']} expectations passed" if report.get("success")
            else f"{summary['failed']} of {summary['expectations']} expectations failed")


def _ingest(p: Path) -> list[str]:
    s = _json(p, "data/ingested/summary.json")
    facts = s["facts"]
    return [f"{sum(facts.values())} facts kept ({', '.join(f'{k} {v}' for k, v in facts.items())}), "
            f"{s['rejects']} rejected ({s['reject_fraction']:.2%})"]


def _synthesize(p: Path) -> list[str]:
    r = _json(p, "data/sft/report.json")
    kept = ", ".join(f"{split} {s['kept']}/{s['requested']}" for split, s in r["splits"].items())
    rejected = sum(sum(s["rejected"].values()) for s in r["splits"].values())
    return [f"rationales kept {kept} ({r['teacher']} teacher, {r['prompt']} prompt), {rejected} rejected"]


def _sft(p: Path) -> list[str]:
    s = _json(p, "models/sft/sft_summary.json")
    line = (f"{s['steps']} steps, loss {_num(s['first_logged_loss'])} → {_num(s['last_logged_loss'])}, "
            f"{s['train_samples']} samples ({s['dropped_overlong']} dropped as overlong)")
    if s.get("dev_sample_f1") is not None:
        line += f", dev-sample F1 {_num(s['dev_sample_f1'])}"
    if s.get("longest_rationale_tokens"):
        line += f", longest rationale {s['longest_rationale_tokens']} tokens"
    return [line]


def _difficulty(p: Path) -> list[str]:
    s = _json(p, "data/difficulty/difficulty_summary.json")
    return [f"{s['facts']} facts: {s['solved']} solved, {s['learnable']} learnable, {s['hard']} hard "
            f"(mean pass rate {_num(s['mean_pass_rate'], 2)})"]


def _curriculum(p: Path) -> list[str]:
    s = _json(p, "data/curriculum/plan.json")
    return [f"{s['total']} prompts, {s['mode']}" + (f", {len(s['warnings'])} warnings" if s.get("warnings") else "")]


def _grpo(p: Path) -> list[str]:
    s = _json(p, "models/grpo/grpo_summary.json")
    return [f"{s['steps']} steps, reward {_num(s['reward_first'])} → {_num(s['reward_last'])}"]


def _evaluate(p: Path) -> list[str]:
    m = _json(p, "reports/eval/metrics.json")
    chosen = (_json(p, "reports/eval/chosen.json") or {}).get("model_dir")
    lines = [f"{name}: dev F1 {_interval(c, 'dev_f1')}, test F1 {_interval(c, 'test_f1')}"
             for name, c in (m.get("candidates") or {}).items()]
    for name, c in (m.get("comparisons") or {}).items():
        if "dev" in c and "delta_f1" in c["dev"]:
            lines.append(f"{name.replace('_vs_', ' − ')}: dev ΔF1 {_signed_interval(c['dev'], 'delta_f1')}")
    if not lines:  # an evaluation of one model without candidates
        lines = [f"dev F1 {_interval(m['dev'], 'f1')}, test F1 {_interval(m['test'], 'f1')}"]
    if chosen:
        lines[0] = f"chosen {chosen}; " + lines[0]
    return lines


def _register(p: Path) -> list[str]:
    r = _json(p, "reports/registry/registered.json")
    d = r["promotion"]
    line = f"{r['model_name']} version {r['version']} (challenger); {d['decision']}: {d['reason']}"
    return [line + (f"; champion: {d['model_name']} version {d['served_version']}" if d.get("served_version") else "")]


def _flywheel(p: Path) -> list[str]:
    r = _json(p, "data/flywheel/report.json")
    if not r["enabled"]:
        return ["off (flywheel.enabled)"]
    return [f"{r['blind_spots']} blind spots in {r['facts']} facts, {r['sent']} sent, {r['usable']} usable"]


# stage -> its facts, from the outputs its command writes in dvc.yaml (lines: the first, then continuations)
STAGE_FACTS = {
    "ingest": _ingest,
    "validate_facts": lambda p: [_gate(_json(p, "data/validation/facts/report.json"))],
    "synthesize": _synthesize,
    "validate_sft": lambda p: [_gate(_json(p, "data/validation/sft/report.json"))],
    "sft": _sft,
    "difficulty": _difficulty,
    "curriculum": _curriculum,
    "grpo": _grpo,
    "evaluate": _evaluate,
    "validate_predictions": lambda p: [_gate(_json(p, "data/validation/predictions/report.json"))],
    "register": _register,
    "flywheel": _flywheel,
}


def stage_facts(project_dir: str | Path, stage: str) -> list[str]:
    """What `stage`'s outputs in the workspace say, in lines (none when the stage has no summary or its output is
    missing or of another shape)."""
    try:
        return STAGE_FACTS[stage](Path(project_dir)) if stage in STAGE_FACTS else []
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError):
        return []


def champion_metrics(project_dir: str | Path) -> dict | None:
    """The served model's headline figures (`HEADLINE_METRICS`): those of the chosen model when the last registration
    made it champion (or it already was), else the champion version's registry tags (`served_version` of the
    decision); None when there is no champion or the registry cannot say."""
    project = Path(project_dir)
    registered, chosen = _json(project, "reports/registry/registered.json"), _json(project, "reports/eval/chosen.json")
    if not registered:
        return None
    decision = registered.get("promotion") or {}
    version, model = decision.get("served_version"), decision.get("model_name")
    if version is None:
        return None
    metrics = None
    if decision.get("decision") in ("promoted", "already_champion") and chosen:
        metrics = chosen.get("metrics") or {}
    else:
        try:
            from mlflow import MlflowClient

            tags = MlflowClient().get_model_version(model, version).tags
            metrics = {k: float(tags[k]) for k in HEADLINE_METRICS if k in tags}
        except Exception:  # noqa: BLE001 - no registry here, or the version is gone: nothing to report
            return None
    figures = {k: float(metrics[k]) for k in HEADLINE_METRICS if isinstance(metrics.get(k), (int, float))}
    return {"model_name": model, "version": str(version), "metrics": figures} if figures else None


def _champion_line(champion: dict, word: str = "champion", quote: str = "") -> str:
    """`champion <model> version <n>: dev F1 … [lo, hi], test F1 …` (`champion_metrics`' figures), the model's name
    between `quote`s."""
    m = champion["metrics"]
    return (f"{word} {quote}{champion['model_name']}{quote} version {champion['version']}: "
            f"dev F1 {_interval(m, 'dev_f1')}, test F1 {_interval(m, 'test_f1')}")


def headline_lines(project_dir: str | Path, champion: dict | None = None) -> list[str]:
    """The current headline: the champion and its figures, and the last promotion decision."""
    project = Path(project_dir)
    lines = []
    if champion:
        lines.append(_champion_line(champion))
    registered = _json(project, "reports/registry/registered.json")
    if registered and registered.get("promotion"):
        d = registered["promotion"]
        lines.append(f"last promotion decision on {registered['model_name']} version {registered['version']}: "
                     f"{d['decision']}: {d['reason']}")
    return lines


def run_summary(project_dir: str | Path, results: list[dict], champion: dict | None = None,
                dvc_experiment: dict | None = None) -> list[str]:
    """The closing summary of a pipeline run: one line per stage (status, seconds, what its outputs say), then the
    headline; a run that ran nothing says "nothing changed" and gives the headline only. For a profile run the
    outputs are in the DVC experiment, not the workspace: the stages and the experiment only."""
    ran = [r for r in results if r["status"] == "ran"]
    failed = [r for r in results if r["status"] == "failed"]
    if dvc_experiment:
        return ([f"morer1 pipeline: profile {dvc_experiment['profile']} as DVC experiment "
                 f"{dvc_experiment['experiment']}: {len(ran)} stages differ from the workspace"]
                + [f"  {r['stage']:<15}{r['status']}" for r in results])
    if not ran and not failed:
        return [f"morer1 pipeline: nothing changed: all {len(results)} stages are up to date"] + [
            f"  {line}" for line in headline_lines(project_dir, champion)]
    lines = [f"morer1 pipeline: {len(ran)} stages ran, {len(results) - len(ran) - len(failed)} up to date"
             + (f", {failed[0]['stage']} failed" if failed else "")]
    width = max([14, *(len(r["stage"]) for r in results)]) + 1
    for r in results:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        facts = [] if r["status"] == "failed" else stage_facts(project_dir, r["stage"])
        status = "up to date" if r["status"] == "skipped" else r["status"]
        lines.append(f"  {r['stage']:<{width}}{status:<11}{seconds:>7}  {facts[0] if facts else ''}".rstrip())
        lines += [f"  {'':<{width}}{'':<11}{'':>7}  {more}" for more in facts[1:]]
    if not failed:
        lines += [f"  {line}" for line in headline_lines(project_dir, champion)[:1]]
    return lines


def summary_markdown(project_dir: str | Path, results: list[dict], run_id: str, experiment_id: str,
                     dvc_experiment: dict | None = None, champion: dict | None = None) -> str:
    """The pipeline summary: MLflow run, stage table (with what each stage's outputs say, `stage_facts`), the
    champion's headline figures (`champion_metrics`), and the outputs of `evaluate` (`reports/eval/metrics.json`)
    and `register` (`reports/registry/registered.json`) when those stages succeeded in `results`. A run that ran
    nothing says so first.

    For a profile run (`dvc_experiment`: its name, profile, rev), the outputs are in the experiment, not in the
    workspace: the summary names the experiment instead of reading the workspace's reports.
    """
    project = Path(project_dir)
    done = {r["stage"] for r in results if r["status"] in ("ran", "skipped")}

    def facts(r: dict) -> str:
        return "" if dvc_experiment or r["status"] == "failed" else "<br>".join(stage_facts(project, r["stage"]))

    rows = "".join(f"| {r['stage']} | {r['status']} | {'–' if r['seconds'] is None else r['seconds']} | {facts(r)} |\n"
                   for r in results)
    text = f"# morer1 pipeline\n\nMLflow run `{run_id}` (experiment `{experiment_id}`)\n\n"
    if not dvc_experiment and results and all(r["status"] == "skipped" for r in results):
        text += "**Nothing changed**: every stage is up to date.\n\n"
    if not dvc_experiment and champion:
        text += f"{_champion_line(champion, 'Champion', '`')}.\n\n"
    if dvc_experiment:
        name = dvc_experiment["experiment"]
        text += (f"Params profile `{dvc_experiment['profile']}`, run as DVC experiment `{name}`"
                 + (f" (`{dvc_experiment['rev'][:7]}`)" if dvc_experiment.get("rev") else "")
                 + f": `dvc exp show` compares it, `dvc exp apply {name}` brings its params and outputs into the "
                 "workspace. A stage `ran` when its dvc.lock entry differs from the workspace's.\n\n")
    text += f"| stage | status | seconds | outputs |\n|---|---|---|---|\n{rows}"
    if dvc_experiment:
        return text
    metrics_file = project / "reports" / "eval" / "metrics.json"
    if "evaluate" in done and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        head = " | ".join(title for _, title in METRIC_COLUMNS)
        rows = "".join(f"| {split} | " + " | ".join(_cell(metrics[split].get(key)) for key, _ in METRIC_COLUMNS)
                       + " |\n" for split in ("dev", "test") if split in metrics)
        text += f"\n## Evaluation\n\n| split | {head} |\n|---" + "|---" * len(METRIC_COLUMNS) + f"|\n{rows}"
    registered_file = project / "reports" / "registry" / "registered.json"
    if "register" in done and registered_file.is_file():
        registered = json.loads(registered_file.read_text(encoding="utf-8"))
        text += (f"\n## Registry\n\nRegistered `{registered['model_name']}` version {registered['version']} "
                 f"(alias `challenger`).\n\n" + promotion_markdown(registered["promotion"]))
    return text


def _main(argv: list[str] | None = None) -> int:
    """The helper process: `repro STAGE` or `exp-run NAME [--target S]... [--set-param K=V]...`, result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m morer1.orchestrate")
    parser.add_argument("--result", required=True, help="file to write the outcome to (JSON)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("repro").add_argument("stage")
    exp = sub.add_parser("exp-run")
    exp.add_argument("name")
    exp.add_argument("--target", action="append", default=[])
    exp.add_argument("--set-param", action="append", default=[])
    args = parser.parse_args(argv)
    action = ["repro", args.stage] if args.action == "repro" else ["exp-run", args.name, args.target, args.set_param]
    result = _helper(Path.cwd(), action)
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(_main())
