"""What the SFT and GRPO stages share: training settings, LoRA, job fingerprints and checkpoint folders, strict
resume, the stage run on the main process, and saving the trained model.

Both run inside `accelerate launch` (one CPU process up to multi-node DeepSpeed, see infra/accelerate/).
Checkpoints go to `checkpoint_dir/<stage>/`; a rerun of the same job (config, data, base model) resumes from the
last one, and another job clears them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from morer1 import tracking
from morer1.errors import BadInputError, TrackingServerLost
from morer1.files import swap_in
from morer1.params import StageConfig
from morer1.prompt import write_prompt_name

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
    learning_rate: float = Field(..., gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field(..., description="transformers scheduler name: linear, cosine, constant, ...")
    warmup_steps: float = Field(
        ..., ge=0, description="Warm-up: a number of steps, or below 1 a share of the total steps (0.05 = 5 %).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training set (ignored when max_steps > 0).")
    max_steps: int = Field(..., description="Stop after this many optimizer steps (-1: use epochs).")
    per_device_train_batch_size: int = Field(..., ge=1, description="Samples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    bf16: bool | None = Field(None, description="bf16 mixed precision (None: on when a CUDA GPU is present).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    logging_steps: int = Field(..., ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(..., ge=1, description="Write a checkpoint every this many steps.")
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
    """This job's checkpoint folder, and its last usable checkpoint when resuming (`last_usable_checkpoint`); other
    jobs' checkpoints are cleared."""
    folder = Path(root) / stage
    marker = folder / "JOB"
    if folder.exists() and (not marker.exists() or marker.read_text().strip() != job):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(job + "\n")
    return folder, last_usable_checkpoint(folder)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a file missing, truncated or unreadable), or None.
    Reads headers only: safetensors headers against the file size, torch files' zip directories, JSON files whole.
    The Trainer writes `trainer_state.json` last, so a checkpoint without it was cut off while being written."""
    import zipfile

    from safetensors import safe_open

    if not (checkpoint / "trainer_state.json").is_file():
        return "no trainer_state.json (cut off while being written)"
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(file).close()
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - any failure to read makes the checkpoint unusable
            return f"{file.relative_to(checkpoint)}: {type(exc).__name__}: {exc}"
    return None


def last_usable_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-<step>` of `folder` whose files are complete (`checkpoint_problem`). Newer unusable
    ones are deleted, with a warning naming them and saying whether training resumes from an older one or starts
    over."""
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                         key=lambda p: int(p.name[11:]), reverse=True)
    unusable = []
    for checkpoint in checkpoints:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            break
        unusable.append(f"{checkpoint} ({problem})")
        shutil.rmtree(checkpoint, ignore_errors=True)  # every process of a launch decides the same
    else:
        checkpoint = None
    if unusable:
        logger.warning("unusable checkpoint(s) deleted: %s; %s", "; ".join(unusable),
                       f"resuming from the previous good one, {checkpoint}" if checkpoint
                       else "no usable checkpoint left: training starts over from step 0")
    return str(checkpoint) if checkpoint else None


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


def save_model(trainer, processor, output: Path, *, prompt: str, summary: dict, summary_file: str) -> None:
    """Save the (LoRA-merged) model, its processor, the prompt template's name and the summary (as `summary_file`)
    into `output` from the main process, written beside it and swapped in when complete (`files.swap_in`)."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        staging = output.with_name(output.name + ".partial")  # git-ignored, like every staging folder
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_prompt_name(staging, prompt)
        (staging / summary_file).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        swap_in(staging, output)
    trainer.accelerator.wait_for_everyone()


@contextmanager
def main_process_run(stage: str, config: TrainingSettings) -> Iterator[bool]:
    """The stage's MLflow run, opened on the accelerate main process only; yields whether this is that process.
    When the tracking server stops answering, the stage fails with TrackingServerLost, which says so in one line."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        yield False
        return
    try:
        with tracking.stage_run(stage, config):
            yield True
    except Exception as exc:
        cause = _unreachable_server(exc)
        if cause is None:
            raise
        kept = (Path(config.checkpoint_dir) / stage).resolve()
        raise TrackingServerLost(
            f"the MLflow tracking server {tracking.tracking_uri()} stopped answering during stage '{stage}' "
            f"({type(cause).__name__}); the checkpoints written so far stay in {kept}: "
            "rerun when the server is back to resume from the last one") from None


def _unreachable_server(exc: BaseException | None) -> BaseException | None:
    """The connection error or timeout (requests') behind `exc`, if the tracking server could not be reached."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def bf16_enabled(setting: bool | None) -> bool:
    """The setting, or when None whether a CUDA GPU is present."""
    import torch

    return torch.cuda.is_available() if setting is None else setting
