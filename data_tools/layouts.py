"""Dumps that are not one table -> rows: COCO captions, Flickr token files, folders, tars.

Used by ``python -m data_tools.convert`` through ``readers.load``, which imports this module
(never the other way round: both build their rows from ``data_tools.rows``); try one with
``python -m data_tools.readers INPUT FORMAT``.

- coco: ``captions_*.json``; one row per annotated image, every caption kept (``Row.captions``).
- flickr: ``img.jpg#N<TAB>caption`` lines (Flickr8k/30k token files), grouped by image.
- folder: images under a folder; the caption is ``NAME.txt`` beside ``NAME.jpg``, or, with
  ``--caption-template "a photo of a {label}"``, each sub-folder is a class (index in sorted
  order) and its name fills the template.
- tar / webdataset: tars of images and existing shards (ours, img2dataset's, webdataset's);
  members are grouped by key as webdataset does (path up to the first dot of the file name).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from data_tools.rows import (
    Dataset,
    ReadOptions,
    Row,
    TableError,
    load_json,
    make_row,
    open_text,
    table_dir,
)

# Image formats the converter reads as input (it re-encodes them); the members a finished shard
# may hold are clipforge.data.tario.IMAGE_EXTS, which data_tools.inspect checks.
INPUT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# Fields of our own KEY.json that a re-shard recomputes; the rest travels on as extra columns.
REGENERATED = {"key", "source", "caption", "captions", "width", "height", "sha256", "status"}
REGENERATED |= {"original_width", "original_height", "error_message", "url"}
_FLICKR_LINE = re.compile(r"^(?P<name>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def coco_dataset(path: str, obj: dict[str, Any] | None = None) -> Dataset:
    """One row per image that has captions, in the order of the file's "images" list."""
    obj = obj if obj is not None else load_json(path)
    if not isinstance(obj, dict) or "images" not in obj or "annotations" not in obj:
        raise TableError(f"{path}: not COCO captions JSON (needs 'images' and 'annotations')")
    captions: dict[Any, list[str]] = {}
    for ann in obj["annotations"]:
        if "caption" not in ann:
            raise TableError(f"{path}: annotations have no 'caption' (instances file?)")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    rows = []
    for image in obj["images"]:
        caps = captions.get(image["id"])
        if not caps:  # not a captioned sample (COCO ships unannotated images beside them)
            continue
        extra = {"image_id": image["id"]}
        extra.update({k: image[k] for k in ("coco_url", "flickr_url", "license") if k in image})
        rows.append(make_row(len(rows), image["file_name"], caps[0], captions=caps, extra=extra))
    if not rows:
        raise TableError(f"{path}: no image has a caption")
    return Dataset(rows, table_dir(path))


def read_coco(path: str, opts: ReadOptions) -> Dataset:
    return coco_dataset(path)


def read_flickr(path: str, opts: ReadOptions) -> Dataset:
    """``name#N<TAB>caption`` lines -> one row per image, captions in N order."""
    grouped: dict[str, dict[int, str]] = {}
    try:
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                match = _FLICKR_LINE.match(line)
                if match is None:
                    raise TableError(f"{path} line {line_no}: expected 'image.jpg#N<TAB>caption'")
                grouped.setdefault(match["name"], {})[int(match["n"])] = match["caption"]
    except OSError as e:
        raise TableError(f"cannot read {path}: {e}") from e
    rows = [
        make_row(i, name, caps[min(caps)], captions=[caps[n] for n in sorted(caps)])
        for i, (name, caps) in enumerate(grouped.items())
    ]
    if not rows:
        raise TableError(f"{path}: no captions")
    return Dataset(rows, table_dir(path))


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in INPUT_IMAGE_EXTS if "." in name else False


def _images_under(folder: str) -> list[str]:
    """Relative paths of every image below ``folder``, sorted, hidden entries skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, folder)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if _is_image(f)]
    return sorted(found)


def class_label(folder_name: str) -> str:
    # "golden_retriever" reads as "golden retriever" in captions and zero-shot prompts.
    return folder_name.replace("_", " ").strip()


def read_folder(path: str, opts: ReadOptions) -> Dataset:
    if "://" in path or not os.path.isdir(path):
        raise TableError(f"--input-format folder needs a local folder, got {path}")
    if opts.caption_template is not None:
        return _class_folder(path, opts.caption_template)
    rows = []
    for i, rel in enumerate(_images_under(path)):
        sidecar = os.path.join(path, os.path.splitext(rel)[0] + ".txt")
        caption = ""
        if os.path.exists(sidecar):
            with open(sidecar, encoding="utf-8", errors="surrogateescape") as f:
                caption = f.read()
        rows.append(make_row(i, rel, caption))
    if not rows:
        raise TableError(f"{path}: no images ({', '.join(INPUT_IMAGE_EXTS)}) found")
    return Dataset(rows, os.path.abspath(path))


def _class_folder(path: str, template: str) -> Dataset:
    classes = sorted(
        d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and d[0] != "."
    )
    if not classes:
        raise TableError(f"{path}: --caption-template needs one sub-folder per class")
    rows: list[Row] = []
    for index, name in enumerate(classes):
        label = class_label(name)
        caption = fill_template(template, label)
        for rel in _images_under(os.path.join(path, name)):
            rows.append(make_row(len(rows), os.path.join(name, rel), caption, label=index))
    if not rows:
        raise TableError(f"{path}: no images in its class sub-folders")
    return Dataset(rows, os.path.abspath(path), [class_label(c) for c in classes])


def fill_template(template: str, label: str) -> str:
    """Accepts ``{label}``, ``{c}`` and ``{}``; raises TableError for anything else."""
    try:
        return template.format(label, label=label, c=label)
    except (KeyError, IndexError, ValueError) as e:
        raise TableError(f"bad --caption-template {template!r}: use {{label}} ({e})") from e


# --- tars and shards ------------------------------------------------------------------------


def is_shard_folder(path: str) -> bool:
    """A folder of tars (or with a manifest) rather than of loose images."""
    if os.path.exists(os.path.join(path, "manifest.json")):
        return True
    names = os.listdir(path)
    return any(n.endswith((".tar", ".tgz", ".tar.gz")) for n in names) and not any(
        _is_image(n) for n in names
    )


def tar_paths(path: str) -> list[str]:
    """A tar, a folder of tars (the manifest's when there is one), or a glob/brace pattern."""
    if "{" in path:
        import braceexpand

        return list(braceexpand.braceexpand(path))
    if "*" in path or "?" in path:
        if "://" in path:
            import fsspec

            fs, _ = fsspec.core.url_to_fs(path)
            protocol = path.split("://", 1)[0]
            return sorted(f"{protocol}://{p}" for p in fs.glob(path))
        return sorted(glob.glob(path))
    if "://" not in path and os.path.isdir(path):
        manifest = os.path.join(path, "manifest.json")
        if os.path.exists(manifest):
            with open(manifest, encoding="utf-8") as f:
                return [os.path.join(path, s["name"]) for s in json.load(f)["shards"]]
        return sorted(
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.endswith((".tar", ".tgz", ".tar.gz"))
        )
    return [path]


def split_member(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: ``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``)."""
    directory, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem), ext.lower()


@dataclass
class _TarSample:
    members: dict[str, tarfile.TarInfo]
    tar: tarfile.TarFile
    inline: dict[str, bytes]  # member name -> bytes, for compressed tars only

    def read(self, ext: str) -> bytes:
        member = self.members[ext]
        if member.name in self.inline:
            return self.inline[member.name]
        f = self.tar.extractfile(member)
        return f.read() if f is not None else b""


def _samples(tar_path: str) -> Iterator[tuple[str, _TarSample]]:
    import fsspec

    compressed = tar_path.lower().endswith((".gz", ".tgz", ".bz2", ".xz"))
    with fsspec.open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        inline: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            groups.setdefault(key, {})[ext] = member
            if compressed:  # stream order is all a compressed tar allows: read it now
                inline[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, members in groups.items():
            yield key, _TarSample(members, tar, inline)


def _meta(sample: _TarSample) -> dict[str, Any]:
    if "json" not in sample.members:
        return {}
    try:
        meta = json.loads(sample.read("json"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _tar_row(index: int, tar_path: str, key: str, sample: _TarSample) -> Row | None:
    image_ext = next((e for e in sample.members if e in INPUT_IMAGE_EXTS), None)
    if image_ext is None:
        return None
    member = sample.members[image_ext]
    meta = _meta(sample)
    caption = meta.get("caption", "")
    if "txt" in sample.members:
        caption = sample.read("txt").decode("utf-8", "surrogateescape")
    captions = meta.get("captions") if isinstance(meta.get("captions"), list) else None
    label = (
        sample.read("cls").decode("ascii", "replace").strip() if "cls" in sample.members else None
    )
    extra = {k: v for k, v in meta.items() if k not in REGENERATED}
    extra["original_key"] = key
    inline = sample.inline.get(member.name)
    return make_row(
        index,
        tar_path,
        caption,
        captions=captions,
        label=label,
        extra=extra,
        member=None if inline is not None else (member.offset_data, member.size),
        data=inline,
    )


def read_tars(path: str, opts: ReadOptions) -> Dataset:
    """One row per sample with an image member; captions from ``.txt`` (or json), ``.cls`` kept."""
    paths = tar_paths(path)
    if not paths:
        raise TableError(f"{path}: no tar files found")
    rows: list[Row] = []
    try:
        for tar_path in paths:
            for key, sample in _samples(tar_path):
                row = _tar_row(len(rows), tar_path, key, sample)
                if row is not None:
                    rows.append(row)
    except (OSError, tarfile.TarError) as e:
        raise TableError(f"cannot read tar {path}: {e}") from e
    if not rows:
        raise TableError(f"{path}: no sample with an image member ({', '.join(INPUT_IMAGE_EXTS)})")
    return Dataset(rows, "")


LOADERS: dict[str, Callable[[str, ReadOptions], Dataset]] = {
    "coco": read_coco,
    "flickr": read_flickr,
    "folder": read_folder,
    "tar": read_tars,
    "webdataset": read_tars,
}
