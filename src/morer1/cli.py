"""The `morer1` command: one subcommand per pipeline stage, each calling that stage's entry function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morer1.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_TRANSIENT,
    BadInputError,
    GateFailedError,
    RegistryUnavailable,
    TrackingServerLost,
    record_exit,
)
from morer1.params import StageConfig, describe, load_section, read_params, section_config


def _config(args, section: str, model: type[StageConfig], **overrides) -> StageConfig:
    """Section `section` of the params file. Without the default params.yaml (a command run outside a project,
    e.g. `morer1 ingest` checking a release) the config's defaults, which cover every setting of some sections;
    params.yaml holds the rest."""
    path = Path(args.params)
    if not path.exists() and args.params == "params.yaml":
        path = None
    return load_section(section, model, path, **overrides)


PARAMS_HELP = "params file (default: params.yaml if present); before or after the command"


def params_argument(argv: list[str]) -> str:
    """The --params value of a command line wherever it stands (before or after the command; the last one wins),
    or params.yaml: what --help reads the values in effect from, before argparse has parsed anything."""
    found = "params.yaml"
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--params" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--params="):
            found = arg.split("=", 1)[1]
    return found


class StageParser(argparse.ArgumentParser):
    """A subcommand whose --help ends with the params it reads, from its configs' own field descriptions, each with
    the value in effect (from the --params file when it can be read, else the code's default). A subcommand that
    reads params also takes --params itself, so `morer1 ingest --params p.yaml` works as `morer1 --params p.yaml
    ingest` does."""

    params_file = "params.yaml"  # set by MorerParser from the command line before parsing

    def __init__(self, *args, sections: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.sections = sections
        if sections:  # SUPPRESS: absent here, the value given before the command (or its default) stays
            self.add_argument("--params", default=argparse.SUPPRESS, help=PARAMS_HELP)

    def format_help(self) -> str:
        if self.sections:  # the configs are imported only when help is asked for
            path, values, note = Path(self.params_file), None, ""
            try:
                values = read_params(path)
            except BadInputError as exc:  # missing or unreadable: the code's defaults
                note = f"; {exc}: the code's defaults shown"
            heading = f"section of --params {self.params_file}" + (", values in effect" if values is not None else "")
            self.epilog = "\n".join(
                f"params ({s} {heading}{note}):\n"
                f"{describe(section_config(s), s, None if values is None else values.get(s) or {}, str(path))}"
                for s in self.sections)
        return super().format_help()


class MorerParser(argparse.ArgumentParser):
    """The `morer1` parser: before parsing, tells the subcommands' help which params file is in effect and gives
    every subcommand a description."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        StageParser.params_file = params_argument(argv)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                describe_commands(action)
        return super().parse_known_args(argv, namespace)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("morer1")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_demo_data(args) -> None:
    from morer1.demo_data import DemoDataConfig, run

    summary = run(_config(args, "demo_data", DemoDataConfig, seed=args.seed), Path(args.out))
    print(json.dumps(summary["facts"]))


def cmd_ingest(args) -> None:
    """As a pipeline stage (under DVC or a flow) the run is logged to MLflow; on its own only with --track or
    MLFLOW_TRACKING_URI set (`tracking.standalone_tracked`)."""
    from morer1 import tracking
    from morer1.ingest import IngestConfig, run

    cfg = _config(args, "ingest", IngestConfig, source=args.source, max_reject_fraction=args.max_reject_fraction)
    track = tracking.standalone_tracked(args.track)
    summary = run(cfg, Path(args.output), track=track)
    print(f"ingested {summary['facts']} facts, {summary['rejects']} rejected "
          f"({summary['reject_fraction']:.2%}) -> {args.output}"
          + ("" if track else " (not logged to MLflow: --track or MLFLOW_TRACKING_URI logs a stand-alone run)"))


def cmd_validate_facts(args) -> None:
    from morer1.validate import ValidateConfig, run_facts

    summary = run_facts(_config(args, "validate", ValidateConfig), Path(args.facts), Path(args.out))
    print(f"facts gate passed: {summary['expectations']} expectations -> {args.out}")


def cmd_validate_sft(args) -> None:
    from morer1.validate import ValidateConfig, run_sft

    summary = run_sft(_config(args, "validate", ValidateConfig), Path(args.sft), Path(args.out))
    print(f"SFT gate passed: {summary['expectations']} expectations -> {args.out}")


def cmd_validate_predictions(args) -> None:
    from morer1.validate import ValidateConfig, run_predictions

    summary = run_predictions(_config(args, "validate", ValidateConfig), Path(args.eval), Path(args.out))
    print(f"predictions gate passed: {summary['expectations']} expectations -> {args.out}")


def cmd_synthesize(args) -> None:
    """Too few rationales (SynthesisError) and an unusable teacher endpoint (TeacherError) are BadInputErrors:
    one line, exit code 2."""
    from morer1.synthesize import SynthesizeConfig, run

    cfg = _config(args, "synthesize", SynthesizeConfig)
    budget = None
    # a paid teacher: the prompts are checked against the SFT stage's limits first (when the params file has them)
    if cfg.teacher == "openai" and Path(args.params).is_file() and read_params(args.params).get("sft"):
        from morer1.preflight import PromptBudget
        from morer1.sft import SFTConfig

        sft = _config(args, "sft", SFTConfig)
        budget = PromptBudget(sft.model, sft.max_length, sft.max_dropped_fraction, sft.min_pixels, sft.max_pixels)
    report = run(cfg, Path(args.facts), Path(args.out), budget)
    print(json.dumps({split: (s["kept"], s["requested"]) for split, s in report["splits"].items()}))


def cmd_tiny_model(args) -> None:
    from morer1.tiny_model import TinyModelConfig, run

    summary = run(_config(args, "tiny_model", TinyModelConfig), Path(args.corpus), Path(args.out))
    print(f"tiny model: {summary['parameters']} parameters, vocabulary {summary['vocab_size']} -> {args.out}")


def cmd_sft(args) -> None:
    from accelerate import PartialState

    from morer1.preflight import generation_caps
    from morer1.sft import SFTConfig, run

    cfg = _config(args, "sft", SFTConfig)
    # the preflight checks the SFT set against every generation cap, those of other sections included
    caps = generation_caps(args.params, cfg.dev_f1_every, cfg.dev_f1_max_new_tokens)
    summary = run(cfg, Path(args.data), Path(args.out), Path(args.curves) if args.curves else None,
                  Path(args.supplement) if args.supplement else None, caps)
    if PartialState().is_main_process:
        print(f"sft: {summary['steps']} steps, loss {summary['first_logged_loss']} -> {summary['last_logged_loss']}")


def cmd_flywheel(args) -> None:
    from morer1.flywheel import FlywheelConfig, run
    from morer1.rollout import RolloutConfig
    from morer1.synthesize import SynthesizeConfig

    r = run(_config(args, "flywheel", FlywheelConfig), _config(args, "rollout", RolloutConfig),
            _config(args, "synthesize", SynthesizeConfig), Path(args.facts), Path(args.supplement), Path(args.out))
    print(f"flywheel: {r['blind_spots']} blind spots in {r['facts']} facts, {r['sent']} sent, {r['usable']} usable "
          f"-> {args.out}" if r["enabled"] else f"flywheel: disabled (flywheel.enabled) -> {args.out}")


def cmd_flywheel_accept(args) -> None:
    from morer1.flywheel import accept

    s = accept(Path(args.round), Path(args.out))
    if s["accepted"]:
        print(f"flywheel round accepted: {s['rows_added']} rows, supplement {s['supplement_rows']} rows "
              f"({s['rounds']} rounds) -> {args.out}")
    elif s["stale"]:
        print("round made against another state of the supplement (accepted already?): nothing accepted")
    else:
        print("no usable row in the round: nothing accepted")


def cmd_difficulty(args) -> None:
    from morer1.difficulty import DifficultyConfig, run
    from morer1.rollout import RolloutConfig

    summary = run(_config(args, "difficulty", DifficultyConfig), _config(args, "rollout", RolloutConfig),
                  Path(args.facts), Path(args.out))
    print(f"difficulty: {json.dumps({k: summary[k] for k in ('solved', 'learnable', 'hard')})}")


def cmd_curriculum(args) -> None:
    from morer1.curriculum import CurriculumConfig, run

    summary = run(_config(args, "curriculum", CurriculumConfig), Path(args.difficulty), Path(args.out))
    print(f"curriculum ({summary['mode']}): {summary['prompts']} prompts -> {args.out}")


def cmd_grpo(args) -> None:
    from accelerate import PartialState

    from morer1.grpo import GRPOConfig, run
    from morer1.rollout import RolloutConfig

    summary = run(_config(args, "grpo", GRPOConfig), _config(args, "rollout", RolloutConfig), Path(args.facts),
                  Path(args.stream), Path(args.out), Path(args.curves) if args.curves else None)
    if PartialState().is_main_process:
        print(f"grpo: {summary['steps']} steps, reward {summary['reward_first']} -> {summary['reward_last']}")


def cmd_evaluate(args) -> None:
    from morer1.evaluate import EvaluateConfig, run

    s = run(_config(args, "evaluate", EvaluateConfig), Path(args.facts), args.model, Path(args.out))
    scores = ", ".join(f"{name} {c['dev_f1']:.4f}/{c['test_f1']:.4f}" for name, c in s["candidates"].items())
    print(f"chosen on dev: {s['chosen']}; dev/test F1 {scores}; test accuracy {s['test_accuracy']:.4f} "
          f"(majority baseline {s['test_baseline_majority_accuracy']:.4f})")


def cmd_register(args) -> None:
    from morer1.registry import RegisterConfig, decision_line, run

    s = run(_config(args, "register", RegisterConfig), Path(args.chosen), Path(args.out))
    print(f"registered {s['model_name']} version {s['version']} ({s['model_dir']}) as challenger; "
          f"{decision_line(s['promotion'])}")


def cmd_promote(args) -> None:
    from morer1.registry import RegisterConfig, decision_line, promote

    print(decision_line(promote(_config(args, "register", RegisterConfig))))


def cmd_predict(args) -> None:
    from morer1.serve import predict_jsonl, predict_one

    params = {"samples": args.samples, "abstain_below": args.abstain_below}
    if args.jsonl:
        if not args.output:
            raise BadInputError("--jsonl needs --output")
        n = predict_jsonl(args.model, args.jsonl, args.output, allow_dirs=args.allow_dir, params=params)
        print(f"{n} predictions -> {args.output}")
        return
    missing = [name for name in ("image", "title", "entity", "box") if getattr(args, name) is None]
    if missing:
        raise BadInputError(f"missing --{', --'.join(missing)} (or use --jsonl)")
    result = predict_one(args.model, args.image, args.title, args.entity, args.box, allow_dirs=args.allow_dir,
                         params=params)
    print(f"label: {result['label']}\nconfidence: {result['confidence']:.2f}\nrationale: {result['rationale']}")


def cmd_ablate(args) -> None:
    from morer1.ablate import load_grid, rebuild_from_mlflow, run
    from morer1.orchestrate import PipelineLocked

    if args.from_mlflow:
        result = rebuild_from_mlflow(args.from_mlflow, Path(args.out))
    else:
        grid, cells = load_grid(args.grid, Path.cwd(), args.profile)
        try:
            result = run(grid, cells, Path.cwd(), Path(args.out), force=args.force, read_only=args.from_dvc)
        except PipelineLocked as exc:
            sys.exit(f"morer1 ablate: {exc}")
    print(result["markdown"])
    print(f"-> {', '.join(str(f) for f in result['files'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = MorerParser(prog="morer1", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
    parser.add_argument("--version", action="version", version=f"morer1 {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=StageParser)

    p = sub.add_parser("demo-data", help="write the synthetic demo dataset in the official MORE layout",
                       sections=("demo_data",))
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, help="override demo_data.seed")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("ingest", help="read a MORE-layout folder into clean JSONL facts, crops and rejects",
                       sections=("ingest",))
    p.add_argument("--source", help="MORE-layout folder (default: ingest.source)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--max-reject-fraction", type=float, help="override ingest.max_reject_fraction")
    p.add_argument("--track", action="store_true",
                   help="log this run to MLflow (the project's store, or MLFLOW_TRACKING_URI) also when run on its "
                        "own; as a pipeline stage (dvc repro, the flow) it always is, on its own it is not by default")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate-facts", help="gate the ingested facts with the `facts` Great Expectations suite",
                       sections=("validate",))
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--out", required=True, help="folder for report.json and Data Docs")
    p.set_defaults(func=cmd_validate_facts)

    p = sub.add_parser("synthesize", help="write six-step rationales with the teacher and filter them into the SFT set",
                       sections=("synthesize",))
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--out", required=True, help="folder for the SFT set and report.json")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("validate-sft", help="gate the SFT set with the `sft` Great Expectations suite",
                       sections=("validate",))
    p.add_argument("--sft", required=True, help="SFT set folder")
    p.add_argument("--out", required=True, help="folder for report.json and Data Docs")
    p.set_defaults(func=cmd_validate_sft)

    p = sub.add_parser("validate-predictions", help="gate the chosen model's dev predictions and metrics with the "
                                                    "`predictions` Great Expectations suite, before register",
                       sections=("validate",))
    p.add_argument("--eval", required=True, help="the evaluate stage's folder (predictions_dev.jsonl, metrics.json, "
                                                 "chosen.json)")
    p.add_argument("--out", required=True, help="folder for report.json and Data Docs")
    p.set_defaults(func=cmd_validate_predictions)

    p = sub.add_parser("tiny-model", help="build the tiny Qwen2.5-VL of the embedded default", sections=("tiny_model",))
    p.add_argument("--corpus", required=True, help="SFT set folder whose texts train the tokenizer")
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("sft", help="supervised fine-tuning on the SFT set (run under `accelerate launch`)",
                       sections=("sft",))
    p.add_argument("--data", required=True, help="SFT set folder (train.jsonl, optional dev.jsonl)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model and processor")
    p.add_argument("--curves", help="folder for the loss and dev-F1 curves (CSV and PNG)")
    p.add_argument("--supplement", help="accepted flywheel supplement folder (its train.jsonl rows are added; "
                                        "absent or empty: none)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("difficulty", help="pass rate of each training fact over k rollouts of rollout.model",
                       sections=("difficulty", "rollout"))
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--out", required=True, help="folder for difficulty.jsonl and its summary")
    p.set_defaults(func=cmd_difficulty)

    p = sub.add_parser("flywheel", help="the trained policy's blind spots (pass rate 0) back to the teacher: a round "
                                        "of SFT supplement rows", sections=("flywheel", "rollout", "synthesize"))
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--supplement", required=True, help="accepted supplement folder (its last round is measured again)")
    p.add_argument("--out", required=True, help="folder for the round (report.json, sent.jsonl, supplement/)")
    p.set_defaults(func=cmd_flywheel)

    p = sub.add_parser("flywheel-accept", help="add a flywheel round's usable rows to the supplement `sft` reads")
    p.add_argument("--round", required=True, help="folder written by `morer1 flywheel`")
    p.add_argument("--out", required=True, help="supplement folder (the sft stage's --supplement)")
    p.set_defaults(func=cmd_flywheel_accept)

    p = sub.add_parser("curriculum", help="order the RL samples by Progressive Sample-Mixing (or uniformly)",
                       sections=("curriculum",))
    p.add_argument("--difficulty", required=True, help="folder written by `morer1 difficulty`")
    p.add_argument("--out", required=True, help="folder for stream.jsonl and plan.json")
    p.set_defaults(func=cmd_curriculum)

    p = sub.add_parser("grpo", help="GRPO on the curriculum stream (run under `accelerate launch`)",
                       sections=("grpo", "rollout"))
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--stream", required=True, help="folder written by `morer1 curriculum`")
    p.add_argument("--out", required=True, help="folder for the trained model and processor")
    p.add_argument("--curves", help="folder for the reward and per-phase curves (CSV and PNG)")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("evaluate", help="score candidate models on dev and test, choose one on dev; metrics and report",
                       sections=("evaluate",))
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--model", required=True, action="append",
                   help="candidate model folder, repeated (ties on dev: the later one)")
    p.add_argument("--out", required=True, help="folder for metrics, plots, predictions, the report and chosen.json")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register the chosen model as challenger and run the promotion gate",
                       sections=("register",))
    p.add_argument("--chosen", required=True, help="chosen.json written by `morer1 evaluate`")
    p.add_argument("--out", required=True, help="folder for registered.json")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "promote", help="move alias champion to the challenger if it beats the champion on dev with confidence",
        description="Compare the challenger of register.candidates_model_name with the champion of "
                    "register.model_name on the same dev facts (paired by fact id; the champion re-scored on the "
                    "challenger's dev facts when it was scored on other data) and copy it in as champion when the "
                    "lower bound of the paired-bootstrap interval of the difference in register.metric is above "
                    "register.min_delta. Prints the decision in one line.",
        sections=("register",))
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="label and rationale for one input, or a JSONL batch")
    p.add_argument("--model", default="models:/morer1@champion", help="model URI or folder (default: the champion)")
    p.add_argument("--image", help="image file (or its bytes base64-encoded)")
    p.add_argument("--title", help="news title")
    p.add_argument("--entity", help="target entity as written in the title")
    p.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="object box in pixels")
    p.add_argument("--jsonl", help="batch mode: one input per line with image, title, entity, box")
    p.add_argument("--output", help="batch mode: where to write the predictions")
    p.add_argument("--allow-dir", action="append", metavar="DIR",
                   help="folder image files may lie in, after symlinks and .. are resolved (repeatable; default: "
                        "the folder of --image, or of --jsonl)")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="self-consistency: vote over K sampled completions per input (default 1: one greedy "
                        "completion); at most the model's max_samples")
    p.add_argument("--abstain-below", type=float, default=0.0, metavar="T",
                   help="answer none when the confidence (vote share) is below T (default 0: never)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ablate", help="the ablation grid: one DVC experiment per row and seed, one comparison table "
                                      "(docs/ablation.md)")
    p.add_argument("--grid", default="ablation.yaml", help="grid file (default: ablation.yaml)")
    p.add_argument("--profile", help="profiles/<name>.yaml under every cell, instead of the grid's `profile`")
    p.add_argument("--force", action="store_true", help="run every cell again (default: a cell whose experiment "
                                                        "exists on this commit is read, not run)")
    p.add_argument("--from-dvc", action="store_true", help="run nothing: the table from the cells' DVC experiments")
    p.add_argument("--from-mlflow", metavar="GRID", help="run nothing: the table of grid GRID from its MLflow runs")
    p.add_argument("--out", default="reports/ablation", help="folder for <grid>/table.md, table.csv, cells.csv")
    p.set_defaults(func=cmd_ablate)
    return parser


def describe_commands(sub) -> None:
    """Every subcommand's --help opens with a description: its own, else its one-line help from `morer1 --help`."""
    for action in sub._choices_actions:
        command = sub.choices[action.dest]
        if not command.description and action.help:
            command.description = action.help[0].upper() + action.help[1:] + "."


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BadInputError as exc:
        print(f"morer1 {args.command}: error: {exc}", file=sys.stderr)
        record_exit(EXIT_BAD_INPUT, str(exc))
        sys.exit(EXIT_BAD_INPUT)
    except GateFailedError as exc:
        print(f"morer1 {args.command}: validation failed:\n{exc}", file=sys.stderr)
        record_exit(EXIT_GATE_FAILED, str(exc))
        sys.exit(EXIT_GATE_FAILED)
    except RegistryUnavailable as exc:  # one line: the tracking URI tried and how to set another
        print(f"morer1 {args.command}: error: {exc}", file=sys.stderr)
        record_exit(EXIT_TRANSIENT, str(exc))
        sys.exit(EXIT_TRANSIENT)
    except TrackingServerLost as exc:  # one line, not the HTTP client's traceback; the orchestrator retries it
        print(f"morer1 {args.command}: error: TrackingServerLost: {exc}", file=sys.stderr)
        record_exit(EXIT_TRANSIENT, str(exc))
        sys.exit(EXIT_TRANSIENT)


if __name__ == "__main__":
    main()
