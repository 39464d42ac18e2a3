"""The HTML report: written, self-contained, holding the metrics and every kind of image."""

from __future__ import annotations

import base64
import re

import pytest
from PIL import Image

from vargpt.evaluation.report import RIGHT, WRONG, contact_sheet, image_data_uri, write_report


def _png(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_write_report(tmp_path):
    img = _png(tmp_path / "q.png", (255, 0, 0))
    curve = _png(tmp_path / "loss.png", (0, 0, 0))
    metrics = {"model": "runs/m", "data": "data/sw", "split": "test", "understanding_accuracy": 0.5,
               "understanding_per_qtype": {"colour": 1.0, "shape": 0.0}, "generation_accuracy": 0.25,
               "generation_per_attribute": {"colour": 0.5, "colour+shape": 0.25},
               "generation_seen": {"colour": 0.75}, "generation_unseen": {"colour": 0.125},
               "generation_per_size": {"small": {"colour": 0.375}, "large": {"colour": 0.875}},
               "fid": 12.3456, "fid_reference": 3.21, "seconds": {"generation": 4.2}, "note": None}
    und = [{"image": str(img), "question": "What colour is the <b>square</b>?", "answer": "red", "gold": "red",
            "correct": True, "qtype": "colour", "task": "qa"},
           {"image": Image.new("RGB", (32, 32)), "question": "What shape?", "answer": "circle", "gold": "star",
            "correct": False, "qtype": "shape", "task": "qa"}]
    gen_img = Image.new("RGB", (32, 32), (0, 255, 0))
    gen = [{"prompt": "Draw a green circle.", "image": gen_img, "previews": [gen_img.resize((s, s)) for s in (1, 2, 4)],
            "expected": {"colour": "green", "shape": "circle"},
            "judged": {"colour": True, "shape": False, "colour+shape": False}, "combo_seen": False, "task": "gen",
            "reference": str(img), "seed": 3}]
    out = write_report(tmp_path / "sub" / "report.html", metrics=metrics, understanding_samples=und,
                       generation_samples=gen, loss_curves=[curve, tmp_path / "missing.png"])
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # 2 questions + generated + reference + 3 previews + 1 loss curve
    assert len(uris) == 8
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    for text in ("50.0%", "25.0%", "12.35", "3.21", "understanding_per_qtype.colour", "Draw a green circle.",
                 "held-out combo", "small objects", "37.5%", "87.5%",
                 "scale 3", "gold: star", "&lt;b&gt;square&lt;/b&gt;", "seconds.generation"):
        assert text in page, text
    assert "<b>square</b>" not in page  # escaped
    assert page.count('class="qa ok"') == 1 and page.count('class="qa bad"') == 1
    assert 'badge ok">colour: green' in page and 'badge bad">shape: circle' in page
    assert "src=\"http" not in page  # self-contained


def test_report_without_samples(tmp_path):
    out = write_report(tmp_path / "r.html", metrics={"understanding_accuracy": None, "fid": None})
    page = out.read_text()
    assert "Metrics" in page and "data:image" not in page


def test_contact_sheet_borders():
    imgs = [Image.new("RGB", (8, 8), (255, 255, 255))] * 3
    sheet = contact_sheet(imgs, ["a", "b", "c"], columns=3, cell=20, borders=[RIGHT, WRONG, None])
    assert sheet.getpixel((0, 0)) == RIGHT and sheet.getpixel((20, 0)) == WRONG
    assert sheet.getpixel((40, 0)) == (255, 255, 255)
    with pytest.raises(ValueError):
        contact_sheet(imgs, borders=[RIGHT])


def test_image_data_uri_downscales(tmp_path):
    uri = image_data_uri(Image.new("RGB", (400, 100)), max_side=40)
    im = Image.open(__import__("io").BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.size == (40, 10)
