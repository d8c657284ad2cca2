"""Decode, orient, convert to RGB, resize and re-encode one image; guards against bombs.

Used by ``python -m data_tools.convert``; try one file with
``python -m data_tools.images IN OUT.jpg [SIZE] [MODE]``.

Resize modes follow img2dataset: ``no`` keeps the size, ``keep_ratio`` makes the smaller side
``image_size``, ``center_crop`` does that and crops the centre square, ``border`` makes the larger
side ``image_size`` and pads to a square with white.

Speed, in order of what it saves: a JPEG that must shrink by 2x or more is decoded at 1/2, 1/4
or 1/8 scale inside libjpeg (draft mode); center_crop resizes only the square it keeps; an image
that already has the target size, mode and format is stored as it came (``--reencode
if-needed``). Pillow releases the GIL while decoding, resizing and encoding, so fetch threads
keep running beside it.
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "webp")
REENCODE = ("never", "if-needed", "always")
# img2dataset's names; for downscaling, Pillow's BOX filter is area averaging (cv2.INTER_AREA).
INTERPOLATIONS = {
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# PIL's own default limit (~0.25 GiB as RGB). PIL itself raises only at twice its limit, so
# limits above 2 * Image.MAX_IMAGE_PIXELS still fail, reported as too large too.
DEFAULT_MAX_PIXELS = 89_478_485
WHITE = (255, 255, 255)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the loader decodes


class ImageError(ValueError):
    """A row's image can't be used; the message starts with a short failure category."""


class FilteredError(ImageError):
    """A good image that the filters (--min-image-size, --max-aspect-ratio) turn away."""


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "border"  # img2dataset's default
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    encode_format: str = "jpg"
    reencode: str = "if-needed"
    min_image_size: int = 0  # smaller side, before resizing
    max_aspect_ratio: float = math.inf  # larger side / smaller side
    downscale_interpolation: str = "area"
    upscale_interpolation: str = "lanczos"


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str  # tar member extension: "jpg", "webp" (or "png" kept as is)
    width: int
    height: int
    original_width: int  # after EXIF orientation, before resizing
    original_height: int
    reencoded: bool


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only, and refuse images whose pixel count would blow up memory."""
    if not data:
        raise ImageError("empty file: zero bytes")
    try:
        with warnings.catch_warnings():
            # The size check below replaces PIL's warning with a per-row error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"not an image: {len(data)} bytes that no decoder recognises") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"decode failed: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels exceeds {max_pixels}")
    return img


def orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (ValueError, TypeError, SyntaxError, OSError):
        return 1  # a broken EXIF block is no reason to lose the image


def check_filters(width: int, height: int, opts: ImageOptions) -> None:
    short, long = min(width, height), max(width, height)
    if short < opts.min_image_size:
        raise FilteredError(f"image too small: {width}x{height} < --min-image-size")
    if long > short * opts.max_aspect_ratio:
        raise FilteredError(f"aspect ratio: {width}x{height} > --max-aspect-ratio")


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """Final width and height for an upright image of ``width`` x ``height``."""
    if opts.resize_mode == "no":
        return width, height
    if opts.resize_mode == "keep_ratio":
        return _scaled_size(width, height, opts.image_size, fit_smaller_side=True)
    return opts.image_size, opts.image_size


def _draft(img: Image.Image, opts: ImageOptions) -> None:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for nearly free; ask for the largest reduction
    # that still leaves every side the resize needs at least `image_size`.
    if img.format != "JPEG" or opts.resize_mode == "no":
        return
    width, height = img.size
    fit = opts.resize_mode in ("keep_ratio", "center_crop")
    scale = opts.image_size / (min(width, height) if fit else max(width, height))
    if scale <= 0.5:
        img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_8bit(img: Image.Image) -> Image.Image:
    import numpy as np  # only 16-bit and float images need it

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


def _filter(src: tuple[int, int], dst: tuple[int, int], opts: ImageOptions) -> Image.Resampling:
    shrinking = dst[0] < src[0] or dst[1] < src[1]
    name = opts.downscale_interpolation if shrinking else opts.upscale_interpolation
    return INTERPOLATIONS[name]


def resize(img: Image.Image, opts: ImageOptions) -> Image.Image:
    """Apply ``opts.resize_mode`` (see the module docstring) to an upright RGB image."""
    if opts.resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {opts.resize_mode!r}; known: {RESIZE_MODES}")
    width, height = img.size
    size = opts.image_size
    if opts.resize_mode == "no":
        return img
    if opts.resize_mode == "center_crop":
        # Resize only the centred square that survives the crop: the same picture as
        # resize-then-crop, with less work and no rounding of the crop offset.
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        if (width, height) == (size, size):
            return img
        box = (left, top, left + side, top + side)
        return img.resize((size, size), _filter((side, side), (size, size), opts), box=box)
    scaled = _scaled_size(width, height, size, fit_smaller_side=opts.resize_mode == "keep_ratio")
    if scaled != img.size:
        img = img.resize(scaled, _filter(img.size, scaled, opts))
    if opts.resize_mode == "border" and scaled != (size, size):
        canvas = Image.new("RGB", (size, size), WHITE)
        canvas.paste(img, ((size - scaled[0]) // 2, (size - scaled[1]) // 2))
        img = canvas
    return img


def encode(img: Image.Image, encode_format: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if encode_format == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _keep_as_is(img: Image.Image, turn: int, opts: ImageOptions) -> bool:
    """Whether the source bytes can be stored unchanged under ``opts.reencode``."""
    ext = PIL_FORMAT_EXT.get(img.format or "")
    if opts.reencode == "always" or ext is None:
        return False
    if opts.reencode == "never":
        return True
    fits = target_size(*img.size, opts) == img.size
    return ext == opts.encode_format and img.mode == "RGB" and turn == 1 and fits


def _validate(img: Image.Image) -> None:
    # A kept image is still decoded once, so a corrupt file is reported here rather than
    # crashing a training run; 1/8 scale is enough to read every JPEG entropy-coded byte.
    if img.format == "JPEG":
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


def process_image(data: bytes, opts: ImageOptions) -> EncodedImage:
    """Encoded bytes in -> resized RGB image out; raises ImageError for anything unusable."""
    img = open_image(data, opts.max_pixels)
    turn = orientation(img)
    original_width, original_height = img.size
    if turn in ROTATING_ORIENTATIONS:
        original_width, original_height = original_height, original_width
    check_filters(original_width, original_height, opts)
    try:
        if _keep_as_is(img, turn, opts):
            _validate(img)
            ext = PIL_FORMAT_EXT[img.format or ""]
            return EncodedImage(
                data, ext, original_width, original_height, original_width, original_height, False
            )
        _draft(img, opts)
        img.load()
        if turn != 1:  # exif_transpose copies even an upright image: skip it then
            img = ImageOps.exif_transpose(img)
        img = resize(to_rgb(img), opts)
        out = encode(img, opts.encode_format, opts.quality)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # PIL reports truncated or corrupt pixel data as any of these.
        raise ImageError(f"decode failed: {type(e).__name__}: {e}") from e
    return EncodedImage(
        out, opts.encode_format, img.width, img.height, original_width, original_height, True
    )


if __name__ == "__main__":
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    mode = sys.argv[4] if len(sys.argv) > 4 else "border"
    with open(sys.argv[1], "rb") as f:
        result = process_image(f.read(), ImageOptions(image_size=size, resize_mode=mode))
    with open(sys.argv[2], "wb") as f:
        f.write(result.data)
    print(f"{result.original_width}x{result.original_height} -> {result.width}x{result.height}")
