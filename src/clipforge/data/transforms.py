"""Image transforms: random resized crop for training, resize + center crop for eval (CLIP's).

    python -m clipforge.data.transforms IMAGE.jpg [SIZE]     # time the training transform

The training transform is split in two so the loader's workers do the float work once per
batch: `crop` (per image: RandomResizedCrop as one PIL resize over the crop box -> uint8 HWC
tensor) and `normalize` (per batch: uint8 BHWC -> float BCHW, (x / 255 - mean) / std in one
scaled copy and one subtraction). Calling the transform on one image does both, so it is a
drop-in for torchvision's ToTensor + Normalize pipeline (same crops for the same torch seed).

BatchTransform is that split as the training stream's contract: `image` per image, `batch` per
batch. The stream takes any image -> tensor callable too, wrapped whole by `batch_transform`.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from clipforge.config import AugmentConfig

WHITE = (255, 255, 255, 255)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, transparency composited on white: the pixels data_tools.convert
    writes into shards for the same file, and what transformers' CLIPImageProcessor does (so
    an image folder read in place, its shards and an HF export see the same picture)."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return img.convert("RGB")


class CenterCrop:
    """The centre size x size square, its offset rounded down: (W - size) // 2. torchvision's
    CenterCrop rounds half to even instead, one pixel further along the long side when
    (W - size) % 4 == 3; rounding down is what transformers' CLIPImageProcessor does, so a run
    exported with `--format hf` preprocesses there exactly as here (open_clip's preprocess,
    given an `--format open_clip` export, crops with torchvision's rule)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w < self.size or h < self.size:
            raise ValueError(f"image {w}x{h} is smaller than the {self.size} px crop")
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


# Allocates a batch tensor of (shape, dtype): shared memory in a DataLoader worker.
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class BatchTransform(ABC):
    """What the training stream calls: `image` on each decoded image, with torch's generator
    seeded per sample, then `batch` once on the batch's results, into a tensor from `alloc`."""

    @abstractmethod
    def image(self, img: Image.Image) -> torch.Tensor: ...

    @abstractmethod
    def batch(self, images: list[torch.Tensor], alloc: Alloc) -> torch.Tensor: ...


class WholeImage(BatchTransform):
    """Any image -> tensor callable, applied whole per image; the batch is their stack."""

    def __init__(self, fn: Callable[[Image.Image], torch.Tensor]):
        self.fn = fn

    def image(self, img: Image.Image) -> torch.Tensor:
        return self.fn(img)

    def batch(self, images: list[torch.Tensor], alloc: Alloc) -> torch.Tensor:
        return torch.stack(images, out=alloc((len(images), *images[0].shape), images[0].dtype))


def batch_transform(transform: Callable[[Image.Image], torch.Tensor]) -> BatchTransform:
    """The stream's view of a transform: a BatchTransform as it is, any other callable whole."""
    return transform if isinstance(transform, BatchTransform) else WholeImage(transform)


class TrainTransform(BatchTransform):
    """RandomResizedCrop(size, scale, bicubic) + ToTensor + Normalize, split per image/batch."""

    def __init__(self, size: int, aug: AugmentConfig):
        self.size, self.scale = size, (aug.scale_min, aug.scale_max)
        std = torch.tensor(aug.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mul = 1.0 / (255.0 * std)
        self._sub = torch.tensor(aug.mean, dtype=torch.float32).view(1, 3, 1, 1) / std

    def crop(self, img: Image.Image) -> torch.Tensor:
        """One image -> uint8 [size, size, 3] (crop and resize in one resampling pass)."""
        img = _to_rgb(img)
        # torchvision's own parameter draw, from torch's default generator, so seeding that
        # generator replays the crop.
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), [3 / 4, 4 / 3])
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(j, i, j + w, i + h))
        return torch.from_numpy(np.array(img, dtype=np.uint8))

    def normalize(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalized float [B, 3, H, W] (contiguous), into `out` if
        given (the loader passes shared memory, saving the copy a worker's queue would make)."""
        if out is None:
            out = torch.empty(batch.shape[0], 3, batch.shape[1], batch.shape[2])
        out.copy_(batch.permute(0, 3, 1, 2))
        return out.mul_(self._mul).sub_(self._sub)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop(img)[None])[0]

    def image(self, img: Image.Image) -> torch.Tensor:
        return self.crop(img)

    def batch(self, images: list[torch.Tensor], alloc: Alloc) -> torch.Tensor:
        """uint8 HWC crops -> float CHW, once per batch."""
        h, w, c = images[0].shape
        return self.normalize(torch.stack(images), out=alloc((len(images), c, h, w), torch.float32))


def train_transform(size: int, aug: AugmentConfig) -> TrainTransform:
    return TrainTransform(size, aug)


def eval_transform(size: int, aug: AugmentConfig) -> T.Compose:
    return T.Compose(
        [
            _to_rgb,
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            CenterCrop(size),
            T.ToTensor(),
            T.Normalize(aug.mean, aug.std),
        ]
    )


if __name__ == "__main__":
    image = Image.open(sys.argv[1])
    image.load()
    tf = train_transform(int(sys.argv[2]) if len(sys.argv) > 2 else 224, AugmentConfig())
    t0 = time.perf_counter()
    for _ in range(50):
        x = tf(image)
    print(f"{tuple(x.shape)}: {(time.perf_counter() - t0) / 50 * 1e3:.2f} ms per image")
