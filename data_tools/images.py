"""Decode, orient, convert to RGB, resize and re-encode one image; guards against bombs.

Used by ``python -m data_tools.convert``; try one file with
``python -m data_tools.images IN OUT.jpg [SIZE] [MODE]``.

Resize modes follow img2dataset: ``no`` keeps the size, ``keep_ratio`` makes the smaller side
``image_size``, ``center_crop`` does that and crops the centre square, ``border`` makes the larger
side ``image_size`` and pads to a square with white.
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
# PIL's own default limit (~0.25 GiB as RGB). PIL itself raises only at twice its limit, so
# limits above 2 * Image.MAX_IMAGE_PIXELS still fail, reported as too large too.
DEFAULT_MAX_PIXELS = 89_478_485
WHITE = (255, 255, 255)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """A row's image can't be used; the message starts with a short failure category."""


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "border"  # img2dataset's default
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class EncodedImage:
    data: bytes  # JPEG
    width: int
    height: int
    original_width: int  # after EXIF orientation, before resizing
    original_height: int


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only, and refuse images whose pixel count would blow up memory."""
    try:
        with warnings.catch_warnings():
            # The size check below replaces PIL's warning with a per-row error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"decode failed: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels exceeds {max_pixels}")
    return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    if img.getexif().get(ExifTags.Base.Orientation) in ROTATING_ORIENTATIONS:
        return height, width
    return width, height


def _draft(img: Image.Image, image_size: int, resize_mode: str) -> None:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for nearly free; ask for the largest reduction
    # that still leaves every side the resize needs at least `image_size`.
    if img.format != "JPEG" or resize_mode == "no":
        return
    width, height = img.size
    side = (
        min(width, height) if resize_mode in ("keep_ratio", "center_crop") else max(width, height)
    )
    scale = image_size / side
    if scale < 1:
        img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or 255 < peak <= 65535:
        arr = arr / 257.0  # 16-bit range -> 8-bit
    elif peak > 65535:
        arr = arr * (255.0 / peak)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, high bit depths are scaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _scaled_size(
    width: int, height: int, image_size: int, fit_smaller_side: bool
) -> tuple[int, int]:
    # The fitted side is set exactly, so it never ends one pixel off through rounding.
    if (width <= height) == fit_smaller_side:
        return image_size, max(1, round(height * image_size / width))
    return max(1, round(width * image_size / height)), image_size


def resize(img: Image.Image, image_size: int, resize_mode: str) -> Image.Image:
    """Apply one of RESIZE_MODES (see the module docstring)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize_mode!r}; known: {RESIZE_MODES}")
    if resize_mode == "no":
        return img
    size = _scaled_size(*img.size, image_size, fit_smaller_side=resize_mode != "border")
    if size != img.size:
        # reducing_gap=3 shrinks by integer steps first: much faster, visually identical.
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    width, height = img.size
    if resize_mode == "center_crop":
        left, top = (width - image_size) // 2, (height - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    elif resize_mode == "border":
        canvas = Image.new("RGB", (image_size, image_size), WHITE)
        canvas.paste(img, ((image_size - width) // 2, (image_size - height) // 2))
        img = canvas
    return img


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_image(data: bytes, opts: ImageOptions) -> EncodedImage:
    """Encoded bytes in -> resized RGB JPEG out; raises ImageError for anything unusable."""
    img = open_image(data, opts.max_pixels)
    original_width, original_height = oriented_size(img)
    try:
        _draft(img, opts.image_size, opts.resize_mode)
        img.load()
        img = ImageOps.exif_transpose(img)
        img = resize(to_rgb(img), opts.image_size, opts.resize_mode)
    except (OSError, ValueError, SyntaxError) as e:
        # PIL reports truncated or corrupt pixel data as any of these.
        raise ImageError(f"decode failed: {type(e).__name__}: {e}") from e
    return EncodedImage(
        data=encode_jpeg(img, opts.quality),
        width=img.width,
        height=img.height,
        original_width=original_width,
        original_height=original_height,
    )


if __name__ == "__main__":
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    mode = sys.argv[4] if len(sys.argv) > 4 else "border"
    with open(sys.argv[1], "rb") as f:
        out = process_image(f.read(), ImageOptions(image_size=size, resize_mode=mode))
    with open(sys.argv[2], "wb") as f:
        f.write(out.data)
    print(f"{out.original_width}x{out.original_height} -> {out.width}x{out.height}")
