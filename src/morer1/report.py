"""Error-analysis report: one static, offline HTML page of predictions with their images and rationales.

Everything that comes from the data or the model (titles, tokens, names, labels, completions, ids) is
untrusted: it is passed through `html.escape` before it reaches the page, it is never put inside the
script, and image files are named by position, never by a value from the data. The only script is a
fixed inline filter, allowed by its hash in the page's Content-Security-Policy.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import Counter
from pathlib import Path

from morer1.metrics import INTERVAL_KEYS, SUMMARY_KEYS

FULL_MAX_SIDE = 480   # full images are scaled to at most this side (smaller ones up to FULL_MIN_SIDE)
FULL_MIN_SIDE = 240
CROP_MAX_SIDE = 200
JPEG_QUALITY = 80

SCRIPT = """
(function () {
  var rel = document.getElementById('f-relation');
  var right = document.getElementById('f-right');
  var wrong = document.getElementById('f-wrong');
  var count = document.getElementById('f-count');
  function apply() {
    var r = rel.value, shown = 0;
    var cards = document.querySelectorAll('.sample');
    for (var i = 0; i < cards.length; i++) {
      var c = cards[i];
      var okRel = r === '' || c.getAttribute('data-relation') === r || c.getAttribute('data-predicted') === r;
      var ok = c.getAttribute('data-correct') === 'true';
      var okCorrect = ok ? right.checked : wrong.checked;
      c.hidden = !(okRel && okCorrect);
      if (!c.hidden) { shown++; }
    }
    count.textContent = String(shown);
  }
  rel.addEventListener('change', apply);
  right.addEventListener('change', apply);
  wrong.addEventListener('change', apply);
  apply();
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
td, th { border: 1px solid #ccc; padding: .2em .5em; text-align: right; white-space: nowrap; }
td:first-child, th:first-child { text-align: left; }
.filters { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }
.sample { border: 1px solid #ccc; border-radius: 6px; padding: .8em; margin: 1em 0; }
.sample.wrong { border-left: 6px solid #c62828; }
.sample.right { border-left: 6px solid #2e7d32; }
.images { display: flex; gap: 1em; align-items: flex-start; flex-wrap: wrap; }
.images img { border: 1px solid #999; max-width: 100%; }
.badge { display: inline-block; padding: .1em .6em; border-radius: 1em; color: #fff; font-weight: bold; }
.badge.right { background: #2e7d32; } .badge.wrong { background: #c62828; }
mark { background: #ffe066; padding: 0 .15em; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: .6em; max-height: 30em;
      overflow: auto; }
.missing { color: #999; font-style: italic; }
.meta { color: #666; font-size: .9em; }
"""


def _e(value) -> str:
    """Escape anything for HTML text and attribute values (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return _e(value)


def _inside(base: Path, rel) -> Path | None:
    """`base / rel` when it stays inside `base` (the data names the path, so it is not trusted)."""
    if not isinstance(rel, str) or not rel:
        return None
    base = base.resolve()
    path = (base / rel).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None


def _box(row: dict) -> tuple[int, int, int, int] | None:
    try:
        x0, y0, x1, y1 = (int(v) for v in row["object"]["box"])
    except (KeyError, TypeError, ValueError):
        return None
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _save_full(src: Path, box, dest: Path) -> bool:
    """The full image scaled to a light size, with the object box drawn as a thick rectangle."""
    from PIL import Image, ImageDraw

    try:
        with Image.open(src) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    w, h = img.size
    side = max(w, h)
    scale = FULL_MAX_SIDE / side if side > FULL_MAX_SIDE else max(1, -(-FULL_MIN_SIDE // side)) if side else 1
    if scale != 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    if box is not None:
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        width = max(3, round(max(img.size) / 120))
        draw = ImageDraw.Draw(img)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 80), width=width)
    img.save(dest, "JPEG", quality=JPEG_QUALITY)
    return True


def _save_crop(crop_src: Path | None, full_src: Path | None, box, dest: Path) -> bool:
    """The object crop: the ingested crop file, else cut from the full image; scaled to a light size."""
    from PIL import Image

    try:
        if crop_src is not None:
            with Image.open(crop_src) as img:
                img = img.convert("RGB")
        elif full_src is not None and box is not None:
            with Image.open(full_src) as full:
                img = full.convert("RGB").crop(box)
        else:
            return False
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    w, h = img.size
    side = max(w, h)
    if not side:
        return False
    scale = CROP_MAX_SIDE / side if side > CROP_MAX_SIDE else max(1, (CROP_MAX_SIDE // 2) // side)
    if scale != 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    img.save(dest, "JPEG", quality=JPEG_QUALITY)
    return True


def _title_html(row: dict) -> str:
    """The title tokens, escaped, with the entity span `[start, end)` inside `<mark>`."""
    tokens = row.get("tokens")
    entity = row.get("entity") or {}
    if not isinstance(tokens, list) or not tokens:
        return _e(row.get("text", ""))
    words = [_e(t) for t in tokens]
    try:
        start, end = int(entity.get("start")), int(entity.get("end"))
    except (TypeError, ValueError):
        return " ".join(words)
    if not 0 <= start < end <= len(words):
        return " ".join(words)
    marked = "<mark>" + " ".join(words[start:end]) + "</mark>"
    return " ".join(words[:start] + [marked] + words[end:])


def select_samples(rows: list[dict], max_samples: int = 500) -> list[dict]:
    """At most `max_samples` rows: every wrong one first (in input order), then right ones."""
    wrong = [r for r in rows if r.get("predicted") != r.get("relation")]
    right = [r for r in rows if r.get("predicted") == r.get("relation")]
    return (wrong + right)[:max(0, max_samples)]


def _with_interval(m: dict, key: str) -> str:
    """A figure as `0.7100 [0.6400, 0.7800]` when the result carries its interval, else the figure alone."""
    bounds = (m.get("intervals") or {}).get(key)
    text = _fmt(m.get(key, ""))
    return f"{text} [{_fmt(bounds[0])}, {_fmt(bounds[1])}]" if bounds else text


def _interval_note(results: dict) -> str:
    found = next((m["intervals"] for m in results.values() if m.get("intervals")), None)
    if not found:
        return ""
    return (f"<p>In brackets: the {found['confidence']:.0%} interval of accuracy and micro P/R/F1 from "
            f"{found['resamples']} bootstrap resamples of the {found['n_pairs']} image-title pairs (all facts of a pair "
            "are drawn together: they share the image and the title).</p>")


def _metrics_html(metrics: dict) -> str:
    results = {"": metrics} if "accuracy" in metrics else {
        k: v for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v}
    if not results:
        return ""
    keys = [k for k in SUMMARY_KEYS if any(k in m for m in results.values())]
    out = ["<h2>Metrics</h2><table><tr><th></th>", *(f"<th>{_e(k)}</th>" for k in keys), "</tr>"]
    for split, m in results.items():
        out.append(f"<tr><td>{_e(split or 'all')}</td>")
        out += [f"<td>{_with_interval(m, k)}</td>" for k in keys]
        out.append("</tr>")
        for name, b in (m.get("baselines") or {}).items():
            out.append(f"<tr><td>{_e(split)} baseline: {_e(name)}</td>")
            out += [f"<td>{_with_interval(b, k)}</td>" for k in keys]
            out.append("</tr>")
    out.append("</table>")
    out.append(_interval_note(results))
    out.append("<p>Precision follows MORE: every answer that is not <code>none</code> is a relation "
               "prediction, an invalid one included (a wrong one); <code>invalid_rate</code> says how many "
               "answers were invalid. Macro figures leave invalid answers out of every relation's "
               "precision (metrics.py).</p>")
    case_keys = ("n", "accuracy", "precision", "recall", "f1", "invalid_rate")
    for split, m in results.items():
        if m.get("by_case"):
            out.append(f"<h3>By case {_e(split)}</h3><table><tr><th>case</th>"
                       + "".join(f"<th>{k}</th>" for k in case_keys) + "</tr>")
            for case, s in m["by_case"].items():
                out.append(f"<tr><td>{_e(case)}</td>" + "".join(
                    f"<td>{_fmt(s.get(k, ''))}</td>" for k in case_keys) + "</tr>")
            out.append("</table>")
    return "".join(out)


def _signed(value) -> str:
    return f"{value:+.4f}" if isinstance(value, float) else _e(value)


def _comparisons_html(comparisons: dict) -> str:
    """One row per comparison and split: Δ of each figure with its paired interval, p-values, facts only one got
    right."""
    rows = [(name, split, c) for name, by_split in comparisons.items() for split, c in by_split.items()]
    if not rows:
        return ""
    out = ["<h2>Paired comparisons</h2><p><code>a_vs_b</code>: model a minus model b on the same facts. Each "
           "interval comes from bootstrap resamples of image-title pairs applied to both models at once, so what "
           "the two get right or wrong together cancels out; p is two-sided. <em>only a</em> / <em>only b</em>: "
           "facts only that model gets right.</p><table><tr><th>comparison</th><th>split</th>",
           *(f"<th>Δ {k}</th>" for k in INTERVAL_KEYS),
           "<th>p (F1)</th><th>p (accuracy)</th><th>only a</th><th>only b</th><th>facts</th><th>pairs</th></tr>"]
    for name, split, c in rows:
        out.append(f"<tr><td>{_e(name)}</td><td>{_e(split)}</td>")
        out += [f"<td>{_signed(c[f'delta_{k}'])} [{_signed(c[f'delta_{k}_lo'])}, {_signed(c[f'delta_{k}_hi'])}]</td>"
                for k in INTERVAL_KEYS]
        out.append(f"<td>{_fmt(c['p_value_f1'])}</td><td>{_fmt(c['p_value_accuracy'])}</td><td>{_e(c['wins'])}</td>"
                   f"<td>{_e(c['losses'])}</td><td>{_e(c['n'])}</td><td>{_e(c['n_pairs'])}</td></tr>")
    out.append("</table>")
    return "".join(out)


CURVE_LINES = (("precision", "#1565c0"), ("recall", "#c62828"), ("coverage", "#2e7d32"))


def _curve_svg(curve: list[dict], width: int = 360, height: int = 220) -> str:
    """An inline SVG of precision, recall and coverage over the abstention threshold (all in [0, 1])."""
    left, right, top, bottom = 36, 90, 10, 30
    w, h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + w * min(max(t, 0.0), 1.0)

    def y(v: float) -> float:
        return top + h * (1 - min(max(v, 0.0), 1.0))

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           "aria-label='precision, recall and coverage over the abstention threshold'>",
           f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#999'/>"]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f"<text x='{x(tick):.1f}' y='{height - 14}' font-size='10' text-anchor='middle'>{tick:g}</text>"
                   f"<text x='{left - 4}' y='{y(tick) + 3:.1f}' font-size='10' text-anchor='end'>{tick:g}</text>")
    out.append(f"<text x='{left + w / 2:.1f}' y='{height - 2}' font-size='10' text-anchor='middle'>"
               "abstention threshold T</text>")
    for i, (key, color) in enumerate(CURVE_LINES):
        # a step function of T: the value holds from one threshold to the next
        points = []
        for j, row in enumerate(curve):
            points.append((x(row["threshold"]), y(row[key])))
            if j + 1 < len(curve):
                points.append((x(curve[j + 1]["threshold"]), y(row[key])))
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='2'/>"
                   f"<text x='{left + w + 8}' y='{top + 14 + 16 * i}' font-size='11' fill='{color}'>{key}</text>")
    out.append("</svg>")
    return "".join(out)


def _self_consistency_html(sc: dict) -> str:
    """Greedy against self-consistency per split, and each split's precision-recall-coverage curve."""
    splits = [s for s in ("dev", "test") if isinstance(sc.get(s), dict)]
    if not splits:
        return ""
    keys = ("accuracy", "precision", "recall", "f1", "invalid_rate", "coverage")
    t = sc.get("abstain_below")
    names = {"greedy": "greedy", "self_consistency": f"self-consistency (K={_e(sc.get('samples'))})",
             "abstain": f"self-consistency, abstain below {_fmt(t)}"}
    out = ["<h2>Self-consistency</h2>",
           f"<p>{_e(sc.get('samples'))} completions sampled per fact at temperature {_fmt(sc.get('temperature'))}, "
           "majority vote over their labels (invalid ones do not vote; a tie goes to the label voted first); the "
           "vote share is the confidence. Abstaining answers <code>none</code> when the confidence is below T; "
           "coverage is the share of facts not abstained. Precision and recall follow MORE, as above.</p>",
           "<table><tr><th>split</th><th>decoding</th>", *(f"<th>{k}</th>" for k in keys), "</tr>"]
    for split in splits:
        for name, label in names.items():
            m = sc[split].get(name) or {}
            out.append(f"<tr><td>{_e(split)}</td><td>{label}</td>"
                       + "".join(f"<td>{_fmt(m.get(k, 1.0 if k == 'coverage' else ''))}</td>" for k in keys) + "</tr>")
    out.append("</table><div class='images'>")
    for split in splits:
        curve = sc[split].get("curve") or []
        if curve:
            out.append(f"<figure>{_curve_svg(curve)}<figcaption>{_e(split)}: precision, recall and coverage over "
                       "the abstention threshold</figcaption></figure>")
    out.append("</div>")
    return "".join(out)


def _counts_html(rows: list[dict]) -> str:
    gold, predicted, right = Counter(), Counter(), Counter()
    for r in rows:
        g, p = str(r.get("relation")), r.get("predicted")
        gold[g] += 1
        predicted["invalid" if p is None else str(p)] += 1
        right[g] += p == g
    n_right = sum(right.values())
    out = [f"<p>{len(rows)} facts: <span class='badge right'>{n_right} right</span> "
           f"<span class='badge wrong'>{len(rows) - n_right} wrong</span> "
           f"({predicted['invalid']} invalid answers)</p>",
           "<h2>Per relation</h2><table><tr><th>relation</th><th>gold</th><th>predicted</th><th>right</th>"
           "<th title='answered this relation, gold is another'>wrong: false positives</th>"
           "<th title='gold is this relation, answered another (or invalid)'>wrong: false negatives</th></tr>"]
    # a false positive of a relation is an answer of it whose gold is another: predicted - right; a false negative
    # is a fact of that gold answered otherwise: gold - right (an invalid answer is a false positive of `invalid`)
    for lab in sorted(set(gold) | set(predicted)):
        out.append(f"<tr><td>{_e(lab)}</td><td>{gold[lab]}</td><td>{predicted[lab]}</td><td>{right[lab]}</td>"
                   f"<td>{predicted[lab] - right[lab]}</td><td>{gold[lab] - right[lab]}</td></tr>")
    out.append("</table><p class='meta'>false positives: answered this relation, gold is another; "
               "false negatives: gold is this relation, answered another or invalid.</p>")
    return "".join(out)


def _sample_html(i: int, row: dict, full: str | None, crop: str | None) -> str:
    gold, pred = row.get("relation"), row.get("predicted")
    correct = pred == gold
    status = "right" if correct else "wrong"
    obj, entity = row.get("object") or {}, row.get("entity") or {}
    img = (f"<figure><img src='{_e(full)}' alt='full image with the object box'><figcaption>image</figcaption>"
           f"</figure>" if full else "<p class='missing'>image missing</p>")
    img += (f"<figure><img src='{_e(crop)}' alt='object crop'><figcaption>object crop</figcaption></figure>"
            if crop else "<p class='missing'>crop missing</p>")
    return (
        f"<section class='sample {status}' id='s{i}' data-relation='{_e(gold)}' "
        f"data-predicted='{_e('invalid' if pred is None else pred)}' data-correct='{'true' if correct else 'false'}'>"
        f"<p><span class='badge {status}'>{status}</span> gold <code>{_e(gold)}</code> &middot; predicted "
        f"<code>{_e(pred) if pred is not None else '<em>invalid</em>'}</code> "
        f"<span class='meta'>{_e(row.get('id'))} &middot; {_e(row.get('img_id'))}</span></p>"
        f"<p class='title'>{_title_html(row)}</p>"
        f"<p class='meta'>entity <b>{_e(entity.get('name'))}</b> &middot; object <b>{_e(obj.get('name'))}</b>"
        f"{' &middot; caption ' + _e(obj.get('caption')) if obj.get('caption') else ''}"
        f" &middot; pair {_e(row.get('pair_entities'))} entities &times; {_e(row.get('pair_objects'))} objects</p>"
        f"<div class='images'>{img}</div>"
        f"<details open><summary>model output</summary><pre>{_e(row.get('completion', ''))}</pre></details>"
        "</section>"
    )


def write_report(rows: list[dict], facts_dir, out_dir, title: str, metrics: dict | None = None,
                 max_samples: int = 500, self_consistency: dict | None = None,
                 comparisons: dict | None = None) -> Path:
    """Write `out_dir/index.html` and its images in `out_dir/img/`; return the page's path.

    `self_consistency` (evaluate's `self_consistency.json`) adds a section: greedy against self-consistency per split
    and each split's precision-recall-coverage curve as an inline SVG figure (the page stays offline). `comparisons`
    (evaluate's: name -> split -> metrics.paired_bootstrap result) adds the table of paired differences.
    `rows` are fact records (docs/data.md) plus `predicted` (label or None for an invalid answer) and
    `completion` (the raw model output). Image paths are read relative to `facts_dir`. The summary
    counts every row; at most `max_samples` are rendered, all wrong ones first, then right ones.
    """
    facts_dir, out_dir = Path(facts_dir), Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = select_samples(rows, max_samples)
    fulls: dict = {}  # (image, box) -> relative file name or None; shared by the facts of one object
    crops: dict = {}
    cards = []
    for i, row in enumerate(samples):
        image_src = _inside(facts_dir, row.get("image"))
        box = _box(row)
        key = (str(image_src), box)
        if key not in fulls:
            name = f"img/full_{len(fulls):05d}.jpg"
            fulls[key] = name if image_src is not None and _save_full(image_src, box, out_dir / name) else None
        if key not in crops or image_src is None:
            name = f"img/crop_{i:05d}.jpg"
            crop_src = _inside(facts_dir, (row.get("object") or {}).get("crop"))
            crops[key] = name if _save_crop(crop_src, image_src, box, out_dir / name) else None
        cards.append(_sample_html(i, row, fulls[key], crops[key]))

    relations = sorted({str(r.get("relation")) for r in samples}
                       | {"invalid" if r.get("predicted") is None else str(r.get("predicted")) for r in samples})
    options = "".join(f"<option value='{_e(lab)}'>{_e(lab)}</option>" for lab in relations)
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'")
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_e(csp)}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        + (_metrics_html(metrics) if metrics else "")
        + (_comparisons_html(comparisons) if comparisons else "")
        + (_self_consistency_html(self_consistency) if self_consistency else "")
        + _counts_html(rows)
        + f"<p class='meta'>Showing {len(samples)} of {len(rows)} facts (wrong ones first).</p>"
        "<div class='filters'><label>relation (gold or predicted) <select id='f-relation'>"
        f"<option value=''>all</option>{options}</select></label> "
        "<label><input type='checkbox' id='f-wrong' checked> wrong</label> "
        "<label><input type='checkbox' id='f-right' checked> right</label> "
        "&middot; <span id='f-count'></span> shown</div>"
        + "".join(cards)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
