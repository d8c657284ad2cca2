"""Models: a timm image tower and a CLIP text tower, joined by `CLIP` (see clip.py)."""

from clipforge.model.clip import CLIP, build_model
from clipforge.model.image_tower import ImageTower, build_image_tower
from clipforge.model.text_tower import TextTower

__all__ = ["CLIP", "ImageTower", "TextTower", "build_image_tower", "build_model"]
