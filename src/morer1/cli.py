"""The `morer1` command: one subcommand per pipeline stage, each calling that stage's entry function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morer1.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, BadInputError, GateFailedError
from morer1.params import StageConfig, load_section



def _config(args, section: str, model: type[StageConfig], **overrides) -> StageConfig:
    """Section of the params file, or the defaults when the default params file is absent."""
    path = Path(args.params)
    if not path.exists() and args.params == "params.yaml":
        path = None
    return load_section(section, model, path, **overrides)


def cmd_demo_data(args) -> None:
    from morer1 import tracking
    from morer1.demo_data import DemoDataConfig, generate_demo

    cfg = _config(args, "demo_data", DemoDataConfig, seed=args.seed)
    with tracking.stage_run("demo_data", cfg) as _:
        summary = generate_demo(Path(args.out), cfg)
        import mlflow

        mlflow.log_metrics({f"facts_{split}": n for split, n in summary["facts"].items()})
    print(json.dumps(summary["facts"]))


def cmd_ingest(args) -> None:
    from morer1 import tracking
    from morer1.ingest import IngestConfig, ingest, log_to_mlflow, report_rejects

    cfg = _config(args, "ingest", IngestConfig, source=args.source, max_reject_fraction=args.max_reject_fraction)
    with tracking.stage_run("ingest", cfg):
        try:
            summary = ingest(cfg.source, args.output, cfg)
        finally:
            report_rejects(args.output)
        log_to_mlflow(summary, args.output)
    print(f"ingested {summary['facts']} facts, {summary['rejects']} rejected "
          f"({summary['reject_fraction']:.2%}) -> {args.output}")


def cmd_validate(args) -> None:
    from morer1 import tracking
    from morer1.validate import ValidateConfig, log_to_mlflow, validate_data

    cfg = _config(args, "validate", ValidateConfig)
    with tracking.stage_run("validate", cfg):
        try:
            report = validate_data(Path(args.facts), Path(args.out), cfg, Path(args.sft) if args.sft else None)
        finally:
            log_to_mlflow(Path(args.out))
    print(f"validation passed: {report['summary']} -> {args.out}")


def cmd_synthesize(args) -> None:
    from morer1 import tracking
    from morer1.synthesize import SynthesizeConfig, log_to_mlflow, synthesize

    cfg = _config(args, "synthesize", SynthesizeConfig)
    with tracking.stage_run("synthesize", cfg):
        report = synthesize(Path(args.facts), Path(args.out), cfg)
        log_to_mlflow(report, Path(args.out))
    print(json.dumps({split: (s["kept"], s["requested"]) for split, s in report["splits"].items()}))


def cmd_tiny_model(args) -> None:
    from morer1 import tracking
    from morer1.tiny_model import TinyModelConfig, build_tiny_model, sft_corpus

    cfg = _config(args, "tiny_model", TinyModelConfig)
    with tracking.stage_run("tiny_model", cfg):
        summary = build_tiny_model(Path(args.out), sft_corpus(Path(args.corpus)), cfg)
        import mlflow

        mlflow.log_metrics({"parameters": summary["parameters"], "vocab_size": summary["vocab_size"]})
    print(f"tiny model: {summary['parameters']} parameters, vocabulary {summary['vocab_size']} -> {args.out}")


def cmd_sft(args) -> None:
    from contextlib import nullcontext

    from accelerate import PartialState

    from morer1 import tracking
    from morer1.sft import SFTConfig, train_sft

    cfg = _config(args, "sft", SFTConfig)
    main_process = PartialState().is_main_process
    with tracking.stage_run("sft", cfg) if main_process else nullcontext():
        summary = train_sft(Path(args.data), Path(args.out), cfg)
        if main_process:
            import mlflow

            mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if main_process:
        print(f"sft: {summary['steps']} steps, loss {summary['first_logged_loss']} -> {summary['last_logged_loss']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="morer1", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml if present)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write the synthetic demo dataset in the official MORE layout")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, help="override demo_data.seed")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("ingest", help="read a MORE-layout folder into clean JSONL facts, crops and rejects")
    p.add_argument("--source", help="MORE-layout folder (default: ingest.source)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--max-reject-fraction", type=float, help="override ingest.max_reject_fraction")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate", help="gate the ingested facts (and the SFT set) with the Great Expectations suites")
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--sft", help="SFT set folder to gate with the `sft` suite as well")
    p.add_argument("--out", required=True, help="folder for report.json and Data Docs")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("synthesize", help="write six-step rationales with the teacher and filter them into the SFT set")
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--out", required=True, help="folder for the SFT set and report.json")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("tiny-model", help="build the tiny Qwen2.5-VL of the embedded default")
    p.add_argument("--corpus", required=True, help="SFT set folder whose texts train the tokenizer")
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("sft", help="supervised fine-tuning on the SFT set (run under `accelerate launch`)")
    p.add_argument("--data", required=True, help="SFT set folder (train.jsonl, optional dev.jsonl)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model and processor")
    p.set_defaults(func=cmd_sft)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BadInputError as exc:
        print(f"morer1 {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except GateFailedError as exc:
        print(f"morer1 {args.command}: validation failed:\n{exc}", file=sys.stderr)
        sys.exit(EXIT_GATE_FAILED)


if __name__ == "__main__":
    main()
