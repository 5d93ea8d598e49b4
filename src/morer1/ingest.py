"""Ingest stage: read a folder in the official MORE layout into clean JSONL facts, crops and rejects.

Nothing in the data is executed: text lines are read as Python literals (`fast_literal`, else
`ast.literal_eval`), `.pth` files with `torch.load(weights_only=True)`, and image paths must stay inside
`img_org/<split>/`. Paths written into the output name the source as given, relative to the working directory
(the project) when inside it, so two checkouts in different folders write the same bytes.

The stage streams: lines are read, checked and written one at a time (facts and rejects go to files as they
come), each photo is decoded once for the facts that follow it, and what is kept in memory is counters and,
per image, its distinct entity spans and object names (for `pair_entities` / `pair_objects`). The object crops
(PNG) and the photos are written by `ingest.workers` threads (`FileWriter`) while the next lines are read; what is
written does not depend on how many.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from morer1 import tracking
from morer1.errors import BadInputError
from morer1.files import swap_in, write_jsonl
from morer1.labels import load_rel2id, type_pair
from morer1.params import StageConfig

SPLITS = {"train": "train", "valid": "dev", "test": "test"}  # source file name -> output split
MAX_LINE_CHARS = 1_000_000
REQUIRED_FIELDS = ("token", "h", "t", "relation", "img_id")
SHOW_CHARS = 120  # longest value quoted in a reject reason
DECODED_PHOTOS = 4  # decoded photos kept for the facts that follow them
REFUSED_PHOTOS = 4096  # refused photos remembered with their reason
MAX_BRACKETS = 100  # lines with more go to `ast.literal_eval`, whose parser refuses 200 nested ones
WRITE_BATCH = 64  # files (crops, photos) handed to a writer thread at once


class IngestConfig(StageConfig):
    """Parameters of the ingest stage."""

    source: str = Field("data/demo", description="Folder in the official MORE layout to read.")
    max_reject_fraction: float = Field(
        0.02, ge=0.0, le=1.0, description="Fail the stage when rejected lines exceed this share of all lines."
    )
    box_tolerance: float = Field(
        0.02, ge=0.0, le=0.5,
        description="A box may leave the image by this fraction of the image side; it is then clipped.",
    )
    workers: int = Field(
        2, ge=0, le=64,
        description="Threads that write the object crops (PNG) and the photos while the lines are read; 0: the "
                    "reading thread writes them. The output is the same bytes for any value.",
    )


class IngestError(BadInputError):
    """The source folder cannot be ingested (missing files, unsafe .pth, bad rel2id)."""


class RejectFractionExceeded(IngestError):
    """More lines were rejected than `max_reject_fraction` allows (the previous output is kept)."""


class Reject(Exception):
    """One source line is rejected: `kind` is a short code for statistics, the message says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _stable_repr(value) -> str:
    """repr of a literal value, with sets sorted: a set's order changes with the hash seed of each run."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_stable_repr, value))) + "}" if value else "set()"
    if isinstance(value, list):
        return "[" + ", ".join(map(_stable_repr, value)) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_stable_repr, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in value.items()) + "}"
    return repr(value)


def show(value) -> str:
    """A source value as quoted in a reject reason: the same text on every run, at most SHOW_CHARS long."""
    try:
        text = _stable_repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def _literal_error(exc: Exception) -> str:
    """Why `ast.literal_eval` refused a line, without the memory address its message gives a non-literal node."""
    node = re.search(r"<ast\.(\w+) object at 0x[0-9a-fA-F]+>", str(exc))
    if node:
        return (f"a {node.group(1)} expression is not allowed "
                "(only strings, numbers, tuples, lists, dicts, sets, True, False and None)")
    return f"{type(exc).__name__}: {getattr(exc, 'msg', None) or exc}"


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int
    height: int


def pixel_box(pos, width: int, height: int, tolerance: float) -> list[int]:
    """Pixel box [x0, y0, x1, y1] (x1, y1 exclusive) from a normalised (cx, cy, w, h) of numbers or strings."""
    if not isinstance(pos, (list, tuple)) or len(pos) != 4:
        raise Reject("bad_box", f"object box must be 4 values (cx, cy, w, h), got {show(pos)}")
    if any(isinstance(v, bool) for v in pos):  # bool is an int to Python, and float(True) is 1.0
        raise Reject("bad_box", f"object box has a boolean value: {show(pos)}")
    try:
        cx, cy, w, h = (float(v) for v in pos)
    except (TypeError, ValueError, OverflowError):
        raise Reject("bad_box", f"object box has a non-numeric value: {show(pos)}") from None
    edges = (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height
    if not all(math.isfinite(v) for v in (cx, cy, w, h, *edges)) or w <= 0 or h <= 0:
        raise Reject("bad_box", f"object box is not a positive finite box: {show(pos)}")
    x0, y0, x1, y1 = (round(v) for v in edges)
    tol_x, tol_y = tolerance * width, tolerance * height
    if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
        raise Reject("box_outside_image", f"box {[x0, y0, x1, y1]} lies outside the {width}x{height} image")
    box = [max(0, x0), max(0, y0), min(width, x1), min(height, y1)]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise Reject("bad_box", f"box {box} is empty")
    return box


_PY_TOKEN = re.compile(r"""'[^'\\\n\r]*'|"[^"\\\n\r]*"|[()]|True|False|None|true|false|null""")
_AS_JSON = {"(": '{"\\u0000": [', ")": "]}", "True": "true", "False": "false", "None": "null"}
_TUPLE = "\x00"  # the key of the JSON object a parenthesis becomes; no source text can make it (no backslash)


class NotSure(Exception):
    """`fast_literal` cannot vouch that its value is the one `ast.literal_eval` gives; use that instead."""


def _json_token(m: re.Match) -> str:
    """A Python token as JSON: 'x' as "x", ( ) as an object {"\u0000": [...]} (see `_from_json`), True as true."""
    tok = m.group()
    if tok[0] == "'":
        return '"' + tok[1:-1].replace('"', '\\"') + '"'
    if tok[0] == '"':
        return tok
    if tok in _AS_JSON:
        return _AS_JSON[tok]
    raise NotSure  # true, false, null are JSON, not Python


def _from_json(pairs: list):
    """A JSON object back as Python: a parenthesis as its tuple, or its one value (`(x)` is x), else a dict."""
    if len(pairs) == 1 and pairs[0][0] == _TUPLE:
        items = pairs[0][1]
        return items[0] if len(items) == 1 else tuple(items)
    return dict(pairs)


def _no_constant(name: str):
    raise NotSure  # NaN, Infinity: JSON words that are no Python literal


_JSON = json.JSONDecoder(object_pairs_hook=_from_json, parse_constant=_no_constant)


def fast_literal(text: str):
    """The value `ast.literal_eval(text)` gives for a literal of dicts with string keys, lists, tuples, strings
    without backslashes, numbers as JSON writes them, True, False and None (what the MORE files hold), the same
    value and types, ~7x faster: the text is rewritten token by token as JSON and decoded in C. NotSure
    for anything else (escapes, sets, `(x,)`, trailing commas, bytes, other number forms, syntax errors), which
    the caller hands to `ast.literal_eval`."""
    if "\\" in text or "\x00" in text or text.count("(") + text.count("[") + text.count("{") > MAX_BRACKETS:
        raise NotSure
    if '"' in text:
        converted = _PY_TOKEN.sub(_json_token, text)
    else:  # every ' delimits a string: rewrite what lies between the strings in a few C-level passes
        parts = text.split("'")
        if len(parts) % 2 == 0:
            raise NotSure  # a string is not closed
        between = "\x00".join(parts[0::2])
        if "true" in between or "false" in between or "null" in between:
            raise NotSure
        for token, as_json in _AS_JSON.items():
            between = between.replace(token, as_json)
        parts[0::2] = between.split("\x00")
        converted = '"'.join(parts)
    try:
        return _JSON.decode(converted)
    except (ValueError, RecursionError):  # json's errors are ValueErrors
        raise NotSure from None


def parse_line(line: str) -> dict:
    """One source line as a fact dict; Reject if it is not a complete dict literal with the MORE fields."""
    text = line.strip()
    if len(text) > MAX_LINE_CHARS:
        raise Reject("not_a_literal", f"line longer than {MAX_LINE_CHARS} characters")
    try:
        try:
            record = fast_literal(text)
        except NotSure:
            record = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:  # TypeError: {[1]: 2}
        if text.startswith("{") and not text.endswith("}"):
            raise Reject("truncated_line", "truncated line: the record is cut off") from None
        raise Reject("not_a_literal", f"not a Python literal: {_literal_error(exc)}") from None
    if not isinstance(record, dict):
        raise Reject("not_a_literal", f"record is a {type(record).__name__}, not a dict")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise Reject("missing_field", f"missing field(s): {', '.join(missing)}")
    return record


def parse_entity(record: dict) -> tuple[list[str], dict]:
    """Tokens and entity {name, start, end} of a record; Reject on a bad span."""
    tokens = record["token"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise Reject("bad_tokens", "'token' must be a non-empty list of strings")
    h = record["h"]
    pos = h.get("pos") if isinstance(h, dict) else None
    if not (isinstance(pos, (list, tuple)) and len(pos) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) for p in pos)):
        raise Reject("bad_entity_span", f"entity 'h.pos' must be [start, end] integers, got {show(pos)}")
    start, end = pos
    if not 0 <= start < end <= len(tokens):
        raise Reject("bad_entity_span", f"entity span [{start}, {end}) is outside the {len(tokens)} tokens")
    name = h.get("name")
    if isinstance(name, (list, tuple)) and all(isinstance(n, str) for n in name):
        name = " ".join(name)
    elif name is not None and not isinstance(name, str):
        raise Reject("bad_entity_name", f"entity 'h.name' must be a string or a list of strings, got {show(name)}")
    return tokens, {"name": name or " ".join(tokens[start:end]), "start": start, "end": end}


def image_path(source: Path, split_file: str, img_id, folder: Path | None = None) -> Path:
    """Path of an image, confined to `img_org/<split>/`; Reject if it would leave that folder. `folder`: that
    folder resolved, if the caller has it."""
    if not isinstance(img_id, str) or not img_id or "\x00" in img_id:
        raise Reject("image_path", f"img_id must be a non-empty string, got {show(img_id)}")
    folder = folder or (source / "img_org" / split_file).resolve()
    path = (folder / img_id).resolve()
    if path.parent != folder:
        raise Reject("image_path", f"image path {show(img_id)} leaves img_org/{split_file}/")
    return path


def read_image(path: Path):
    """Size and RGB pixels of a readable image; Reject if missing or undecodable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise Reject("image_missing", f"image not found: {path.name}")
    try:
        img = Image.open(path)
        with img:
            img.load()
            return ImageInfo(path, img.width, img.height), img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's message names the file by its absolute path: the reason names it by its name only, so the
        # rejects are the same bytes wherever the project lives
        reason = str(exc).replace(str(path), path.name)
        raise Reject("image_unreadable", f"unreadable image {path.name}: {reason}") from None


class Photos:
    """The photos of a run, each read once for the facts that follow it, in bounded memory: the last
    DECODED_PHOTOS decoded (size and RGB pixels) and the last REFUSED_PHOTOS refused (with the Reject). A photo
    seen again after it left is read again, with the same result."""

    def __init__(self):
        self._decoded: OrderedDict = OrderedDict()
        self._refused: OrderedDict = OrderedDict()
        self._paths = functools.lru_cache(maxsize=REFUSED_PHOTOS)(self._image_path)
        self._folders: dict = {}

    def _image_path(self, source: Path, split_file: str, img_id) -> Path:
        folder = self._folders.get((source, split_file))
        if folder is None:  # resolved once a run (each component costs a system call)
            folder = self._folders[source, split_file] = (source / "img_org" / split_file).resolve()
        return image_path(source, split_file, img_id, folder)

    def path(self, source: Path, split_file: str, img_id) -> Path:
        """`image_path`, resolved once for the facts of a photo."""
        return self._paths(source, split_file, img_id) if isinstance(img_id, str) else image_path(
            source, split_file, img_id)

    def get(self, key, path: Path):
        """(ImageInfo, RGB image) of the photo `key` at `path`; raise its Reject if it is refused."""
        for cache in (self._decoded, self._refused):
            if key in cache:
                cache.move_to_end(key)
                found = cache[key]
                if isinstance(found, Reject):
                    raise found.with_traceback(None)  # not a traceback that grows with each fact
                return found
        try:
            found, cache, size = read_image(path), self._decoded, DECODED_PHOTOS
        except Reject as exc:
            found, cache, size = exc, self._refused, REFUSED_PHOTOS
        cache[key] = found
        if len(cache) > size:
            cache.popitem(last=False)
        return self.get(key, path)


def _write_bytes(path: str, data: bytes) -> None:
    """Create the file `path` holding `data`: what `open(path, "wb").write(data)` does (same mode and bytes) without
    the buffered file object, whose set-up costs about as much as creating the file (one per fact)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _write_files(jobs: list) -> None:
    """Do each job (what, source line, target file, value): "crop" writes the value, a crop image, as PNG (once
    per image: the facts of one object share it), "copy" copies the photo at the value's path. An error names the
    source line and the file."""
    encoded: dict = {}  # id of a crop image of `jobs` -> its PNG bytes
    for what, where, target, value in jobs:
        try:
            if what == "crop":
                data = encoded.get(id(value))
                if data is None:
                    buffer = io.BytesIO()
                    value.save(buffer, format="PNG")  # the bytes `value.save(target)` writes
                    data = encoded[id(value)] = buffer.getvalue()
                _write_bytes(target, data)
            else:
                shutil.copyfile(value, target)
        except Exception as exc:
            exc.add_note(f"while writing the {'object crop' if what == 'crop' else 'photo'} of {where} to {target}")
            raise


class FileWriter:
    """The object crops (PNG) and photo copies of a run, written in batches of WRITE_BATCH files: by `workers`
    threads while the caller reads on (Pillow encodes and the kernel creates files without holding the GIL), at
    most 2 batches a thread in flight, so memory does not follow the corpus; with 0 workers by the calling thread
    when a batch is full. A crop is cut and encoded once for the facts of a batch that share its photo and box.
    Every file is written by one job, so the order the threads write them in changes no byte. The first error of
    a writer is raised in the calling thread by an `add_*` or the `finish` after it; leaving the `with` block waits
    for the threads (none still writes into the folder a failed run removes)."""

    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest-writer") if workers else None
        self._window = 2 * workers
        self._batch: list = []
        self._crops: dict = {}  # (photo, box) -> its crop image, for the batch
        self._in_flight: deque = deque()

    def add_crop(self, where: str, target: str, photo, pixels, box: list[int]) -> None:
        """Write the crop `box` of `pixels`, the RGB image of `photo` (a key), to `target` as PNG."""
        key = (photo, *box)
        crop = self._crops.get(key)
        if crop is None:
            crop = self._crops[key] = pixels.crop(box)
        self._add(("crop", where, target, crop))

    def add_copy(self, where: str, target: Path, path: Path) -> None:
        """Copy the photo at `path` to `target`."""
        self._add(("copy", where, target, path))

    def _add(self, job: tuple) -> None:
        self._batch.append(job)
        if len(self._batch) >= WRITE_BATCH:
            self._submit()

    def _submit(self) -> None:
        batch, self._batch, self._crops = self._batch, [], {}
        if self._pool is None:
            _write_files(batch)
            return
        if batch:
            self._in_flight.append(self._pool.submit(_write_files, batch))
        while len(self._in_flight) > self._window:
            self._in_flight.popleft().result()

    def finish(self) -> None:
        """Write what is left and wait for every file; raise the first error of a writer."""
        self._submit()
        while self._in_flight:
            self._in_flight.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._batch, self._crops = [], {}
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _torch_refusal(exc: Exception) -> str:
    """Why torch's restricted loader refused a file, in our words.

    Torch's own message advises retrying with `weights_only=False`, which would run whatever code the
    file holds; that advice is never passed on."""
    if isinstance(exc, EOFError):
        return "not a readable plain-data torch file (it is empty or cut off); the file is never loaded."
    text = str(exc)
    code = re.search(r"GLOBAL\s+([\w.]+)", text)
    if code:
        return (f"not plain data: it refers to {code.group(1)}, which a full unpickling would import or run; "
                "the file is never loaded. Only plain data (dicts, lists, strings, numbers, tensors) is read.")
    detail = next((line.strip() for line in text.splitlines() if line.strip()
                   and not re.search(r"weights.only|re-running|file an issue|documentation", line, re.IGNORECASE)),
                  type(exc).__name__)
    detail = re.sub(r"0x[0-9a-fA-F]{6,}", "0x…", detail.split(". ")[0])[:SHOW_CHARS]
    return f"not a readable plain-data torch file ({detail}); the file is never loaded."


TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy (non-zip) torch.save file
NEVER_LOADED = ("the file is never loaded. Only plain data (dicts, lists, strings, numbers, tensors) is read, from a "
                "file torch.save wrote.")


def _bare_pickle(path: Path) -> tuple[int, list[str]] | None:
    """(pickle protocol, the globals it refers to) when `path` is a bare pickle stream (`pickle.dump`), not a file
    torch.save wrote; None for anything else. Read with `pickletools` opcode by opcode: nothing is unpickled."""
    import pickletools

    try:
        with path.open("rb") as f:
            head = f.read(2)
            if len(head) < 2 or head[0] != 0x80:  # PROTO: a pickle of protocol >= 2; torch's zip files start "PK"
                return None
            f.seek(0)
            refs, strings, first = [], [], None
            for op, arg, _ in pickletools.genops(f):
                if first is None and op.name not in ("PROTO", "FRAME"):
                    first = (op.name, arg)
                    if op.name in ("LONG1", "LONG4") and arg == TORCH_LEGACY_MAGIC:
                        return None  # a legacy torch.save file: torch's own refusal says why
                if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(str(arg))
                elif op.name in ("GLOBAL", "INST"):
                    refs.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    refs.append(".".join(strings[-2:]))
    except Exception:  # noqa: BLE001 - not a well-formed pickle after its first bytes: torch's refusal stands
        return None
    return head[1], refs


def _pth_refusal(path: Path, exc: Exception) -> str:
    """Why a .pth file is refused: a bare pickle (pickle.dump, not torch.save) said as such, else `_torch_refusal`."""
    bare = _bare_pickle(path)
    if bare is None:
        return _torch_refusal(exc)
    protocol, refs = bare
    if refs:
        return (f"not plain data: it refers to {refs[0]}, which a full unpickling would import or run; "
                f"{NEVER_LOADED}")
    return (f"a bare pickle stream (pickle protocol {protocol}, as pickle.dump writes it), not a torch file; "
            f"{NEVER_LOADED} Write the dict with torch.save(objects, path) instead.")


def load_object_dict(path: Path) -> dict[str, dict]:
    """`ent_<split>_dict.pth` as plain data; IngestError if it holds anything else."""
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError,
            KeyError, IndexError, OSError) as exc:
        raise IngestError(f"{path}: refused: {_pth_refusal(path, exc)}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise IngestError(f"{path}: refused: expected a dict img_id -> {{object name: box}}")
    return data


def load_captions(path: Path) -> dict:
    """`caption_dict.json` if present (img_id -> object -> caption), else empty."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise IngestError(f"{path}:1: expected a JSON object img_id -> {{object: caption}}")
    for img_id, objects in data.items():
        if not isinstance(objects, dict) or not all(c is None or isinstance(c, str) for c in objects.values()):
            raise IngestError(f"{path}: entry {img_id!r}: expected a JSON object {{object name: caption string}}")
    return data


def _read_lines(path: Path):
    """(line number, raw bytes) of the non-blank lines; each line is decoded on its own (see `decode_line`)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, raw


def decode_line(raw: bytes, lineno: int) -> str:
    """One line as text; Reject if it is not UTF-8, so one bad line costs that line, not the file."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Reject("not_utf8", f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                 f"of the line ({exc.reason})") from None


class Rejects:
    """The rejected lines of a run, written to a JSON-lines file as they come, with a count per kind."""

    def __init__(self, path: Path):
        self.kinds = Counter()
        self._file = path.open("w", encoding="utf-8")

    def add(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.kinds[row["kind"]] += 1

    def __len__(self) -> int:
        return sum(self.kinds.values())

    def close(self) -> None:
        self._file.close()


def _ingest_split(source, split_file, labels, captions, cfg, photos, staging, rejects, writer):
    """Write the good facts of one split, without their pair counts, to `<split>.jsonl.pass1` in `staging`, with
    their crops and photos (written by `writer`, a FileWriter); rejected lines go to `rejects`. Returns that file, the
    number of facts, their labels and, per image, its distinct entity spans and object names."""
    split = SPLITS[split_file]
    txt = source / "txt" / f"{split_file}.txt"
    if not txt.is_file():
        raise IngestError(f"{txt}: missing (the MORE layout needs txt/{{train,valid,test}}.txt)")
    pass1 = staging / f"{split}.jsonl.pass1"
    n_facts, relations, pairs = 0, Counter(), {}
    with pass1.open("w", encoding="utf-8") as out:
        for lineno, raw in _read_lines(txt):
            line = raw.decode("utf-8", errors="backslashreplace")  # for the excerpt; decode_line checks it
            try:
                record = parse_line(decode_line(raw, lineno))
                tokens, entity = parse_entity(record)
                relation = record["relation"]
                if not isinstance(relation, str) or relation not in labels:
                    raise Reject("label_not_in_set", f"label {show(relation)} is not in rel2id.json")
                text = record.get("text")
                if text is not None and not isinstance(text, str):
                    raise Reject("bad_text", f"'text' must be a string, got {type(text).__name__}")
                path = photos.path(source, split_file, record["img_id"])  # checks img_id before it is a key
                info, pixels = photos.get((split_file, record["img_id"]), path)
                t = record["t"]
                if not isinstance(t, dict) or "pos" not in t:
                    raise Reject("bad_box", "object 't' must be a dict with 'name' and 'pos'")
                if not isinstance(t.get("name", ""), str):
                    raise Reject("bad_object_name", f"object 't.name' must be a string, got {show(t['name'])}")
                box = pixel_box(t["pos"], info.width, info.height, cfg.box_tolerance)
            except Reject as exc:
                rejects.add({"file": str(txt), "line": lineno, "kind": exc.kind, "reason": str(exc),
                             "excerpt": line.strip()[:200]})
                continue
            fact_id = f"{split}-{lineno:06d}"
            crop_rel = f"crops/{split}/{fact_id}.png"
            where = f"{txt}:{lineno}"
            writer.add_crop(where, f"{staging}/{crop_rel}", info.path, pixels, box)
            if record["img_id"] not in pairs:  # the photo's first fact: copy the photo
                writer.add_copy(where, staging / "images" / split / record["img_id"], info.path)
            obj_name = t.get("name", "")
            types = type_pair(relation)
            out.write(json.dumps({
                "id": fact_id,
                "split": split,
                "source": f"txt/{split_file}.txt:{lineno}",
                "img_id": record["img_id"],
                "image": f"images/{split}/{record['img_id']}",
                "width": info.width,
                "height": info.height,
                "text": text or " ".join(tokens),
                "tokens": tokens,
                "entity": entity,
                "object": {
                    "name": obj_name,
                    "box": box,
                    "crop": crop_rel,
                    "caption": (captions.get(record["img_id"]) or {}).get(obj_name),
                },
                "relation": relation,
                "object_type": types[0] if types else None,
                "entity_type": types[1] if types else None,
            }, ensure_ascii=False) + "\n")
            n_facts += 1
            relations[relation] += 1
            spans, objects = pairs.setdefault(record["img_id"], (set(), set()))
            spans.add((entity["start"], entity["end"]))
            objects.add(obj_name)
    return pass1, n_facts, relations, pairs


_IMG_ID_KEY = '"img_id": '  # its first place in a fact line: the keys before it hold no such text


def _add_pair_counts(pass1: Path, output: Path, pairs: dict, object_dict: dict[str, dict]) -> None:
    """Write the facts of `pass1` to `output`, each with `pair_entities` / `pair_objects`: the distinct entities
    and objects of its image-title pair (objects: those of its facts and of `object_dict`); remove `pass1`."""
    counts = {img_id: (len(spans), len(set(object_dict.get(img_id, {})) | objects))
              for img_id, (spans, objects) in pairs.items()}
    decode = json.JSONDecoder().raw_decode
    with pass1.open(encoding="utf-8", newline="\n") as src, output.open("w", encoding="utf-8") as out:
        for line in src:  # '{..., "entity_type": ...}\n' as json.dumps wrote it
            img_id, _ = decode(line, line.index(_IMG_ID_KEY) + len(_IMG_ID_KEY))
            n_entities, n_objects = counts[img_id]
            out.write(f'{line[:-2]}, "pair_entities": {n_entities}, "pair_objects": {n_objects}}}\n')
    pass1.unlink()


def shown_path(path: str | Path) -> Path:
    """`path` relative to the working directory when it lies inside it, else as given: what outputs record."""
    path = Path(path)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd())
        except ValueError:
            return path
    return path


def failed_rejects_path(output: str | Path) -> Path:
    """`<output>.rejects.jsonl`: the rejects of the last run into `output` if that run failed, else absent."""
    output = Path(output)
    return output.with_name(output.name + ".rejects.jsonl")


def ingest(source: str | Path, output: str | Path, cfg: IngestConfig) -> dict:
    """Read `source` (official MORE layout) into `output`; return the summary.

    Everything is written into `<output>.partial` and swapped in only when the run succeeds. On any
    failure, too many rejects included, the partial folder is removed, `output` is left as it was, and
    the lines this run rejected before it stopped go to `<output>.rejects.jsonl` (`report_rejects`
    prints them); the next run removes that file.
    """
    source, output = shown_path(source), Path(output)
    staging = output.with_name(output.name + ".partial")
    failed = failed_rejects_path(output)
    pending = failed.with_name(failed.name + ".partial")  # this run's rejects, as they come
    failed.unlink(missing_ok=True)
    pending.unlink(missing_ok=True)  # left by a run that was killed
    try:
        summary = _ingest_into(source, staging, cfg, pending, output)
        swap_in(staging, output)
    except BaseException:  # Ctrl-C too: never leave a half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        try:
            failed.parent.mkdir(parents=True, exist_ok=True)
            if pending.exists():
                os.replace(pending, failed)
            else:
                write_jsonl(failed, [])
        except OSError:
            pass  # do not hide the error that stopped the run behind one about this file
        raise
    return summary


def _ingest_into(source: Path, staging: Path, cfg: IngestConfig, pending: Path, output: Path) -> dict:
    """Write the whole ingested folder into `staging`, the rejects first to `pending`; raise if the run must fail
    (see `ingest`)."""
    if not source.is_dir():
        raise IngestError(f"{source}: source folder not found")
    try:
        labels = load_rel2id(source / "rel2id.json")
    except FileNotFoundError:
        raise IngestError(f"{source / 'rel2id.json'}: missing") from None
    except ValueError as exc:
        raise IngestError(str(exc)) from None
    captions = load_captions(source / "caption_dict.json")

    shutil.rmtree(staging, ignore_errors=True)
    for split in SPLITS.values():
        (staging / "crops" / split).mkdir(parents=True)
        (staging / "images" / split).mkdir(parents=True)

    photos = Photos()
    summary: dict = {"source": str(source), "facts": {}, "lines": {}, "labels": {}}
    rejects = Rejects(pending)
    try:
        with FileWriter(cfg.workers) as writer:  # on any error, waits for its threads before the caller cleans up
            for split_file, split in SPLITS.items():
                pth = source / f"ent_{split_file}_dict.pth"
                object_dict = load_object_dict(pth) if pth.exists() else {}
                before = len(rejects)
                pass1, n_facts, relations, pairs = _ingest_split(source, split_file, labels, captions, cfg, photos,
                                                                 staging, rejects, writer)
                _add_pair_counts(pass1, staging / f"{split}.jsonl", pairs, object_dict)
                summary["facts"][split] = n_facts
                summary["lines"][split] = n_facts + len(rejects) - before
                summary["labels"][split] = dict(sorted(relations.items()))
            writer.finish()
    finally:
        rejects.close()

    total = sum(summary["lines"].values())
    if total == 0:
        raise IngestError(f"{source / 'txt'}: no fact lines found")
    summary["rejects"] = len(rejects)
    summary["reject_fraction"] = len(rejects) / total
    summary["reject_reasons"] = dict(rejects.kinds.most_common())
    if summary["reject_fraction"] > cfg.max_reject_fraction:
        raise RejectFractionExceeded(
            f"{len(rejects)} of {total} lines rejected ({summary['reject_fraction']:.1%}), more than "
            f"ingest.max_reject_fraction={cfg.max_reject_fraction:.1%}; {output} was left as it was; "
            f"every rejected line is in {failed_rejects_path(output)}"
        )
    os.replace(pending, staging / "rejects.jsonl")
    (staging / "labels.json").write_text(json.dumps(sorted(labels, key=labels.get), indent=1) + "\n")
    (staging / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def report_rejects(output: str | Path, limit: int = 50, stream=sys.stderr) -> None:
    """Print the rejects of the last run into `output` as `file:line: reason`, at most `limit` of them.

    After a failed run these are the ones in `<output>.rejects.jsonl`, not the older ones in `output`."""
    failed = failed_rejects_path(output)
    path = failed if failed.exists() else Path(output) / "rejects.jsonl"
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for row in rows[:limit]:
        print(f"{row['file']}:{row['line']}: {row['reason']}", file=stream)
    if len(rows) > limit:
        print(f"... and {len(rows) - limit} more in {path}", file=stream)


def run(cfg: IngestConfig, output: str | Path, track: bool = True) -> dict:
    """The ingest stage: `ingest` the folder `cfg.source` into `output` in an MLflow stage run; return the summary.

    Logs the summary, `rejects.jsonl` and each split as a dataset input. A failed run still prints its rejects
    (`report_rejects`) and logs them to its failed MLflow run. `track=False` (the stand-alone `morer1 ingest`
    outside a pipeline, `tracking.standalone_tracked`): the same, logged nowhere."""
    from contextlib import nullcontext

    output = Path(output)
    with tracking.stage_run("ingest", cfg) if track else nullcontext():
        try:
            summary = ingest(cfg.source, output, cfg)
        except BaseException:
            if track and failed_rejects_path(output).exists():
                import mlflow

                mlflow.log_artifact(str(failed_rejects_path(output)))
            raise
        finally:
            report_rejects(output)
        if track:
            import mlflow

            tracking.log_summary(summary)
            mlflow.log_artifact(str(output / "rejects.jsonl"))
            _log_datasets(output, summary["facts"])
    return summary


def _log_datasets(output: Path, splits) -> None:
    """Each split's `id`, `img_id`, `text` and `relation` as an MLflow dataset input of the active run."""
    import mlflow
    import pandas as pd

    for split in splits:
        columns = {"id": [], "img_id": [], "text": [], "relation": []}
        with (output / f"{split}.jsonl").open(encoding="utf-8") as f:
            for line in f:  # only these columns are kept, the relation once per label
                record = json.loads(line)
                for name, values in columns.items():
                    values.append(sys.intern(record[name]) if name == "relation" else record[name])
        flat = pd.DataFrame(columns) if columns["id"] else pd.DataFrame(columns=["id"])
        with warnings.catch_warnings():  # mlflow registers the local source class twice and warns about it
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(flat, source=(output / f"{split}.jsonl").resolve().as_uri(),
                                              name=f"facts-{split}")
        mlflow.log_input(dataset, context=split)
