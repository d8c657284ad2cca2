"""Image transforms: random resized crop for training, resize + center crop for eval (CLIP's)."""

from __future__ import annotations

from torchvision import transforms as T

from clipforge.config import AugmentConfig


def _to_rgb(img):
    return img.convert("RGB") if img.mode != "RGB" else img


def train_transform(size: int, aug: AugmentConfig) -> T.Compose:
    return T.Compose(
        [
            _to_rgb,
            T.RandomResizedCrop(
                size,
                scale=(aug.scale_min, aug.scale_max),
                interpolation=T.InterpolationMode.BICUBIC,
            ),
            T.ToTensor(),
            T.Normalize(aug.mean, aug.std),
        ]
    )


def eval_transform(size: int, aug: AugmentConfig) -> T.Compose:
    return T.Compose(
        [
            _to_rgb,
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(aug.mean, aug.std),
        ]
    )
