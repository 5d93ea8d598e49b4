"""SFT stage: cold-start supervised fine-tuning on the synthesised rationales with TRL's SFTTrainer.

Runs inside `accelerate launch` (`morer1.training`: checkpoints, resume, LoRA, saving). Loss is on the assistant
turn only; samples longer than `max_length` are dropped, never truncated (truncation would cut image tokens).
The image bounds `min_pixels`/`max_pixels` are set on the processor saved with the model, so every later stage
(difficulty, GRPO, evaluation, serving) sizes images the same way. Before a trainer is built, the preflight
(`morer1.preflight`) checks that the SFT set fits `max_length`, that its completions fit every generation cap, and
that processor and model agree on the image tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import read_jsonl
from morer1.preflight import check_sft, generation_caps
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


class SFTConfig(TrainingSettings):
    """Parameters of the SFT stage."""

    model: str = Field("models/tiny", description="Base model folder: the tiny model, or a local Qwen2.5-VL checkpoint.")
    max_length: int = Field(1024, ge=16, description="Samples with more tokens (images included) are dropped.")
    dev_f1_every: int = Field(
        ..., ge=0, description="Score greedy answers on a dev sample every this many steps and at the end (0: never).")
    dev_f1_samples: int = Field(64, ge=1, description="Size of that dev sample (the first rows of the SFT dev set).")
    dev_f1_max_new_tokens: int = Field(..., ge=1, description="Longest answer generated for that dev sample.")
    min_pixels: int | None = Field(
        None, ge=1, description="Smaller images are upscaled to at least this many pixels (None: the base processor's "
                                "own); saved with the model's processor, so every later stage uses it.")
    max_pixels: int | None = Field(
        None, ge=1, description="Larger images are downscaled to at most this many pixels (None: the base "
                                "processor's own, 12.8 M for Qwen2.5-VL: thousands of image tokens for a large "
                                "photo); saved with the model's processor. One image token is 28 x 28 pixels.")
    max_dropped_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Preflight: fail before training when more than this share of the "
                                          "training samples is longer than max_length (dropped); all dropped always fails.")
    generation_caps_check: Literal["fail", "warn"] = Field(
        "fail", description="Preflight: a generation cap (rollout.max_completion_length, evaluate.max_new_tokens, "
                            "sft.dev_f1_max_new_tokens, register.max_new_tokens) below the longest SFT rationale "
                            "fails the stage before training (warn: only logged).")

    @model_validator(mode="after")
    def _check_pixels(self) -> SFTConfig:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must be <= max_pixels")
        return self


def to_dataset(rows: list[dict]):
    """A datasets.Dataset with `messages` and `images` (paths decoded to PIL images on access)."""
    import datasets

    ds = datasets.Dataset.from_list([{"messages": r["messages"], "images": r["images"]} for r in rows])
    return ds.cast_column("images", datasets.List(datasets.Image()))


def supplement_rows(supplement_dir: str | Path | None, data_dir: Path) -> list[dict]:
    """The flywheel's accepted rows (`supplement_dir/train.jsonl`, `morer1.flywheel`): none when the folder or the
    file is absent; BadInputError when they were written with another prompt template than the SFT set."""
    from morer1.prompt import model_prompt

    if supplement_dir is None or not (Path(supplement_dir) / "train.jsonl").is_file():
        return []
    rows = read_jsonl(Path(supplement_dir) / "train.jsonl")
    if rows and model_prompt(supplement_dir) != model_prompt(data_dir):
        raise BadInputError(f"{supplement_dir}: supplement written with prompt {model_prompt(supplement_dir)!r}, "
                            f"the SFT set {data_dir} with {model_prompt(data_dir)!r}")
    return rows


def run(cfg: SFTConfig, data_dir: str | Path, output: str | Path, curves_dir: str | Path | None = None,
        supplement_dir: str | Path | None = None, caps: dict[str, int] | None = None) -> dict:
    """Fine-tune `cfg.model` on `data_dir/train.jsonl` plus the flywheel supplement's rows in `supplement_dir`, if
    any (evaluated on `dev.jsonl` if present); save the model, its processor, the prompt template's name and
    `sft_summary.json` to `output`; write the loss and dev-F1 curves into `curves_dir` (`morer1.curves`) when given;
    log to the stage's MLflow run (main process); return the summary.

    Before the trainer is built, the preflight (`morer1.preflight.check_sft`) checks the SFT set against
    `cfg.max_length`, the image tokens against the model's vision tower, and the completions against the generation
    `caps` (params key -> tokens, `preflight.generation_caps`; None: SFT's own dev-curve cap only); PreflightError
    before anything is trained."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from morer1.curves import dev_f1_callback, log_curves, write_sft_curves
    from morer1.labels import read_labels
    from morer1.modeling import load_model_and_processor, set_pixel_bounds
    from morer1.prompt import model_prompt

    data_dir, output = Path(data_dir), Path(output)
    with main_process_run("sft", cfg) as main:
        model, processor = load_model_and_processor(cfg.model)
        set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
        train_path, dev_path = data_dir / "train.jsonl", data_dir / "dev.jsonl"
        extra = supplement_rows(supplement_dir, data_dir)
        extra_path = Path(supplement_dir) / "train.jsonl" if extra else None
        train = {train_path: read_jsonl(train_path), **({extra_path: extra} if extra else {})}
        dev = {dev_path: read_jsonl(dev_path)} if dev_path.exists() else {}
        if caps is None:
            caps = generation_caps(None, cfg.dev_f1_every, cfg.dev_f1_max_new_tokens)
        checked = check_sft(model, processor, train, dev, max_length=cfg.max_length,
                            max_dropped_fraction=cfg.max_dropped_fraction, caps=caps,
                            caps_check=cfg.generation_caps_check, check_images=main)
        extra_rows = checked.kept[extra_path] if extra else []
        train_rows, dropped = checked.kept[train_path] + extra_rows, checked.numbers["dropped_overlong"]
        dev_rows = checked.kept.get(dev_path, [])
        if not train_rows:
            raise BadInputError(f"preflight: {train_path} holds no training sample")

        data = [train_path.read_bytes()]
        if extra:  # without a supplement the job is the one it was before the flywheel existed
            data.append(extra_path.read_bytes())
        # the preflight's settings train nothing: a change of them resumes the same job
        job = fingerprint(cfg.model_dump(exclude={"max_dropped_fraction", "generation_caps_check"}), *data,
                          folder_signature(cfg.model))
        ckpt_dir, last = checkpoint_folder(cfg.checkpoint_dir, "sft", job)
        args = TRLSFTConfig(
            **cfg.trainer_arguments(ckpt_dir),
            per_device_eval_batch_size=cfg.per_device_train_batch_size,
            eval_strategy="epoch" if dev_rows else "no",
            max_length=None,  # overlong samples were dropped above; never truncate image tokens
            assistant_only_loss=True,
        )

        class ResumingSFTTrainer(StrictResumeMixin, SFTTrainer):
            pass

        callbacks = []
        if cfg.dev_f1_every and dev_rows:
            callbacks.append(dev_f1_callback(dev_rows[:cfg.dev_f1_samples], read_labels(data_dir / "labels.json"),
                                             cfg.dev_f1_every, max_new_tokens=cfg.dev_f1_max_new_tokens,
                                             batch_size=max(cfg.per_device_train_batch_size, 16)))
        trainer = ResumingSFTTrainer(
            model=apply_lora(model, cfg.lora, cfg.seed),
            args=args,
            train_dataset=to_dataset(train_rows),
            eval_dataset=to_dataset(dev_rows) if dev_rows else None,
            processing_class=processor,
            callbacks=callbacks,
        )
        resumed_run = tracking.link_resumed_run(ckpt_dir, last is not None) if main else None
        result = trainer.train(resume_from_checkpoint=last)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        points = callbacks[0].points if callbacks else []
        summary = {
            "train_samples": len(train_rows), "supplement_samples": len(extra_rows), "dropped_overlong": dropped,
            "dev_samples": len(dev_rows),
            "steps": trainer.state.global_step, "resumed_from": last, "resumed_run_id": resumed_run,
            "train_loss": result.training_loss,
            "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
            "dev_sample_f1": points[-1]["dev_f1"] if points else None,
            **{k: v for k, v in checked.numbers.items() if k != "dropped_overlong"},
        }
        # the model is asked the way its SFT set was written
        save_model(trainer, processor, output, prompt=model_prompt(data_dir), summary=summary,
                   summary_file="sft_summary.json")
        if main:
            if curves_dir is not None:
                log_curves(write_sft_curves(curves_dir, trainer.state.log_history, points))
            tracking.log_summary(summary)
    return summary
