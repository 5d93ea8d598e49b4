"""Batched generation from a vision-language model: shared by difficulty, evaluation, SFT's dev curve and serving.

One prompt per fact (`morer1.prompt.prompt_messages` in the model's template: the photo and the crop, the text),
rendered with the processor's chat template, batched with left padding so every prompt ends where
generation starts, and decoded without the prompt. Special tokens (chat and vision tokens) are
skipped; `<think>`/`<answer>` are plain added tokens and survive decoding.

Decoding is fully specified here rather than inherited: transformers fills every generation option a
caller leaves unset from the checkpoint's `generation_config.json` (instruct checkpoints ship their own
sampling defaults, e.g. a repetition penalty or top-k/top-p) and then from library defaults (top-k 50).
So greedy is plain greedy (no repetition penalty), and sampling is plain temperature sampling
(top_k=0, top_p=1.0, no repetition penalty), as TRL's GRPOTrainer samples by default. The image and
video placeholder tokens are suppressed (as TRL does): a generated `<|image_pad|>` would have no image
features behind it and break the next forward pass.

Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from morer1.prompt import DEFAULT_PROMPT, fact_images, prompt_messages

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

log = logging.getLogger(__name__)


def load_rgb(path: str | Path):
    """An image file as an RGB PIL image, fully loaded (the file is closed)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def generation_config(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    *,
    num_return_sequences: int,
    do_sample: bool,
    temperature: float,
    max_new_tokens: int,
    top_p: float,
    top_k: int,
):
    """The GenerationConfig of `generate_completions`: every decoding knob explicit, placeholder tokens suppressed."""
    from transformers import GenerationConfig

    suppress = []
    for name in ("image_token_id", "video_token_id"):
        token_id = getattr(model.config, name, None)
        if token_id is None:
            token_id = getattr(processor, name, None)
        if token_id is not None:
            suppress.append(int(token_id))
    base = model.generation_config
    pad = base.pad_token_id if base.pad_token_id is not None else processor.tokenizer.pad_token_id
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        num_return_sequences=num_return_sequences,
        repetition_penalty=1.0,
        suppress_tokens=suppress or None,
        eos_token_id=base.eos_token_id,
        pad_token_id=pad,
        bos_token_id=base.bos_token_id,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(**kwargs)


def generate_completions(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    facts: list[dict],
    facts_dir: str | Path,
    labels: Sequence[str],
    *,
    prompt: str = DEFAULT_PROMPT,
    **decoding,
) -> list[list[str]]:
    """Completions of `model` for each ingested fact: one list of `num_return_sequences` strings per fact, in order.

    The prompt of a fact is `prompt_messages(fact, labels, prompt)` with its photo and crop (`fact_images`,
    relative to `facts_dir`); `prompt` names the template, which must be the one the model was trained with
    (`morer1.prompt.model_prompt`). `decoding` as in `generate_from_messages`.
    """
    return generate_from_messages(model, processor, [prompt_messages(f, labels, prompt) for f in facts],
                                  [fact_images(f, facts_dir) for f in facts], **decoding)


def generate_from_messages(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    conversations: list[list[dict]],
    image_paths: list[Sequence[str | Path]],
    *,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    top_p: float = 1.0,
    top_k: int = 0,
    progress: bool = True,
) -> list[list[str]]:
    """Completions of `model` for prompt turns with their image files, in order.

    Greedy by default (`num_return_sequences` must then be 1). With `do_sample=True`, plain temperature
    sampling (`top_k=0` and `top_p=1.0` disable the truncations) seeded per batch with `seed + batch index`,
    so a rerun with the same prompts, `batch_size` and seed gives the same strings (on the same hardware);
    changing `batch_size` changes which random numbers each prompt gets. The caller's global RNG state is left
    untouched. Greedy output does not depend on the batch (left padding, checked in the tests on CPU float32;
    bf16 kernels on GPU can differ in the last bits).

    `batch_size` counts prompts; one forward pass holds `batch_size * num_return_sequences` sequences.
    Returns one list of `num_return_sequences` strings per prompt.
    """
    import torch

    if len(conversations) != len(image_paths):
        raise ValueError(f"{len(conversations)} conversations but {len(image_paths)} image lists")
    if num_return_sequences < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("num_return_sequences, batch_size and max_new_tokens must be >= 1")
    if not do_sample and num_return_sequences > 1:
        raise ValueError("greedy decoding gives one completion per prompt; set do_sample=True for several")
    if do_sample and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    if not conversations:
        return []

    gen_config = generation_config(
        model, processor, num_return_sequences=num_return_sequences, do_sample=do_sample,
        temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k,
    )
    starts = range(0, len(conversations), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(conversations), desc="generate", unit="prompt", leave=False)

    device = model.device
    # torch.manual_seed seeds every CUDA device; fork them all so the caller's RNG state comes back intact
    # (a model spread over several GPUs samples on the device of its last layer).
    rng_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        for index, start in enumerate(starts):
            turns = conversations[start:start + batch_size]
            texts = [processor.apply_chat_template(t, tokenize=False, add_generation_prompt=True) for t in turns]
            images = [[load_rgb(p) for p in paths] for paths in image_paths[start:start + batch_size]]
            inputs = processor(
                text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            prompt_len = inputs["input_ids"].shape[1]
            with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
                torch.manual_seed(seed + index)
                sequences = model.generate(**inputs, generation_config=gen_config)
            decoded = processor.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
            # generate() repeats each prompt num_return_sequences times in a row (repeat_interleave).
            for i in range(len(turns)):
                out.append(decoded[i * num_return_sequences:(i + 1) * num_return_sequences])
            if bar is not None:
                bar.update(len(turns))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out
