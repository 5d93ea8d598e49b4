"""Benchmark 4, training throughput: SFT samples/s and GRPO steps/s on the demo's tiny model (the fixture's data,
model and params.yaml settings), each stage's `run()` in its own process; for GRPO, the share of the training
time spent generating completions vs the rest (scoring, reference log-probs, backward, optimizer): the share vLLM
would take off the trainer on a GPU.

Throughput is the trainer's own `train_runtime` (model loading and saving excluded), read from the TrainOutput
of `Trainer.train`; generation time is the time inside `model.generate` (transformers' GenerationMixin.generate,
which TRL's GRPOTrainer calls without vLLM), wrapped in the child process. No checkpoint is written during the
measured steps (save_steps above max_steps) and SFT's dev-F1 curve is off, so the figures are of training alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import child_json, env, parser, report, table
from project import fixture


def child(kind: str, project: Path, steps: int) -> None:
    import os

    import transformers
    from transformers.generation.utils import GenerationMixin

    from morer1.params import load_section

    timing = {"generate_s": 0.0, "generate_calls": 0}
    original_generate = GenerationMixin.generate

    def timed_generate(self, *a, **kw):
        start = time.perf_counter()
        try:
            return original_generate(self, *a, **kw)
        finally:
            timing["generate_s"] += time.perf_counter() - start
            timing["generate_calls"] += 1

    GenerationMixin.generate = timed_generate
    captured = {}
    original_train = transformers.Trainer.train

    def train(self, *a, **kw):
        out = original_train(self, *a, **kw)
        captured.update(out.metrics, global_step=out.global_step,
                        batch=self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps)
        return out

    transformers.Trainer.train = train
    params = project / "params.yaml"  # run in the project folder: its paths are relative to it
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MORER1_STATE_DIR"] = str(Path(tmp) / "state")
        common = dict(max_steps=steps, save_steps=steps + 1000, checkpoint_dir=str(Path(tmp) / "ckpt"),
                      logging_steps=max(1, steps // 4))
        if kind == "sft":
            from morer1.sft import SFTConfig, run

            cfg = load_section("sft", SFTConfig, params, dev_f1_every=0, **common)  # model: models/tiny
            run(cfg, project / "data" / "sft", Path(tmp) / "out")
        else:
            from morer1.grpo import GRPOConfig, run
            from morer1.rollout import RolloutConfig

            cfg = load_section("grpo", GRPOConfig, params, **common)
            rollout = load_section("rollout", RolloutConfig, params)  # model: models/sft
            run(cfg, rollout, project / "data" / "ingested", project / "data" / "curriculum", Path(tmp) / "out")
            captured["num_generations"] = rollout.num_generations
            captured["max_completion_length"] = rollout.max_completion_length
    print("RESULT " + json.dumps({**captured, **timing}), flush=True)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sft-steps", type=int, default=None, help="default 200, quick 4")
    p.add_argument("--grpo-steps", type=int, default=None, help="default 20, quick 2")
    p.add_argument("--child", choices=("sft", "grpo"), help=argparse_hide())
    p.add_argument("--project", help=argparse_hide())
    p.add_argument("--steps", type=int, help=argparse_hide())
    args = p.parse_args()
    if args.child:
        child(args.child, Path(args.project), args.steps)
        return
    sft_steps = args.sft_steps or (4 if args.quick else 200)
    grpo_steps = args.grpo_steps or (2 if args.quick else 20)
    project = fixture(args.quick)
    out = {}
    for kind, steps in (("sft", sft_steps), ("grpo", grpo_steps)):
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--project", str(project), "--steps",
                               str(steps)], cwd=project, env=env(), capture_output=True, text=True)
        out[kind] = child_json(proc)
    sft, grpo = out["sft"], out["grpo"]
    sft_rate = sft["global_step"] * sft["batch"] / sft["train_runtime"]
    grpo_rate = grpo["global_step"] / grpo["train_runtime"]
    gen_share = grpo["generate_s"] / grpo["train_runtime"]
    figures = {"sft_samples_per_s": sft_rate, "sft_steps_per_s": sft["global_step"] / sft["train_runtime"],
               "grpo_steps_per_s": grpo_rate,
               "grpo_completions_per_s": grpo["global_step"] * grpo["batch"] / grpo["train_runtime"],
               "grpo_generate_share": gen_share, "grpo_learn_share": 1 - gen_share}
    md = table(["stage", "steps", "batch", "train s", "samples/s", "steps/s", "generating", "the rest"],
               [["SFT", sft["global_step"], sft["batch"], sft["train_runtime"], sft_rate,
                 figures["sft_steps_per_s"], "", ""],
                ["GRPO", grpo["global_step"], grpo["batch"], grpo["train_runtime"], figures["grpo_completions_per_s"],
                 grpo_rate, f"{gen_share:.0%}", f"{1 - gen_share:.0%}"]])
    notes = [f"GRPO: {grpo['generate_calls']} generate calls, {grpo['generate_s']:.1f} s of {grpo['train_runtime']:.1f} s "
             f"(group size {grpo['num_generations']}, up to {grpo['max_completion_length']} new tokens); GRPO samples/s "
             "counts completions",
             "the rest = reward scoring, policy and reference log-probs, backward, optimizer step"]
    report("training", "Training throughput (SFT, GRPO) on the demo's tiny model", md,
           {"sizes": {"sft_steps": sft_steps, "grpo_steps": grpo_steps, "project": str(project)},
            "figures": figures, "runs": out}, args.quick, not args.no_mlflow, notes)


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
