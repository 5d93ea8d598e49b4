"""The embedded default model: a tiny Qwen2.5-VL with random weights and a tokenizer trained on the fly.

`build_tiny_model` writes a Hugging Face folder (config, weights, tokenizer, image and video processor,
chat template) that `morer1.modeling.load_model_and_processor` loads exactly like a real
Qwen2.5-VL-7B-Instruct folder. Heavy libraries are imported inside the functions so that importing
this module (e.g. for `TinyModelConfig`) stays cheap.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import swap_in
from morer1.modeling import image_token_count
from morer1.params import StageConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Qwen2.5-VL's chat and vision tokens; ids follow this order, so <|endoftext|> is 0.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Reasoning tags: added as whole tokens, but not special, so decoding with skip_special_tokens keeps them.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, whitespace).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's format without its default system message. The assistant turn after its
# `<|im_start|>assistant\n` header, up to and including `<|im_end|>\n`, sits inside
# {% generation %}...{% endgeneration %}, so `return_assistant_tokens_mask=True` (TRL's
# `assistant_only_loss`) masks exactly what the model must generate, stop token included.
CHAT_TEMPLATE = """\
{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for part in content %}
            {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif part['type'] == 'video' or 'video' in part %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- render_content(message['content']) + '<|im_end|>\\n' }}
        {%- endgeneration %}
    {%- else %}
        {{- render_content(message['content']) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WINDOW_SIZE = 112  # vision window attention span in pixels, as in Qwen2.5-VL
TEMPORAL_PATCH_SIZE = 2  # an image is repeated to two frames, as in Qwen2.5-VL


class TinyModelConfig(StageConfig):
    """Shape of the tiny Qwen2.5-VL built for the embedded default."""

    seed: int = Field(0, description="Seed of the random weights: same seed, same weights.")
    vocab_size: int = Field(
        2000, ge=512, description="BPE vocabulary size including the special tokens (fewer if the corpus is small)."
    )
    hidden_size: int = Field(..., ge=8, description="Width of the text decoder.")
    num_hidden_layers: int = Field(..., ge=1, description="Layers of the text decoder.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads of the text decoder.")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads of the text decoder (grouped-query).")
    intermediate_size: int = Field(..., ge=1, description="MLP width of the text decoder.")
    max_position_embeddings: int = Field(
        4096, ge=256, description="Longest sequence the text decoder is configured for."
    )
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and output head (as Qwen2.5-VL-3B).")
    rope_theta: float = Field(
        ..., gt=0, description="Rotary base of the text decoder; Qwen2.5-VL's 1e6 leaves a small head few "
        "frequencies that resolve neighbouring tokens, 1e4 gives more.")
    vision_depth: int = Field(2, ge=1, description="Blocks of the vision encoder (the last one has full attention).")
    vision_hidden_size: int = Field(32, ge=8, description="Width of the vision encoder.")
    vision_num_heads: int = Field(2, ge=1, description="Attention heads of the vision encoder.")
    vision_intermediate_size: int = Field(64, ge=1, description="MLP width of the vision encoder.")
    patch_size: int = Field(14, ge=1, description="Side in pixels of a vision patch.")
    spatial_merge_size: int = Field(2, ge=1, description="Patches merged per side into one image token.")
    min_pixels: int = Field(
        28 * 28 * 4,
        ge=1,
        description="Smaller images are upscaled to at least this many pixels (4 tokens by default).",
    )
    max_pixels: int = Field(
        28 * 28 * 16,
        ge=1,
        description="Larger images are downscaled to at most this many pixels (16 tokens by default).",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("hidden_size / num_attention_heads must be an even integer (rotary head dim)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ValueError("vision_hidden_size / vision_num_heads must be a multiple of 4 (2-D rotary head dim)")
        token_side = self.patch_size * self.spatial_merge_size
        if not token_side * token_side <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need ({token_side})^2 <= min_pixels <= max_pixels")
        return self


def mrope_section(head_dim: int) -> list[int]:
    """Split of the rotary half-dimension into (time, height, width), in Qwen2.5-VL's 2:3:3 ratio."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with Qwen2.5-VL's special tokens, reasoning tags and chat template.

    Special tokens are dropped by `decode(..., skip_special_tokens=True)`; `<think>`, `</think>`, `<answer>`,
    `</answer>` are single tokens that decoding keeps. EOS is `<|im_end|>`, padding `<|endoftext|>` on the left.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        padding_side="left",
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: Path, texts: Iterable[str], cfg: TinyModelConfig) -> dict:
    """Build the tiny Qwen2.5-VL, its tokenizer and processor, and save them all into `out_dir`.

    The folder is written next to `out_dir` and swapped in at the end, so a failed build leaves a previous
    model untouched. An existing `out_dir` is replaced only if it is empty or a model folder (has config.json).
    Returns a summary: path, parameter count, vocabulary size, image tokens per 128x128 image, file names.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise BadInputError(f"{out_dir}: exists and is not a model folder; refusing to overwrite it")

    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    token_id = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    vision_kwargs = dict(
        size=size,
        patch_size=cfg.patch_size,
        merge_size=cfg.spatial_merge_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision_kwargs),
        video_processor=Qwen2VLVideoProcessor(**vision_kwargs),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            max_window_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": cfg.rope_theta,
                "mrope_section": mrope_section(cfg.hidden_size // cfg.num_attention_heads),
            },
            bos_token_id=token_id[PAD_TOKEN],
            eos_token_id=token_id[EOS_TOKEN],
            pad_token_id=token_id[PAD_TOKEN],
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=cfg.vision_intermediate_size,
            num_heads=cfg.vision_num_heads,
            patch_size=cfg.patch_size,
            spatial_merge_size=cfg.spatial_merge_size,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            window_size=WINDOW_SIZE,
            fullatt_block_indexes=[cfg.vision_depth - 1],
            out_hidden_size=cfg.hidden_size,
        ),
        image_token_id=token_id["<|image_pad|>"],
        video_token_id=token_id["<|video_pad|>"],
        vision_start_token_id=token_id["<|vision_start|>"],
        vision_end_token_id=token_id["<|vision_end|>"],
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    # As in Qwen2.5-VL: stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=token_id[PAD_TOKEN],
        eos_token_id=[token_id[EOS_TOKEN], token_id[PAD_TOKEN]],
        pad_token_id=token_id[PAD_TOKEN],
    )

    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    swap_in(staging, out_dir)

    return {
        "path": str(out_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "image_tokens_128x128": image_token_count(processor, 128, 128),
        "files": sorted(p.name for p in out_dir.iterdir()),
    }


def sft_corpus(sft_dir: Path) -> Iterable[str]:
    """Every text the model will read or write in the SFT set: the tokenizer's training corpus."""
    import json

    for path in sorted(Path(sft_dir).glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                for message in json.loads(line)["messages"]:
                    for part in message["content"]:
                        if part.get("text"):
                            yield part["text"]


def run(cfg: TinyModelConfig, sft_dir: str | Path, out: str | Path) -> dict:
    """The tiny_model stage: `build_tiny_model` into `out`, its tokenizer trained on the SFT set in `sft_dir`, in an
    MLflow stage run; return and log the summary."""
    with tracking.stage_run("tiny_model", cfg):
        summary = build_tiny_model(Path(out), sft_corpus(Path(sft_dir)), cfg)
        tracking.log_summary(summary)
    return summary
