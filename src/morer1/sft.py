"""SFT stage: cold-start supervised fine-tuning on the synthesised rationales with TRL's SFTTrainer.

Runs inside `accelerate launch` (one CPU process up to multi-node DeepSpeed, see infra/accelerate/).
Loss is on the assistant turn only; samples longer than `max_length` are dropped, never truncated
(truncation would cut image tokens). Checkpoints go to `checkpoint_dir` and a rerun with the same
inputs resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from pydantic import Field

from morer1.errors import BadInputError
from morer1.files import read_jsonl
from morer1.params import StageConfig

logger = logging.getLogger(__name__)


class LoraSettings(StageConfig):
    """peft LoRA adapter settings (merged into the saved model)."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), description="Names of the linear layers that get adapters.")


class TrainingSettings(StageConfig):
    """Optimisation settings shared by the SFT and GRPO stages."""

    accelerate_config: str = Field("infra/accelerate/cpu.yaml", description="accelerate config the stage launches with.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name: linear, cosine, constant, ...")
    warmup_steps: float = Field(
        0.0, ge=0, description="Warm-up: a number of steps, or below 1 a share of the total steps (0.05 = 5 %).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training set (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: int = Field(4, ge=1, description="Samples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    bf16: bool | None = Field(None, description="bf16 mixed precision (None: on when a CUDA GPU is present).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    logging_steps: int = Field(5, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints.")
    seed: int = Field(0, description="Training seed.")
    checkpoint_dir: str = Field(".state/checkpoints", description="Checkpoints live here, per stage; a rerun with the same inputs resumes.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Optional LoRA adapters.")

    def trainer_arguments(self, output_dir: Path) -> dict:
        """The TRL/transformers training arguments these settings give (both trainers take them)."""
        return dict(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            bf16=bf16_enabled(self.bf16),
            gradient_checkpointing=self.gradient_checkpointing,
            logging_steps=self.logging_steps,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            seed=self.seed,
            report_to=["mlflow"],
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=bf16_enabled(None),  # pinning only helps with a CUDA device
        )


class SFTConfig(TrainingSettings):
    """Parameters of the SFT stage."""

    model: str = Field("models/tiny", description="Base model folder: the tiny model, or a local Qwen2.5-VL checkpoint.")
    max_length: int = Field(1024, ge=16, description="Samples with more tokens (images included) are dropped.")
    dev_f1_every: int = Field(
        0, ge=0, description="Score greedy answers on a dev sample every this many steps and at the end (0: never).")
    dev_f1_samples: int = Field(64, ge=1, description="Size of that dev sample (the first rows of the SFT dev set).")
    dev_f1_max_new_tokens: int = Field(256, ge=1, description="Longest answer generated for that dev sample.")


def to_dataset(rows: list[dict]):
    """A datasets.Dataset with `messages` and `images` (paths decoded to PIL images on access)."""
    import datasets

    ds = datasets.Dataset.from_list([{"messages": r["messages"], "images": r["images"]} for r in rows])
    return ds.cast_column("images", datasets.List(datasets.Image()))


def sequence_length(processor, messages: list[dict], image_paths: list[str]) -> int:
    """Tokens of a full conversation with its images, as the model sees it: the text's tokens, each image
    placeholder counted as the image tokens the processor gives that image's size (read from the file header)."""
    from PIL import Image

    from morer1.modeling import image_token_count

    text = processor.apply_chat_template(messages, tokenize=False)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    n_image = 0
    for path in image_paths:
        with Image.open(path) as image:
            n_image += image_token_count(processor, *image.size) - 1  # the placeholder itself is one text token
    return n_text + n_image


def drop_overlong(rows: list[dict], processor, max_length: int) -> tuple[list[dict], int]:
    """Rows that fit in `max_length` tokens, and how many were dropped."""
    kept = [r for r in rows if sequence_length(processor, r["messages"], r["images"]) <= max_length]
    return kept, len(rows) - len(kept)


def fingerprint(*parts) -> str:
    """Short hash identifying a training job (config, data, base model), to know when resuming is safe."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def folder_signature(folder: str | Path) -> list:
    """Name, size and modification time of every file of a model folder: changes when the model is rewritten,
    without reading gigabytes of weights."""
    root = Path(folder)
    return sorted([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in root.rglob("*") if p.is_file())


def checkpoint_folder(root: str | Path, stage: str, job: str) -> tuple[Path, str | None]:
    """This job's checkpoint folder, and its last checkpoint when resuming; other jobs' checkpoints are cleared."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(root) / stage
    marker = folder / "JOB"
    if folder.exists() and (not marker.exists() or marker.read_text().strip() != job):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(job + "\n")
    return folder, get_last_checkpoint(str(folder))


class CheckpointMismatchError(BadInputError):
    """A checkpoint's weights do not fit the model being trained: resuming from it would train other weights."""


def _mismatch_error(checkpoint: Path, what: str, **problems: list[str]) -> CheckpointMismatchError:
    found = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {', '.join(sorted(keys)[:3])})"
                      for kind, keys in problems.items() if keys)
    return CheckpointMismatchError(
        f"{checkpoint}: its {what} do not match the model being trained: {found}. Resuming would train other "
        f"weights than the checkpoint's; delete {checkpoint.parent} to start this job over")


def _weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors file(s) of a full-model checkpoint: one file, or the shards its index names."""
    if (checkpoint / "model.safetensors").is_file():
        return [checkpoint / "model.safetensors"]
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return [checkpoint / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def _load_full_weights(model, checkpoint: Path) -> int:
    """Load a save_pretrained checkpoint into `model` through the model's own key mapping (the one from_pretrained
    applies), strictly: every weight of the model comes from the checkpoint, with its shape, and nothing is left over."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    files = _weight_files(checkpoint)
    if not files:
        raise CheckpointMismatchError(f"{checkpoint}: no model.safetensors (or index) to resume the weights from; "
                                      f"delete {checkpoint.parent} to start this job over")
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    target_of: dict[str, str] = {}  # checkpoint key -> model key
    unexpected, mismatched, not_renamable = [], [], []
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                target, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
                if target not in expected and key in expected:
                    target, converter = key, None
                shape = tuple(weights.get_slice(key).get_shape())
                if converter is not None:
                    not_renamable.append(key)
                elif target not in expected or target in target_of.values():
                    unexpected.append(key)
                elif shape != tuple(expected[target].shape):
                    mismatched.append(f"{target} {shape} vs {tuple(expected[target].shape)}")
                else:
                    target_of[key] = target
    loaded = set(target_of.values())
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight -> embed_tokens.weight
    missing = [k for k in expected if k not in loaded and not (k in tied and tied[k] in loaded)]
    if missing or unexpected or mismatched or not_renamable:
        raise _mismatch_error(checkpoint, "weights", missing_weights=missing, unexpected_weights=unexpected,
                              shape_mismatches=mismatched, weights_needing_a_conversion=not_renamable)
    for file in files:
        part = {target_of[k]: v for k, v in load_file(str(file)).items()}
        result = model.load_state_dict(part, strict=False)
        if result.unexpected_keys:
            raise _mismatch_error(checkpoint, "weights", unexpected_weights=result.unexpected_keys)
    return len(target_of)


def _load_adapter_weights(model, checkpoint: Path) -> int:
    """Load the LoRA adapters of a checkpoint into the peft `model` (peft maps the keys), strictly: every weight of
    every adapter comes from the checkpoint and nothing is left over. The active adapter is saved at the top of the
    checkpoint, others in a subfolder named after them (e.g. the frozen `ref` copy TRL's GRPO adds as reference)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    own_keys = model.state_dict().keys()
    loaded = 0
    for adapter in model.peft_config:
        folder = checkpoint if adapter == model.active_adapter else checkpoint / adapter
        if not (folder / "adapter_model.safetensors").is_file():
            raise CheckpointMismatchError(
                f"{checkpoint}: no {'' if folder == checkpoint else adapter + '/'}adapter_model.safetensors to resume the "
                f"LoRA weights of adapter '{adapter}' from (was it written without LoRA?); delete {checkpoint.parent} "
                "to start this job over")
        saved = load_file(str(folder / "adapter_model.safetensors"))
        try:
            result = set_peft_model_state_dict(model, saved, adapter_name=adapter)
        except RuntimeError as exc:  # torch refuses shape mismatches even when not strict
            mismatched = [f"{key} {tuple(map(int, saved_shape.split(',')))} vs {tuple(map(int, shape.split(',')))}"
                          for key, saved_shape, shape in re.findall(
                              r"size mismatch for (\S+): copying a param with shape torch.Size\(\[([\d, ]+)\]\) from "
                              r"checkpoint, the shape in current model is torch.Size\(\[([\d, ]+)\]\)", str(exc))]
            raise _mismatch_error(checkpoint, f"LoRA weights of adapter '{adapter}'",
                                  shape_mismatches=mismatched or [str(exc).splitlines()[0]]) from exc
        missing = sorted(k for k in result.missing_keys if f".{adapter}." in k and k in own_keys)
        if missing or result.unexpected_keys:
            raise _mismatch_error(checkpoint, f"LoRA weights of adapter '{adapter}'", missing_weights=missing,
                                  unexpected_weights=list(result.unexpected_keys))
        loaded += len(saved)
    return loaded


def load_checkpoint_weights(model, checkpoint: str | Path) -> int:
    """Load the weights of a Trainer checkpoint folder into `model` (a transformers model, or a peft LoRA model) for
    real; return how many tensors were loaded. Raises CheckpointMismatchError naming the checkpoint when its weights
    do not match the model (missing or unexpected weights, other shapes): a resume never trains on silently."""
    from transformers.trainer_utils import _is_peft_model

    checkpoint = Path(checkpoint)
    if _is_peft_model(model):
        n = _load_adapter_weights(model, checkpoint)
    else:
        n = _load_full_weights(model, checkpoint)
    logger.info("resumed %d weight tensors from %s", n, checkpoint)
    return n


class StrictResumeMixin:
    """Trainer mixin: resuming from a checkpoint loads its weights into the model for real, or fails naming it.

    transformers' own `_load_from_checkpoint` loads the saved state dict non-strictly and without the model's key
    mapping: a Qwen2.5-VL checkpoint (saved as `model.layers.*`, `visual.*`) matches none of the keys of the model in
    memory (`model.language_model.*`, `model.visual.*`), and training goes on from the base weights with the restored
    optimizer, scheduler and data position (ms-swift #7947, QwenLM/Qwen3-VL #1763). DeepSpeed and FSDP checkpoints
    keep the trainer's own loading (their files hold the in-memory keys).
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(self.model if model is None else model, resume_from_checkpoint)


def apply_lora(model, lora: LoraSettings, seed: int = 0):
    """Wrap the model with LoRA adapters when enabled; their initial weights follow `seed`, so a rerun of the same job
    starts from the same adapters."""
    if not lora.enabled:
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def save_model(trainer, processor, output: Path) -> None:
    """Save the (LoRA-merged) model and its processor to `output` from the main process."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        if output.exists():
            shutil.rmtree(output)
        model.save_pretrained(output)
        processor.save_pretrained(output)
    trainer.accelerator.wait_for_everyone()


def bf16_enabled(setting: bool | None) -> bool:
    import torch

    return torch.cuda.is_available() if setting is None else setting


def train_sft(data_dir: str | Path, output: str | Path, cfg: SFTConfig, curves_dir: str | Path | None = None) -> dict:
    """Fine-tune `cfg.model` on `data_dir/train.jsonl` (and evaluate on `dev.jsonl` if present); save to `output`;
    write the loss and dev-F1 curves into `curves_dir` (`morer1.curves`) when given."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from morer1 import tracking
    from morer1.modeling import load_model_and_processor
    from morer1.prompt import model_prompt, write_prompt_name

    tracking.setup()  # the trainer's MLflow callback logs into the project's store (into the active stage run)
    data_dir, output = Path(data_dir), Path(output)
    model, processor = load_model_and_processor(cfg.model)
    train_rows, dropped = drop_overlong(read_jsonl(data_dir / "train.jsonl"), processor, cfg.max_length)
    if not train_rows:
        raise ValueError(f"{data_dir / 'train.jsonl'}: no training sample fits in sft.max_length={cfg.max_length}")
    dev_path = data_dir / "dev.jsonl"
    dev_rows = drop_overlong(read_jsonl(dev_path), processor, cfg.max_length)[0] if dev_path.exists() else []

    job = fingerprint(cfg.model_dump(), (data_dir / "train.jsonl").read_bytes(), folder_signature(cfg.model))
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
        from morer1.curves import dev_f1_callback
        from morer1.labels import read_labels

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
    resumed_run = tracking.link_resumed_run(ckpt_dir, last is not None) if trainer.accelerator.is_main_process else None
    result = trainer.train(resume_from_checkpoint=last)
    save_model(trainer, processor, output)
    if trainer.accelerator.is_main_process:
        write_prompt_name(output, model_prompt(data_dir))  # the model is asked the way its SFT set was written
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "train_samples": len(train_rows), "dropped_overlong": dropped, "dev_samples": len(dev_rows),
        "steps": trainer.state.global_step, "resumed_from": last, "resumed_run_id": resumed_run,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
    }
    if trainer.accelerator.is_main_process:
        (output / "sft_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if curves_dir is not None:
            from morer1.curves import log_curves, write_sft_curves

            points = callbacks[0].points if callbacks else []
            log_curves(write_sft_curves(curves_dir, trainer.state.log_history, points))
            if points:
                summary["dev_sample_f1"] = points[-1]["dev_f1"]
    return summary
