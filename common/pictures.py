"""Pictures that read without the code: panels with captions under a title and notes, label maps
as outlines over a lightly tinted image (the tissue's own colours stay readable), PIL only.

    rows = [[(tile, "tile"), (paint(tile, ids), "its masks")], ...]   # uint8 (H, W, 3) panels
    sheet(rows, "title", ["what one colour means", ...], cell=160).save("masks.png")
"""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common import data as cdata

# 20 colours that stay apart from each other and from H&E's pinks and purples as outlines
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 0, 0),
                    (0, 128, 128), (255, 255, 255), (170, 110, 40), (128, 0, 0), (0, 0, 128),
                    (128, 128, 0), (255, 150, 0), (100, 100, 255), (0, 200, 120), (128, 128, 128)],
                   np.uint8)


def font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the small bitmap font
        return ImageFont.load_default()


def to_rgb(x):
    """A view as the model sees it (float (3, H, W), ImageNet-normalised) or uint8 (3, H, W) ->
    uint8 (H, W, 3) numpy."""
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        mean = torch.tensor(cdata.IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(cdata.IMAGENET_STD).view(3, 1, 1)
        x = (x.float() * std + mean).clamp(0, 1).mul(255).round().byte()
    return x.permute(1, 2, 0).numpy().copy()


def enlarge(img, size, nearest=False):
    """uint8 (h, w, 3) picture, or an (h, w) map of ids or floats -> (size, size[, 3]); maps
    always by nearest (each cell stays one value)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a.astype(np.float32 if a.dtype.kind == "f" else np.int32)
        return np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST))
    return np.asarray(Image.fromarray(a).resize(
        (size, size), Image.NEAREST if nearest else Image.BICUBIC))


def paint(img, labels, alpha=0.2, palette=PALETTE):
    """uint8 (H, W, 3) + int (h, w) ids (-1: unpainted), enlarged to the picture by nearest ->
    uint8 (H, W, 3): every id's region lightly tinted in its colour (alpha) and outlined in it
    (a 2 px line where two ids meet, one pixel on each side), the tissue visible."""
    img = np.asarray(img)
    lab = enlarge(labels, img.shape[0]).astype(np.int64)
    colour = palette[lab % len(palette)]
    edge = np.zeros(lab.shape, bool)
    down, right = lab[1:] != lab[:-1], lab[:, 1:] != lab[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    on = (lab >= 0)[..., None]
    out = np.where(on, (1 - alpha) * img + alpha * colour, img)
    out = np.where((edge[..., None] & on), colour, out)
    return out.astype(np.uint8)


def box(img, x0, y0, x1, y1, colour, width=2):
    """Draw a rectangle (pixel edges) on a uint8 (H, W, 3) picture -> a new picture."""
    pil = Image.fromarray(np.asarray(img))
    ImageDraw.Draw(pil).rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(int(c) for c in colour),
                                  width=width)
    return np.asarray(pil)


def cell_box(img, c, s, colour, width=3):
    """Outline cell c (row-major) of an s x s grid laid over the picture."""
    px = img.shape[0] / s
    return box(img, c % s * px, c // s * px, (c % s + 1) * px, (c // s + 1) * px, colour, width)


def _wrap(draw, text, f, width):
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=f) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def sheet(rows, title, notes=(), cell=160, pad=8, caption_lines=2):
    """rows: lists of (uint8 (h, w, 3) picture, caption) -> PIL image: a bold title line, the
    notes (wrapped), then the rows of panels, each enlarged to cell x cell with its caption
    (wrapped to `caption_lines` lines) under it. Shorter rows leave white space."""
    f, fb = font(13), font(16)
    ncol = max(len(r) for r in rows)
    width = pad + ncol * (cell + pad)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    note_lines = [ln for n in notes for ln in _wrap(probe, n, f, width - 2 * pad)]
    head = pad + 22 + 17 * len(note_lines) + pad
    row_h = cell + 4 + 16 * caption_lines + pad
    out = Image.new("RGB", (width, head + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((pad, pad), title, fill="black", font=fb)
    for i, ln in enumerate(note_lines):
        draw.text((pad, pad + 22 + 17 * i), ln, fill=(60, 60, 60), font=f)
    for r, row in enumerate(rows):
        y = head + r * row_h
        for c, (pic, caption) in enumerate(row):
            x = pad + c * (cell + pad)
            pic = pic if pic.shape[:2] == (cell, cell) else enlarge(pic, cell)
            out.paste(Image.fromarray(pic), (x, y))
            for k, ln in enumerate(_wrap(draw, caption, f, cell)[:caption_lines]):
                draw.text((x, y + cell + 3 + 16 * k), ln, fill="black", font=f)
    return out
