"""A folder with one sub-folder of images per class (ImageNet's `val/n01440764/*.JPEG`) read in
place as an eval set: no conversion to shards first.

    python -m clipforge.data.image_folder /data/imagenet/val     # its sub-folders and counts

The eval loader (eval_loader.EvalLoader) reads it as it reads shards of known sizes: each class
sub-folder is one "shard" whose samples are its images in sorted order, so the global batches,
the split over ranks and workers and the padding are the same code. Samples come out as a
shard's would ({"__key__": "n01440764/ILSVRC2012_val_00000293", "jpeg": bytes, "cls": b"0"}),
decoded in the loader's workers by the same transform. Which class a sub-folder is comes from
the caller (`label_of`: a benchmark's synsets or names), so the folder's own order never picks
class indices. Paths may be fsspec URLs; listing costs one `ls` per sub-folder.
"""

from __future__ import annotations

import posixpath
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from clipforge.data.shards import SourceError
from clipforge.data.tario import IMAGE_EXTS

# Files beside the class folders that mark a folder as shards or a CLIP_benchmark export.
_SHARD_MARKS = ("manifest.json", "classnames.txt", "nshards.txt")


@dataclass
class ImageFolder:
    root: str
    classes: list[str]  # sub-folder names, sorted: the order samples are read in
    files: list[list[str]]  # per sub-folder, the URLs of its images, sorted
    labels: list[int]  # per sub-folder, the class index it stands for

    @property
    def urls(self) -> list[str]:
        return [posixpath.join(self.root, c) for c in self.classes]

    @property
    def counts(self) -> list[int]:
        return [len(f) for f in self.files]

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def read(self, shard: int, first: int, end: int) -> list[dict[str, Any]]:
        """Images [first, end) of sub-folder `shard`, as raw samples."""
        out = []
        for url in self.files[shard][first:end]:
            name = posixpath.basename(url)
            stem, ext = name.rsplit(".", 1)
            with fsspec.open(url, "rb") as f:
                data = f.read()
            out.append(
                {
                    "__key__": f"{self.classes[shard]}/{stem}",
                    "__url__": url,
                    ext.lower(): data,
                    "cls": str(self.labels[shard]).encode(),
                }
            )
        return out


def _fs(source: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, path, prefix that turns a path it lists back into a URL)."""
    fs, path = fsspec.core.url_to_fs(source)
    keeps_protocol = "://" in path  # http lists whole URLs; s3, gcs, file strip the protocol
    prefix = source.split("://")[0] + "://" if "://" in source and not keeps_protocol else ""
    return fs, path.rstrip("/"), prefix


def _is_image(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS


def is_image_folder(source: str) -> bool:
    """A folder holding class sub-folders and no shards (nor a manifest or CLIP_benchmark files)."""
    if any(c in source for c in "{}") or "::" in source or source.startswith("pipe:"):
        return False
    try:
        fs, path, _ = _fs(source)
        if not fs.isdir(path):
            return False
        entries = fs.ls(path, detail=True)
    except (OSError, ValueError, ImportError):
        return False
    names = {posixpath.basename(e["name"].rstrip("/")) for e in entries}
    if names & set(_SHARD_MARKS) or any(n.endswith((".tar", ".tgz", ".tar.gz")) for n in names):
        return False
    return any(e["type"] == "directory" for e in entries)


def open_folder(source: str, label_of: Callable[[str], int | None], kind: str) -> ImageFolder:
    """List the class sub-folders and their images; every sub-folder must name a class.

    `label_of(sub_folder)` gives its class index or None; `kind` says what a name should be
    ("imagenet1k synset (e.g. n01440764)") in the one error line for unknown ones."""
    fs, path, prefix = _fs(source)
    dirs = [e["name"].rstrip("/") for e in fs.ls(path, detail=True) if e["type"] == "directory"]
    subdirs = sorted(d for d in dirs if not posixpath.basename(d).startswith("."))
    classes = [posixpath.basename(d) for d in subdirs]
    labels = [label_of(c) for c in classes]
    unknown = [c for c, label in zip(classes, labels) if label is None]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        names = ", ".join(repr(c) for c in unknown[:3])
        raise SourceError(f"{source}: sub-folder {names}{more} names no {kind}")
    files = [
        sorted(prefix + p for p in fs.ls(d, detail=False) if _is_image(posixpath.basename(p)))
        for d in subdirs
    ]
    if not any(files):
        raise SourceError(f"{source}: no images ({'/'.join(IMAGE_EXTS)}) in its sub-folders")
    return ImageFolder(prefix + path, classes, files, labels)  # type: ignore[arg-type]


if __name__ == "__main__":
    folder = open_folder(sys.argv[1], lambda c: 0, "class")
    for name, count in zip(folder.classes, folder.counts):
        print(f"{count}\t{name}")
    print(f"{len(folder.classes)} sub-folders, {folder.samples} images", file=sys.stderr)
