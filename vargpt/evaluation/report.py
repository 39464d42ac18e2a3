"""Pictures for people: contact sheets of images with short captions."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def contact_sheet(
    images: Sequence[Image.Image], captions: Sequence[str] | None = None, *, columns: int = 8,
    cell: int = 96, caption_height: int = 14, background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile ``images`` (nearest-upscaled to ``cell`` px) in a grid, each with an optional caption below.

    Raises:
        ValueError: no images, or captions of a different length.
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    cap_h = caption_height if captions is not None else 0
    sheet = Image.new("RGB", (columns * cell, rows * (cell + cap_h)), background)
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + cap_h)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if captions is not None:
            draw.text((x + 2, y + cell + 1), captions[i][: cell // 6], fill=(0, 0, 0))
    return sheet
