"""Predictions from a registered or local model: one question, or a JSONL file of them.

Inputs follow the pyfunc contract of `morer1.registry` (`image`, `title`, `entity`, `box`); a model URI is
`models:/morer1@champion`, any MLflow model URI, or a model folder saved by a trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from morer1.errors import BadInputError


def predict_one(model_uri: str, image: str, title: str, entity: str, box: list[int]) -> dict:
    """`label`, `rationale` and `completion` for one image (path or base64), title, entity and pixel box."""
    import pandas as pd

    from morer1.registry import predict

    frame = pd.DataFrame([{"image": str(image), "title": title, "entity": entity, "box": list(box)}])
    return predict(model_uri, frame).iloc[0].to_dict()


def predict_jsonl(model_uri: str, in_path: str | Path, out_path: str | Path) -> int:
    """Write each input line of `in_path` with its `label` and `rationale` to `out_path`; return the line count.

    Relative image paths are read relative to the folder of `in_path`. The output appears only when complete.
    """
    import pandas as pd

    from morer1.registry import load_predictor

    in_path, out_path = Path(in_path), Path(out_path)
    records = []
    with in_path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadInputError(f"{in_path}:{number}: not valid JSON: {exc.msg}") from None
                if not isinstance(records[-1], dict):
                    raise BadInputError(f"{in_path}:{number}: expected a JSON object")
    frame = pd.DataFrame(records, columns=sorted({key for r in records for key in r}))
    if "image" in frame.columns:
        frame["image"] = [resolve_image(value, in_path.parent) for value in frame["image"]]
    result = load_predictor(model_uri).predict(frame) if records else None
    staging = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with staging.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            answer = {"label": result["label"].iloc[i], "rationale": result["rationale"].iloc[i]}
            f.write(json.dumps({**record, **answer}, ensure_ascii=False) + "\n")
    os.replace(staging, out_path)
    return len(records)


def resolve_image(value, base: Path):
    """`base / value` when that names a file (a path relative to the JSONL file), else `value` unchanged."""
    if isinstance(value, str) and value and os.path.isfile(base / value):
        return str(base / value)
    return value
