"""Contact sheets: images in a grid, each with its caption underneath."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 4


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def contact_sheet(images: list[np.ndarray], captions: list[str], cols: int = 8, scale: int = 3) -> Image.Image:
    """A grid of ``images`` ([H, W, 3] uint8), each enlarged ``scale`` times (nearest) over its caption.

    Captions wrap at word boundaries to the cell width, in PIL's default font.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    h, w = images[0].shape[:2]
    cell_w = w * scale
    wrapped = [_wrap(c, font, cell_w, probe) for c in captions]
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    cell_h = h * scale + PAD + line_h * max(len(lines) for lines in wrapped)
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (cell_w + PAD) + PAD, rows * (cell_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x = PAD + (i % cols) * (cell_w + PAD)
        y = PAD + (i // cols) * (cell_h + PAD)
        sheet.paste(Image.fromarray(img).resize((cell_w, h * scale), Image.NEAREST), (x, y))
        draw.rectangle((x - 1, y - 1, x + cell_w, y + h * scale), outline=(200, 200, 200))
        for j, line in enumerate(lines):
            draw.text((x, y + h * scale + PAD + j * line_h), line, fill="black", font=font)
    return sheet
