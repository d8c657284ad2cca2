"""Eval pictures drawn with PIL alone (no matplotlib): a zero-shot confusion matrix and a
retrieval strip (text queries, each with its top images, the right ones framed in green).

Pure functions: numbers and images in, a PIL image out; the logger decides where it goes
(wandb, RUN_DIR/eval/). Try one with:

    python -c "from clipforge.eval.figures import confusion_image; \\
confusion_image([[5, 1], [0, 6]], ['cat', 'dog']).save('/tmp/cm.png')"
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_BG = (255, 255, 255)
_INK = (20, 20, 20)
_RIGHT = (40, 170, 60)
_WRONG = (200, 200, 200)
# Above this many classes the names no longer fit beside the cells: only the colours remain.
_MAX_LABELLED = 40


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _blue(frac: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1): one hue, so the eye reads the value, not the colour."""
    f = min(max(frac, 0.0), 1.0)
    return (int(255 - 225 * f), int(255 - 185 * f), int(255 - 75 * f))


def confusion_image(
    confusion: Sequence[Sequence[int]], classnames: Sequence[str], title: str = ""
) -> Image.Image:
    """Rows are true classes, columns predictions; each row normalised (its recall), so
    classes of different sizes read alike. Counts are printed when the cells are large enough."""
    n = len(confusion)
    if n == 0 or any(len(row) != n for row in confusion):
        raise ValueError("confusion must be a non-empty square matrix")
    cell = max(2, min(40, 640 // n))
    font = _font(11 if cell >= 24 else 10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labelled = n <= _MAX_LABELLED
    names = [f"{i} {classnames[i] if i < len(classnames) else ''}" for i in range(n)]
    left = 8 + (max(_text_width(probe, s, font) for s in names) + 6 if labelled else 0)
    top = 26 + (16 if labelled else 0)
    title = title or "confusion: rows true, columns predicted"
    width = max(left + n * cell + 8, _text_width(probe, title, font) + 16)
    img = Image.new("RGB", (width, top + n * cell + 22), _BG)
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill=_INK, font=font)
    for i, row in enumerate(confusion):
        total = max(1, sum(row))
        for j, count in enumerate(row):
            frac = count / total
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_blue(frac))
            if labelled and cell >= 24 and count:
                ink = _BG if frac > 0.5 else _INK
                draw.text((x + 3, y + cell // 3), str(count), fill=ink, font=font)
        if labelled:
            draw.text((8, top + i * cell + max(0, cell // 2 - 6)), names[i], fill=_INK, font=font)
    if labelled:
        for j in range(n):
            draw.text(
                (left + j * cell + max(0, cell // 2 - 4), top - 15), str(j), fill=_INK, font=font
            )
    draw.text((left, top + n * cell + 4), "predicted class ->", fill=_INK, font=font)
    return img


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(draw, lines[-1] + " " + word, font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return lines


def retrieval_strip(
    queries: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    correct: Sequence[Sequence[bool]],
    thumb: int = 96,
) -> Image.Image:
    """One row per text query: the query, then its top images left to right, each framed in
    green when it is the query's own image and in grey otherwise."""
    if not (len(queries) == len(images) == len(correct)):
        raise ValueError("queries, images and correct must have one entry per query")
    k = max((len(row) for row in images), default=0)
    text_w, pad, border = 240, 6, 4
    row_h = thumb + 2 * border + pad
    img = Image.new(
        "RGB", (text_w + k * (thumb + 2 * border + pad) + pad, pad + row_h * len(queries)), _BG
    )
    draw = ImageDraw.Draw(img)
    font = _font(12)
    for r, (query, row, right) in enumerate(zip(queries, images, correct)):
        y = pad + r * row_h
        for n, line in enumerate(_wrap(draw, query, font, text_w - 2 * pad, thumb // 16)):
            draw.text((pad, y + n * 16), line, fill=_INK, font=font)
        for c, (picture, ok) in enumerate(zip(row, right)):
            x = text_w + c * (thumb + 2 * border + pad)
            frame = _RIGHT if ok else _WRONG
            draw.rectangle(
                [x, y, x + thumb + 2 * border - 1, y + thumb + 2 * border - 1], fill=frame
            )
            img.paste(picture.convert("RGB").resize((thumb, thumb)), (x + border, y + border))
    return img
