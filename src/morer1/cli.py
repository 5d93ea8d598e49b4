"""The `morer1` command: one subcommand per pipeline stage, each calling that stage's entry function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morer1.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    BadInputError,
    GateFailedError,
)
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
    """Too few rationales (SynthesisError) and an unusable teacher endpoint (TeacherError) are BadInputErrors:
    one line, exit code 2. The report of a run that kept too few is still logged to its (failed) MLflow run."""
    from morer1 import tracking
    from morer1.synthesize import SynthesisError, SynthesizeConfig, log_to_mlflow, synthesize

    cfg = _config(args, "synthesize", SynthesizeConfig)
    with tracking.stage_run("synthesize", cfg):
        try:
            report = synthesize(Path(args.facts), Path(args.out), cfg)
        except SynthesisError as exc:
            if exc.report is not None:
                log_to_mlflow(exc.report, Path(args.out))
            raise
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
        summary = train_sft(Path(args.data), Path(args.out), cfg, Path(args.curves) if args.curves else None)
        if main_process:
            import mlflow

            mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if main_process:
        print(f"sft: {summary['steps']} steps, loss {summary['first_logged_loss']} -> {summary['last_logged_loss']}")


def cmd_difficulty(args) -> None:
    from morer1 import tracking
    from morer1.curriculum import (
        DifficultyConfig,
        estimate_difficulty,
        log_difficulty,
        write_difficulty,
    )
    from morer1.labels import read_labels

    cfg = _config(args, "difficulty", DifficultyConfig)
    labels = read_labels(Path(args.facts) / "labels.json")
    with tracking.stage_run("difficulty", cfg):
        rows = estimate_difficulty(Path(args.model), Path(args.facts), cfg, labels)
        summary = write_difficulty(rows, Path(args.out))
        log_difficulty(summary, Path(args.out))
    print(f"difficulty: {json.dumps({k: summary[k] for k in ('solved', 'learnable', 'hard')})}")


def cmd_curriculum(args) -> None:
    from morer1 import tracking
    from morer1.curriculum import (
        CurriculumConfig,
        build_stream,
        log_plan,
        read_difficulty,
        write_stream,
    )

    cfg = _config(args, "curriculum", CurriculumConfig)
    with tracking.stage_run("curriculum", cfg):
        stream, plan = build_stream(read_difficulty(Path(args.difficulty)), cfg)
        write_stream(stream, plan, Path(args.out))
        log_plan(plan, Path(args.out))
    print(f"curriculum ({cfg.mode}): {len(stream)} prompts -> {args.out}")


def cmd_grpo(args) -> None:
    from contextlib import nullcontext

    from accelerate import PartialState

    from morer1 import tracking
    from morer1.grpo import GRPOConfig, train_grpo

    cfg = _config(args, "grpo", GRPOConfig)
    main_process = PartialState().is_main_process
    with tracking.stage_run("grpo", cfg) if main_process else nullcontext():
        summary = train_grpo(Path(args.facts), Path(args.stream), Path(args.out), cfg,
                             Path(args.curves) if args.curves else None)
    if main_process:
        print(f"grpo: {summary['steps']} steps, reward {summary['reward_first']} -> {summary['reward_last']}")


def cmd_evaluate(args) -> None:
    from morer1 import tracking
    from morer1.evaluate import EvaluateConfig, evaluate, log_to_mlflow

    cfg = _config(args, "evaluate", EvaluateConfig)
    with tracking.stage_run("evaluate", cfg):
        summary = evaluate(Path(args.facts), Path(args.out), cfg)
        log_to_mlflow(summary, Path(args.out))
    dev, test = summary["results"]["dev"], summary["results"]["test"]
    base = test["baselines"]["majority"]
    for model, dev_value in summary["selection"]["dev"].items():
        print(f"{model}: dev F1 {dev_value:.4f}, test F1 {summary['selection']['test'][model]:.4f}")
    print(f"chosen on dev: {summary['selection']['chosen']}; dev F1 {dev['f1']:.4f}; test F1 {test['f1']:.4f}, "
          f"accuracy {test['accuracy']:.4f} (majority baseline: F1 {base['f1']:.4f}, accuracy {base['accuracy']:.4f})")


def cmd_register(args) -> None:
    from morer1 import tracking
    from morer1.registry import RegisterConfig, promote, register_model

    cfg = _config(args, "register", RegisterConfig)
    eval_dir = Path(args.eval)
    selection = json.loads((eval_dir / "selection.json").read_text())
    flat = json.loads((eval_dir / "metrics.json").read_text())
    metrics = {f"{split}_{k}": v for split in ("dev", "test") for k, v in flat[split].items()
               if not k.startswith(("baseline_", "by_case_"))}
    with tracking.stage_run("register", cfg):
        import mlflow

        version = register_model(selection["chosen"], Path(args.facts) / "labels.json", cfg, metrics,
                                 {"model_dir": selection["chosen"]})
        decision = promote(cfg)
        mlflow.log_dict(decision, "promotion.json")
        mlflow.set_tags({"morer1.registered_version": version.version, "morer1.promotion": decision["decision"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "registered.json").write_text(json.dumps({"model_name": cfg.model_name, "version": str(version.version),
                                                     "promotion": decision}, indent=1) + "\n")
    print(f"registered {cfg.model_name} version {version.version} as challenger; {decision['decision']}: "
          f"{decision['reason']}")


def cmd_promote(args) -> None:
    from morer1.registry import RegisterConfig, promote

    decision = promote(_config(args, "register", RegisterConfig))
    print(f"{decision['decision']}: {decision['reason']}")


def cmd_predict(args) -> None:
    from morer1.predict import predict_jsonl, predict_one

    if args.jsonl:
        if not args.output:
            raise BadInputError("--jsonl needs --output")
        n = predict_jsonl(args.model, args.jsonl, args.output)
        print(f"{n} predictions -> {args.output}")
        return
    missing = [name for name in ("image", "title", "entity", "box") if getattr(args, name) is None]
    if missing:
        raise BadInputError(f"missing --{', --'.join(missing)} (or use --jsonl)")
    result = predict_one(args.model, args.image, args.title, args.entity, args.box)
    print(f"label: {result['label']}\nrationale: {result['rationale']}")


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
    p.add_argument("--curves", help="folder for the loss and dev-F1 curves (CSV and PNG)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("difficulty", help="pass rate of each training fact over k rollouts of the SFT model")
    p.add_argument("--model", required=True, help="model folder (the SFT checkpoint)")
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--out", required=True, help="folder for difficulty.jsonl and its summary")
    p.set_defaults(func=cmd_difficulty)

    p = sub.add_parser("curriculum", help="order the RL samples by Progressive Sample-Mixing (or uniformly)")
    p.add_argument("--difficulty", required=True, help="folder written by `morer1 difficulty`")
    p.add_argument("--out", required=True, help="folder for stream.jsonl and plan.json")
    p.set_defaults(func=cmd_curriculum)

    p = sub.add_parser("grpo", help="GRPO on the curriculum stream (run under `accelerate launch`)")
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--stream", required=True, help="folder written by `morer1 curriculum`")
    p.add_argument("--out", required=True, help="folder for the trained model and processor")
    p.add_argument("--curves", help="folder for the reward and per-phase curves (CSV and PNG)")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("evaluate", help="score candidate models on dev, the chosen one on test; metrics and report")
    p.add_argument("--facts", required=True, help="ingested facts folder")
    p.add_argument("--out", required=True, help="folder for metrics, plots, predictions and the report")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register the chosen model as challenger and run the promotion gate")
    p.add_argument("--facts", required=True, help="ingested facts folder (for labels.json)")
    p.add_argument("--eval", required=True, help="folder written by `morer1 evaluate`")
    p.add_argument("--out", required=True, help="folder for registered.json")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move alias champion to the challenger if it beats the champion on dev")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="label and rationale for one input, or a JSONL batch")
    p.add_argument("--model", default="models:/morer1@champion", help="model URI or folder (default: the champion)")
    p.add_argument("--image", help="image file (or base64 bytes)")
    p.add_argument("--title", help="news title")
    p.add_argument("--entity", help="target entity as written in the title")
    p.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="object box in pixels")
    p.add_argument("--jsonl", help="batch mode: one input per line with image, title, entity, box")
    p.add_argument("--output", help="batch mode: where to write the predictions")
    p.set_defaults(func=cmd_predict)
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
