"""Pictures for people: contact sheets, and the self-contained HTML evaluation report.

:func:`write_report` writes one ``report.html`` with every image embedded as a base64 PNG (the file
can be mailed or archived alone): headline numbers, the metrics table, held-out questions with the
model's answers (green = right, red = wrong), generation prompts with the generated image, its
per-scale previews and the oracle's verdict per attribute, and the loss curves.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = ["contact_sheet", "image_data_uri", "write_report"]

RIGHT = (46, 160, 67)
WRONG = (207, 34, 46)


def contact_sheet(
    images: Sequence[Image.Image], captions: Sequence[str] | None = None, *, columns: int = 8,
    cell: int = 96, caption_height: int = 14, background: tuple[int, int, int] = (255, 255, 255),
    borders: Sequence[tuple[int, int, int] | None] | None = None, border_width: int = 3,
) -> Image.Image:
    """Tile ``images`` (nearest-upscaled to ``cell`` px) in a grid, each with an optional caption below.

    Args:
        borders: optional frame colour per image (None = no frame), e.g. :data:`RIGHT` / :data:`WRONG`.

    Raises:
        ValueError: no images, or captions / borders of a different length.
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if borders is not None and len(borders) != len(images):
        raise ValueError(f"{len(borders)} borders for {len(images)} images")
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    cap_h = caption_height if captions is not None else 0
    sheet = Image.new("RGB", (columns * cell, rows * (cell + cap_h)), background)
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + cap_h)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if borders is not None and borders[i] is not None:
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=borders[i], width=border_width)
        if captions is not None:
            draw.text((x + 2, y + cell + 1), captions[i][: cell // 6], fill=(0, 0, 0))
    return sheet


# --------------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------------


def image_data_uri(image: Image.Image | str | Path, *, max_side: int | None = None) -> str:
    """``data:image/png;base64,...`` of a PIL image or an image file (downscaled to ``max_side`` if larger)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f8fa;color:#1f2328}
header{background:#24292f;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header .sub{opacity:.75;font-size:13px;margin-top:4px}
main{padding:8px 28px 40px}section{margin-top:26px}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.headline{display:flex;gap:14px;flex-wrap:wrap;margin-top:18px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 18px;min-width:170px}
.card .v{font-size:28px;font-weight:600}.card .k{font-size:12px;color:#57606a;text-transform:uppercase}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:left}th{background:#eaeef2}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.bar{display:inline-block;height:9px;background:#2da44e;border-radius:2px;vertical-align:middle;margin-left:6px}
.bar.bg{background:#d0d7de;position:relative}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.qa{background:#fff;border:3px solid;border-radius:8px;width:150px;padding:6px;font-size:12px}
.qa.ok{border-color:#2da44e}.qa.bad{border-color:#cf222e}
.qa img{width:150px;height:150px;image-rendering:pixelated;display:block;border-radius:4px}
.qa .q{margin-top:4px;color:#57606a}.qa .a{font-weight:600;margin-top:2px}.qa.ok .a{color:#1a7f37}
.qa.bad .a{color:#cf222e}.qa .g{color:#57606a}
.gens{display:flex;flex-wrap:wrap;gap:10px}
.gen{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 12px;width:600px;box-sizing:border-box;
display:flex;gap:16px;align-items:flex-start}
.gen .main img{width:128px;height:128px;image-rendering:pixelated;border-radius:4px;display:block}
.gen .lbl{font-size:11px;color:#57606a;text-align:center;margin-top:2px}
.gen .info{flex:1;min-width:260px}.gen .prompt{font-size:14px;margin-bottom:6px}
.strip{display:flex;gap:4px;margin-top:6px;flex-wrap:wrap}
.strip img{width:40px;height:40px;image-rendering:pixelated;border:1px solid #d0d7de;border-radius:3px;display:block}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;margin:2px 3px 2px 0;color:#fff}
.badge.ok{background:#2da44e}.badge.bad{background:#cf222e}.badge.na{background:#8c959f}
.curves img{max-width:560px;background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:0 10px 10px 0}
.muted{color:#57606a;font-size:13px}
summary{cursor:pointer;font-weight:600;margin:14px 0 8px}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}")
    return html.escape(str(v))


_NOT_RATES = ("fid", "loss", "mse", "seconds", "lr", "seed")
"""Keys whose numbers in [0, 1] are not fractions (no bar is drawn)."""


def _is_rate(key: str, v: Any) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0 and not any(w in key for w in _NOT_RATES)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows.extend(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            if len(v) <= 8 and all(not isinstance(x, (Mapping, list, tuple, Image.Image)) for x in v):
                rows.append((key, ", ".join(str(x) for x in v)))
        elif not isinstance(v, Image.Image):
            rows.append((key, v))
    return rows


def _value_cell(key: str, v: Any) -> str:
    if _is_rate(key, v):
        return (f'<td class="num">{v:.1%}<span class="bar bg" style="width:80px">'
                f'<span class="bar" style="width:{round(80 * v)}px;margin:0;position:absolute;left:0;top:0">'
                "</span></span></td>")
    return f'<td class="num">{_fmt(v)}</td>'


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td>{_value_cell(k, v)}</tr>" for k, v in _flatten(metrics))
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _attribute_table(metrics: Mapping[str, Any]) -> str:
    """Oracle accuracy per attribute x (all, seen, unseen combinations, each asked-for size), when present."""
    cols = [("all prompts", metrics.get("generation_per_attribute")), ("seen combos", metrics.get("generation_seen")),
            ("held-out combos", metrics.get("generation_unseen"))]
    per_size = metrics.get("generation_per_size")
    if isinstance(per_size, Mapping):  # prompts that ask for a size, one column per size
        cols += [(f"{size} objects", acc) for size, acc in per_size.items()]
    cols = [(name, c) for name, c in cols if isinstance(c, Mapping) and c]
    if not cols:
        return ""
    keys = list(dict.fromkeys(k for _, c in cols for k in c))
    head = "".join(f"<th>{html.escape(n)}</th>" for n, _ in cols)
    body = "".join("<tr><td>" + html.escape(k) + "</td>" +
                   "".join(_value_cell(k, c.get(k)) if c.get(k) is not None else "<td>—</td>" for _, c in cols)
                   + "</tr>" for k in keys)
    return f"<h3>Oracle accuracy of generated images</h3><table><tr><th>attribute</th>{head}</tr>{body}</table>"


def _headline(metrics: Mapping[str, Any]) -> str:
    cards = [("understanding accuracy", metrics.get("understanding_accuracy"), True),
             ("generation accuracy (colour+shape)", metrics.get("generation_accuracy"), True),
             ("replies name what was asked", metrics.get("generation_reply_accuracy"), True),
             ("replies that never end (lower is better)", metrics.get("generation_reply_runaway"), True),
             ("drawing requests answered without drawing (lower is better)",
              metrics.get("generation_reply_forced_image"), True),
             ("FID (project features)", metrics.get("fid"), False),
             ("FID real vs real (floor)", metrics.get("fid_reference"), False)]
    out = []
    for name, v, rate in cards:
        if v is None:
            continue
        shown = f"{v:.1%}" if rate else f"{v:.2f}"
        out.append(f'<div class="card"><div class="k">{html.escape(name)}</div><div class="v">{shown}</div></div>')
    return f'<div class="headline">{"".join(out)}</div>' if out else ""


def _understanding_section(samples: Sequence[Mapping[str, Any]], limit: int) -> str:
    if not samples:
        return ""
    # a seeded shuffle: consecutive records often ask every question about one image
    shown = random.Random(0).sample(list(samples), min(limit, len(samples)))
    n_ok = sum(bool(s.get("correct")) for s in samples)
    cards = []
    for s in shown:
        ok = bool(s.get("correct"))
        img = image_data_uri(s["image"], max_side=256) if s.get("image") is not None else ""
        tag = " · ".join(html.escape(str(s[k])) for k in ("task", "qtype") if s.get(k))
        cards.append(
            f'<div class="qa {"ok" if ok else "bad"}"><img src="{img}" alt="">'
            f'<div class="q">{html.escape(str(s.get("question", "")))}</div>'
            f'<div class="a">{"✔" if ok else "✘"} {html.escape(str(s.get("answer", "")))}</div>'
            + ("" if ok else f'<div class="g">gold: {html.escape(str(s.get("gold", "")))}</div>')
            + (f'<div class="muted">{tag}</div>' if tag else "") + "</div>")
    return (f"<section><h2>Understanding: held-out questions</h2><p class='muted'>{n_ok} of {len(samples)} "
            f"correct (exact match after normalisation); showing {len(shown)}.</p>"
            f'<div class="grid">{"".join(cards)}</div></section>')


def _badges(expected: Mapping[str, str] | None, judged: Mapping[str, bool] | None) -> str:
    if not expected:
        return ""
    out = []
    for key, want in expected.items():
        ok = None if judged is None else judged.get(key)
        cls = "na" if ok is None else ("ok" if ok else "bad")
        out.append(f'<span class="badge {cls}">{html.escape(key)}: {html.escape(str(want))}</span>')
    if judged is not None and "colour+shape" in judged:
        cls = "ok" if judged["colour+shape"] else "bad"
        out.append(f'<span class="badge {cls}">colour+shape</span>')
    return "".join(out)


def _generation_card(s: Mapping[str, Any], previews: bool) -> str:
    main = (f'<div class="main"><img src="{image_data_uri(s["image"], max_side=256)}" alt="">'
            '<div class="lbl">generated</div></div>')
    ref = ""
    if s.get("reference"):
        try:
            ref = (f'<div class="main"><img src="{image_data_uri(s["reference"], max_side=256)}" alt="">'
                   f'<div class="lbl">dataset image</div></div>')
        except OSError:
            ref = ""
    strip = ""
    if previews and s.get("previews"):
        cells = "".join(f'<div><img src="{image_data_uri(p, max_side=128)}" alt="">'
                        f'<div class="lbl">scale {k + 1}</div></div>' for k, p in enumerate(s["previews"]))
        strip = f'<div class="strip">{cells}</div>'
    seen = s.get("combo_seen")
    meta = " · ".join(x for x in (s.get("task") or "", "" if seen is None else ("seen combo" if seen else
                                  "held-out combo"), "" if s.get("seed") is None else f"seed {s['seed']}") if x)
    prompt = html.escape(str(s.get("prompt", "")))
    return (f'<div class="gen">{main}{ref}<div class="info"><div class="prompt">{prompt}</div>'
            f'<div>{_badges(s.get("expected"), s.get("judged"))}</div><div class="muted">{html.escape(meta)}</div>'
            f"{strip}</div></div>")


def _generation_section(samples: Sequence[Mapping[str, Any]], limit: int, previews: bool) -> str:
    if not samples:
        return ""
    shown = list(samples[:limit])
    cards = "".join(_generation_card(s, previews) for s in shown)
    return (f"<section><h2>Generation: prompts and images</h2><p class='muted'>showing {len(shown)} of {len(samples)}; "
            "badges: the oracle's reading of each requested attribute (green = as asked); the strip shows "
            "the image after each scale of next-scale prediction.</p>"
            f'<div class="gens">{cards}</div></section>')


def _reply_section(samples: Sequence[Mapping[str, Any]], limit: int) -> str:
    if not samples:
        return ""
    shown = list(samples[:limit])
    n_ok = sum(bool((s.get("named") or {}).get("all")) for s in samples)
    n_named = sum("all" in (s.get("named") or {}) for s in samples)
    n_runaway = sum(s.get("finish_reason") == "length" for s in samples)
    ending = (f" {n_runaway} of {len(samples)} did not end before the text budget ran out (ended: "
              "<code>length</code>)." if any(s.get("finish_reason") for s in samples) else "")
    rows = "".join(
        f"<tr><td>{html.escape(str(s.get('prompt', '')))}</td><td>{html.escape(str(s.get('reply', '')))}</td>"
        f"<td>{_badges(s.get('expected'), s.get('named'))}</td>"
        f"<td>{html.escape(str(s.get('finish_reason') or '—'))}</td></tr>" for s in shown)
    return (f"<section><h2>Generation: the model's own replies</h2><p class='muted'>the text a chat shows around "
            f"the image: {n_named} of {len(samples)} replies name some attribute of the request before it, {n_ok} "
            f"of them only as asked (badges: red = a different one named).{ending} Showing {len(shown)}.</p>"
            f"<table><tr><th>prompt</th><th>reply</th><th>named</th><th>ended</th></tr>{rows}</table></section>")


def _curves_section(loss_curves: Sequence[str | Path]) -> str:
    imgs = []
    for p in loss_curves:
        p = Path(p)
        if p.is_file():
            imgs.append(f'<figure style="display:inline-block;margin:0"><img src="{image_data_uri(p)}" alt="">'
                        f'<figcaption class="muted">{html.escape(str(p))}</figcaption></figure>')
    return f'<section><h2>Loss curves</h2><div class="curves">{"".join(imgs)}</div></section>' if imgs else ""


def write_report(
    out_path_html: str | Path, *, metrics: Mapping[str, Any],
    understanding_samples: Sequence[Mapping[str, Any]] = (), generation_samples: Sequence[Mapping[str, Any]] = (),
    reply_samples: Sequence[Mapping[str, Any]] = (), previews: bool = True, loss_curves: Sequence[str | Path] = (),
    title: str = "VARGPT evaluation", max_understanding: int = 96, max_generation: int = 48, max_replies: int = 32,
) -> Path:
    """Write a self-contained HTML report (images embedded) and return its path.

    Args:
        out_path_html: the ``.html`` file to write (parent folders are created).
        metrics: any (nested) dict of numbers; ``understanding_accuracy``, ``generation_accuracy``,
            ``generation_reply_accuracy``, ``fid`` and ``fid_reference`` become headline cards,
            ``generation_per_attribute`` / ``generation_seen`` / ``generation_unseen`` an attribute table.
        understanding_samples: ``{"image" (path or PIL), "question", "answer", "gold", "correct",
            "qtype"?, "task"?}`` (as returned by ``evaluate_understanding``).
        generation_samples: ``{"prompt", "image" (PIL), "previews" (PIL per scale), "expected",
            "judged", "reference"?, "combo_seen"?, "task"?, "seed"?}`` (``evaluate_generation``).
        reply_samples: ``{"prompt", "reply", "expected", "named"}`` (``evaluate_replies``).
        previews: show the per-scale preview strip of each generated image.
        loss_curves: PNG files to embed (missing files are skipped).
        title: page title.
        max_understanding / max_generation / max_replies: how many samples to show.
    """
    out = Path(out_path_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = " · ".join(html.escape(str(metrics[k])) for k in ("model", "data", "split") if metrics.get(k))
    body = (
        f"<header><h1>{html.escape(title)}</h1><div class='sub'>{sub} · {when}</div></header><main>"
        f"{_headline(metrics)}"
        f"<section><h2>Metrics</h2>{_attribute_table(metrics)}<details><summary>All numbers</summary>"
        f"{_metrics_table(metrics)}</details></section>"
        f"{_understanding_section(understanding_samples, max_understanding)}"
        f"{_generation_section(generation_samples, max_generation, previews)}"
        f"{_reply_section(reply_samples, max_replies)}"
        f"{_curves_section(loss_curves)}</main>"
    )
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
    out.write_text(page, encoding="utf-8")
    return out
