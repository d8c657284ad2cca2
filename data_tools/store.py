"""Whole-or-nothing writes to a local folder or any fsspec URL (s3://, gs://, memory://, ...).

Used by ``python -m data_tools.convert --output URL`` (through shards.py and packer.py) and
``python -m data_tools.merge_manifests URL``. The trainer, ``data_tools.inspect`` and a resuming
converter list and open an output while it is being written, so a name never refers to a
partial object. How each kind of filesystem gets there:

  - a local folder: ``NAME.tmp``, fsync, rename, fsync the folder (a POSIX rename is atomic);
  - S3 (s3fs): an object appears whole when its upload completes. Small objects are one PUT
    (``pipe_file``); a shard streams out through fsspec's transactional file
    (``autocommit=False``: a multipart upload) and appears at ``commit()``. A process killed
    before that leaves nothing visible; the multipart upload it left behind is aborted by
    ``clear_partials`` when the job resumes;
  - any other fsspec filesystem (gs, azure, sftp, hdfs, memory, ...): ``NAME.tmp``, then
    ``fs.mv`` (a rename on sftp/hdfs, a server-side copy on gs/azure, whose copy appears whole).
    Not every implementation honours ``autocommit=False`` (memory:// shows a file while it is
    written), so only stores whose transactional writes are tested here take the path above.

Credentials and endpoints come from the filesystem's own configuration, exactly as for the
trainer: ``AWS_PROFILE``/``AWS_ENDPOINT_URL`` or fsspec's ``FSSPEC_S3_ENDPOINT_URL`` and
``~/.config/fsspec/*.json`` (``{"s3": {"endpoint_url": ...}}``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

TMP_SUFFIX = ".tmp"
# Filesystems whose transactional uploads stay invisible until committed, checked against a
# server (tests/test_convert_s3.py); the others take the temporary-name route, slower but safe.
OBJECT_STORES = {"s3", "s3a"}


class StoreError(ValueError):
    """A location that cannot be used (unknown protocol, backend not installed)."""


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def join(base: str | Path, *names: str) -> str:
    """``base/name`` for a path or URL; a URL keeps its protocol and query-free form."""
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([str(base).rstrip("/"), *names])


def _fs(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    # fsspec caches filesystem instances: this is a parse and a dictionary look-up.
    try:
        return fsspec.core.url_to_fs(str(location))
    except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
        raise StoreError(f"{location}: {e}") from None
    except ValueError as e:  # "Protocol not known: ..."
        raise StoreError(f"{location}: {e}") from None


def filesystem(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, its path for ``location``); raises StoreError when it has no backend."""
    return _fs(location)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, tuple | list) else {proto}


def is_local(location: str | Path) -> bool:
    return isinstance(_fs(location)[0], LocalFileSystem)


def kind(location: str | Path) -> str:
    """``local``, ``object`` (uploads appear whole) or ``move`` (temp name, then rename)."""
    fs, _ = _fs(location)
    if isinstance(fs, LocalFileSystem):
        return "local"
    return "object" if _protocols(fs) & OBJECT_STORES else "move"


def isfile(location: str | Path) -> bool:
    fs, path = _fs(location)
    return fs.isfile(path)


def read_bytes(location: str | Path) -> bytes:
    fs, path = _fs(location)
    return fs.cat_file(path)


def read_if_exists(location: str | Path) -> bytes | None:
    """The object's bytes, or None where there is none: one GET, where exists() + read is two
    or three requests on S3."""
    try:
        return read_bytes(location)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def makedirs(location: str | Path) -> None:
    """A local folder (and its parents); object stores have no folders to make."""
    fs, path = _fs(location)
    if kind(location) != "object":
        fs.makedirs(path, exist_ok=True)


def listing(location: str | Path) -> dict[str, dict[str, Any]]:
    """Entries directly under a folder or prefix: name -> {"type": "file"|"directory", "size"}.

    One request per 1,000 names on S3, so a resume learns which shards exist, and their sizes,
    without a request per shard. Empty when the folder does not exist.
    """
    fs, path = _fs(location)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if name:
            out[name] = {"type": entry.get("type", "file"), "size": entry.get("size")}
    return out


def remove(locations: list[str], recursive: bool = False) -> None:
    for location in locations:
        fs, path = _fs(location)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)


class AtomicFile(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def fsync_dir(path: str | Path) -> None:
    # Makes a rename itself durable; not possible (or needed) on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalFile:
    def __init__(self, path: str, durable: bool) -> None:
        self.path, self.tmp, self.durable = path, path + TMP_SUFFIX, durable
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.flush()
        if self.durable:
            os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        if self.durable:
            fsync_dir(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class _UploadFile:
    """fsspec's transactional file: parts upload as they fill; the object appears at commit."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self._f = fs.open(path, "wb", autocommit=False)
        # fs.open files every uncommitted file under the filesystem's transaction; this one is
        # committed or discarded right here, so it must not stay referenced there.
        with contextlib.suppress(ValueError, AttributeError):
            fs.transaction.files.remove(self._f)

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.close()  # uploads the last part; still invisible
        self._f.commit()  # S3: CompleteMultipartUpload, the object appears whole

    def abort(self) -> None:
        try:
            self._f.discard()  # S3: AbortMultipartUpload
        finally:
            # Never let close() (also run by __del__) upload what was written so far.
            if isinstance(self._f, AbstractBufferedFile):
                self._f.closed = True
            else:
                self._f.close()


class _MoveFile:
    """Other filesystems: a temporary name that readers skip, renamed when complete."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path, self.tmp = fs, path, path + TMP_SUFFIX
        self._f = fs.open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.tmp)


def open_atomic(location: str | Path, durable: bool = True) -> AtomicFile:
    """A file that appears at ``location``, whole, on ``commit()``, and never on ``abort()``."""
    fs, path = _fs(location)
    how = kind(location)
    if how == "local":
        return _LocalFile(path, durable)
    return _UploadFile(fs, path) if how == "object" else _MoveFile(fs, path)


def write_bytes(location: str | Path, data: bytes, durable: bool = True) -> None:
    """Atomic write of a small object: tmp + [fsync] + rename locally, one PUT on S3."""
    if kind(location) == "object":
        fs, path = _fs(location)
        fs.pipe_file(path, data)  # one PUT (a multipart upload above 100 MB): appears whole
        return
    f = open_atomic(location, durable)
    try:
        f.write(data)
    except BaseException:
        f.abort()
        raise
    f.commit()


def clear_partials(location: str | Path) -> list[str]:
    """Remove what killed writers left under a folder or prefix; returns what it removed.

    Temporary names (local and rename-based filesystems) are deleted; on S3, multipart uploads
    begun under the prefix and never completed (invisible, but billed) are aborted.
    """
    fs, path = _fs(location)
    removed = [join(location, n) for n in listing(location) if n.endswith(TMP_SUFFIX)]
    remove(removed)
    if "s3" in _protocols(fs):
        bucket, _, prefix = path.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        for upload in _s3_uploads(fs, bucket, prefix):
            fs.call_s3(
                "abort_multipart_upload",
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )
            removed.append(f"{upload['Key']} (unfinished upload)")
    return removed


def _s3_uploads(fs: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    uploads, marker = [], {}
    while True:
        reply = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
        uploads += reply.get("Uploads", [])
        if not reply.get("IsTruncated"):
            return uploads
        marker = {
            "KeyMarker": reply["NextKeyMarker"],
            "UploadIdMarker": reply["NextUploadIdMarker"],
        }
