"""The one way a vision-language model is loaded: the tiny embedded model and a real checkpoint alike.

A model folder is anything `save_pretrained` wrote for a Qwen2-VL / Qwen2.5-VL class model: the folder of
`morer1.tiny_model.build_tiny_model`, or a local copy of e.g. Qwen/Qwen2.5-VL-7B-Instruct. Nothing is
ever downloaded (`local_files_only=True`). Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from morer1.errors import BadInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin


class ModelFolderError(BadInputError):
    """The path is not a loadable local vision-language model folder."""


def load_model_and_processor(
    path: str | Path, *, dtype: str = "auto", device_map: Any = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load the model (`AutoModelForImageTextToText`) and its processor (`AutoProcessor`) from a local folder.

    `dtype="auto"` keeps the dtype the weights were saved in (float32 for the tiny model, bfloat16 for
    Qwen2.5-VL-7B); `device_map` is passed to `from_pretrained` (e.g. "auto" on a GPU node).
    The processor's tokenizer is made ready for batched generation: it gets a pad token if it has none
    (its EOS token) and pads on the left, so every prompt of a batch ends where generation starts.
    Training collators that need right padding (TRL's) ask for it explicitly per call.
    Raises ModelFolderError naming the path when it is not a vision-language model folder.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFolderError(
            f"{path}: not a model folder (no config.json); expected a local save_pretrained folder of a "
            "Qwen2.5-VL class model, such as the tiny model built by morer1 or a Qwen2.5-VL-7B-Instruct download"
        )
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFolderError(f"{path}: cannot load the processor: {exc}") from exc
    if not isinstance(processor, ProcessorMixin):
        raise ModelFolderError(
            f"{path}: not a vision-language model folder (AutoProcessor gave {type(processor).__name__}, "
            "not a multimodal processor)"
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, device_map=device_map, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFolderError(f"{path}: cannot load the model: {exc}") from exc

    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def image_token_count(processor: ProcessorMixin, width: int, height: int) -> int:
    """Number of image tokens the processor gives an image of `width` x `height` pixels."""
    image_processor = processor.image_processor
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return patches // image_processor.merge_size**2


def set_pixel_bounds(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the pixels the image processor resizes an image to (a Qwen2-VL class processor keeps them as
    `size["shortest_edge"]` and `size["longest_edge"]`, and `save_pretrained` writes them); None keeps its own."""
    from transformers.image_utils import SizeDict

    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    try:
        bounds = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
    except (TypeError, KeyError) as exc:
        raise ModelFolderError(f"{type(image_processor).__name__} keeps no pixel bounds (size shortest_edge/"
                               f"longest_edge) to set min_pixels/max_pixels on") from exc
    if min_pixels is not None:
        bounds["shortest_edge"] = min_pixels
    if max_pixels is not None:
        bounds["longest_edge"] = max_pixels
    if bounds["shortest_edge"] > bounds["longest_edge"]:
        raise ModelFolderError(f"min_pixels {bounds['shortest_edge']} > max_pixels {bounds['longest_edge']}")
    image_processor.size = SizeDict(**bounds)
