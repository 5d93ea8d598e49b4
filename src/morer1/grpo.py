"""GRPO stage: reinforcement learning from the SFT model with rule-based rewards, on the curriculum stream.

Runs inside `accelerate launch` (`morer1.training`: checkpoints, resume, LoRA, saving). The rollouts are drawn and
scored as the `rollout` section says, the same as the difficulty stage's (`morer1.rollout`). The training order
is the curriculum stream's order (`shuffle_dataset` off), so phases arrive as planned; resuming from a checkpoint
continues at the same data position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from morer1 import tracking
from morer1.files import read_jsonl
from morer1.prompt import DEFAULT_PROMPT
from morer1.rollout import PLAIN_SAMPLING, RolloutConfig, log_params
from morer1.training import (
    StrictResumeMixin,
    TrainingSettings,
    apply_lora,
    checkpoint_folder,
    fingerprint,
    folder_signature,
    main_process_run,
    save_model,
)


class GRPOConfig(TrainingSettings):
    """Parameters of the GRPO stage (its model, rollouts and rewards are the `rollout` section)."""

    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference (SFT) model; 0 drops the reference.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("grpo", description="TRL loss normalisation.")
    use_vllm: bool = Field(
        False, description="Generate with vLLM (GPU nodes only; vllm is in the `cluster` extra, `make cluster-install`).")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="vLLM in the training processes or a separate server.")
    completions_log_every: int = Field(10, ge=1, description="Log a table of completions to MLflow every this many steps.")


def rl_dataset(stream: list[dict], facts_dir: Path, labels: tuple[str, ...], prompt: str = DEFAULT_PROMPT):
    """The stream as a datasets.Dataset, in stream order: prompt turns (template `prompt`), the two images, the
    gold, phase and pool."""
    import datasets

    from morer1.prompt import fact_images, prompt_messages

    facts = {f["id"]: f for f in read_jsonl(facts_dir / "train.jsonl")}
    missing = [item["id"] for item in stream if item["id"] not in facts]
    if missing:
        raise ValueError(f"curriculum stream names facts missing from {facts_dir / 'train.jsonl'}: {missing[:5]}")
    rows = [{"id": item["id"], "prompt": prompt_messages(facts[item["id"]], labels, prompt),
             "images": fact_images(facts[item["id"]], facts_dir), "relation": facts[item["id"]]["relation"],
             "phase": item["phase"], "pool": item["pool"]} for item in stream]
    return datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))


def make_trainer_class():
    """GRPOTrainer that records the curriculum position of each step, logs completion tables to MLflow, and resumes
    the checkpoint's weights for real (StrictResumeMixin)."""
    from trl import GRPOTrainer

    class CurriculumGRPOTrainer(StrictResumeMixin, GRPOTrainer):
        completions_log_every = 10

        def _generate_and_score_completions(self, inputs):
            mode = "train" if self.model.training else "eval"
            if mode == "train":
                phases = [x["phase"] for x in inputs]
                pools = [x["pool"] for x in inputs]
                self._metrics[mode]["curriculum/phase"].append(sum(phases) / len(phases))
                for pool in ("learnable", "hard", "solved"):
                    self._metrics[mode][f"curriculum/share_{pool}"].append(pools.count(pool) / len(pools))
                self.seen_ids.append([x["id"] for x in inputs])
            return super()._generate_and_score_completions(inputs)

        def log(self, logs, start_time=None):
            step = self.state.global_step
            if (self.accelerator.is_main_process and step and step % self.completions_log_every == 0
                    and self._logs["completion"] and "loss" in logs):
                log_completion_table(self._logs, step)
            super().log(logs, start_time)

    return CurriculumGRPOTrainer


def log_completion_table(logs, step: int) -> None:
    """A sample of the latest completions with their reward components and advantages, as an MLflow table."""
    import mlflow

    def text(message):
        return message if isinstance(message, str) else " ".join(str(m.get("content", "")) for m in message)

    table = {"step": [step] * len(logs["completion"]),
             "completion": [text(c) for c in logs["completion"]],
             "advantage": list(logs["advantages"])}
    table.update({f"reward_{name}": list(values) for name, values in logs["rewards"].items()})
    mlflow.log_table(table, artifact_file=f"completions/step_{step:06d}.json")


def run(cfg: GRPOConfig, rollout: RolloutConfig, facts_dir: str | Path, stream_dir: str | Path, output: str | Path,
        curves_dir: str | Path | None = None) -> dict:
    """Train `rollout.model` with GRPO on the curriculum stream of `stream_dir` (facts from `facts_dir`); save the
    model, its processor, the prompt template's name and `grpo_summary.json` to `output`; write the reward and
    per-phase curves into `curves_dir` (`morer1.curves`) when given; log to the stage's MLflow run (main process);
    return the summary."""
    from trl import GRPOConfig as TRLGRPOConfig

    from morer1.curves import log_curves, write_grpo_curves
    from morer1.labels import read_labels
    from morer1.modeling import load_model_and_processor
    from morer1.prompt import model_prompt
    from morer1.rewards import build_reward_funcs

    facts_dir, stream_dir, output = Path(facts_dir), Path(stream_dir), Path(output)
    with main_process_run("grpo", cfg) as main:
        if main:
            log_params(rollout)
        labels = read_labels(facts_dir / "labels.json")
        stream = read_jsonl(stream_dir / "stream.jsonl")
        prompt = model_prompt(rollout.model)
        dataset = rl_dataset(stream, facts_dir, labels, prompt)
        reward_funcs, weights = build_reward_funcs(rollout.rewards, labels)
        model, processor = load_model_and_processor(rollout.model)

        job = fingerprint(cfg.model_dump(), rollout.model_dump(), (stream_dir / "stream.jsonl").read_bytes(),
                          folder_signature(rollout.model))
        ckpt_dir, last = checkpoint_folder(cfg.checkpoint_dir, "grpo", job)
        args = TRLGRPOConfig(
            **cfg.trainer_arguments(ckpt_dir),
            num_generations=rollout.num_generations,
            temperature=rollout.temperature,
            max_completion_length=rollout.max_completion_length,
            **PLAIN_SAMPLING,
            repetition_penalty=1.0,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            reward_weights=weights,
            shuffle_dataset=False,  # the curriculum's order is the training order
            use_vllm=cfg.use_vllm,
            vllm_mode=cfg.vllm_mode,
        )
        trainer_class = make_trainer_class()
        trainer_class.completions_log_every = cfg.completions_log_every
        trainer = trainer_class(model=apply_lora(model, cfg.lora, cfg.seed), reward_funcs=reward_funcs, args=args,
                                train_dataset=dataset, processing_class=processor)
        trainer.seen_ids = []
        resumed_run = tracking.link_resumed_run(ckpt_dir, last is not None) if main else None
        trainer.train(resume_from_checkpoint=last)
        history = [e for e in trainer.state.log_history if "loss" in e]
        summary = {
            "steps": trainer.state.global_step, "resumed_from": last, "resumed_run_id": resumed_run,
            "stream_prompts": len(stream), "trained_ids": trainer.seen_ids,
            "reward_first": history[0].get("reward") if history else None,
            "reward_last": history[-1].get("reward") if history else None,
        }
        save_model(trainer, processor, output, prompt=prompt, summary=summary, summary_file="grpo_summary.json")
        if main:
            if curves_dir is not None:
                log_curves(write_grpo_curves(curves_dir, trainer.state.log_history))
            tracking.log_summary(summary)
    return summary
