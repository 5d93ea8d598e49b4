"""The error-analysis page: images, escaping of untrusted text, filters, the sample cap."""

import base64
import hashlib
import re

from PIL import Image

from morer1.labels import NONE
from morer1.metrics import compute_metrics
from morer1.report import write_report

A, B = "/per/per/partner", "/per/org/member_of"
XSS = "<script>alert(1)</script>"
ATTR = '"onerror=alert(2) x=\''


def _facts_dir(tmp_path):
    root = tmp_path / "ingested"
    (root / "images" / "dev").mkdir(parents=True)
    (root / "crops" / "dev").mkdir(parents=True)
    Image.new("RGB", (200, 120), (30, 120, 200)).save(root / "images" / "dev" / "a.jpg", "JPEG")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "crops" / "dev" / "dev-000001.png")
    return root


def _row(i, gold, pred, **extra):
    row = {
        "id": f"dev-{i:06d}", "split": "dev", "img_id": "a.jpg", "image": "images/dev/a.jpg", "width": 200,
        "height": 120, "text": "Alice Smith meets Bob", "tokens": ["Alice", "Smith", "meets", "Bob"],
        "entity": {"name": "Alice Smith", "start": 0, "end": 2},
        "object": {"name": "person", "box": [10, 20, 50, 50], "crop": f"crops/dev/dev-{i:06d}.png", "caption": None},
        "relation": gold, "pair_entities": 2, "pair_objects": 1, "predicted": pred,
        "completion": f"<think>step 1: ...</think><answer>{pred}</answer>",
    }
    row.update(extra)
    return row


def _sections(page):
    return re.findall(r"<section class='sample (right|wrong)' id='s\d+' data-relation='([^']*)' "
                      r"data-predicted='([^']*)' data-correct='(true|false)'>", page)


def _card(page, fact_id):
    cards = [c for c in page.split("<section")[1:] if f"<span class='meta'>{fact_id} " in c]
    assert len(cards) == 1
    return cards[0].split("</section>")[0]


def test_page_images_rows_and_summary(tmp_path):
    facts = _facts_dir(tmp_path)
    rows = [_row(1, A, A), _row(2, A, B, object={"name": "flag", "box": [100, 10, 190, 110],
                                                   "crop": "crops/dev/missing.png", "caption": "a flag"}),
            _row(3, NONE, None), _row(4, B, NONE, image="images/dev/nowhere.jpg")]
    metrics = compute_metrics([r["relation"] for r in rows], [r["predicted"] for r in rows], [NONE, A, B],
                              pair_entities=[2] * 4, pair_objects=[1] * 4)
    path = write_report(rows, facts, tmp_path / "report", "dev <errors>", metrics)
    assert path == tmp_path / "report" / "index.html"
    page = path.read_text(encoding="utf-8")
    assert "<title>dev &lt;errors&gt;</title>" in page
    assert len(_sections(page)) == 4
    assert "<mark>Alice Smith</mark> meets Bob" in page
    assert "1 right" in page and "3 wrong" in page and "1 invalid answers" in page
    assert "Nent_1obj" in page and "0.5000" in page  # by case and overall metrics tables
    # the MORE rule: positives A, B and the invalid answer = 3, right 1 -> P 1/3 (the old rule gave 1/2),
    # R 1/3 (gold A, A, B), F1 1/3; accuracy 1/4, macro P (1 + 0)/2, macro R (1/2 + 0)/2,
    # macro F1 (2/3 + 0)/2, invalid 1/4, n 4
    assert ("<tr><td>all</td><td>0.2500</td><td>0.3333</td><td>0.3333</td><td>0.3333</td><td>0.5000</td>"
            "<td>0.2500</td><td>0.3333</td><td>0.2500</td><td>4</td></tr>") in page
    # by case: every fact is Nent_1obj, with the same figures and its invalid rate beside them
    assert ("<tr><th>case</th><th>n</th><th>accuracy</th><th>precision</th><th>recall</th><th>f1</th>"
            "<th>invalid_rate</th></tr>") in page
    assert ("<tr><td>Nent_1obj</td><td>4</td><td>0.2500</td><td>0.3333</td><td>0.3333</td><td>0.3333</td>"
            "<td>0.2500</td></tr>") in page
    assert "an invalid one included" in page
    # every referenced image exists, inside img/; the fact whose image is missing says so
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert srcs and all(s.startswith("img/") and (tmp_path / "report" / s).is_file() for s in srcs)
    # fact 1 (right, so rendered last): a light JPEG of the full image with its box [10, 20, 50, 50] drawn
    card = _card(page, "dev-000001")
    full_src, crop_src = re.findall(r"<img src='([^']+)'", card)
    full = Image.open(tmp_path / "report" / full_src)
    assert full.format == "JPEG" and 240 <= max(full.size) <= 480
    scale = full.size[0] / 200
    r, g, b = full.convert("RGB").getpixel((round(10 * scale) + 1, round(35 * scale)))  # on the box's left edge
    assert r > 150 and b < 150
    r, g, b = full.convert("RGB").getpixel((round(150 * scale), round(100 * scale)))  # background
    assert b > 150 and r < 100
    assert Image.open(tmp_path / "report" / crop_src).format == "JPEG"
    # fact 2: its crop file is missing, so the crop is cut from the full image
    assert "crop missing" not in _card(page, "dev-000002")
    # fact 4: neither image nor crop exist
    card = _card(page, "dev-000004")
    assert "image missing" in card and "crop missing" in card and "<img" not in card
    assert len(list((tmp_path / "report" / "img").iterdir())) == len(set(srcs))


def test_untrusted_text_is_escaped(tmp_path):
    facts = _facts_dir(tmp_path)
    evil = _row(1, A, B, tokens=["Hi", XSS, ATTR], text=XSS, entity={"name": XSS + ATTR, "start": 1, "end": 3},
                completion=f"<think>{XSS} and <img src=x onerror=alert(3)> {ATTR}</think><answer>x</answer>",
                img_id=ATTR, id=XSS, object={"name": ATTR, "box": [0, 0, 10, 10], "crop": "../../../etc/passwd",
                                             "caption": XSS})
    evil2 = _row(2, XSS, ATTR)  # even labels are data
    path = write_report([evil, evil2], facts, tmp_path / "r", XSS, {"accuracy": 0.0, "n": 1})
    page = path.read_text(encoding="utf-8")
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '"onerror=' not in page and "onerror=alert(2) x='" not in page
    assert "&quot;onerror=alert(2) x=&#x27;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(3)&gt;" in page
    assert page.count("<script") == 1  # only the page's own filter script
    # the rendered tags are only ours
    tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "table", "tr", "th", "td",
                    "p", "span", "div", "label", "select", "option", "input", "section", "code", "em", "b",
                    "mark", "figure", "img", "figcaption", "details", "summary", "pre", "script"}
    assert len(_sections(page)) == 2
    # the script is allowed by its hash and by nothing else
    script = page.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src &#x27;sha256-{digest}&#x27;" in page


def test_filters_have_their_attributes(tmp_path):
    facts = _facts_dir(tmp_path)
    rows = [_row(1, A, A), _row(2, NONE, B), _row(3, B, None)]
    page = write_report(rows, facts, tmp_path / "r", "t").read_text(encoding="utf-8")
    assert sorted(_sections(page)) == sorted([("right", A, A, "true"), ("wrong", NONE, B, "false"),
                                              ("wrong", B, "invalid", "false")])
    assert "<select id='f-relation'>" in page and "<option value=''>all</option>" in page
    for lab in (A, B, NONE, "invalid"):
        assert f"<option value='{lab}'>" in page
    assert "id='f-right' checked" in page and "id='f-wrong' checked" in page
    assert "data-relation" in page.split("<script>")[1] and "data-correct" in page.split("<script>")[1]
    assert "http://" not in page and "https://" not in page  # nothing external: works offline


def test_max_samples_keeps_wrong_ones_first(tmp_path):
    facts = _facts_dir(tmp_path)
    rows = [_row(1, A, A), _row(2, NONE, NONE), _row(3, A, B), _row(4, B, B), _row(5, NONE, None),
            _row(6, B, A)]
    page = write_report(rows, facts, tmp_path / "r", "t", max_samples=4).read_text(encoding="utf-8")
    shown = re.findall(r"<span class='meta'>(dev-\d+) ", page)
    assert shown == ["dev-000003", "dev-000005", "dev-000006", "dev-000001"]
    assert "Showing 4 of 6 facts" in page
    assert "3 right" in page and "3 wrong" in page  # the summary counts every row
    page = write_report(rows, facts, tmp_path / "r2", "t", max_samples=2).read_text(encoding="utf-8")
    assert re.findall(r"<span class='meta'>(dev-\d+) ", page) == ["dev-000003", "dev-000005"]


def test_image_paths_stay_inside_facts_dir(tmp_path):
    facts = _facts_dir(tmp_path)
    Image.new("RGB", (20, 20)).save(tmp_path / "outside.png")
    rows = [_row(1, A, B, image="../outside.png",
                 object={"name": "x", "box": [0, 0, 5, 5], "crop": str(tmp_path / "outside.png"), "caption": None})]
    page = write_report(rows, facts, tmp_path / "r", "t").read_text(encoding="utf-8")
    assert "image missing" in page and "crop missing" in page and "<img" not in page


def test_self_consistency_section_and_offline_curve(tmp_path):
    from morer1.metrics import coverage_curve

    facts = _facts_dir(tmp_path)
    rows = [_row(1, A, A), _row(2, NONE, B)]
    curve = coverage_curve([A, NONE], [A, B], [1.0, 0.4], [NONE, A, B], [0.0, 0.5, 1.0])
    m = {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "invalid_rate": 0.0}
    sc = {"samples": 5, "temperature": 0.7, "abstain_below": 0.6, "seconds": 1.0,
          "dev": {"greedy": m, "self_consistency": m, "abstain": {**m, "precision": 1.0, "coverage": 0.5},
                  "curve": curve}}
    page = write_report(rows, facts, tmp_path / "report", "dev", self_consistency=sc).read_text(encoding="utf-8")
    assert "<h2>Self-consistency</h2>" in page and "5 completions sampled per fact at temperature 0.7000" in page
    assert ("<tr><td>dev</td><td>self-consistency, abstain below 0.6000</td><td>0.5000</td><td>1.0000</td>"
            "<td>1.0000</td><td>0.6667</td><td>0.0000</td><td>0.5000</td></tr>") in page
    assert "<tr><td>dev</td><td>greedy</td>" in page and page.count("<svg") == 1
    svg = page[page.index("<svg"):page.index("</svg>")]
    lines = re.findall(r"<polyline points='([^']+)' fill='none' stroke='(#[0-9a-f]+)'", svg)
    assert len(lines) == 3  # precision, recall, coverage
    # coverage steps 1 -> 0.5 -> 0.5 over T = 0, 0.5, 1: two points per step but the last, each in the plot box
    coverage = [tuple(map(float, p.split(","))) for p in lines[2][0].split()]
    assert len(coverage) == 5 and coverage[0][1] < coverage[2][1] == coverage[4][1]
    # the page stays offline: the CSP is unchanged and nothing refers outside it
    assert "default-src &#x27;none&#x27;" in page and "://" not in page.replace("xmlns='http://www.w3.org/2000/svg'", "")
    without = write_report(rows, facts, tmp_path / "plain", "dev").read_text(encoding="utf-8")
    assert "Self-consistency" not in without and "<svg" not in without


def test_intervals_and_paired_comparisons_on_the_page(tmp_path):
    facts = _facts_dir(tmp_path)
    rows = [_row(1, A, A), _row(2, A, B), _row(3, NONE, NONE), _row(4, B, B)]
    metrics = compute_metrics([r["relation"] for r in rows], [r["predicted"] for r in rows], [NONE, A, B])
    metrics["intervals"] = {"accuracy": [0.5, 1.0], "precision": [0.25, 1.0], "recall": [0.4, 0.9],
                            "f1": [0.64, 0.78], "confidence": 0.95, "resamples": 1000, "n_pairs": 3}
    comparison = {"delta_f1": 0.0312, "delta_f1_lo": -0.0101, "delta_f1_hi": 0.0723, "p_value_f1": 0.152,
                  "delta_accuracy": 0.02, "delta_accuracy_lo": 0.001, "delta_accuracy_hi": 0.04,
                  "p_value_accuracy": 0.04, "wins": 11, "losses": 4, "n": 1040, "n_pairs": 170,
                  **{f"delta_{k}{end}": 0.0 for k in ("precision", "recall") for end in ("", "_lo", "_hi")}}
    page = write_report(rows, facts, tmp_path / "report", "dev", metrics,
                        comparisons={"grpo_vs_sft": {"dev": comparison}}).read_text(encoding="utf-8")
    assert f"<td>{metrics['f1']:.4f} [0.6400, 0.7800]</td>" in page
    assert "95% interval of accuracy and micro P/R/F1 from 1000 bootstrap resamples of the 3 image-title pairs" in page
    assert "<h2>Paired comparisons</h2>" in page
    assert ("<tr><td>grpo_vs_sft</td><td>dev</td><td>+0.0200 [+0.0010, +0.0400]</td><td>+0.0000 [+0.0000, +0.0000]"
            "</td><td>+0.0000 [+0.0000, +0.0000]</td><td>+0.0312 [-0.0101, +0.0723]</td><td>0.1520</td>"
            "<td>0.0400</td><td>11</td><td>4</td><td>1040</td><td>170</td></tr>") in page
    plain = write_report(rows, facts, tmp_path / "plain", "dev", compute_metrics(
        [r["relation"] for r in rows], [r["predicted"] for r in rows], [NONE, A, B])).read_text(encoding="utf-8")
    assert "Paired comparisons" not in plain and "bootstrap" not in plain


def test_per_relation_counts_false_positives_and_false_negatives(tmp_path):
    """The per-relation table counts both kinds of wrong: a relation predicted 11 times with 4 right has 7 false
    positives, though no fact of that gold was missed (the old "wrong" column, gold - right, read 0)."""
    facts = _facts_dir(tmp_path)
    nat = "/per/misc/nationality"
    rows = ([_row(i, nat, nat) for i in range(1, 5)] + [_row(i, NONE, nat) for i in range(5, 12)]
            + [_row(12, A, B), _row(13, A, None)])
    page = write_report(rows, facts, tmp_path / "r", "dev").read_text(encoding="utf-8")
    assert "<th>right</th><th title='answered this relation, gold is another'>wrong: false positives</th>" in page
    # relation, gold, predicted, right, false positives, false negatives
    assert f"<tr><td>{nat}</td><td>4</td><td>11</td><td>4</td><td>7</td><td>0</td></tr>" in page
    assert f"<tr><td>{NONE}</td><td>7</td><td>0</td><td>0</td><td>0</td><td>7</td></tr>" in page
    assert f"<tr><td>{A}</td><td>2</td><td>0</td><td>0</td><td>0</td><td>2</td></tr>" in page
    assert f"<tr><td>{B}</td><td>0</td><td>1</td><td>0</td><td>1</td><td>0</td></tr>" in page
    assert "<tr><td>invalid</td><td>0</td><td>1</td><td>0</td><td>1</td><td>0</td></tr>" in page
